"""Per-caller rate limits: 429 with Retry-After and the httpapi RateLimit fields."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import limits
import pytest
import redis
from limits.errors import StorageError
from limits.storage import MemoryStorage, Storage

from gateway.errors import RateLimited
from gateway.guards import sharedstate
from gateway.guards.quotas import CALLS, LEASE_TTL_S, REQUESTS, Quotas, build_storage
from gateway.guards.sharedstate import RedisSettings, StaleConnection
from tests.fake_ews import FakeExchange
from tests.guards import KEY_A, KEY_B, PLACE, app_with_keys, sample
from tests.integration.processes import free_port
from tests.redis_servers import RedisServer, redis_installed


def test_calls_over_the_quota_are_429_with_retry_after_and_exchange_is_not_asked(
    tmp_path: Path,
) -> None:
    fake = FakeExchange()
    client = app_with_keys(tmp_path, fake, rate_limit_calls="2/minute").test_client()
    caller_a = {"X-API-Key": KEY_A}

    first, second, third = (client.post("/calls", json=PLACE, headers=caller_a) for _ in range(3))

    assert [first.status_code, second.status_code, third.status_code] == [201, 201, 429]
    assert first.headers["RateLimit-Policy"] == '"calls";q=2;w=60'
    assert first.headers["RateLimit"] == '"calls";r=1'
    assert second.headers["RateLimit"] == '"calls";r=0'
    retry_after = int(third.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert third.headers["RateLimit"] == f'"calls";r=0;t={retry_after}'
    assert third.headers["RateLimit-Policy"] == '"calls";q=2;w=60'
    assert third.mimetype == "application/problem+json"
    assert third.get_json()["type"] == "urn:ews-gateway:problem:rate-limited"
    assert len(fake.calls) == 2


def test_each_caller_has_its_own_quota(tmp_path: Path) -> None:
    fake = FakeExchange()
    client = app_with_keys(tmp_path, fake, rate_limit_calls="1/minute").test_client()

    a_first = client.post("/calls", json=PLACE, headers={"X-API-Key": KEY_A})
    a_again = client.post("/calls", json=PLACE, headers={"X-API-Key": KEY_A})
    b_first = client.post("/calls", json=PLACE, headers={"X-API-Key": KEY_B})

    assert [a_first.status_code, a_again.status_code, b_first.status_code] == [201, 429, 201]


def test_the_request_quota_counts_every_request_and_the_refusal_is_counted(
    tmp_path: Path,
) -> None:
    fake = FakeExchange()
    app = app_with_keys(tmp_path, fake, rate_limit_requests="3/hour", rate_limit_calls=None)
    client = app.test_client()
    caller_a = {"X-API-Key": KEY_A}

    statuses = [client.get("/calls/call-1", headers=caller_a).status_code for _ in range(3)]
    refused = client.get("/calls/call-1", headers=caller_a)

    assert statuses == [404, 404, 404]  # counted even when the call is not the caller's
    assert refused.status_code == 429
    assert refused.headers["RateLimit-Policy"] == '"requests";q=3;w=3600'
    assert sample(app, 'ews_gateway_refusals_total{reason="rate_limit"}') == 1
    # Probes and metrics are never limited.
    assert client.get("/livez").status_code == 200


def test_placing_a_call_charges_both_quotas_and_shows_both_policies(tmp_path: Path) -> None:
    app = app_with_keys(
        tmp_path, FakeExchange(), rate_limit_requests="100/minute", rate_limit_calls="5/minute"
    )

    answer = app.test_client().post("/calls", json=PLACE, headers={"X-API-Key": KEY_A})

    assert answer.headers["RateLimit-Policy"] == '"requests";q=100;w=60, "calls";q=5;w=60'
    assert answer.headers["RateLimit"] == '"requests";r=99, "calls";r=4'


def test_a_429_for_calls_still_shows_what_is_left_of_the_request_quota(tmp_path: Path) -> None:
    app = app_with_keys(
        tmp_path, FakeExchange(), rate_limit_requests="100/minute", rate_limit_calls="1/minute"
    )
    client = app.test_client()

    client.post("/calls", json=PLACE, headers={"X-API-Key": KEY_A})
    refused = client.post("/calls", json=PLACE, headers={"X-API-Key": KEY_A})

    assert refused.status_code == 429
    retry_after = refused.headers["Retry-After"]
    assert refused.headers["RateLimit-Policy"] == '"requests";q=100;w=60, "calls";q=1;w=60'
    assert refused.headers["RateLimit"] == f'"requests";r=98, "calls";r=0;t={retry_after}'


class UnreachableStorage(MemoryStorage):
    """Storage whose every command fails as a Redis outage does."""

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        raise StorageError(ConnectionError("Redis is down"))


def test_an_unreachable_store_lets_requests_through_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures: list[int] = []
    quotas = Quotas(
        UnreachableStorage(),
        calls="1/minute",
        requests=None,
        on_storage_error=lambda: failures.append(1),
    )

    with caplog.at_level(logging.WARNING, logger="gateway"):
        charges = [quotas.charge(CALLS, "alice") for _ in range(3)]

    assert charges == [None, None, None]
    assert len(failures) == 3  # each failure counted
    warnings = [r for r in caplog.records if "rate limit storage unreachable" in r.message]
    assert len(warnings) == 1  # but an outage does not write a warning per request


class CountingStorage(MemoryStorage):
    """Memory storage that counts its round trips, as Redis would be asked."""

    def __init__(self) -> None:
        super().__init__()
        self.trips = 0

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        self.trips += 1
        return super().incr(key, expiry, amount)

    def get_expiry(self, key: str) -> float:
        self.trips += 1
        return super().get_expiry(key)


class Clock:
    """time.monotonic() that a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def leasing_workers(
    storage: Storage, clock: Clock, *, requests: str, count: int = 2
) -> list[Quotas]:
    """COUNT processes sharing STORAGE, as replicas share Redis, each leasing its units."""
    return [
        Quotas(storage, calls=None, requests=requests, lease_target_s=0.1, clock=clock)
        for _ in range(count)
    ]


def admitted(quotas: Quotas, owner: str = "alice") -> bool:
    try:
        quotas.charge(REQUESTS, owner)
    except RateLimited:
        return False
    return True


def counted_key(text: str, owner: str = "alice") -> str:
    """The storage key of OWNER's request quota."""
    return limits.parse(text).key_for(REQUESTS, owner)


def test_a_busy_caller_takes_its_units_in_leases_and_the_workers_never_pass_the_quota() -> None:
    storage, clock = CountingStorage(), Clock()
    workers = leasing_workers(storage, clock, requests="100000/hour")
    answered = 0
    # 1,000 requests a second, spread over two workers, for 5 s.
    for n in range(5000):
        clock.now += 0.001
        answered += admitted(workers[n % 2])

    assert answered == 5000
    # Each worker sees 500/s: leases grow to 50 units (0.1 s of them), so about 20 trips a second.
    assert storage.trips < 5000 / 20
    counted = storage.get(counted_key("100000/hour"))
    assert 5000 <= counted <= 5000 + 2 * 50


def test_leased_units_run_out_at_the_quota_exactly_with_the_last_lease_cut_short() -> None:
    storage, clock = CountingStorage(), Clock()
    # 1,005: the leases (1, 2, 4, 8, then 10 at most) leave 5 units for the last one.
    workers = leasing_workers(storage, clock, requests="1005/hour")
    outcomes = []
    for n in range(1200):
        clock.now += 0.0001
        outcomes.append(admitted(workers[n % 2]))

    # Every unit counted is spent: the last lease takes only what was left, and a worker
    # refused while the other still holds units leaves those to the other.
    assert sum(outcomes) == 1005
    assert outcomes[:990] == [True] * 990
    assert outcomes[-20:] == [False] * 20
    # A lease never takes more than 1 % of the quota.
    assert storage.trips >= 1000 / 10


def test_a_quota_under_200_per_window_is_counted_one_unit_at_a_time() -> None:
    storage, clock = CountingStorage(), Clock()
    workers = leasing_workers(storage, clock, requests="150/minute")
    outcomes = []
    for n in range(160):
        clock.now += 0.0001
        outcomes.append(admitted(workers[n % 2]))

    assert outcomes == [True] * 150 + [False] * 10
    # One per unit, then per worker one refused INCRBY and one read of the window's reset
    # (and one of its count, which this storage does not count).
    assert storage.trips == 150 + 2 * 2


def test_unspent_units_of_a_lease_are_dropped_after_a_second_and_stay_counted() -> None:
    storage, clock = CountingStorage(), Clock()
    [worker] = leasing_workers(storage, clock, requests="100000/hour", count=1)
    for _ in range(200):
        clock.now += 0.0005
        assert admitted(worker)
    counted = storage.get(counted_key("100000/hour"))
    assert counted > 200  # the last lease holds units not spent yet

    clock.now += LEASE_TTL_S
    trips = storage.trips
    assert admitted(worker)

    assert storage.trips == trips + 1  # the expired lease was not spent
    # The lease of 128 units lived 1.04 s and 73 were spent: 0.1 s of that rate is 8 units.
    assert storage.get(counted_key("100000/hour")) == counted + 8


class LostAnswerStorage(CountingStorage):
    """Storage that counts, then loses the answer while `losing`, as a Redis timeout does."""

    def __init__(self) -> None:
        super().__init__()
        self.losing = False

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        count = super().incr(key, expiry, amount)
        if self.losing:
            raise StorageError(TimeoutError("Timeout reading from socket"))
        return count


def test_a_brownout_strands_at_most_one_unit_per_request_and_leases_grow_again_after() -> None:
    storage, clock = LostAnswerStorage(), Clock()
    [worker] = leasing_workers(storage, clock, requests="100000/hour", count=1)
    key = counted_key("100000/hour")
    for _ in range(1000):  # 1,000 requests a second: leases of about 100 units
        clock.now += 0.001
        assert admitted(worker)

    storage.losing = True
    before = storage.get(key)
    for _ in range(300):
        clock.now += 0.001
        assert admitted(worker)  # fail open
    stranded = storage.get(key) - before

    # The units left of the last lease are spent without storage; then the first lost
    # answer strands one lease (at most 2 x 100 units) and every later one a single unit.
    assert stranded <= 200 + 300
    storage.losing = False
    trips = storage.trips
    for _ in range(1000):
        clock.now += 0.001
        assert admitted(worker)
    assert storage.trips - trips < 50  # leases of 1, 2, 4 ... 100 again, not 1,000 trips


def test_a_refused_caller_is_answered_from_memory_until_the_window_resets() -> None:
    storage, clock = CountingStorage(), Clock()
    [worker] = leasing_workers(storage, clock, requests="3/minute", count=1)
    for _ in range(3):
        assert admitted(worker)
    with pytest.raises(RateLimited) as first:
        worker.charge(REQUESTS, "alice")
    trips = storage.trips

    clock.now += 30
    with pytest.raises(RateLimited) as later:
        worker.charge(REQUESTS, "alice")

    assert storage.trips == trips
    assert 1 <= later.value.retry_after_s <= first.value.retry_after_s - 29
    assert admitted(worker, "bob")  # another caller is not refused with Alice


def test_threads_of_two_workers_spend_every_unit_of_the_quota_and_no_more() -> None:
    storage = MemoryStorage()
    workers = [
        Quotas(storage, calls=None, requests="5000/hour", lease_target_s=0.1) for _ in range(2)
    ]

    def hammer(worker: Quotas) -> int:
        return sum(admitted(worker) for _ in range(1000))

    with ThreadPoolExecutor(16) as pool:
        answered = sum(pool.map(hammer, workers * 8))

    assert answered == 5000


class MeetingStorage(MemoryStorage):
    """Memory storage whose next two INCRBYs wait for each other once armed."""

    def __init__(self) -> None:
        super().__init__()
        self.meeting: threading.Barrier | None = None

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        count = super().incr(key, expiry, amount)
        if self.meeting is not None:
            self.meeting.wait(timeout=5)
        return count


def test_two_threads_leasing_at_once_keep_both_leases() -> None:
    storage, clock = MeetingStorage(), Clock()
    [worker] = leasing_workers(storage, clock, requests="400/hour", count=1)
    for _ in range(11):  # leases of 1, 2, 4 and 4 units, all spent
        clock.now += 0.001
        assert admitted(worker)

    storage.meeting = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda _: admitted(worker), range(2)))
    storage.meeting = None
    answered = 11 + sum(together)
    while admitted(worker):
        answered += 1

    assert together == [True, True]
    assert answered == 400  # neither lease's units were lost


def test_the_lease_after_two_merged_ones_is_sized_to_both() -> None:
    storage, clock = MeetingStorage(), Clock()
    [worker] = leasing_workers(storage, clock, requests="100000/hour", count=1)
    for _ in range(7):  # leases of 1, 2 and 4 units, spent at 1,000 a second
        clock.now += 0.001
        assert admitted(worker)
    storage.meeting = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda _: admitted(worker), range(2))) == [True, True]
    storage.meeting = None
    for _ in range(14):  # what is left of the two leases of 8
        clock.now += 0.001
        assert admitted(worker)
    counted = storage.get(counted_key("100000/hour"))

    clock.now += 0.001
    assert admitted(worker)

    # 16 units in 15 ms: 0.1 s of that is 107, and a lease at most doubles the last (16).
    assert storage.get(counted_key("100000/hour")) == counted + 32


class ShortWindowStorage(CountingStorage):
    """Counting storage whose windows all reset a quarter of a second from now."""

    def get_expiry(self, key: str) -> float:
        self.trips += 1
        return time.time() + 0.25


def test_a_refusal_just_before_the_window_resets_is_not_remembered_past_the_reset() -> None:
    storage, clock = ShortWindowStorage(), Clock()
    [worker] = leasing_workers(storage, clock, requests="1/second", count=1)
    assert admitted(worker)
    with pytest.raises(RateLimited) as refused:
        worker.charge(REQUESTS, "alice")
    assert refused.value.retry_after_s == 1  # the header still says at least a second

    clock.now += 0.5
    storage.reset()  # the window reset a quarter of a second ago

    assert admitted(worker)


class UnreadableExpiryStorage(CountingStorage):
    """Counting storage that counts, but fails to say when a window resets."""

    def get_expiry(self, key: str) -> float:
        raise StorageError(ConnectionError("Redis went away"))


def test_a_caller_over_the_quota_is_refused_when_the_reset_cannot_be_read() -> None:
    failures: list[int] = []
    storage, clock = UnreadableExpiryStorage(), Clock()
    worker = Quotas(
        storage,
        calls=None,
        requests="1/minute",
        lease_target_s=0.1,
        on_storage_error=lambda: failures.append(1),
        clock=clock,
    )
    assert admitted(worker)

    with pytest.raises(RateLimited):
        worker.charge(REQUESTS, "alice")

    assert failures == [1]  # the failure is still counted


class ResettingStorage(CountingStorage):
    """Counting storage whose window, once armed, resets before its reset is read, and
    another replica then counts a request in the new window."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def get_expiry(self, key: str) -> float:
        if self.armed:
            self.armed = False
            self.reset()
            self.incr(key, 60)
        return super().get_expiry(key)


def test_a_refusal_is_not_remembered_through_a_window_that_began_after_it() -> None:
    storage, clock = ResettingStorage(), Clock()
    [worker] = leasing_workers(storage, clock, requests="3/minute", count=1)
    for _ in range(3):
        assert admitted(worker)
    storage.armed = True
    with pytest.raises(RateLimited):
        worker.charge(REQUESTS, "alice")

    clock.now += 1

    assert admitted(worker)  # the new window has counted one request of three


class WindowRedis:
    """A Redis client holding counters whose window has LEFT_MS milliseconds to go: TTL
    rounds that to the nearest second, as Redis does; PTTL gives it whole."""

    def __init__(self, left_ms: int, stale_tries: int = 0) -> None:
        self.left_ms = left_ms
        self.counts: dict[str, int] = {}
        self.stale_tries = stale_tries  # counts whose pooled connection is found stale first
        self.connection_pool = redis.ConnectionPool()  # never connects

    def register_script(self, _script: str) -> Any:
        def incr_expire(keys: list[str], args: list[int]) -> int:
            if self.stale_tries:
                self.stale_tries -= 1
                raise StaleConnection("readonly")
            self.counts[keys[0]] = self.counts.get(keys[0], 0) + int(args[1])
            return self.counts[keys[0]]

        return incr_expire

    def get(self, key: str) -> bytes:
        return str(self.counts.get(key, 0)).encode()

    def ttl(self, _key: str) -> int:
        return (self.left_ms + 500) // 1000

    def pttl(self, _key: str) -> int:
        return self.left_ms


@pytest.mark.parametrize(
    ("left_ms", "retry_after_s"), [(2400, 3), (2600, 3), (2000, 3), (999, 1), (59_999, 60)]
)
def test_retry_after_is_the_windows_reset_in_milliseconds_rounded_up(
    left_ms: int, retry_after_s: int
) -> None:
    storage = build_storage(cast(redis.Redis, WindowRedis(left_ms)), on_error=lambda: None)
    quotas = Quotas(storage, calls="1/minute", requests=None)
    quotas.charge(CALLS, "alice")

    with pytest.raises(RateLimited) as refused:
        quotas.charge(CALLS, "alice")

    # Redis drops a key the millisecond after its PTTL reaches 0: 2000 ms left is 3 s to wait.
    assert refused.value.retry_after_s == retry_after_s
    assert refused.value.headers["RateLimit"] == f'"calls";r=0;t={retry_after_s}'


def test_a_count_a_failover_interrupted_is_sent_again_and_the_failure_counted() -> None:
    failures: list[int] = []
    window = WindowRedis(30_000, stale_tries=1)
    quotas = Quotas(
        build_storage(cast(redis.Redis, window), on_error=lambda: failures.append(1)),
        calls="2/minute",
        requests=None,
    )

    assert quotas.charge(CALLS, "alice") is not None  # counted, not let through uncounted
    assert list(window.counts.values()) == [1]
    assert failures == [1]


def wait_as_told(quotas: Quotas) -> None:
    """Spend a 1-per-2-seconds quota, be refused 0.6 s later, wait exactly as told: served."""
    quotas.charge(CALLS, "alice")
    time.sleep(0.6)  # 1.4 s left: Redis's TTL says 1
    with pytest.raises(RateLimited) as refused:
        quotas.charge(CALLS, "alice")
    assert refused.value.retry_after_s is not None
    time.sleep(refused.value.retry_after_s)
    assert quotas.charge(CALLS, "alice") is not None


def test_a_caller_that_waits_as_told_is_served_in_memory() -> None:
    wait_as_told(
        Quotas(build_storage(None, on_error=lambda: None), calls="1/2second", requests=None)
    )


@pytest.mark.network
@pytest.mark.skipif(not redis_installed(), reason="redis-server is not installed")
def test_a_caller_that_waits_as_told_is_served_in_redis(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    client = sharedstate.connect(RedisSettings(server.url))
    try:
        storage = build_storage(client, on_error=lambda: None)
        wait_as_told(Quotas(storage, calls="1/2second", requests=None))
    finally:
        assert client is not None
        client.close()
        server.stop()
