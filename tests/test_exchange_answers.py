"""What real deployments answer, through the whole gateway: status mapping, routing and
correlation headers, and Exchange's diagnostic ids in the request's log line.

The gateway is the real app with its real transport, asking a fake Exchange on loopback.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry

from gateway import __version__
from gateway.app import create_app
from gateway.config import Config
from gateway.exchange import replies
from gateway.exchange.client import EwsClient
from gateway.exchange.transport import ExchangeReply
from tests.loopback_exchange import Answer, FakeExchange, exchange

__all__ = ["exchange"]  # a fixture, imported to be found by pytest

FIXTURES = Path(__file__).parent / "fixtures"
SUCCESS = (FIXTURES / "disconnect_success.xml").read_bytes()
HTML = {"Content-Type": "text/html"}


@pytest.fixture
def gateway(exchange: FakeExchange) -> Iterator[FlaskClient]:
    """The gateway as `serve` builds it, asking the fake Exchange."""
    config = Config.from_env(
        {"EWS_URL": exchange.url, "GATEWAY_AUTH": "none", "EWS_TIMEOUT_SECONDS": "5"}
    )
    app = create_app(config, registry=CollectorRegistry())
    yield app.test_client()
    # Its pooled connections close before the fake Exchange does.
    app.extensions["gateway"].ews._transport.close()


# 7. Mapping


@pytest.mark.network
def test_440_login_timeout_is_upstream_authentication_failed(
    exchange: FakeExchange, gateway: FlaskClient
) -> None:
    exchange.answer = Answer(440, HTML, b"<html>Login Timeout</html>")
    response = gateway.delete("/calls/call-1")
    assert response.status_code == 502
    assert response.json is not None
    assert response.json["type"] == "urn:ews-gateway:problem:upstream-authentication-failed"
    assert "Retry-After" not in response.headers


@pytest.mark.network
def test_429_is_503_with_exchanges_retry_after(
    exchange: FakeExchange, gateway: FlaskClient
) -> None:
    exchange.answer = Answer(429, {**HTML, "Retry-After": "7"}, b"")
    response = gateway.post("/calls", json={"itemId": "item-1", "dialString": "100"})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    assert response.json is not None
    assert response.json["type"] == "urn:ews-gateway:problem:exchange-busy"


@pytest.mark.network
def test_429_without_retry_after_is_503_with_the_default_wait(
    exchange: FakeExchange, gateway: FlaskClient
) -> None:
    exchange.answer = Answer(429, HTML, b"")
    response = gateway.post("/calls", json={"itemId": "item-1", "dialString": "100"})
    assert (response.status_code, response.headers["Retry-After"]) == (503, "5")


@pytest.mark.network
def test_503_with_an_http_date_retry_after_passes_it_on_in_seconds(
    exchange: FakeExchange, gateway: FlaskClient
) -> None:
    later = datetime.now(UTC) + timedelta(seconds=30)
    exchange.answer = Answer(503, {**HTML, "Retry-After": format_datetime(later, usegmt=True)}, b"")
    response = gateway.post("/calls", json={"itemId": "item-1", "dialString": "100"})
    assert response.status_code == 503
    # Whole seconds from now to a date given to the second.
    assert 29 <= int(response.headers["Retry-After"]) <= 31


@pytest.mark.network
def test_a_balancers_504_stays_504(exchange: FakeExchange, gateway: FlaskClient) -> None:
    exchange.answer = Answer(504, HTML, b"<html>504 Gateway Time-out</html>")
    response = gateway.delete("/calls/call-1")
    assert response.status_code == 504
    assert response.json is not None
    assert response.json["type"] == "urn:ews-gateway:problem:upstream-timeout"


@pytest.mark.network
def test_a_transient_connection_failure_is_503_with_a_default_retry_after(
    exchange: FakeExchange, gateway: FlaskClient
) -> None:
    # Was 502 exchange-error: the contract lists it with Exchange's other transient codes.
    fault = (FIXTURES / "fault.xml").read_text(encoding="utf-8")
    body = fault.replace("{code}", "ErrorConnectionFailedTransientError")
    exchange.answer = Answer(500, {"Content-Type": "text/xml; charset=utf-8"}, body.encode())
    response = gateway.delete("/calls/call-1")
    assert (response.status_code, response.headers.get("Retry-After")) == (503, "5")
    assert response.json is not None
    assert response.json["type"] == "urn:ews-gateway:problem:exchange-unavailable"
    assert response.json["ewsResponseCode"] == "ErrorConnectionFailedTransientError"


def access_line(caplog: pytest.LogCaptureFixture) -> dict[str, object]:
    [record] = [r for r in caplog.records if r.name == "gateway.access"]
    return record.__dict__


@pytest.mark.network
def test_a_404_points_at_the_path_of_ews_url(
    exchange: FakeExchange, gateway: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    # Was "Exchange answered HTTP 404", read as an answer the gateway cannot read.
    exchange.answer = Answer(404, HTML, b"<html>404 - File or directory not found.</html>")
    caplog.set_level(logging.INFO, logger="gateway.access")
    response = gateway.post("/calls", json={"itemId": "item-1", "dialString": "100"})
    assert response.status_code == 502
    assert response.json is not None
    expected = "EWS_URL's path answered 404: EWS is usually at /EWS/Exchange.asmx"
    assert response.json["detail"] == expected
    line = access_line(caplog)
    assert (line["detail"], line["upstreamStatus"]) == (expected, 404)


@contextmanager
def gateway_with(exchange: FakeExchange, **environ: str) -> Iterator[FlaskClient]:
    """The gateway as `serve` builds it with these settings, asking the fake Exchange."""
    config = Config.from_env(
        {"EWS_URL": exchange.url, "GATEWAY_AUTH": "none", "EWS_TIMEOUT_SECONDS": "5", **environ}
    )
    app = create_app(config, registry=CollectorRegistry())
    try:
        yield app.test_client()
    finally:
        app.extensions["gateway"].ews._transport.close()


BASIC = {"EWS_AUTH": "basic", "EWS_USERNAME": "svc-gateway", "EWS_PASSWORD": "Basic-Password-1"}
BEARER = {"EWS_AUTH": "bearer", "EWS_BEARER_TOKEN": "eyJ0eXAiOiJKV1QifQ.e30.c2lnbmF0dXJl"}
# IIS with Windows authentication only, its challenges as a single field.
NEGOTIATE_AND_NTLM = {**HTML, "WWW-Authenticate": "Negotiate, NTLM"}


@pytest.mark.network
@pytest.mark.parametrize(
    ("environ", "challenge", "detail"),
    [
        (
            {},
            "Negotiate, NTLM",
            "Upstream authentication failed: Exchange offers Negotiate, NTLM, and EWS_AUTH=none "
            "sends no credentials; set EWS_AUTH=ntlm or negotiate",
        ),
        (
            BASIC,
            "Negotiate, NTLM",
            "Upstream authentication failed: Exchange offers Negotiate, NTLM, and EWS_AUTH=basic "
            "speaks Basic; set EWS_AUTH=ntlm or negotiate",
        ),
        (
            BEARER,
            "NTLM",
            "Upstream authentication failed: Exchange offers NTLM, and EWS_AUTH=bearer speaks "
            "Bearer; set EWS_AUTH=ntlm",
        ),
        (
            {},
            'Basic realm="mail.example.com"',
            "Upstream authentication failed: Exchange offers Basic, and EWS_AUTH=none sends no "
            "credentials; set EWS_AUTH=basic",
        ),
    ],
    ids=["none-vs-windows", "basic-vs-windows", "bearer-vs-ntlm", "none-vs-basic"],
)
def test_a_401_offering_other_schemes_names_them_and_the_ews_auth_to_set(
    exchange: FakeExchange,
    caplog: pytest.LogCaptureFixture,
    environ: dict[str, str],
    challenge: str,
    detail: str,
) -> None:
    # Was "Exchange refused the gateway's credentials", though none had been offered.
    exchange.answer = Answer(401, {**HTML, "WWW-Authenticate": challenge}, b"")
    caplog.set_level(logging.INFO, logger="gateway.access")
    with gateway_with(exchange, **environ) as gateway:
        response = gateway.post("/calls", json={"itemId": "item-1", "dialString": "100"})
    assert response.status_code == 502
    assert response.json is not None
    assert response.json["type"] == "urn:ews-gateway:problem:upstream-authentication-failed"
    assert response.json["detail"] == detail
    line = access_line(caplog)
    assert (line["detail"], line["upstreamStatus"]) == (detail, 401)


@pytest.mark.network
def test_basic_credentials_exchange_never_looked_at_are_not_held_back(
    exchange: FakeExchange,
) -> None:
    # No Basic logon failed, so none counts toward a lockout: the next call asks again.
    exchange.answer = Answer(401, NEGOTIATE_AND_NTLM, b"")
    with gateway_with(exchange, **BASIC) as gateway:
        answers = [gateway.delete("/calls/call-1") for _ in range(2)]
    assert [answer.status_code for answer in answers] == [502, 502]
    assert answers[0].json == {**answers[1].json, "requestId": answers[0].json["requestId"]}
    assert len(exchange.received) == 2


@pytest.mark.network
def test_basic_credentials_exchange_refused_are_named_refused(exchange: FakeExchange) -> None:
    exchange.answer = Answer(401, {**HTML, "WWW-Authenticate": 'Basic realm="mail"'}, b"")
    with gateway_with(exchange, **BASIC) as gateway:
        response = gateway.delete("/calls/call-1")
    assert response.json is not None
    assert response.json["detail"] == (
        "Upstream authentication failed: Exchange refused the gateway's credentials (HTTP 401)"
    )


@pytest.mark.network
def test_the_schemes_exchange_offers_are_named_without_their_token_bytes(
    exchange: FakeExchange, caplog: pytest.LogCaptureFixture
) -> None:
    negotiate = "oYGaMIGXoAMKAQGiAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    ntlm = "TlRMTVNTUAACAAAADAAMADgAAAAFgomiAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    exchange.answer = Answer(
        401, {**HTML, "WWW-Authenticate": f"Negotiate {negotiate}, NTLM {ntlm}"}, b""
    )
    with caplog.at_level(logging.DEBUG), gateway_with(exchange) as gateway:
        response = gateway.delete("/calls/call-1")
    assert response.json is not None
    assert response.json["detail"].endswith("set EWS_AUTH=ntlm or negotiate")
    for text in (response.get_data(as_text=True), caplog.text, str(access_line(caplog))):
        assert negotiate not in text
        assert ntlm not in text


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120),
        (" 0 ", 0),
        ("Sun, 29 Nov 2026 10:00:30 GMT", 30),
        ("Sunday, 29-Nov-26 10:01:00 GMT", 60),  # RFC 850, which RFC 9110 still accepts
        ("Sun Nov 29 10:00:05 2026", 5),  # asctime
        ("Sun, 29 Nov 2026 09:00:00 GMT", 0),  # in the past: at once
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        (None, None),
    ],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(
    header: str | None, seconds: int | None
) -> None:
    now = datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC)
    assert replies.retry_after_seconds(header, now) == seconds


# 4. Routing and correlation headers


class RecordingTransport:
    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []

    def post(
        self,
        body: bytes,
        headers: dict[str, str],
        *,
        deadline: float | None = None,
        idempotent: bool = False,
    ) -> ExchangeReply:
        self.headers.append(dict(headers))
        return ExchangeReply(200, "text/xml; charset=utf-8", None, None, SUCCESS)


def sent_headers(
    anchor_mailbox: str | None, mailbox: str | None, impersonation_id: str = "smtp"
) -> dict[str, str]:
    transport = RecordingTransport()
    client = EwsClient(
        transport,
        server_version="Exchange2013",
        anchor_mailbox=anchor_mailbox,
        impersonation_id=impersonation_id,
    )
    client.disconnect_call("call-1", request_id="req-1", mailbox=mailbox)
    return transport.headers[0]


def test_an_impersonated_call_is_anchored_on_the_impersonated_mailbox() -> None:
    headers = sent_headers(anchor_mailbox="svc@example.com", mailbox="alice@example.com")
    assert headers["X-AnchorMailbox"] == "alice@example.com"


def test_a_call_impersonating_by_upn_is_anchored_on_the_upn() -> None:
    headers = sent_headers("svc@example.com", "alice@corp.example.com", impersonation_id="upn")
    assert headers["X-AnchorMailbox"] == "alice@corp.example.com"


@pytest.mark.parametrize("anchor_mailbox", ["svc@example.com", None])
def test_a_call_impersonating_by_sid_is_anchored_only_on_the_configured_mailbox(
    anchor_mailbox: str | None,
) -> None:
    # X-AnchorMailbox takes an SMTP address or a UPN, never an SID.
    headers = sent_headers(anchor_mailbox, "S-1-5-21-1-2-3-1104", impersonation_id="sid")
    assert headers.get("X-AnchorMailbox") == anchor_mailbox


def test_a_call_impersonating_nobody_is_anchored_on_the_configured_mailbox() -> None:
    assert sent_headers("svc@example.com", None)["X-AnchorMailbox"] == "svc@example.com"


@pytest.mark.parametrize("mailbox", ["łukasz@example.com", "jürgen@example.com"])
def test_a_mailbox_no_header_can_carry_as_ascii_is_impersonated_without_an_anchor(
    mailbox: str,
) -> None:
    # Exchange 2013/2016 addresses are ASCII; the call still goes, routed by the account.
    assert "X-AnchorMailbox" not in sent_headers("svc@example.com", mailbox)


def test_without_impersonation_or_a_configured_anchor_no_anchor_is_sent() -> None:
    assert "X-AnchorMailbox" not in sent_headers(None, None)


def test_every_call_carries_a_fresh_client_request_id() -> None:
    first, second = sent_headers(None, None), sent_headers(None, None)
    guid = uuid.UUID(first["client-request-id"])
    assert (guid.version, guid.variant, str(guid)) == (4, uuid.RFC_4122, first["client-request-id"])
    assert first["client-request-id"] != second["client-request-id"]


@pytest.mark.network
def test_the_wire_carries_the_client_request_id_and_asks_for_it_back(
    exchange: FakeExchange, gateway: FlaskClient
) -> None:
    exchange.answer = Answer(body=SUCCESS)
    gateway.delete("/calls/call-1")
    headers = exchange.received[0].headers
    assert uuid.UUID(headers["client-request-id"]).version == 4
    assert headers["return-client-request-id"] == "true"


@pytest.mark.network
def test_the_user_agent_names_the_gateway_and_its_version(
    exchange: FakeExchange, gateway: FlaskClient
) -> None:
    exchange.answer = Answer(body=SUCCESS)
    gateway.delete("/calls/call-1")
    assert exchange.received[0].headers["User-Agent"] == f"ews-call-gateway/{__version__}"


@pytest.mark.network
def test_exchanges_diagnostic_ids_and_the_client_request_id_join_the_request_log_line(
    exchange: FakeExchange, gateway: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    exchange.answer = Answer(
        body=SUCCESS,
        headers={
            "Content-Type": "text/xml; charset=utf-8",
            "request-id": "6f3a1e0c-1a2b-4c5d-8e9f-0a1b2c3d4e5f",
            "X-FEServer": "CAS01",
            "X-BEServer": "MBX02",
            "X-CalculatedBETarget": "mbx02.corp.example.com",
            "X-DiagInfo": "MBX02",
        },
    )
    caplog.set_level(logging.INFO, logger="gateway.access")
    response = gateway.delete("/calls/call-1", headers={"X-Request-ID": "req-42"})
    assert response.status_code == 200
    [record] = [r for r in caplog.records if r.name == "gateway.access"]
    fields = record.__dict__
    assert fields["requestId"] == "req-42"
    assert fields["clientRequestId"] == exchange.received[0].headers["client-request-id"]
    assert (
        fields["exchangeRequestId"],
        fields["exchangeFrontEnd"],
        fields["exchangeBackEnd"],
        fields["exchangeBackEndTarget"],
        fields["exchangeDiagInfo"],
    ) == (
        "6f3a1e0c-1a2b-4c5d-8e9f-0a1b2c3d4e5f",
        "CAS01",
        "MBX02",
        "mbx02.corp.example.com",
        "MBX02",
    )


@pytest.mark.network
def test_a_failed_call_still_logs_exchanges_diagnostic_ids(
    exchange: FakeExchange, gateway: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    exchange.answer = Answer(503, {**HTML, "X-FEServer": "CAS01"}, b"")
    caplog.set_level(logging.INFO, logger="gateway.access")
    assert gateway.delete("/calls/call-1").status_code == 503
    [record] = [r for r in caplog.records if r.name == "gateway.access"]
    assert record.__dict__["exchangeFrontEnd"] == "CAS01"
