"""Acting as the caller: EWS_IMPERSONATION=token runs each call as the token's own mailbox."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from lxml import etree
from prometheus_client import CollectorRegistry

from gateway import wire
from gateway.app import create_app
from gateway.config import IMPERSONATION_IDS, Config
from gateway.exchange.envelopes import CONNECTING_SID
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


def connecting_sid(envelope: str) -> tuple[str, str | None] | None:
    """Return the ConnectingSID child an envelope names its mailbox by, and its text."""
    root = etree.fromstring(envelope.encode(), etree.XMLParser(resolve_entities=False))
    found = root.find(
        f".//{{{wire.TYPES_NS}}}ExchangeImpersonation/{{{wire.TYPES_NS}}}ConnectingSID"
    )
    if found is None:
        return None
    (child,) = found
    return etree.QName(child).localname, child.text


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
    in_envelopes = [connecting_sid(request["body"]) for request in recorded_requests(simulator)]

    # Bob's attempts on Alice's call stop at the gateway (gateway.guards.ownership).
    assert sent == [
        ("PlayOnPhone", ALICE),
        ("GetPhoneCallInformation", ALICE),
        ("DisconnectPhoneCall", ALICE),
        ("GetPhoneCallInformation", ALICE),
    ]
    assert in_envelopes == [("SmtpAddress", mailbox) for _, mailbox in sent]


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


# Naming the mailbox: EWS_IMPERSONATION_ID, which follows the mailbox claim unless set.

DANA = "dana.ortiz@example.com"  # the simulator lists her with these names:
DANA_ALIAS = "dana@example.com"
DANA_UPN = "dortiz@corp.example.com"
DANA_SID = "S-1-5-21-3623811015-3361044348-30300820-1104"
# (mailbox claim, EWS_IMPERSONATION_ID or "" to follow the claim, the claim's value, element)
NAMINGS = {
    "alias": ("email", "", DANA_ALIAS, "SmtpAddress"),
    "upn": ("upn", "", DANA_UPN, "PrincipalName"),
    "sid": ("onprem_sid", "", DANA_SID, "SID"),
    "upn set over email": ("email", "upn", DANA_UPN, "PrincipalName"),
}


def naming_environ(signer: SigningKey, naming: str) -> dict[str, str]:
    claim, impersonation_id, _, _ = NAMINGS[naming]
    chosen = {"EWS_IMPERSONATION_ID": impersonation_id} if impersonation_id else {}
    return impersonating_environ(signer, GATEWAY_JWT_MAILBOX_CLAIM=claim, **chosen)


def as_dana(signer: SigningKey, naming: str) -> dict[str, str]:
    claim, _, value, _ = NAMINGS[naming]
    return bearer(signer.token(claims(sub="dana", **{claim: value})))


@pytest.mark.parametrize("naming", sorted(NAMINGS))
def test_the_claim_names_the_mailbox_in_the_id_type_that_follows_the_claim_unless_set(
    naming: str, signer: SigningKey, exchange: RecordingExchange
) -> None:
    _, _, value, element = NAMINGS[naming]
    client = client_for(naming_environ(signer, naming), exchange)

    answer = client.delete(call_path(subject="dana"), headers=as_dana(signer, naming))

    assert answer.status_code == 200, answer.text
    assert exchange.mailboxes == [value]
    config = Config.from_env(naming_environ(signer, naming))
    assert CONNECTING_SID[config.ews_impersonation_id] == element


# (EWS_IMPERSONATION_ID, a claim value that does not fit it)
MISFITS = [
    ("sid", DANA),
    ("sid", "S-1-5"),
    ("sid", "S-1-5-21-"),
    ("sid", "S-1-5-21-12x"),
    ("sid", "s-1-5-21-1"),
    ("sid", "S-1-5-21-1\n"),
    ("sid", "S-1-5-21-\u0661\u0662"),
    ("sid", "S-2-5-21-1"),
    ("sid", "S-1-5" + "-1" * 16),
    ("upn", DANA_SID),
    ("upn", "dortiz"),
    ("upn", "dortiz@corp@example.com"),
    ("smtp", DANA_SID),
]


@pytest.mark.parametrize(("impersonation_id", "value"), MISFITS, ids=repr)
def test_a_claim_that_does_not_fit_the_id_type_is_403_and_exchange_is_not_contacted(
    impersonation_id: str, value: str, signer: SigningKey, exchange: RecordingExchange
) -> None:
    environ = impersonating_environ(
        signer, GATEWAY_JWT_MAILBOX_CLAIM="mailbox", EWS_IMPERSONATION_ID=impersonation_id
    )
    client = client_for(environ, exchange)

    answer = client.delete("/calls/abc", headers=bearer(signer.token(claims(mailbox=value))))

    assert answer.status_code == 403, answer.text
    assert answer.mimetype == PROBLEM_JSON
    assert "'mailbox'" in answer.get_json()["detail"]
    assert exchange.calls == []


@pytest.mark.parametrize(
    "sid", ["S-1-5-18", "S-1-5-21-3623811015-3361044348-30300820-1013", "S-1-12-1-4-1-2-3"]
)
def test_any_well_formed_sid_is_accepted_as_the_mailbox(
    sid: str, signer: SigningKey, exchange: RecordingExchange
) -> None:
    environ = impersonating_environ(signer, GATEWAY_JWT_MAILBOX_CLAIM="sid")
    client = client_for(environ, exchange)

    token = signer.token(claims(sub="dana", sid=sid))
    assert client.delete(call_path(subject="dana"), headers=bearer(token)).status_code == 200
    assert exchange.mailboxes == [sid]


@pytest.fixture
def simulated(simulator: SimulatorServer) -> Iterator[Callable[[dict[str, str]], FlaskClient]]:
    """Build gateways (from an environment) that call the simulator; close them afterwards."""
    apps: list[Flask] = []

    def gateway_for(environ: dict[str, str]) -> FlaskClient:
        environ = {**environ, "EWS_URL": simulator.ews_url, "EWS_TIMEOUT_SECONDS": "5"}
        apps.append(create_app(Config.from_env(environ), registry=CollectorRegistry()))
        return apps[-1].test_client()

    yield gateway_for
    for app in apps:
        close_upstream(app)


def place_read_and_hang_up(gateway: FlaskClient, headers: dict[str, str]) -> list[int]:
    placed = gateway.post(
        "/calls", json={"itemId": "AAMkVoiceMail", "dialString": "+15551234567"}, headers=headers
    )
    if placed.status_code != 201:
        return [placed.status_code]
    path = "/calls/" + quote(placed.get_json()["callId"], safe="")
    return [
        placed.status_code,
        gateway.get(path, headers=headers).status_code,
        gateway.delete(path, headers=headers).status_code,
    ]


@pytest.mark.network
@pytest.mark.parametrize("naming", sorted(NAMINGS))
def test_each_id_type_reaches_the_same_mailbox_on_the_simulator(
    naming: str,
    signer: SigningKey,
    simulator: SimulatorServer,
    simulated: Callable[[dict[str, str]], FlaskClient],
) -> None:
    gateway = simulated(naming_environ(signer, naming))

    assert place_read_and_hang_up(gateway, as_dana(signer, naming)) == [201, 200, 200]

    (call,) = simulator.exchange.calls.all_calls()
    assert (call.mailbox, call.phase.state) == (DANA, "Disconnected")
    _, _, value, element = NAMINGS[naming]
    for request in recorded_requests(simulator):
        assert connecting_sid(request["body"]) == (element, value)
        if schema_available():
            assert_envelope_valid(request["body"].encode())


def replayed(simulator: SimulatorServer, request: dict[str, Any], body: str) -> tuple[int, bytes]:
    """Send a recorded request's body again, as amended, with its SOAPAction."""
    replay = urllib.request.Request(
        simulator.ews_url,
        data=body.encode(),
        headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": request["soapAction"]},
    )
    try:
        with urllib.request.urlopen(replay, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.mark.network
def test_an_alias_succeeds_as_smtp_address_where_primary_smtp_address_is_refused(
    signer: SigningKey,
    simulator: SimulatorServer,
    simulated: Callable[[dict[str, str]], FlaskClient],
) -> None:
    """Why the gateway sends SmtpAddress: the address in a token is often an alias."""
    gateway = simulated(impersonating_environ(signer))

    assert place_read_and_hang_up(gateway, as_user(signer, DANA_ALIAS)) == [201, 200, 200]

    reading = recorded_requests(simulator)[1]
    assert connecting_sid(reading["body"]) == ("SmtpAddress", DANA_ALIAS)
    as_primary = reading["body"].replace("t:SmtpAddress>", "t:PrimarySmtpAddress>")
    status, answer = replayed(simulator, reading, as_primary)
    assert status == 500
    code = etree.fromstring(answer).findtext(f".//{{{wire.ERRORS_NS}}}ResponseCode")
    assert code == "ErrorNonExistentMailbox"


@pytest.mark.network
def test_a_sid_exchange_does_not_know_is_404_naming_exchanges_code(
    signer: SigningKey, simulated: Callable[[dict[str, str]], FlaskClient]
) -> None:
    gateway = simulated(impersonating_environ(signer, GATEWAY_JWT_MAILBOX_CLAIM="onprem_sid"))
    stranger = bearer(signer.token(claims(sub="stranger", onprem_sid="S-1-5-21-1-2-3-4242")))

    answer = gateway.post(
        "/calls", json={"itemId": "AAMkVoiceMail", "dialString": "+15551234567"}, headers=stranger
    )

    assert answer.status_code == 404, answer.text
    assert answer.get_json()["ewsResponseCode"] == "ErrorNonExistentMailbox"


def test_every_id_type_the_configuration_takes_has_an_element_to_be_sent_in() -> None:
    assert set(IMPERSONATION_IDS) == set(CONNECTING_SID)
