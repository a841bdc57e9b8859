"""`ews-gateway check`: the way to Exchange, tried once, one step at a time.

With the configuration `serve` uses, the check resolves EWS_URL's host (or the
proxy's), connects, opens the proxy's tunnel, completes TLS, asks once without
credentials to see which schemes Exchange offers (WWW-Authenticate), then asks
with them: GetPhoneCallInformation for a call that cannot exist, whose answer
ErrorInvalidPhoneCallId proves the path, EWS_SERVER_VERSION and the account.

Each step ends in one StepResult: what passed, or one sentence naming the
variable to change; the first failure ends the check. The gateway's own
transport, authentication and EWS client do the work (the transport's
ConnectTrace reports the steps of opening a connection), so what passes here
passes in `serve`, and each request is bounded by EWS_TIMEOUT_SECONDS as
serve's are. The sentences are the gateway's own words: hosts, ports, schemes,
statuses and EWS response codes, never a credential and never Exchange's text.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from gateway import wire
from gateway.errors import (
    ExchangeAuthFailed,
    ExchangeBadAnswer,
    ExchangeTimeout,
    ExchangeUnreachable,
    GatewayError,
)
from gateway.exchange.auth import MODE_SCHEMES, schemes_in
from gateway.exchange.client import PhoneCalls, Transport
from gateway.exchange.proxy import Proxy
from gateway.exchange.transport import (
    ConnectStep,
    ConnectTrace,
    ExchangeReply,
    ExchangeTransport,
    tls_reason,
)

# An EWS id no call ever has: Exchange answers ErrorInvalidPhoneCallId, and nothing is dialled.
NO_SUCH_CALL = "ews-gateway-check-no-such-call"
REQUEST_ID = "ews-gateway-check"
PATH_NOT_FOUND = "EWS_URL's path answered 404: EWS is usually at /EWS/Exchange.asmx"
UNTRUSTED_CA = (
    "TLS: Exchange's certificate is not signed by a CA the gateway trusts; set EWS_CA_BUNDLE"
)
# What an HTTP status says when it answers where EWS should.
_UNAVAILABLE = "Exchange, or a balancer in front of it, is unavailable"
STATUS_SENTENCES = {
    404: PATH_NOT_FOUND,
    440: "EWS_URL answered 440: a forms login stands in front of EWS; point EWS_URL at EWS",
    502: f"EWS_URL answered HTTP 502: {_UNAVAILABLE}",
    503: f"EWS_URL answered HTTP 503: {_UNAVAILABLE}",
    504: f"EWS_URL answered HTTP 504: {_UNAVAILABLE}",
}
# The EWS_AUTH modes a check suggests for the schemes Exchange offers (kerberos is negotiate
# without its NTLM fallback: suggested as negotiate), in EWS_AUTH's own order.
SUGGESTED_MODES = ("basic", "ntlm", "negotiate", "bearer")
# OpenSSL's certificate verification codes (X509_V_ERR_*) the check explains.
UNKNOWN_CA_CODES = frozenset({2, 18, 19, 20, 21})
NAME_MISMATCH_CODES = frozenset({62, 64})
EXPIRED_CODES = frozenset({9, 10})
# OpenSSL's reasons for a handshake with a peer that does not speak TLS, or no common version.
NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"})
VERSION_REASONS = frozenset(
    {
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "UNSUPPORTED_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "VERSION_TOO_LOW",
        "TLSV1_ALERT_INSUFFICIENT_SECURITY",
    }
)


class CheckStep(StrEnum):
    """The check's steps, in their order; the first four are the transport's own."""

    RESOLVE = ConnectStep.RESOLVE.value
    CONNECT = ConnectStep.CONNECT.value
    TUNNEL = ConnectStep.TUNNEL.value
    TLS = ConnectStep.TLS.value
    SCHEMES = "schemes"
    AUTH = "auth"
    EWS = "ews"


@dataclass(frozen=True)
class StepResult:
    """How one step ended: passed, and one sentence saying what was seen or what to change."""

    step: CheckStep
    passed: bool
    sentence: str


Report = Callable[[StepResult], None]


@dataclass(frozen=True)
class CheckTarget:
    """What the sentences speak of: where Exchange is and how the gateway signs in."""

    url: str
    auth_mode: str
    server_version: str
    timeout_s: float
    verify_tls: bool = True
    proxy: Proxy | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def plain_http(self) -> bool:
        return urlsplit(self.url).scheme == "http"

    @property
    def within(self) -> str:
        return f"within EWS_TIMEOUT_SECONDS ({self.timeout_s:g} s)"


class TransportFor(Protocol):
    """Builds the transport serve would build: with the gateway's credentials, or without."""

    def __call__(self, *, authenticated: bool, trace: ConnectTrace | None) -> ExchangeTransport:
        """Return a new transport to EWS_URL."""


ClientFor = Callable[[Transport], PhoneCalls]


class ExchangeCheck:
    """Try the way to Exchange step by step, as `serve` would go it."""

    def __init__(
        self, target: CheckTarget, *, transport_for: TransportFor, client_for: ClientFor
    ) -> None:
        self._target = target
        self._transport_for = transport_for
        self._recorded = _Recorded()
        self._client = client_for(self._recorded)

    def run(self, report: Report) -> bool:
        """Run the steps until one fails, reporting each as it ends; return whether all passed."""
        target = self._target
        trace = _ConnectLines(target, report)
        unauthenticated = self._ask(authenticated=False, trace=trace)
        if trace.stopped or not _passed(report, _offered_schemes(target, unauthenticated)):
            return False
        asked = unauthenticated
        if target.auth_mode != "none":
            asked = self._ask(authenticated=True, trace=None)
        return _passed(report, _authenticated(target, asked)) and _passed(
            report, _ews_answered(target, asked)
        )

    def _ask(self, *, authenticated: bool, trace: ConnectTrace | None) -> _Asked:
        """Ask GetPhoneCallInformation for a call that cannot exist on a new transport."""
        transport = self._transport_for(authenticated=authenticated, trace=trace)
        self._recorded.use(transport)
        try:
            self._client.get_call_information(NO_SUCH_CALL, request_id=REQUEST_ID)
        except GatewayError as error:
            return _Asked(self._recorded.reply, error)
        finally:
            transport.close()
        return _Asked(self._recorded.reply, None)


@dataclass(frozen=True)
class _Asked:
    """Exchange's HTTP answer to one request, if one came, and the error it was read as."""

    reply: ExchangeReply | None
    error: GatewayError | None


class _Recorded:
    """The transport the EWS client sends through, keeping the last answer for the check."""

    def __init__(self) -> None:
        self._transport: ExchangeTransport | None = None
        self.reply: ExchangeReply | None = None

    def use(self, transport: ExchangeTransport) -> None:
        self._transport = transport
        self.reply = None

    def post(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        deadline: float | None = None,
        idempotent: bool = False,
    ) -> ExchangeReply:
        assert self._transport is not None
        self.reply = self._transport.post(body, headers, deadline=deadline, idempotent=idempotent)
        return self.reply


class _ConnectLines:
    """ConnectTrace that reports each step of opening the first connection as it ends."""

    def __init__(self, target: CheckTarget, report: Report) -> None:
        self._target = target
        self._report = report
        self._seen: set[ConnectStep] = set()
        self.stopped = False

    def passed(self, step: ConnectStep, result: object) -> None:
        if step not in self._seen:
            self._seen.add(step)
            self._report(
                StepResult(CheckStep(step), True, _connect_passed(self._target, step, result))
            )

    def failed(self, step: ConnectStep, error: BaseException) -> None:
        if step not in self._seen:
            self._seen.add(step)
            self.stopped = True
            self._report(
                StepResult(CheckStep(step), False, _connect_failed(self._target, step, error))
            )


def _connect_passed(target: CheckTarget, step: ConnectStep, result: object) -> str:
    proxy = target.proxy
    if step is ConnectStep.RESOLVE:
        count = len(result) if isinstance(result, list) else 0
        host = f"the proxy's host {proxy.host}" if proxy else target.host
        return f"{host} resolves ({count} address{'es' if count != 1 else ''})"
    if step is ConnectStep.CONNECT:
        peer = _peer(result)
        return f"connected to the proxy at {peer}" if proxy else f"connected to {peer}"
    if step is ConnectStep.TUNNEL:
        return f"the proxy opened a tunnel to {target.host}:{target.port}"
    version = result.version() if isinstance(result, ssl.SSLSocket) else None
    if not target.verify_tls:
        return f"{version}; Exchange's certificate is not checked (EWS_VERIFY_TLS=false)"
    return f"{version}; Exchange's certificate is trusted and names {target.host}"


def _connect_failed(target: CheckTarget, step: ConnectStep, error: BaseException) -> str:
    if step is ConnectStep.RESOLVE:
        return _resolve_failed(target, error)
    if step is ConnectStep.CONNECT:
        return _connect_refused(target, error)
    if step is ConnectStep.TUNNEL:
        return _tunnel_failed(target, error)
    return _tls_failed(target, error)


def _resolve_failed(target: CheckTarget, error: BaseException) -> str:
    proxy = target.proxy
    whose = f"The proxy's host in {proxy.variable}" if proxy else "EWS_URL's host"
    if isinstance(error, socket.gaierror):
        return f"{whose} does not resolve"
    if isinstance(error, TimeoutError):
        return f"{whose} did not resolve {target.within}"
    return f"{whose} could not be resolved ({type(error).__name__})"


def _connect_refused(target: CheckTarget, error: BaseException) -> str:
    proxy = target.proxy
    if proxy is not None:
        where, change = f"the proxy {proxy.address}", proxy.variable
    else:
        where, change = f"{target.host}:{target.port}", "the host and port in EWS_URL"
    if isinstance(error, ConnectionRefusedError):
        return f"Nothing listens at {where} (connection refused); check {change}"
    if isinstance(error, TimeoutError):
        return f"{where} did not accept a connection {target.within}; check {change} and firewalls"
    reason = (error.strerror if isinstance(error, OSError) else None) or type(error).__name__
    return f"Cannot connect to {where} ({reason}); check {change}"


def _tunnel_failed(target: CheckTarget, error: BaseException) -> str:
    proxy = target.proxy
    variable = proxy.variable if proxy else "HTTPS_PROXY"
    if isinstance(error, GatewayError):
        return f"{error.detail}; check {variable} and NO_PROXY"
    if isinstance(error, TimeoutError):
        return f"The proxy did not open a tunnel to Exchange {target.within}; check {variable}"
    return (
        f"The proxy closed the connection when asked for a tunnel to Exchange "
        f"({type(error).__name__}); check {variable}"
    )


def _tls_failed(target: CheckTarget, error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return _certificate_refused(target, error)
    if isinstance(error, TimeoutError):
        return f"TLS: Exchange did not complete the handshake {target.within}"
    if isinstance(error, ssl.SSLEOFError) or not isinstance(error, ssl.SSLError):
        return "TLS: Exchange closed the connection during the handshake"
    reason = getattr(error, "reason", None)
    if reason in NOT_TLS_REASONS:
        return (
            "TLS: EWS_URL's port does not speak TLS; if it serves plain HTTP, start EWS_URL "
            "with http://"
        )
    if reason in VERSION_REASONS:
        return (
            "TLS: Exchange offers no TLS version the gateway accepts (TLS 1.2 or later); "
            "enable TLS 1.2 on Exchange"
        )
    return f"TLS: the handshake with Exchange failed ({tls_reason(error)})"


def _certificate_refused(target: CheckTarget, error: ssl.SSLCertVerificationError) -> str:
    code = error.verify_code
    if code in UNKNOWN_CA_CODES:
        return UNTRUSTED_CA
    if code in NAME_MISMATCH_CODES:
        return (
            f"TLS: Exchange's certificate does not name {target.host}; set EWS_URL's host to a "
            "name the certificate holds"
        )
    if code in EXPIRED_CODES:
        return f"TLS: Exchange's certificate is out of its validity period ({error.verify_message})"
    return f"TLS: Exchange's certificate was refused ({error.verify_message})"


def _offered_schemes(target: CheckTarget, asked: _Asked) -> StepResult:
    """Read the answer to a request without credentials: the schemes Exchange offers."""
    reply = asked.reply
    if reply is None:
        return StepResult(CheckStep.SCHEMES, False, _unanswered(target, asked.error))
    if reply.status != 401:
        problem = _status_problem(target, reply, authenticated=False)
        if problem is not None:
            return StepResult(CheckStep.SCHEMES, False, problem)
        needed = "EWS_AUTH=none fits" if target.auth_mode == "none" else "none is needed"
        return StepResult(CheckStep.SCHEMES, True, f"Exchange asks for no credentials; {needed}")
    return _scheme_fits(target, reply.www_authenticate)


def _scheme_fits(target: CheckTarget, www_authenticate: str | None) -> StepResult:
    """Say whether EWS_AUTH speaks a scheme Exchange offers, and which ones would."""
    offered = schemes_in(www_authenticate)
    listed = ", ".join(offered)
    modes = [mode for mode in SUGGESTED_MODES if MODE_SCHEMES[mode] in offered]
    if MODE_SCHEMES.get(target.auth_mode) in offered:
        sentence = f"Exchange offers {listed}; EWS_AUTH={target.auth_mode} fits"
        return StepResult(CheckStep.SCHEMES, True, sentence)
    if not modes:
        sentence = (
            f"Exchange offers only {listed}; the gateway speaks Basic, NTLM, Negotiate and Bearer"
            if offered
            else "Exchange answered 401 offering no scheme the gateway speaks "
            "(Basic, NTLM, Negotiate, Bearer)"
        )
        return StepResult(CheckStep.SCHEMES, False, sentence)
    suggestion = ", ".join(modes[:-1]) + " or " + modes[-1] if len(modes) > 1 else modes[0]
    asks = "asks for credentials and offers" if target.auth_mode == "none" else "offers"
    sentence = f"Exchange {asks} {listed}; set EWS_AUTH={suggestion}"
    return StepResult(CheckStep.SCHEMES, False, sentence)


def _authenticated(target: CheckTarget, asked: _Asked) -> StepResult:
    """Read the answer to the request with the gateway's credentials: accepted or refused."""
    reply, error = asked.reply, asked.error
    if target.auth_mode == "none":
        return StepResult(CheckStep.AUTH, True, "EWS_AUTH=none, and Exchange asks for none")
    account = (
        "the token in EWS_BEARER_TOKEN"
        if target.auth_mode == "bearer"
        else "the account in EWS_USERNAME"
    )
    if reply is None:
        return StepResult(CheckStep.AUTH, False, _unanswered(target, error))
    if reply.status == 401:
        return StepResult(CheckStep.AUTH, False, f"Exchange refused {account}")
    problem = _status_problem(target, reply, authenticated=True)
    if problem is not None:
        return StepResult(CheckStep.AUTH, False, problem)
    return StepResult(CheckStep.AUTH, True, f"Exchange accepted {account}")


def _ews_answered(target: CheckTarget, asked: _Asked) -> StepResult:
    """Read the EWS answer: ErrorInvalidPhoneCallId proves path, version and account."""
    error = asked.error
    operation = wire.GET_PHONE_CALL_INFORMATION
    if error is None or error.ews_code == wire.ERROR_INVALID_PHONE_CALL_ID:
        code = wire.NO_ERROR if error is None else error.ews_code
        return StepResult(
            CheckStep.EWS,
            True,
            f"{operation} answered {code} for a call that cannot exist: path, "
            "EWS_SERVER_VERSION and account work",
        )
    code = error.ews_code
    if code is None:
        return StepResult(CheckStep.EWS, False, _not_ews(target, asked))
    return StepResult(CheckStep.EWS, False, _ews_code_sentence(target, code))


def _ews_code_sentence(target: CheckTarget, code: str) -> str:
    if code in ("ErrorInvalidServerVersion", "ErrorInvalidRequest", "ErrorSchemaValidation"):
        return (
            f"Exchange refused the request ({code}); set EWS_SERVER_VERSION to a version it "
            f"runs (now {target.server_version})"
        )
    if code == "ErrorAccessDenied":
        return f"Exchange denied the account in EWS_USERNAME access to EWS ({code})"
    if code in ("ErrorServerBusy", "ErrorExceededConnectionCount", "ErrorTooManyObjectsOpened"):
        return f"Exchange is busy ({code}); run the check again later"
    return f"Exchange answered {code} where {wire.ERROR_INVALID_PHONE_CALL_ID} was expected"


def _not_ews(target: CheckTarget, asked: _Asked) -> str:
    """Say what answered instead of EWS: an error page, or something that is not SOAP."""
    reply = asked.reply
    if reply is not None and reply.status == 500:
        return "Exchange answered HTTP 500 with an error page instead of a SOAP answer"
    if isinstance(asked.error, ExchangeBadAnswer):
        return (
            "EWS_URL answered with something that is not an EWS answer; "
            "EWS is usually at /EWS/Exchange.asmx"
        )
    assert asked.error is not None
    return asked.error.detail


def _status_problem(
    target: CheckTarget, reply: ExchangeReply, *, authenticated: bool
) -> str | None:
    """Say what an HTTP status other than EWS's own (200, or 500 with a fault) means."""
    status = reply.status
    if status in (200, 500):
        return None
    sentence = STATUS_SENTENCES.get(status)
    if 300 <= status < 400:
        to = f" to {_without_query(reply.location)}" if reply.location else ""
        sentence = (
            f"EWS_URL answered with a redirect (HTTP {status}){to}; set EWS_URL to where EWS "
            "answers itself"
        )
    elif status == 403 and target.plain_http:
        sentence = (
            "EWS_URL answered 403 Forbidden; if Exchange asks for TLS, start EWS_URL with https://"
        )
    elif status == 403 and authenticated:
        sentence = "Exchange answered 403 Forbidden: the account in EWS_USERNAME may not use EWS"
    return sentence or f"EWS_URL answered HTTP {status} where EWS was expected"


def _unanswered(target: CheckTarget, error: GatewayError | None) -> str:
    """Say why no HTTP answer came on a connection that opened."""
    if isinstance(error, ExchangeTimeout):
        return f"Exchange did not answer {target.within}"
    if isinstance(error, ExchangeAuthFailed):
        reason = error.detail.removeprefix("Upstream authentication failed: ")
        return f"Authenticating to Exchange failed: {reason}; check {_credentials(target)}"
    if target.proxy is not None and isinstance(error, ExchangeUnreachable):
        return f"{error.detail}; check {target.proxy.variable}"
    if target.plain_http and isinstance(error, ExchangeUnreachable | ExchangeBadAnswer):
        return "EWS_URL's port gave no HTTP answer; if it serves TLS, start EWS_URL with https://"
    return error.detail if error is not None else "Exchange gave no answer"


def _passed(report: Report, result: StepResult) -> bool:
    report(result)
    return result.passed


def _credentials(target: CheckTarget) -> str:
    """Name the variables that hold the gateway's credentials for its EWS_AUTH mode."""
    if target.auth_mode == "bearer":
        return "EWS_BEARER_TOKEN"
    if target.auth_mode in ("kerberos", "negotiate"):
        return "EWS_USERNAME, EWS_PASSWORD or EWS_KEYTAB, and EWS_SPN"
    return "EWS_USERNAME and EWS_PASSWORD"


def _peer(sock: object) -> str:
    """Return the address a socket is connected to, as host:port."""
    try:
        address = sock.getpeername() if isinstance(sock, socket.socket) else None
    except OSError:
        address = None
    if address is None:
        return "an unknown address"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _without_query(url: str) -> str:
    """Return a URL Exchange sent without its query and fragment (they may carry anything)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
