"""POST /calls with Idempotency-Key: one PlayOnPhone per key, caller and body."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from flask import Flask

from gateway.errors import (
    ExchangeAuthFailed,
    ExchangeTimeout,
    ExchangeUnprocessable,
    ExchangeUnreachable,
    IdempotencyKeyInUse,
    IdempotencyOutcomeUnknown,
    SharedStateUnavailable,
)
from gateway.exchange.client import PlacedCall
from gateway.exchange.resilience import Bulkhead
from gateway.guards.idempotency import (
    KEY_PREFIX,
    KEY_TTL_S,
    IdempotentCalls,
    MemoryKeys,
    RedisKeys,
    StoredAnswer,
    parse_key,
)
from gateway.guards.sharedstate import StaleConnection
from tests.fake_ews import FakeExchange
from tests.guards import KEY_A, KEY_B, PLACE, app_with_keys, sample


def post(app: Flask, key: str | None, body: dict[str, Any] = PLACE, caller: str = KEY_A) -> Any:
    headers = {"X-API-Key": caller}
    if key is not None:
        headers["Idempotency-Key"] = key
    return app.test_client().post("/calls", json=body, headers=headers)


@pytest.fixture
def fake() -> FakeExchange:
    return FakeExchange()


@pytest.fixture
def app(tmp_path: Path, fake: FakeExchange) -> Flask:
    return app_with_keys(tmp_path, fake, rate_limit_calls=None)


def test_the_same_key_and_body_answers_the_first_result_without_dialing_again(
    app: Flask, fake: FakeExchange
) -> None:
    first = post(app, '"order-1"')
    again = post(app, '"order-1"')

    assert first.status_code == again.status_code == 201
    assert again.get_json() == first.get_json()
    assert again.headers["Location"] == first.headers["Location"]
    assert len(fake.calls) == 1
    assert sample(app, "ews_gateway_idempotent_replays_total") == 1


def test_the_same_key_with_another_body_is_422(app: Flask, fake: FakeExchange) -> None:
    post(app, '"order-1"')

    other = post(app, '"order-1"', {**PLACE, "dialString": "+15559999999"})

    assert other.status_code == 422
    assert other.get_json()["type"] == "urn:ews-gateway:problem:idempotency-key-reused"
    assert len(fake.calls) == 1


def test_a_key_belongs_to_its_caller(app: Flask, fake: FakeExchange) -> None:
    post(app, '"order-1"', caller=KEY_A)
    post(app, '"order-1"', caller=KEY_B)

    assert len(fake.calls) == 2


def test_without_the_header_every_post_dials(app: Flask, fake: FakeExchange) -> None:
    post(app, None)
    post(app, None)

    assert len(fake.calls) == 2


def test_a_bare_key_is_accepted_and_a_bad_one_is_400(app: Flask, fake: FakeExchange) -> None:
    assert post(app, "order-2").status_code == 201
    assert post(app, '"order-2"').status_code == 201  # the same key, quoted
    assert post(app, '"has space"').status_code == 400
    assert post(app, '""').status_code == 400
    # RFC 8941 strings: closed, with '"' and '\\' only escaped.
    assert post(app, '"order-3').status_code == 400
    assert post(app, 'order"3').status_code == 400
    assert post(app, '"order"3"').status_code == 400
    assert post(app, '"order\\"3"').status_code == 201
    assert post(app, '"order\\"3"').status_code == 201  # replayed
    assert len(fake.calls) == 2
    assert parse_key('"order\\"3"') == 'order"3'


class SlowExchange(FakeExchange):
    """Dials only once `release` is set, so duplicates arrive while the first is running."""

    def __init__(self) -> None:
        super().__init__(placed=PlacedCall(call_id="AAMkSlow", ews_code="NoError"))
        self.release = threading.Event()
        self.lock = threading.Lock()

    def play_on_phone(self, *args: Any, **kwargs: Any) -> PlacedCall:
        with self.lock:
            self.calls.append(cast(Any, ("play_on_phone", args, kwargs)))
        assert self.release.wait(10)
        return self.placed


def test_concurrent_duplicates_dial_once_and_all_get_the_first_answer(tmp_path: Path) -> None:
    slow = SlowExchange()
    app = app_with_keys(tmp_path, slow, rate_limit_calls=None)

    with ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(post, app, '"same"') for _ in range(8)]
        threading.Timer(0.3, slow.release.set).start()
        results = [answer.result(timeout=20) for answer in answers]

    assert {result.status_code for result in results} == {201}
    assert len({result.get_json()["callId"] for result in results}) == 1
    assert len(slow.calls) == 1


class CountingKeys(MemoryKeys):
    """Keys in memory that note which threads waited on them (looked a key up)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting_threads: set[int] = set()

    def get(self, key: str) -> str | None:
        self.waiting_threads.add(threading.get_ident())
        return super().get(key)


def test_duplicates_wait_on_the_bulkhead_so_one_with_no_slot_left_gets_409_at_once() -> None:
    bulkhead, store = Bulkhead(2), CountingKeys()
    holding = threading.Event()

    @contextlib.contextmanager
    def noted_slot() -> Iterator[bool]:
        with bulkhead.held() as held:
            holding.set()
            yield held

    calls = IdempotentCalls(store, wait_s=5, wait_slot=bulkhead.held)
    waiter = IdempotentCalls(store, wait_s=5, wait_slot=noted_slot)
    dialling, hang_up = threading.Event(), threading.Event()
    dialled: list[int] = []

    def dial() -> StoredAnswer:
        with bulkhead.slot():  # as the call to Exchange does
            dialled.append(1)
            dialling.set()
            hang_up.wait(timeout=20)
            return StoredAnswer(201, {"callId": "c", "ewsResponseCode": "NoError"}, "/calls/c")

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(calls.place, "alice", "k", "fp", dial)
        assert dialling.wait(timeout=20)
        waiting = pool.submit(waiter.place, "alice", "k", "fp", dial)
        assert holding.wait(timeout=20)  # the duplicate holds the last slot as it waits
        with pytest.raises(IdempotencyKeyInUse) as no_slot:
            calls.place("alice", "k", "fp", dial)
        assert threading.get_ident() not in store.waiting_threads  # answered without waiting
        hang_up.set()
        assert first.result(timeout=20).status == 201
        assert waiting.result(timeout=20).replayed

    assert no_slot.value.retry_after_s == 1
    assert dialled == [1]
    with bulkhead.held() as held:  # every slot was given back
        assert held


def test_an_unknown_outcome_is_never_replayed_as_a_success(app: Flask, fake: FakeExchange) -> None:
    fake.error = ExchangeTimeout("Exchange did not answer in time")
    first = post(app, '"order-3"')
    fake.error = None

    retry = post(app, '"order-3"')

    assert first.status_code == 504
    assert retry.status_code == 409
    assert retry.get_json()["type"] == "urn:ews-gateway:problem:idempotency-outcome-unknown"
    assert len(fake.calls) == 1
    # A new key dials again, as the problem says.
    assert post(app, '"order-4"').status_code == 201


def test_a_failure_that_placed_no_call_frees_the_key(app: Flask, fake: FakeExchange) -> None:
    fake.error = ExchangeUnprocessable("Exchange answered ErrorInvalidPhoneNumber")
    first = post(app, '"order-5"')
    fake.error = None

    retry = post(app, '"order-5"')

    assert (first.status_code, retry.status_code) == (422, 201)
    assert len(fake.calls) == 2


def test_exchange_unreachable_before_the_request_was_sent_frees_the_key(
    app: Flask, fake: FakeExchange
) -> None:
    refused = ExchangeUnreachable("Exchange could not be reached (ConnectionRefusedError)")
    refused.before_sending = True
    fake.error = refused
    first = post(app, '"order-6"')
    fake.error = ExchangeUnreachable("Exchange closed the connection before its answer")
    cut = post(app, '"order-7"')
    fake.error = None

    assert (first.status_code, post(app, '"order-6"').status_code) == (502, 201)
    # Cut off after the request went out, Exchange may have dialled: that key stays unknown.
    assert (cut.status_code, post(app, '"order-7"').status_code) == (502, 409)


def test_a_refused_final_answer_leaves_the_outcome_unknown_but_a_401_frees_the_key(
    app: Flask, fake: FakeExchange
) -> None:
    fake.error = ExchangeAuthFailed("Exchange's answer failed mutual authentication")
    mutual = post(app, '"order-8"')
    refused = ExchangeAuthFailed("Exchange refused the gateway's credentials (HTTP 401)")
    refused.upstream_status = 401
    fake.error = refused
    unauthorised = post(app, '"order-9"')
    fake.error = None

    assert (mutual.status_code, post(app, '"order-8"').status_code) == (502, 409)
    assert (unauthorised.status_code, post(app, '"order-9"').status_code) == (502, 201)


def test_keys_live_24_hours() -> None:
    now = [0.0]
    keys = MemoryKeys(clock=lambda: now[0])
    keys.claim("k", "first", KEY_TTL_S)

    now[0] = KEY_TTL_S - 1
    assert keys.claim("k", "second", KEY_TTL_S) == "first"
    now[0] = KEY_TTL_S + 1
    assert keys.claim("k", "second", KEY_TTL_S) is None
    assert KEY_TTL_S == 24 * 3600


class DownRedis:
    """A Redis client whose every command fails as an unreachable server does."""

    def set(self, *_args: Any, **_kwargs: Any) -> None:
        raise redis.ConnectionError("Connection refused")

    get = delete = set

    def register_script(self, _script: str) -> Any:
        return self.set


def test_an_unreachable_redis_fails_an_idempotent_post_closed_with_503(
    app: Flask, fake: FakeExchange
) -> None:
    metrics = app.extensions["gateway"].metrics
    store = RedisKeys(
        cast(redis.Redis, DownRedis()), on_error=lambda: metrics.redis_failed("idempotency")
    )
    app.extensions["gateway"].idempotency = IdempotentCalls(store, wait_s=1)

    with_key = post(app, '"order-6"')
    without_key = post(app, None)

    assert with_key.status_code == 503
    assert with_key.get_json()["type"] == f"urn:ews-gateway:problem:{SharedStateUnavailable.slug}"
    assert with_key.headers["Retry-After"] == "1"
    # Two failed commands: the claim, and taking back a claim that may have been stored.
    assert sample(app, 'ews_gateway_redis_errors_total{feature="idempotency"}') == 2
    assert without_key.status_code == 201
    assert len(fake.calls) == 1  # only the POST without a key dialled


def test_a_key_left_pending_by_a_process_that_died_mid_call_answers_outcome_unknown() -> None:
    store = MemoryKeys()
    calls = IdempotentCalls(store, wait_s=0.1)
    dialled: list[int] = []

    def dial() -> StoredAnswer:
        dialled.append(1)
        return StoredAnswer(201, {"callId": "c", "ewsResponseCode": "NoError"}, "/calls/c")

    calls.place("alice", "k", "fp", dial)  # another key, used and finished
    crashed = json.dumps({"state": "pending", "fingerprint": "fp", "startedAt": time.time() - 60})
    store.put(KEY_PREFIX + hashlib.sha256(b"alice\0lost").hexdigest(), crashed, KEY_TTL_S)

    with pytest.raises(IdempotencyOutcomeUnknown):
        calls.place("alice", "lost", "fp", dial)
    assert dialled == [1]


class LosingRedis:
    """A Redis client (a dict) whose first SET NX is stored, then its pooled connection is
    found stale before the answer arrives, as when a middlebox forgets the flow mid-command."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.lost = 0

    def set(self, key: str, value: str, nx: bool = False, ex: int | None = None) -> bool | None:
        if nx and key in self.values:
            return None
        self.values[key] = value
        if nx and not self.lost:
            self.lost += 1
            raise StaleConnection("stale_connection")
        return True

    def get(self, key: str) -> bytes | None:
        value = self.values.get(key)
        return None if value is None else value.encode()

    def register_script(self, _script: str) -> Any:
        def delete_if_equal(keys: list[str], args: list[str]) -> int:
            if self.values.get(keys[0]) != args[0]:
                return 0
            del self.values[keys[0]]
            return 1

        return delete_if_equal


def test_a_claim_sent_again_after_its_stored_first_try_was_lost_is_its_own_and_dials_once() -> None:
    losing = LosingRedis()
    errors: list[int] = []
    calls = IdempotentCalls(
        RedisKeys(cast(redis.Redis, losing), on_error=lambda: errors.append(1)), wait_s=1
    )
    dialled: list[int] = []

    def dial() -> StoredAnswer:
        dialled.append(1)
        return StoredAnswer(201, {"callId": "c9", "ewsResponseCode": "NoError"}, "/calls/c9")

    first = calls.place("gina", "order-9", "fp", dial)  # neither 503 nor 409 in use
    again = calls.place("gina", "order-9", "fp", dial)

    assert (first.status, first.replayed, again.replayed) == (201, False, True)
    assert dialled == [1]
    assert (losing.lost, errors) == (1, [1])  # the stale try was counted once


class ReleasingKeys(MemoryKeys):
    """Memory keys that note every key freed, and how."""

    def __init__(self) -> None:
        super().__init__()
        self.freed: list[tuple[str, str]] = []

    def release_own(self, key: str, record: str) -> None:
        self.freed.append((key, record))
        super().release_own(key, record)


def test_a_key_is_freed_only_while_it_holds_this_requests_own_claim() -> None:
    """So a late second run of that delete (a command sent again) frees no other claim."""
    store = ReleasingKeys()
    calls = IdempotentCalls(store, wait_s=1)

    def refused() -> StoredAnswer:
        raise ExchangeUnprocessable("Exchange answered ErrorInvalidPhoneNumber")

    with pytest.raises(ExchangeUnprocessable):
        calls.place("hana", "order-10", "fp", refused)

    [(key, claim)] = store.freed  # compare and delete of its own pending record
    assert json.loads(claim)["state"] == "pending"
    assert store.claim(key, "another request's claim", KEY_TTL_S) is None
    store.release_own(key, claim)  # the same delete run again, late (a command sent twice)
    assert store.get(key) == "another request's claim"
