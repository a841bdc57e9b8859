"""`ews-gateway check`: each step's line, and the one sentence that says what to change.

Exchange is scripted here (the transport's answers and the steps of its connection); the
integration tests run the same check against the simulator, tinyproxy and real TLS.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway import wire
from gateway.errors import ExchangeTimeout, ExchangeUnreachable
from gateway.exchange.check import (
    NO_SUCH_CALL,
    CheckStep,
    CheckTarget,
    ExchangeCheck,
    StepResult,
)
from gateway.exchange.client import EwsClient, PhoneCalls, Transport
from gateway.exchange.connector import Address, Resolver
from gateway.exchange.proxy import parse_proxy_url
from gateway.exchange.transport import ConnectStep, ConnectTrace, ExchangeReply, ExchangeTransport

FIXTURES = Path(__file__).parent / "fixtures"
EWS_URL = "https://mail.example.com/EWS/Exchange.asmx"
SOAP = "text/xml; charset=utf-8"


def ews_error(code: str) -> ExchangeReply:
    body = (FIXTURES / "error_response.xml").read_text(encoding="utf-8")
    envelope = body.format(operation=wire.GET_PHONE_CALL_INFORMATION, message="", code=code)
    return ExchangeReply(200, SOAP, None, None, envelope.encode())


NO_SUCH_CALL_ANSWER = ews_error(wire.ERROR_INVALID_PHONE_CALL_ID)


def status(code: int, **fields: str) -> ExchangeReply:
    return ExchangeReply(
        code,
        "text/html",
        None,
        fields.get("location"),
        b"<html>not EWS</html>",
        www_authenticate=fields.get("www_authenticate"),
    )


def challenge(schemes: str) -> ExchangeReply:
    return status(401, www_authenticate=schemes)


@dataclass
class StepFailure:
    """The scripted connection fails at this step with this error."""

    step: ConnectStep
    error: BaseException


Answer = ExchangeReply | BaseException | StepFailure


@dataclass
class ScriptedExchange:
    """Stands in for the transport: reports its connection's steps, then answers in turn."""

    answers: list[Answer]
    tls: bool = True
    asked: list[dict[str, object]] = field(default_factory=list)
    closed: int = 0

    def transport_for(self, *, authenticated: bool, trace: ConnectTrace | None) -> Transport:
        return _ScriptedTransport(self, authenticated, trace)


class _ScriptedTransport:
    def __init__(
        self, exchange: ScriptedExchange, authenticated: bool, trace: ConnectTrace | None
    ) -> None:
        self._exchange = exchange
        self._authenticated = authenticated
        self._trace = trace

    def post(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        deadline: float | None = None,
        idempotent: bool = False,
    ) -> ExchangeReply:
        exchange = self._exchange
        exchange.asked.append({"authenticated": self._authenticated, "body": body})
        answer = exchange.answers.pop(0)
        steps = [ConnectStep.RESOLVE, ConnectStep.CONNECT] + ([ConnectStep.TLS] * exchange.tls)
        trace = self._trace
        for step in steps:
            if isinstance(answer, StepFailure) and answer.step is step:
                if trace is not None:
                    trace.failed(step, answer.error)
                raise ExchangeUnreachable("scripted", outcome=None)
            if trace is not None:
                trace.passed(step, [])
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, ExchangeReply)
        return answer

    def close(self) -> None:
        self._exchange.closed += 1


def client_for(transport: Transport) -> PhoneCalls:
    return EwsClient(transport, server_version="Exchange2010")


def run_check(
    *answers: Answer,
    auth_mode: str = "ntlm",
    url: str = EWS_URL,
    tls: bool = True,
    **target: object,
) -> tuple[bool, list[StepResult], ScriptedExchange]:
    exchange = ScriptedExchange(list(answers), tls=tls)
    check = ExchangeCheck(
        CheckTarget(url, auth_mode, "Exchange2010", 10.0, **target),  # type: ignore[arg-type]
        transport_for=exchange.transport_for,  # type: ignore[arg-type]
        client_for=client_for,
    )
    results: list[StepResult] = []
    passed = check.run(results.append)
    return passed, results, exchange


def lines(results: list[StepResult]) -> list[tuple[str, bool]]:
    return [(result.step.value, result.passed) for result in results]


def last(results: list[StepResult]) -> str:
    return results[-1].sentence


def test_every_step_passes_when_exchange_offers_the_scheme_and_answers_no_such_call() -> None:
    passed, results, exchange = run_check(challenge("Negotiate, NTLM"), NO_SUCH_CALL_ANSWER)

    assert passed
    assert lines(results) == [
        ("resolve", True),
        ("connect", True),
        ("tls", True),
        ("schemes", True),
        ("auth", True),
        ("ews", True),
    ]
    assert results[3].sentence == "Exchange offers Negotiate, NTLM; EWS_AUTH=ntlm fits"
    assert "ErrorInvalidPhoneCallId" in last(results)
    assert [ask["authenticated"] for ask in exchange.asked] == [False, True]
    assert NO_SUCH_CALL.encode() in exchange.asked[1]["body"]  # type: ignore[operator]
    assert exchange.closed == 2


def test_with_ews_auth_none_one_request_answers_every_step() -> None:
    passed, results, exchange = run_check(NO_SUCH_CALL_ANSWER, auth_mode="none")

    assert passed
    assert results[-3].sentence == "Exchange asks for no credentials; EWS_AUTH=none fits"
    assert len(exchange.asked) == 1


@pytest.mark.parametrize(
    ("auth_mode", "offered", "sentence"),
    [
        (
            "basic",
            "Negotiate, NTLM",
            "Exchange offers Negotiate, NTLM; set EWS_AUTH=ntlm or negotiate",
        ),
        ("ntlm", 'Basic realm="mail"', "Exchange offers Basic; set EWS_AUTH=basic"),
        (
            "none",
            'Negotiate, NTLM, Basic realm="mail"',
            "Exchange asks for credentials and offers Negotiate, NTLM, Basic; "
            "set EWS_AUTH=basic, ntlm or negotiate",
        ),
        (
            "bearer",
            "Digest realm=x",
            "Exchange offers only Digest; the gateway speaks Basic, NTLM, Negotiate and Bearer",
        ),
        (
            "ntlm",
            "FormsLogin",
            "Exchange answered 401 offering no scheme the gateway speaks "
            "(Basic, NTLM, Negotiate, Bearer)",
        ),
    ],
)
def test_a_scheme_exchange_does_not_offer_names_those_it_does(
    auth_mode: str, offered: str, sentence: str
) -> None:
    passed, results, exchange = run_check(challenge(offered), auth_mode=auth_mode)

    assert not passed
    assert lines(results)[-1] == ("schemes", False)
    assert last(results) == sentence
    assert len(exchange.asked) == 1  # the credentials were never sent


def test_kerberos_fits_an_exchange_that_offers_negotiate() -> None:
    passed, results, _ = run_check(
        challenge("Negotiate"), NO_SUCH_CALL_ANSWER, auth_mode="kerberos"
    )

    assert passed
    assert results[-3].sentence == "Exchange offers Negotiate; EWS_AUTH=kerberos fits"


@pytest.mark.parametrize(
    ("auth_mode", "sentence"),
    [
        ("ntlm", "Exchange refused the account in EWS_USERNAME"),
        ("basic", "Exchange refused the account in EWS_USERNAME"),
        ("bearer", "Exchange refused the token in EWS_BEARER_TOKEN"),
    ],
)
def test_refused_credentials_name_the_variable_that_holds_them(
    auth_mode: str, sentence: str
) -> None:
    scheme = {"ntlm": "NTLM", "basic": "Basic", "bearer": "Bearer"}[auth_mode]
    passed, results, _ = run_check(challenge(scheme), challenge(scheme), auth_mode=auth_mode)

    assert not passed
    assert lines(results)[-1] == ("auth", False)
    assert last(results) == sentence


@pytest.mark.parametrize("authenticated", [False, True], ids=["before", "after credentials"])
def test_a_wrong_path_says_where_ews_usually_is(authenticated: bool) -> None:
    answers = [challenge("NTLM"), status(404)] if authenticated else [status(404)]
    passed, results, _ = run_check(*answers)

    assert not passed
    assert lines(results)[-1] == ("auth" if authenticated else "schemes", False)
    assert last(results) == "EWS_URL's path answered 404: EWS is usually at /EWS/Exchange.asmx"


def test_a_redirect_names_where_it_leads_without_its_query() -> None:
    redirect = status(302, location="https://mail.example.com/owa/auth/errorfe.aspx?msg=secret")
    passed, results, _ = run_check(redirect)

    assert not passed
    assert last(results) == (
        "EWS_URL answered with a redirect (HTTP 302) to "
        "https://mail.example.com/owa/auth/errorfe.aspx; set EWS_URL to where EWS answers itself"
    )


def test_a_forbidden_plain_http_url_suggests_https() -> None:
    _, results, _ = run_check(
        status(403), url="http://mail.example.com/EWS/Exchange.asmx", tls=False
    )

    assert last(results) == (
        "EWS_URL answered 403 Forbidden; if Exchange asks for TLS, start EWS_URL with https://"
    )


@pytest.mark.parametrize(
    ("code", "sentence"),
    [
        (
            "ErrorInvalidServerVersion",
            "Exchange refused the request (ErrorInvalidServerVersion); set EWS_SERVER_VERSION to "
            "a version it runs (now Exchange2010)",
        ),
        (
            "ErrorAccessDenied",
            "Exchange denied the account in EWS_USERNAME access to EWS (ErrorAccessDenied)",
        ),
        ("ErrorServerBusy", "Exchange is busy (ErrorServerBusy); run the check again later"),
        (
            "ErrorMailboxStoreUnavailable",
            "Exchange answered ErrorMailboxStoreUnavailable where ErrorInvalidPhoneCallId was "
            "expected",
        ),
    ],
)
def test_an_ews_code_other_than_no_such_call_is_named(code: str, sentence: str) -> None:
    passed, results, _ = run_check(challenge("NTLM"), ews_error(code))

    assert not passed
    assert lines(results)[-1] == ("ews", False)
    assert last(results) == sentence


def test_a_page_that_is_not_ews_says_so() -> None:
    passed, results, _ = run_check(challenge("NTLM"), status(200))

    assert not passed
    assert last(results) == (
        "EWS_URL answered with something that is not an EWS answer; "
        "EWS is usually at /EWS/Exchange.asmx"
    )


def test_no_answer_within_the_timeout_names_the_variable() -> None:
    late = ExchangeTimeout("Exchange did not answer in time", outcome=None)
    _, results, _ = run_check(late)

    assert last(results) == "Exchange did not answer within EWS_TIMEOUT_SECONDS (10 s)"


def test_a_plain_http_url_to_a_port_that_closes_suggests_https() -> None:
    closed = ExchangeUnreachable("Exchange closed the connection before answering", outcome=None)
    _, results, _ = run_check(
        closed, url="http://mail.example.com:443/EWS/Exchange.asmx", tls=False
    )

    assert last(results) == (
        "EWS_URL's port gave no HTTP answer; if it serves TLS, start EWS_URL with https://"
    )


def verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code = code
    error.verify_message = message
    error.reason = "CERTIFICATE_VERIFY_FAILED"
    return error


def ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    error.reason = reason
    return error


@pytest.mark.parametrize(
    ("error", "sentence"),
    [
        (
            verify_error(20, "unable to get local issuer certificate"),
            "TLS: Exchange's certificate is not signed by a CA the gateway trusts; "
            "set EWS_CA_BUNDLE",
        ),
        (
            verify_error(18, "self-signed certificate"),
            "TLS: Exchange's certificate is not signed by a CA the gateway trusts; "
            "set EWS_CA_BUNDLE",
        ),
        (
            verify_error(62, "Hostname mismatch"),
            "TLS: Exchange's certificate does not name mail.example.com; set EWS_URL's host to "
            "a name the certificate holds",
        ),
        (
            verify_error(10, "certificate has expired"),
            "TLS: Exchange's certificate is out of its validity period (certificate has expired)",
        ),
        (
            ssl_error("TLSV1_ALERT_PROTOCOL_VERSION"),
            "TLS: Exchange offers no TLS version the gateway accepts (TLS 1.2 or later); "
            "enable TLS 1.2 on Exchange",
        ),
        (
            ssl_error("WRONG_VERSION_NUMBER"),
            "TLS: EWS_URL's port does not speak TLS; if it serves plain HTTP, start EWS_URL "
            "with http://",
        ),
        (
            ssl_error("SSLV3_ALERT_HANDSHAKE_FAILURE"),
            "TLS: the handshake with Exchange failed (sslv3 alert handshake failure)",
        ),
        (ConnectionResetError(), "TLS: Exchange closed the connection during the handshake"),
        (
            TimeoutError(),
            "TLS: Exchange did not complete the handshake within EWS_TIMEOUT_SECONDS (10 s)",
        ),
    ],
)
def test_a_failed_handshake_names_its_reason(error: BaseException, sentence: str) -> None:
    passed, results, _ = run_check(StepFailure(ConnectStep.TLS, error))

    assert not passed
    assert lines(results) == [("resolve", True), ("connect", True), ("tls", False)]
    assert last(results) == sentence


@pytest.mark.parametrize(
    ("step", "error", "sentence"),
    [
        (
            ConnectStep.CONNECT,
            ConnectionRefusedError(111, "Connection refused"),
            "Nothing listens at mail.example.com:443 (connection refused); check the host and "
            "port in EWS_URL",
        ),
        (
            ConnectStep.CONNECT,
            TimeoutError(),
            "mail.example.com:443 did not accept a connection within EWS_TIMEOUT_SECONDS (10 s); "
            "check the host and port in EWS_URL and firewalls",
        ),
        (
            ConnectStep.CONNECT,
            OSError(113, "No route to host"),
            "Cannot connect to mail.example.com:443 (No route to host); check the host and port "
            "in EWS_URL",
        ),
        (ConnectStep.RESOLVE, socket.gaierror(-2, "Name or service not known"), None),
    ],
)
def test_a_connection_that_fails_names_where_it_went(
    step: ConnectStep, error: BaseException, sentence: str | None
) -> None:
    _, results, _ = run_check(StepFailure(step, error))

    assert lines(results)[-1] == (step.value, False)
    assert last(results) == (sentence or "EWS_URL's host does not resolve")


def test_through_a_proxy_the_steps_name_the_proxy_and_its_variable() -> None:
    proxy = parse_proxy_url("http://user:pr0xy-secret@proxy.example.com:3128", "HTTPS_PROXY")
    refused = ConnectionRefusedError(111, "Connection refused")

    _, results, _ = run_check(StepFailure(ConnectStep.CONNECT, refused), proxy=proxy)

    assert last(results) == (
        "Nothing listens at the proxy proxy.example.com:3128 (connection refused); "
        "check HTTPS_PROXY"
    )
    assert not any("pr0xy-secret" in result.sentence for result in results)


def real_check(resolver: Resolver) -> list[StepResult]:
    """The check over the real transport, asking this resolver for Exchange's addresses."""

    def transport_for(*, authenticated: bool, trace: ConnectTrace | None) -> ExchangeTransport:
        return ExchangeTransport(EWS_URL, timeout_s=0.3, resolver=resolver, trace=trace)

    check = ExchangeCheck(
        CheckTarget(EWS_URL, "none", "Exchange2010", 0.3),
        transport_for=transport_for,
        client_for=client_for,
    )
    results: list[StepResult] = []
    assert not check.run(results.append)
    return results


def test_a_name_that_does_not_resolve_is_the_first_and_only_line() -> None:
    def no_such_name(host: str, port: int) -> list[Address]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    results = real_check(no_such_name)

    assert [(r.step, r.passed, r.sentence) for r in results] == [
        (CheckStep.RESOLVE, False, "EWS_URL's host does not resolve")
    ]


def test_a_resolver_that_hangs_is_bounded_by_the_timeout() -> None:
    def hanging(host: str, port: int) -> list[Address]:
        time.sleep(2)
        return []

    started = time.monotonic()
    results = real_check(hanging)

    assert time.monotonic() - started < 1.5
    assert last(results) == "EWS_URL's host did not resolve within EWS_TIMEOUT_SECONDS (0.3 s)"
