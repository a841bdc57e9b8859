"""Acting as the caller: EWS_IMPERSONATION=token runs each call as the token's own mailbox."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from flask.testing import FlaskClient
from lxml import etree
from prometheus_client import CollectorRegistry

from gateway import wire
from gateway.app import create_app
from gateway.config import Config
from gateway.simulator import SimulatorServer, start_in_thread
from tests.ews_schema import SCHEMA_DIR, assert_envelope_valid, requires_schema, schema_available
from tests.identity import (
    PROBLEM_JSON,
    RecordingExchange,
    SigningKey,
    bearer,
    call_path,
    claims,
    client_for,
    close_upstream,
    jwt_environ,
    rsa_key,
)

ALICE = "alice@example.com"
BOB = "bob@example.com"


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return rsa_key()


@pytest.fixture
def exchange() -> RecordingExchange:
    return RecordingExchange()


def impersonating_environ(signer: SigningKey, **extra: str) -> dict[str, str]:
    return jwt_environ(
        GATEWAY_JWT_PUBLIC_KEY=signer.public_pem(), EWS_IMPERSONATION="token", **extra
    )


@pytest.fixture
def client(signer: SigningKey, exchange: RecordingExchange) -> FlaskClient:
    return client_for(impersonating_environ(signer), exchange)


def as_user(signer: SigningKey, mailbox: str, claim: str = "email") -> dict[str, str]:
    return bearer(signer.token(claims(sub=mailbox.split("@", maxsplit=1)[0], **{claim: mailbox})))


def every_operation(client: FlaskClient, headers: dict[str, str], subject: str) -> list[int]:
    placed = client.post("/calls", json={"itemId": "item-1", "dialString": "100"}, headers=headers)
    path = call_path("call-1", subject=subject)
    shown = client.get(path, headers=headers)
    hung_up = client.delete(path, headers=headers)
    return [placed.status_code, shown.status_code, hung_up.status_code]


def test_each_caller_reaches_exchange_as_its_own_mailbox(
    client: FlaskClient, signer: SigningKey, exchange: RecordingExchange
) -> None:
    assert every_operation(client, as_user(signer, ALICE), "alice") == [201, 200, 200]
    assert every_operation(client, as_user(signer, BOB), "bob") == [201, 200, 200]

    assert exchange.mailboxes == [ALICE] * 3 + [BOB] * 3


@pytest.mark.parametrize(
    "mailbox",
    [
        "alice",
        "a b@c",
        ["alice@example.com"],
        {"address": "alice@example.com"},
        42,
        None,
        "",
        "alice@@example.com",
        "alice@example.com bob@example.com",
        "alice@example.com\n",
        "alice\x00@example.com",
        "alice\u202e@example.com",
        "x" * 400 + "@example.com",
        "alice@",
        "@example.com",
    ],
    ids=lambda value: repr(value)[:30],
)
def test_a_mailbox_claim_that_is_not_an_address_is_403_and_exchange_is_not_contacted(
    mailbox: Any, client: FlaskClient, signer: SigningKey, exchange: RecordingExchange
) -> None:
    token = signer.token(claims(email=mailbox))

    answer = client.delete("/calls/abc", headers=bearer(token))

    assert answer.status_code == 403, answer.text
    assert answer.mimetype == PROBLEM_JSON
    assert exchange.calls == []


def test_a_token_without_the_mailbox_claim_is_403_and_exchange_is_not_contacted(
    client: FlaskClient, signer: SigningKey, exchange: RecordingExchange
) -> None:
    answer = client.post(
        "/calls",
        json={"itemId": "item-1", "dialString": "100"},
        headers=bearer(signer.token(claims())),
    )

    assert answer.status_code == 403
    assert answer.mimetype == PROBLEM_JSON
    assert "email" in answer.get_json()["detail"]
    assert exchange.calls == []


def test_a_custom_mailbox_claim_is_the_only_one_that_counts(
    signer: SigningKey, exchange: RecordingExchange
) -> None:
    client = client_for(
        impersonating_environ(signer, GATEWAY_JWT_MAILBOX_CLAIM="preferred_username"), exchange
    )
    both = signer.token(claims(preferred_username=ALICE, email="mallory@example.com"))
    email_only = signer.token(claims(email=BOB))

    assert client.delete(call_path(), headers=bearer(both)).status_code == 200
    assert client.delete("/calls/abc", headers=bearer(email_only)).status_code == 403
    assert exchange.mailboxes == [ALICE]


def test_without_impersonation_no_mailbox_is_sent_even_if_the_token_names_one(
    signer: SigningKey, exchange: RecordingExchange
) -> None:
    client = client_for(jwt_environ(GATEWAY_JWT_PUBLIC_KEY=signer.public_pem()), exchange)

    assert (
        client.delete(call_path(subject="alice"), headers=as_user(signer, ALICE)).status_code == 200
    )
    assert exchange.mailboxes == [None]


# The real EwsClient against the simulator, which scopes calls to the mailbox that placed them.


@pytest.fixture
def simulator() -> Iterator[SimulatorServer]:
    schema_dir = SCHEMA_DIR if schema_available() else None
    with start_in_thread("127.0.0.1", 0, step_seconds=0.05, schema_dir=schema_dir) as server:
        yield server


@pytest.fixture
def gateway(simulator: SimulatorServer, signer: SigningKey) -> Iterator[FlaskClient]:
    environ = impersonating_environ(signer, EWS_URL=simulator.ews_url, EWS_TIMEOUT_SECONDS="5")
    app = create_app(Config.from_env(environ), registry=CollectorRegistry())
    yield app.test_client()
    close_upstream(app)


def recorded_requests(simulator: SimulatorServer) -> list[dict[str, Any]]:
    with urllib.request.urlopen(simulator.url + "/simulator/requests", timeout=10) as answer:
        requests: list[dict[str, Any]] = json.load(answer)
    return requests


def impersonated_address(envelope: str) -> str | None:
    root = etree.fromstring(envelope.encode(), etree.XMLParser(resolve_entities=False))
    found = root.findtext(
        f".//{{{wire.TYPES_NS}}}ExchangeImpersonation/{{{wire.TYPES_NS}}}ConnectingSID"
        f"/{{{wire.TYPES_NS}}}PrimarySmtpAddress"
    )
    return None if found is None else str(found)


def alice_and_bob_share_a_gateway(gateway: FlaskClient, signer: SigningKey) -> dict[str, int]:
    """Alice places a call; both try to read and hang it up; return each step's status."""
    alice, bob = as_user(signer, ALICE), as_user(signer, BOB)
    placed = gateway.post(
        "/calls", json={"itemId": "AAMkVoiceMail", "dialString": "+15551234567"}, headers=alice
    )
    assert placed.status_code == 201, placed.text
    path = "/calls/" + quote(placed.get_json()["callId"], safe="")
    return {
        "bob reads": gateway.get(path, headers=bob).status_code,
        "bob hangs up": gateway.delete(path, headers=bob).status_code,
        "alice reads": gateway.get(path, headers=alice).status_code,
        "alice hangs up": gateway.delete(path, headers=alice).status_code,
        "alice reads again": gateway.get(path, headers=alice).status_code,
    }


@pytest.mark.network
def test_a_caller_reaches_only_its_own_mailboxs_calls_on_the_simulator(
    gateway: FlaskClient, signer: SigningKey, simulator: SimulatorServer
) -> None:
    statuses = alice_and_bob_share_a_gateway(gateway, signer)

    assert statuses == {
        "bob reads": 404,
        "bob hangs up": 404,
        "alice reads": 200,
        "alice hangs up": 200,
        "alice reads again": 200,
    }
    (call,) = simulator.exchange.calls.all_calls()
    assert call.mailbox == ALICE
    assert call.phase.state == "Disconnected"


@pytest.mark.network
def test_every_request_the_simulator_recorded_names_the_callers_mailbox(
    gateway: FlaskClient, signer: SigningKey, simulator: SimulatorServer
) -> None:
    alice_and_bob_share_a_gateway(gateway, signer)

    sent = [(request["operation"], request["mailbox"]) for request in recorded_requests(simulator)]
    in_envelopes = [
        impersonated_address(request["body"]) for request in recorded_requests(simulator)
    ]

    # Bob's attempts on Alice's call stop at the gateway (gateway.guards.ownership).
    assert sent == [
        ("PlayOnPhone", ALICE),
        ("GetPhoneCallInformation", ALICE),
        ("DisconnectPhoneCall", ALICE),
        ("GetPhoneCallInformation", ALICE),
    ]
    assert in_envelopes == [mailbox for _, mailbox in sent]


@pytest.mark.network
@requires_schema
def test_every_impersonated_envelope_is_schema_valid(
    gateway: FlaskClient, signer: SigningKey, simulator: SimulatorServer
) -> None:
    alice_and_bob_share_a_gateway(gateway, signer)

    recorded = recorded_requests(simulator)

    assert len(recorded) == 4  # Bob's two attempts never reach Exchange
    for request in recorded:
        assert_envelope_valid(request["body"].encode())
