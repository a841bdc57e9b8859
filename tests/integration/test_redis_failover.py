"""`serve` keeps its shared state through a Redis failover and through middleboxes that forget
idle flows, with no restart: real redis-servers behind a loopback forwarder the tests repoint,
and a real Sentinel."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.guards.sharedstate import SENTINEL_CHECK_S
from tests.forwarder import Forwarder
from tests.integration.processes import (
    Response,
    Server,
    free_port,
    gateway_env,
    http,
    simulator_requests,
    start,
)
from tests.redis_servers import RedisSentinel, RedisServer, redis_installed

pytestmark = pytest.mark.skipif(
    not redis_installed(), reason="redis-server is not installed (Debian: redis-server)"
)
PLACE = {"itemId": "AAMkVoiceMail", "dialString": "+15551234567"}
# A failover must be over for callers within this long (the first request after it, in fact).
RECOVERY_S = 5.0


def redis_in(tmp_path: Path, name: str, options: list[str] | None = None) -> RedisServer:
    workdir = tmp_path / name
    workdir.mkdir()
    server = RedisServer(free_port(), workdir, options=options or [])
    server.start()
    return server


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = redis_in(tmp_path, "primary")
    replica = redis_in(tmp_path, "replica", ["--replicaof", "127.0.0.1", str(primary.port)])
    primary.wait_in_sync(replica)
    yield primary, replica
    replica.stop()
    primary.stop()


def serve(simulator: Server, tmp_path: Path, redis_url: str, **settings: str) -> Server:
    port = free_port()
    env = gateway_env(
        simulator,
        port,
        GATEWAY_REDIS_URL=redis_url,
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
        **settings,
    )
    return start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", tmp_path / "gateway.log")


def post(gateway: Server, key: str | None = None) -> Response:
    headers = {} if key is None else {"Idempotency-Key": f'"{key}"'}
    return http("POST", f"{gateway.url}/calls", PLACE, headers=headers)


def post_until_placed(gateway: Server, key: str) -> tuple[Response, float]:
    """POST with KEY until it is placed or RECOVERY_S passes; return the answer and the wait."""
    started = time.monotonic()
    answer = post(gateway, key)
    while answer.status == 503 and time.monotonic() - started < RECOVERY_S:
        time.sleep(0.1)
        answer = post(gateway, key)
    return answer, time.monotonic() - started


def dialled(simulator: Server) -> int:
    return [r["operation"] for r in simulator_requests(simulator)].count("PlayOnPhone")


def redis_errors(gateway: Server, feature: str) -> float:
    series = f'ews_gateway_redis_errors_total{{feature="{feature}"}}'
    for line in http("GET", f"{gateway.url}/metrics").body.decode().splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def log_reasons(gateway: Server) -> list[str]:
    """The reasons of the gateway's Redis warnings, one per line logged."""
    entries = [json.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]
    return [entry["reason"] for entry in entries if "reason" in entry and "feature" in entry]


def replay_everywhere(gateway: Server, key: str, times: int = 12) -> set[str]:
    """Send duplicates of KEY concurrently, so every worker's pool holds connections."""
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: post(gateway, key), range(times)))
    assert {answer.status for answer in answers} == {201}, [a.body for a in answers]
    return {answer.json()["callId"] for answer in answers}


def test_after_a_failover_behind_the_same_address_posts_and_the_calls_quota_work_at_once(
    primary_and_replica: tuple[RedisServer, RedisServer], simulator: Server, tmp_path: Path
) -> None:
    primary, replica = primary_and_replica
    with Forwarder(primary.address) as forwarder:
        gateway = serve(
            simulator,
            tmp_path,
            f"redis://127.0.0.1:{forwarder.port}/0",
            GATEWAY_RATE_LIMIT_CALLS="4/minute",
            GATEWAY_THREADS="16",
        )
        try:
            before = post(gateway, "before-failover")
            assert before.status == 201, before.body
            assert replay_everywhere(gateway, "before-failover") == {before.json()["callId"]}
            primary.wait_in_sync(replica)

            # The managed failover: promote the replica, demote the old primary (still up and
            # answering on the connections the gateway pooled), move the address.
            replica.client().replicaof("NO", "ONE")
            primary.client().replicaof("127.0.0.1", replica.port)
            forwarder.target = replica.address

            after, waited_s = post_until_placed(gateway, "after-failover")
            assert after.status == 201, after.body
            assert waited_s < 1.0  # the first request after the failover is placed
            # Keys from both sides of the failover replay, on every worker.
            assert replay_everywhere(gateway, "before-failover") == {before.json()["callId"]}
            assert replay_everywhere(gateway, "after-failover") == {after.json()["callId"]}
            # The calls quota counts on the promoted replica: 2 of 4 spent, then refused.
            assert [post(gateway).status for _ in range(3)] == [201, 201, 429]
            assert dialled(simulator) == 4
            # Each READONLY answer was counted (a worker's pool may have held several).
            assert redis_errors(gateway, "idempotency") + redis_errors(gateway, "rate_limit") >= 1
        finally:
            gateway.stop()

    reasons = log_reasons(gateway)
    assert "readonly" in reasons
    assert len(reasons) <= 2 * 2 * 3  # a line per reason, feature and worker: not per request


@pytest.mark.parametrize("reset", [False, True], ids=["silently", "with-a-reset"])
def test_after_a_quiet_period_behind_a_middlebox_that_forgets_idle_flows_every_post_is_placed(
    reset: bool, simulator: Server, tmp_path: Path
) -> None:
    server = redis_in(tmp_path, "redis")
    try:
        with Forwarder(server.address) as forwarder:
            # 12 bulkhead slots a worker (16 threads): 6 concurrent POSTs never meet that limit.
            gateway = serve(
                simulator,
                tmp_path,
                f"redis://127.0.0.1:{forwarder.port}/0",
                GATEWAY_THREADS="16",
            )
            try:
                with ThreadPoolExecutor(6) as pool:
                    warm = list(pool.map(lambda n: post(gateway, f"warm-{n}"), range(6)))
                    assert [answer.status for answer in warm] == [201] * 6
                    forwarder.forget_idle_flows(after_s=1.0, reset=reset)
                    time.sleep(1.5)  # the quiet period: every pooled flow is forgotten

                    quiet = list(pool.map(lambda n: post(gateway, f"after-quiet-{n}"), range(6)))
                errors = redis_errors(gateway, "idempotency")
            finally:
                gateway.stop()
    finally:
        server.stop()

    assert [answer.status for answer in quiet] == [201] * 6, [a.body for a in quiet]
    assert forwarder.forgotten_flows >= 1  # pooled connections were reused, and failed
    assert dialled(simulator) == 12
    assert errors >= 1
    assert "stale_connection" in log_reasons(gateway)


def test_with_a_sentinel_url_the_gateway_follows_the_primary_sentinel_elects(
    primary_and_replica: tuple[RedisServer, RedisServer], simulator: Server, tmp_path: Path
) -> None:
    primary, replica = primary_and_replica
    workdir = tmp_path / "sentinel"
    workdir.mkdir()
    sentinel = RedisSentinel(free_port(), workdir, primary)
    sentinel.start()
    try:
        wait_for(lambda: len(sentinel.client().sentinel_slaves("gateway")) == 1, "replica known")
        gateway = serve(
            simulator,
            tmp_path,
            f"redis+sentinel://127.0.0.1:{sentinel.port}/gateway",
            GATEWAY_RATE_LIMIT_CALLS="4/minute",
            GATEWAY_THREADS="16",
        )
        try:
            before = post(gateway, "before-failover")
            assert before.status == 201, before.body
            replay_everywhere(gateway, "before-failover")
            primary.wait_in_sync(replica)

            sentinel.client().execute_command("SENTINEL", "FAILOVER", "gateway")
            wait_for(lambda: sentinel.primary_port() == replica.port, "the switch")
            # Sentinel demotes the old primary, which stays up, only when it next looks at it
            # (up to 10 s), dropping what it took meanwhile: the gateway must have moved on.
            time.sleep(SENTINEL_CHECK_S + 0.5)
            assert primary.client().info("replication")["role"] == "master"

            after, _ = post_until_placed(gateway, "after-failover")
            assert after.status == 201, after.body
            assert replay_everywhere(gateway, "before-failover") == {before.json()["callId"]}
            assert [post(gateway).status for _ in range(3)] == [201, 201, 429]
            # Every write since the switch went to the promoted replica, none to the old node.
            assert len(replica.client().keys("ews-gateway:idempotency:*")) == 2
            assert len(primary.client().keys("ews-gateway:idempotency:*")) == 1
            [quota] = replica.client().keys("ews-gateway:limits*")
            assert int(replica.client().get(quota) or 0) == 5
        finally:
            gateway.stop()
    finally:
        sentinel.stop()


def wait_for(condition: object, what: str, timeout_s: float = 15.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {what}")
