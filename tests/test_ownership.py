"""Calls belong to their caller: signed call ids, checked by one function on every route."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import pytest
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import Config
from gateway.errors import CallNotFound, ExchangeBadAnswer
from gateway.exchange.client import EwsClient, PlacedCall
from gateway.guards.callers import OPEN_CALLER, Caller
from gateway.guards.ownership import MAX_EWS_ID_CHARS, CallIds
from gateway.guards.validation import check_call_id
from tests.fake_ews import FakeExchange
from tests.identity import (
    RecordingExchange,
    SigningKey,
    bearer,
    call_path,
    claims,
    client_for,
    jwt_environ,
    rsa_key,
)

KEY = b"k" * 32
ALICE = Caller(subject="alice")
BOB = Caller(subject="bob")
OPERATOR = Caller(subject="ops", operator=True)
EWS_IDS = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)


@given(ews_id=EWS_IDS.filter(lambda text: len(text) <= MAX_EWS_ID_CHARS))
def test_a_caller_gets_back_the_ews_id_of_its_own_call_and_the_id_fits_the_contract(
    ews_id: str,
) -> None:
    call_ids = CallIds(KEY)
    call_id = call_ids.issue(ews_id, ALICE)

    assert check_call_id(call_id) == call_id
    assert call_id.endswith("." + ews_id)
    assert call_ids.ews_call_id(call_id, ALICE) == ews_id


def test_another_caller_gets_the_same_not_found_as_for_a_call_nobody_placed() -> None:
    call_ids = CallIds(KEY)
    alices = call_ids.issue("AAMkCall", ALICE)

    with pytest.raises(CallNotFound) as someone_elses:
        call_ids.ews_call_id(alices, BOB)
    with pytest.raises(CallNotFound) as unknown:
        call_ids.ews_call_id(call_ids.issue("AAMkOther", Caller(subject="carol"))[:-1], BOB)

    assert str(someone_elses.value) == str(unknown.value)


def test_an_id_signed_with_another_key_or_altered_is_not_found() -> None:
    forged = CallIds(b"x" * 32).issue("AAMkCall", ALICE)
    genuine = CallIds(KEY).issue("AAMkCall", ALICE)
    swapped = genuine.replace(".AAMkCall", ".AAMkOtherCall")

    for call_id in (forged, swapped, "AAMkCall", "gw1.short.id.AAMk"):
        with pytest.raises(CallNotFound):
            CallIds(KEY).ews_call_id(call_id, ALICE)


def test_ownership_holds_across_instances_sharing_the_key() -> None:
    issued_by_one = CallIds(KEY).issue("AAMkCall", ALICE)

    assert CallIds(KEY).ews_call_id(issued_by_one, ALICE) == "AAMkCall"


def test_an_operator_acts_on_any_issued_id_and_on_raw_ews_ids_from_elsewhere() -> None:
    call_ids = CallIds(KEY)

    assert call_ids.ews_call_id(call_ids.issue("AAMkCall", ALICE), OPERATOR) == "AAMkCall"
    assert call_ids.ews_call_id("AAMkPlacedByOwa", OPERATOR) == "AAMkPlacedByOwa"


def test_an_ews_id_too_long_to_wrap_is_a_bad_upstream_answer() -> None:
    with pytest.raises(ExchangeBadAnswer):
        CallIds(KEY).issue("A" * (MAX_EWS_ID_CHARS + 1), ALICE)


# Through the API, with API keys: two callers, one gateway.

KEY_A, KEY_B = "key-of-alice", "key-of-bob"


@pytest.fixture
def fake() -> FakeExchange:
    return FakeExchange(placed=PlacedCall(call_id="AAMkCall", ews_code="NoError"))


@pytest.fixture
def client(tmp_path: Path, fake: FakeExchange) -> FlaskClient:
    keys = tmp_path / "keys"
    keys.write_text(
        "\n".join(hashlib.sha256(key.encode()).hexdigest() for key in (KEY_A, KEY_B)) + "\n"
    )
    config = Config(
        ews_url="http://exchange.invalid/EWS/Exchange.asmx",
        gateway_auth="apikey",
        api_keys_file=str(keys),
        call_id_key=KEY,
    )
    app = create_app(config, ews=cast(EwsClient, fake), registry=CollectorRegistry())
    return app.test_client()


def place(client: FlaskClient, key: str) -> str:
    body = {"itemId": "AAMkItem", "dialString": "+15551234567"}
    answer = client.post("/calls", json=body, headers={"X-API-Key": key})
    assert answer.status_code == 201, answer.text
    return "/calls/" + quote(answer.get_json()["callId"], safe="")


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_caller_b_gets_404_for_caller_as_call_and_exchange_is_not_asked(
    client: FlaskClient, fake: FakeExchange, method: str
) -> None:
    path = place(client, KEY_A)
    asked = len(fake.calls)

    theirs = client.open(path, method=method, headers={"X-API-Key": KEY_B})
    unknown = client.open(
        "/calls/gw1.AAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA.AAMkCall",
        method=method,
        headers={"X-API-Key": KEY_B},
    )
    mine = client.open(path, method=method, headers={"X-API-Key": KEY_A})

    assert theirs.status_code == unknown.status_code == 404
    strip = {"requestId"}
    assert {k: v for k, v in theirs.get_json().items() if k not in strip} == {
        k: v for k, v in unknown.get_json().items() if k not in strip
    }
    assert mine.status_code == 200
    assert len(fake.calls) == asked + 1  # only the owner's request reached Exchange
    assert fake.last.arguments["call_id"] == "AAMkCall"


def test_with_no_caller_authentication_the_one_anonymous_caller_owns_every_call() -> None:
    call_ids = CallIds(KEY)

    assert call_ids.ews_call_id(call_ids.issue("AAMkCall", OPEN_CALLER), OPEN_CALLER) == (
        "AAMkCall"
    )
    assert call_ids.ews_call_id("AAMkFromOwa", OPEN_CALLER) == "AAMkFromOwa"


# Operators: JWT callers carrying GATEWAY_OPERATOR_CLAIM.


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return rsa_key()


@pytest.mark.parametrize(
    ("claim", "token_claims", "operator"),
    [
        ("roles=call-operator", {"roles": ["reader", "call-operator"]}, True),
        ("roles=call-operator", {"roles": ["reader"]}, False),
        ("scp=calls.operate", {"scp": "calls.read calls.operate"}, True),
        ("scp=calls.operate", {"scp": "calls.operate-not"}, False),
        ("role=admin", {"role": "admin"}, True),
    ],
)
def test_the_operator_claim_lets_a_caller_act_on_other_callers_calls_and_raw_ews_ids(
    signer: SigningKey, claim: str, token_claims: dict[str, Any], operator: bool
) -> None:
    exchange = RecordingExchange()
    environ = jwt_environ(GATEWAY_JWT_PUBLIC_KEY=signer.public_pem(), GATEWAY_OPERATOR_CLAIM=claim)
    client = client_for(environ, exchange)
    headers = bearer(signer.token(claims(sub="ops", **token_claims)))

    alices = client.delete(call_path("AAMkCall", subject="alice"), headers=headers)
    from_owa = client.delete("/calls/AAMkPlacedByOwa", headers=headers)

    assert (alices.status_code, from_owa.status_code) == ((200, 200) if operator else (404, 404))
    expected = ["AAMkCall", "AAMkPlacedByOwa"] if operator else []
    assert [call_id for _, call_id, _ in exchange.calls] == expected


def test_a_token_without_a_subject_is_refused_since_its_calls_could_belong_to_nobody(
    signer: SigningKey,
) -> None:
    client = client_for(
        jwt_environ(GATEWAY_JWT_PUBLIC_KEY=signer.public_pem()), RecordingExchange()
    )

    answer = client.delete(call_path(), headers=bearer(signer.token(claims(without=["sub"]))))

    assert answer.status_code == 401


def test_a_token_whose_subject_is_half_a_surrogate_pair_is_refused(signer: SigningKey) -> None:
    """JSON allows "\\ud800" in a string; no store, Redis key or log line can hold it."""
    client = client_for(
        jwt_environ(GATEWAY_JWT_PUBLIC_KEY=signer.public_pem()), RecordingExchange()
    )

    answer = client.delete(call_path(), headers=bearer(signer.token(claims(sub="\ud800"))))

    assert answer.status_code == 401
    assert "sub claim" in answer.get_json()["detail"]
