"""The embedded store: idempotency keys and quota counts in one SQLite file that several
workers share, with the semantics of the Redis and memory stores (files only, no sockets)."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from limits.errors import StorageError
from limits.storage import storage_from_string

from gateway.errors import ConfigError, RateLimited, SharedStateUnavailable
from gateway.guards.embeddedstore import (
    FILE_NAME,
    PURGE_EVERY_S,
    EmbeddedStore,
    SqliteKeys,
    SqliteStorage,
)
from gateway.guards.idempotency import KEY_TTL_S, IdempotentCalls, StoredAnswer
from gateway.guards.quotas import CALLS, Quotas
from tests.fake_ews import FakeExchange
from tests.guards import KEY_A, PLACE, app_with_keys, sample

START = 1_700_000_000.0
ANSWER = StoredAnswer(201, {"callId": "gw1.c", "ewsResponseCode": "NoError"}, "/calls/gw1.c")


class Clock:
    """Wall-clock seconds that a test moves by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def open_store(tmp_path: Path, clock: Clock) -> Callable[[], EmbeddedStore]:
    """Open the one store in tmp_path again, as each worker of an instance does."""
    EmbeddedStore.create(tmp_path)
    return lambda: EmbeddedStore(tmp_path, clock=clock)


def rows(directory: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(directory / FILE_NAME)) as db:
        count: int = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return count


def test_a_key_is_claimed_once_and_the_claim_returns_what_holds_it(
    open_store: Callable[[], EmbeddedStore],
) -> None:
    keys = SqliteKeys(open_store())

    assert keys.claim("k", "first", KEY_TTL_S) is None
    assert keys.claim("k", "second", KEY_TTL_S) == "first"
    assert keys.get("k") == "first"
    assert keys.get("other") is None


def test_put_replaces_release_frees_and_release_own_frees_only_its_own_record(
    open_store: Callable[[], EmbeddedStore],
) -> None:
    keys = SqliteKeys(open_store())
    keys.claim("k", "pending", KEY_TTL_S)

    keys.put("k", "done", KEY_TTL_S)
    keys.release_own("k", "pending")  # no longer this request's record: kept
    assert keys.get("k") == "done"
    keys.release_own("k", "done")
    assert keys.get("k") is None

    keys.put("k", "unknown", KEY_TTL_S)
    keys.release("k")
    assert keys.claim("k", "again", KEY_TTL_S) is None


def test_keys_live_24_hours(open_store: Callable[[], EmbeddedStore], clock: Clock) -> None:
    keys = SqliteKeys(open_store())
    keys.claim("k", "first", KEY_TTL_S)

    clock.now = START + KEY_TTL_S - 1
    assert keys.claim("k", "second", KEY_TTL_S) == "first"
    clock.now = START + KEY_TTL_S + 1
    assert keys.get("k") is None
    assert keys.claim("k", "second", KEY_TTL_S) is None


def test_expired_rows_are_deleted_by_a_later_write(
    open_store: Callable[[], EmbeddedStore], clock: Clock, tmp_path: Path
) -> None:
    store = open_store()
    keys, counters = SqliteKeys(store), SqliteStorage(store=store)
    keys.claim("short", "r", 10)
    counters.incr("caller", 10)
    keys.claim("long", "r", KEY_TTL_S)

    clock.now = START + PURGE_EVERY_S + 1
    keys.get("short")  # reads delete nothing
    assert (rows(tmp_path, "idempotency_keys"), rows(tmp_path, "quota_counters")) == (2, 1)
    keys.put("other", "r", KEY_TTL_S)

    assert (rows(tmp_path, "idempotency_keys"), rows(tmp_path, "quota_counters")) == (2, 0)
    assert keys.get("long") == "r"


def test_workers_opening_one_store_share_keys_and_one_claim_wins(
    open_store: Callable[[], EmbeddedStore],
) -> None:
    workers = [SqliteKeys(open_store()) for _ in range(4)]
    workers[0].claim("seen", "by-0", KEY_TTL_S)
    assert workers[3].get("seen") == "by-0"

    def claim(n: int) -> str | None:
        return workers[n % 4].claim("contested", f"claim-{n}", KEY_TTL_S)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(claim, range(64)))

    winners = [n for n, answer in enumerate(answers) if answer is None]
    assert len(winners) == 1
    assert set(answers) - {None} == {f"claim-{winners[0]}"}


CLAIM_IN_A_PROCESS = """
import sys
from gateway.guards.embeddedstore import EmbeddedStore, SqliteKeys
keys = SqliteKeys(EmbeddedStore(sys.argv[1]))
sys.stdin.readline()  # every process is ready: claim together
print("won" if keys.claim("contested", sys.argv[2], 60) is None else "lost")
"""


def test_of_processes_claiming_one_key_at_once_exactly_one_wins(tmp_path: Path) -> None:
    EmbeddedStore.create(tmp_path)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM_IN_A_PROCESS, str(tmp_path), f"process-{n}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        )
        for n in range(4)
    ]
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()

    outcomes = [process.communicate(timeout=60)[0].strip() for process in processes]

    assert sorted(outcomes) == ["lost", "lost", "lost", "won"]


def test_a_duplicate_sent_to_another_worker_replays_without_dialing(
    open_store: Callable[[], EmbeddedStore],
) -> None:
    one, two = (IdempotentCalls(SqliteKeys(open_store()), wait_s=1) for _ in range(2))
    dialled: list[int] = []

    def dial() -> StoredAnswer:
        dialled.append(1)
        return ANSWER

    first = one.place("alice", "order-1", "fingerprint", dial)
    again = two.place("alice", "order-1", "fingerprint", dial)

    assert (first.replayed, again.replayed) == (False, True)
    assert (again.status, again.body, again.location) == (201, ANSWER.body, ANSWER.location)
    assert dialled == [1]


def test_a_store_that_fails_makes_requests_with_a_key_fail_closed_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    EmbeddedStore.create(tmp_path)
    keys = SqliteKeys(EmbeddedStore(tmp_path))
    (tmp_path / FILE_NAME).unlink()  # never opened: the worker finds it gone

    for _ in range(3):
        with caplog.at_level(logging.WARNING), pytest.raises(SharedStateUnavailable):
            keys.claim("k", "r", KEY_TTL_S)

    assert len([r for r in caplog.records if "embedded store failed" in r.message]) == 1
    assert not (tmp_path / FILE_NAME).exists()  # and no empty store was made in its place


def test_a_failed_transaction_is_rolled_back_and_the_store_serves_on(
    open_store: Callable[[], EmbeddedStore],
) -> None:
    store = open_store()
    keys = SqliteKeys(store)

    def fail_half_way() -> None:
        with store.writing() as db:
            db.execute("INSERT INTO idempotency_keys VALUES ('k', 'half-done', ?)", (START + 60,))
            raise RuntimeError("a failure inside the transaction")

    with pytest.raises(RuntimeError):
        fail_half_way()

    assert keys.get("k") is None
    assert keys.claim("k", "r", KEY_TTL_S) is None


def test_the_store_cannot_be_created_where_sqlite_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create the embedded store"):
        EmbeddedStore.create(tmp_path / "missing")


def test_counts_grow_within_a_window_and_start_again_after_it(
    open_store: Callable[[], EmbeddedStore], clock: Clock
) -> None:
    counters = SqliteStorage(store=open_store())

    assert counters.get("k") == 0
    assert counters.get_expiry("k") == START  # no window: resets now
    assert counters.incr("k", 60) == 1
    clock.now = START + 30
    assert counters.incr("k", 60, amount=5) == 6
    assert (counters.get("k"), counters.get_expiry("k")) == (6, START + 60)

    clock.now = START + 60
    assert counters.get("k") == 0
    assert counters.incr("k", 60) == 1
    assert counters.get_expiry("k") == START + 120


def test_clear_forgets_one_count_and_reset_all(
    open_store: Callable[[], EmbeddedStore],
) -> None:
    counters = SqliteStorage(store=open_store())
    counters.incr("a", 60)
    counters.incr("b", 60)

    counters.clear("a")
    assert (counters.get("a"), counters.get("b")) == (0, 1)
    assert counters.reset() == 1
    assert counters.get("b") == 0
    assert counters.check()


def test_the_storage_is_registered_under_its_own_scheme(tmp_path: Path) -> None:
    EmbeddedStore.create(tmp_path)
    from_uri = storage_from_string(f"ews-gateway+sqlite://{tmp_path}")
    on_store = SqliteStorage(store=EmbeddedStore(tmp_path))

    assert isinstance(from_uri, SqliteStorage)
    from_uri.incr("k", 60)
    assert on_store.incr("k", 60) == 2


def test_storage_errors_are_the_limits_librarys_and_fail_the_quota_open(tmp_path: Path) -> None:
    EmbeddedStore.create(tmp_path)
    counters = SqliteStorage(store=EmbeddedStore(tmp_path), wrap_exceptions=True)
    (tmp_path / FILE_NAME).unlink()
    failures: list[int] = []
    quotas = Quotas(
        counters, calls="1/minute", requests=None, on_storage_error=lambda: failures.append(1)
    )

    assert not counters.check()
    with pytest.raises(StorageError):
        counters.incr("k", 60)
    assert [quotas.charge(CALLS, "alice") for _ in range(3)] == [None] * 3
    assert failures == [1, 1, 1]


def test_a_quota_counted_by_several_workers_holds_exactly(
    open_store: Callable[[], EmbeddedStore],
) -> None:
    workers = [
        Quotas(
            SqliteStorage(store=open_store(), wrap_exceptions=True), calls="3/minute", requests=None
        )
        for _ in range(2)
    ]

    def charge(n: int) -> bool:
        try:
            workers[n % 2].charge(CALLS, "alice")
        except RateLimited:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(charge, range(20)))

    assert outcomes.count(True) == 3
    assert workers[1].charge(CALLS, "bob") is not None  # another caller counts apart


def test_apps_given_one_state_dir_share_keys_and_quotas_like_the_workers_of_serve(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    EmbeddedStore.create(state)
    fake = FakeExchange()
    one, two = (
        app_with_keys(tmp_path, fake, state_dir=str(state), rate_limit_calls="2/minute")
        for _ in range(2)
    )
    keyed = {"X-API-Key": KEY_A, "Idempotency-Key": '"order-7"'}

    first = one.test_client().post("/calls", json=PLACE, headers=keyed)
    replayed = two.test_client().post("/calls", json=PLACE, headers=keyed)
    second = two.test_client().post("/calls", json=PLACE, headers={"X-API-Key": KEY_A})
    third = one.test_client().post("/calls", json=PLACE, headers={"X-API-Key": KEY_A})

    assert [a.status_code for a in (first, replayed, second, third)] == [201, 201, 201, 429]
    assert replayed.get_json() == first.get_json()
    assert len(fake.calls) == 2
    assert sample(two, "ews_gateway_idempotent_replays_total") == 1


def test_apps_without_a_state_dir_keep_keys_in_their_own_memory(tmp_path: Path) -> None:
    fake = FakeExchange()
    one, two = (app_with_keys(tmp_path, fake, rate_limit_calls=None) for _ in range(2))
    keyed = {"X-API-Key": KEY_A, "Idempotency-Key": '"order-8"'}

    for app in (one, two):
        assert app.test_client().post("/calls", json=PLACE, headers=keyed).status_code == 201

    assert len(fake.calls) == 2
    assert list(tmp_path.glob(f"**/{FILE_NAME}")) == []
