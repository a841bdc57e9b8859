"""The gateway against the simulator playing a real deployment: two mailbox servers behind
one front end, connections that networks end while idle, and gzip answers.
"""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import Config
from gateway.simulator import SimulatorServer, start_in_thread
from gateway.simulator.idle import IdlePolicy
from tests.identity import SigningKey, bearer, claims, close_upstream, jwt_environ, rsa_key

pytestmark = pytest.mark.network

# Mailboxes enough to land on both servers, whatever the assignment.
MAILBOXES = [f"user{number}@example.com" for number in range(8)]
SERVICE_ACCOUNT = "svc-ews@example.com"


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return rsa_key()


@pytest.fixture
def two_servers() -> Iterator[SimulatorServer]:
    with start_in_thread("127.0.0.1", 0, step_seconds=0.05, mailbox_servers=2) as server:
        yield server


def impersonating_gateway(simulator: SimulatorServer, signer: SigningKey) -> Iterator[FlaskClient]:
    environ = jwt_environ(
        EWS_URL=simulator.ews_url,
        GATEWAY_JWT_PUBLIC_KEY=signer.public_pem(),
        EWS_IMPERSONATION="token",
        EWS_AUTH="basic",
        EWS_USERNAME=SERVICE_ACCOUNT,
        EWS_PASSWORD="secret",
        EWS_TIMEOUT_SECONDS="5",
    )
    app = create_app(Config.from_env(environ), registry=CollectorRegistry())
    yield app.test_client()
    close_upstream(app)


@pytest.fixture
def gateway(two_servers: SimulatorServer, signer: SigningKey) -> Iterator[FlaskClient]:
    yield from impersonating_gateway(two_servers, signer)


def as_user(signer: SigningKey, mailbox: str) -> dict[str, str]:
    return bearer(signer.token(claims(email=mailbox, sub=mailbox)))


def recorded(simulator: SimulatorServer) -> list[dict[str, Any]]:
    with urllib.request.urlopen(simulator.url + "/simulator/requests", timeout=10) as answer:
        requests: list[dict[str, Any]] = json.load(answer)
    return requests


def place_read_and_hang_up(gateway: FlaskClient, signer: SigningKey, mailbox: str) -> list[int]:
    user = as_user(signer, mailbox)
    placed = gateway.post(
        "/calls", json={"itemId": "AAMkVoiceMail", "dialString": "+15551234567"}, headers=user
    )
    if placed.status_code != 201:
        return [placed.status_code]
    path = "/calls/" + quote(placed.get_json()["callId"], safe="")
    return [
        placed.status_code,
        gateway.get(path, headers=user).status_code,
        gateway.delete(path, headers=user).status_code,
        gateway.get(path, headers=user).status_code,
    ]


def test_the_mailboxes_used_here_live_on_both_servers(two_servers: SimulatorServer) -> None:
    deployment = two_servers.exchange.deployment
    assert deployment is not None
    assert {deployment.home_of(mailbox) for mailbox in MAILBOXES} == {"MBX01", "MBX02"}


def test_impersonated_calls_through_two_servers_all_succeed_and_none_is_asked_of_the_wrong_one(
    gateway: FlaskClient, signer: SigningKey, two_servers: SimulatorServer
) -> None:
    for mailbox in MAILBOXES:
        assert place_read_and_hang_up(gateway, signer, mailbox) == [201, 200, 200, 200], mailbox
    requests = recorded(two_servers)
    assert len(requests) == 4 * len(MAILBOXES)
    for request in requests:
        assert request["anchorMailbox"] == request["mailbox"]
        assert request["server"] == request["homeServer"], request["operation"]
    held = {(call["mailbox"], call["server"]) for call in _calls(two_servers)}
    deployment = two_servers.exchange.deployment
    assert deployment is not None
    assert held == {(mailbox, deployment.home_of(mailbox)) for mailbox in MAILBOXES}


@pytest.mark.parametrize(
    "alias", ["dana@example.com", "d.ortiz@example.org"], ids=["same domain", "other domain"]
)
def test_an_alias_anchors_the_call_on_its_mailboxs_server_as_the_primary_address_would(
    gateway: FlaskClient, signer: SigningKey, two_servers: SimulatorServer, alias: str
) -> None:
    # The front end finds the mailbox behind X-AnchorMailbox as Active Directory does.
    deployment = two_servers.exchange.deployment
    assert deployment is not None
    primary = "dana.ortiz@example.com"  # listed by the simulator with both aliases

    assert place_read_and_hang_up(gateway, signer, alias) == [201, 200, 200, 200]

    for request in recorded(two_servers):
        assert (request["anchorMailbox"], request["mailbox"]) == (alias, primary)
        assert request["server"] == request["homeServer"] == deployment.home_of(primary)


def _calls(simulator: SimulatorServer) -> list[dict[str, Any]]:
    with urllib.request.urlopen(simulator.url + "/simulator/calls", timeout=10) as answer:
        calls: list[dict[str, Any]] = json.load(answer)
    return calls


def test_without_an_anchor_a_call_on_another_server_than_the_accounts_is_not_found(
    two_servers: SimulatorServer,
) -> None:
    """What the gateway did before: the front end routes by the service account instead."""
    deployment = two_servers.exchange.deployment
    assert deployment is not None
    elsewhere = next(m for m in MAILBOXES if deployment.home_of(m) != deployment.home_of("svc"))
    envelope = (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" '
        'xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><soap:Header>'
        '<t:RequestServerVersion Version="Exchange2013"/><t:ExchangeImpersonation>'
        f"<t:ConnectingSID><t:PrimarySmtpAddress>{elsewhere}</t:PrimarySmtpAddress>"
        "</t:ConnectingSID></t:ExchangeImpersonation></soap:Header><soap:Body>{}</soap:Body>"
        "</soap:Envelope>"
    )
    play = '<m:PlayOnPhone><m:ItemId Id="AAMk"/><m:DialString>100</m:DialString></m:PlayOnPhone>'
    placed = _post(two_servers, envelope.format(play))
    call_id = placed.split('PhoneCallId Id="')[1].split('"')[0]
    read = f'<m:GetPhoneCallInformation><m:PhoneCallId Id="{call_id}"/></m:GetPhoneCallInformation>'
    assert "ErrorInvalidPhoneCallId" in _post(two_servers, envelope.format(read))
    assert "NoError" in _post(two_servers, envelope.format(read), anchor=elsewhere)


def _post(simulator: SimulatorServer, envelope: str, anchor: str | None = None) -> str:
    headers = {
        "Content-Type": "text/xml; charset=utf-8",
        "Authorization": "Basic c3ZjOng=",  # svc:x
        **({"X-AnchorMailbox": anchor} if anchor else {}),
    }
    request = urllib.request.Request(
        simulator.ews_url, data=envelope.encode(), headers=headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return str(answer.read().decode())


def test_exchanges_routing_diagnostics_reach_the_gateways_log_line(
    gateway: FlaskClient,
    signer: SigningKey,
    two_servers: SimulatorServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    mailbox = MAILBOXES[0]
    assert place_read_and_hang_up(gateway, signer, mailbox)[0] == 201
    deployment = two_servers.exchange.deployment
    assert deployment is not None
    home = deployment.home_of(mailbox)
    for record in (r for r in caplog.records if r.name == "gateway.access"):
        assert (record.__dict__["exchangeFrontEnd"], record.__dict__["exchangeBackEnd"]) == (
            "CAS01",
            home,
        )


# Idle connections ended by the network


@pytest.mark.parametrize("action", ["close", "reset"])
def test_connections_the_network_ended_while_idle_cost_no_failed_call(action: str) -> None:
    policy = IdlePolicy(after_s=0.2, action=action)
    with start_in_thread("127.0.0.1", 0, step_seconds=0.05, idle=policy) as simulator:
        environ = {"EWS_URL": simulator.ews_url, "GATEWAY_AUTH": "none", "EWS_TIMEOUT_SECONDS": "5"}
        app = create_app(Config.from_env(environ), registry=CollectorRegistry())
        client = app.test_client()
        try:
            statuses = []
            for _ in range(3):
                placed = client.post("/calls", json={"itemId": "AAMk", "dialString": "100"})
                statuses.append(placed.status_code)
                path = "/calls/" + quote(placed.get_json()["callId"], safe="")
                time.sleep(0.4)  # longer than the simulator keeps an idle connection
                statuses.append(client.get(path).status_code)
        finally:
            close_upstream(app)
    assert statuses == [201, 200] * 3


def test_a_silently_dropped_idle_connection_is_never_reused_within_the_idle_limit() -> None:
    """A NAT forgot the flow after 0.3 s; the gateway's idle limit (0.2 s) is shorter."""
    policy = IdlePolicy(after_s=0.3, action="drop")
    with start_in_thread("127.0.0.1", 0, step_seconds=0.05, idle=policy) as simulator:
        environ = {
            "EWS_URL": simulator.ews_url,
            "GATEWAY_AUTH": "none",
            "EWS_TIMEOUT_SECONDS": "2",
            "EWS_CONNECTION_IDLE_SECONDS": "0.25",
        }
        app = create_app(Config.from_env(environ), registry=CollectorRegistry())
        client = app.test_client()
        try:
            placed = client.post("/calls", json={"itemId": "AAMk", "dialString": "100"})
            path = "/calls/" + quote(placed.get_json()["callId"], safe="")
            time.sleep(0.5)
            assert client.get(path).status_code == 200
        finally:
            close_upstream(app)


def test_the_simulator_drops_an_idle_connection_silently_when_told_to() -> None:
    with start_in_thread("127.0.0.1", 0, idle=IdlePolicy(after_s=0.1, action="drop")) as simulator:
        host, port = simulator.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=0.5)
        connection.request("GET", "/simulator/health")
        assert connection.getresponse().read()
        time.sleep(0.3)
        connection.request("GET", "/simulator/health")
        with pytest.raises(socket.timeout):
            connection.getresponse()
        connection.close()


def test_the_idle_policy_is_set_and_cleared_through_the_control_api() -> None:
    with start_in_thread("127.0.0.1", 0) as simulator:
        url = simulator.url + "/simulator/idle"
        body = json.dumps({"afterSeconds": 4, "action": "reset"}).encode()
        request = urllib.request.Request(url, data=body, method="PUT")
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert json.load(answer) == {"idle": {"afterSeconds": 4.0, "action": "reset"}}
        assert simulator.exchange.idle_policy == IdlePolicy(4.0, "reset")
        with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=5):
            pass
        assert simulator.exchange.idle_policy is None


# gzip when asked


def test_the_simulator_answers_gzip_only_when_asked() -> None:
    envelope = (
        b'<?xml version="1.0"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"'
        b' xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"'
        b' xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><soap:Body>'
        b'<m:DisconnectPhoneCall><m:PhoneCallId Id="x"/></m:DisconnectPhoneCall>'
        b"</soap:Body></soap:Envelope>"
    )
    with start_in_thread("127.0.0.1", 0) as simulator:
        host, port = simulator.url.removeprefix("http://").split(":")
        answers = {}
        for accept in ("gzip, deflate", "identity", "gzip;q=0"):
            connection = http.client.HTTPConnection(host, int(port), timeout=5)
            connection.request(
                "POST",
                "/EWS/Exchange.asmx",
                envelope,
                {"Content-Type": "text/xml", "Accept-Encoding": accept},
            )
            response = connection.getresponse()
            answers[accept] = (response.getheader("Content-Encoding"), response.read())
            connection.close()
    coding, body = answers["gzip, deflate"]
    assert coding == "gzip"
    assert gzip.decompress(body) == answers["identity"][1]
    assert answers["identity"][0] is None
    assert answers["gzip;q=0"][0] is None
