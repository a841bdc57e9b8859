"""The shared Redis client: a failover's answers and pooled connections a middlebox forgot cost
a command one more try on a fresh connection, not a failure; a fresh connection's failure is
final; Sentinel URLs; and each such failure counted, and logged once per reason."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from gateway.guards import sharedstate
from gateway.guards.sharedstate import (
    COMMAND_TIMEOUT_S,
    FreshConnectionRetry,
    RedisSettings,
    SentinelAddress,
    StaleConnection,
    failure_reason,
    sentinel_address,
)
from tests.forwarder import Forwarder
from tests.redis_fakes import LOADING, MASTERDOWN, READONLY, NotPrimaryNode
from tests.redis_servers import RedisServer, redis_installed

needs_redis = pytest.mark.skipif(not redis_installed(), reason="redis-server is not installed")
NOT_PRIMARY_ANSWERS = [(READONLY, "readonly"), (LOADING, "loading"), (MASTERDOWN, "masterdown")]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(_free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


GatewayClient = Callable[[tuple[str, int]], redis.Redis]


@pytest.fixture
def gateway_client() -> Iterator[GatewayClient]:
    """The gateway's client for a Redis at an address, closed after the test."""
    clients: list[redis.Redis] = []

    def connect(address: tuple[str, int]) -> redis.Redis:
        client = sharedstate.connect(RedisSettings(f"redis://{address[0]}:{address[1]}/0"))
        assert client is not None
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def counting_retry(feature: str = "idempotency") -> tuple[FreshConnectionRetry, list[int]]:
    errors: list[int] = []
    return FreshConnectionRetry(feature, lambda: errors.append(1)), errors


def logged_reasons(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (record.__dict__["feature"], record.__dict__["reason"])
        for record in caplog.records
        if "reason" in record.__dict__
    ]


@needs_redis
@pytest.mark.network
@pytest.mark.parametrize(("answer", "reason"), NOT_PRIMARY_ANSWERS, ids=lambda v: str(v)[:12])
def test_a_not_primary_answer_on_a_pooled_connection_is_sent_again_on_a_fresh_one(
    answer: bytes,
    reason: str,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    gateway_client: GatewayClient,
) -> None:
    node = NotPrimaryNode(answer)
    with Forwarder(node.address) as address:
        client = gateway_client(("127.0.0.1", address.port))
        assert client.ping()  # a pooled connection to the node that is about to be demoted
        address.target = redis_server.address  # the failover moves the address
        retry, errors = counting_retry()

        with caplog.at_level(logging.WARNING, logger="gateway"):
            assert retry(lambda: client.set("key", "value"))
            assert retry(lambda: client.get("key")) == b"value"

    node.close()
    assert node.refused == [b"SET"]  # it did not run there; the second try ran on the new node
    assert redis_server.client().get("key") == b"value"
    assert errors == [1]
    assert logged_reasons(caplog) == [("idempotency", reason)]


@needs_redis
@pytest.mark.network
def test_a_readonly_answer_replaces_every_connection_opened_before_it_idle_or_in_use(
    redis_server: RedisServer,
    gateway_client: GatewayClient,
) -> None:
    node = NotPrimaryNode(READONLY)
    with Forwarder(node.address) as address:
        client = gateway_client(("127.0.0.1", address.port))
        pool = client.connection_pool
        opened = [pool.get_connection() for _ in range(3)]
        for connection in opened[1:]:
            pool.release(connection)  # two idle; the first stays in another thread's hands
        address.target = redis_server.address
        retry, _ = counting_retry()

        assert retry(lambda: client.set("key", "value"))
        pool.release(opened[0])
        again = [pool.get_connection() for _ in range(3)]
        for connection in again:
            connection.send_command("GET", "key")
            assert connection.read_response() == b"value"

    node.close()
    assert node.refused == [b"SET"]
    assert address.forwarded_flows == 3 + 3  # each of the three was opened again


@needs_redis
@pytest.mark.network
def test_a_fresh_connection_that_answers_readonly_too_fails_after_the_second_try(
    gateway_client: GatewayClient,
) -> None:
    node = NotPrimaryNode(READONLY)
    client = gateway_client(node.address)
    retry, errors = counting_retry()

    with pytest.raises(StaleConnection) as raised:
        retry(lambda: client.set("key", "value"))

    node.close()
    assert raised.value.reason == "readonly"
    assert node.refused == [b"SET", b"SET"]  # never a third
    assert errors == [1]  # the second failure is the caller's to count


@needs_redis
@pytest.mark.network
@pytest.mark.parametrize("reset", [False, True], ids=["silently", "with-a-reset"])
def test_a_pooled_connection_a_middlebox_forgot_costs_one_more_try_not_a_failure(
    reset: bool,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    gateway_client: GatewayClient,
) -> None:
    with Forwarder(redis_server.address) as address:
        client = gateway_client(("127.0.0.1", address.port))
        assert client.set("key", "value")
        address.forget_idle_flows(0.2, reset=reset)
        time.sleep(0.3)
        retry, errors = counting_retry()

        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="gateway"):
            assert retry(lambda: client.get("key")) == b"value"
        took_s = time.monotonic() - started

    assert address.forgotten_flows == 1
    assert errors == [1]
    assert logged_reasons(caplog) == [("idempotency", "stale_connection")]
    assert took_s < COMMAND_TIMEOUT_S + 0.2  # the forgotten flow's wait, then a fresh one


@needs_redis
@pytest.mark.network
def test_a_redis_that_never_answers_fails_a_command_within_its_timeout_without_a_second_try(
    redis_server: RedisServer,
    gateway_client: GatewayClient,
) -> None:
    with Forwarder(redis_server.address) as address:
        address.forget_idle_flows(0.0)  # nothing is ever forwarded: a hung Redis
        client = gateway_client(("127.0.0.1", address.port))
        retry, errors = counting_retry()

        started = time.monotonic()
        with pytest.raises(redis.TimeoutError) as raised:
            retry(lambda: client.get("key"))
        took_s = time.monotonic() - started

    assert not isinstance(raised.value, StaleConnection)
    assert address.forwarded_flows == 1
    assert errors == []
    assert took_s < 2 * COMMAND_TIMEOUT_S


@needs_redis
@pytest.mark.network
def test_an_idle_pooled_connection_is_pinged_before_reuse_and_uses_tcp_keepalive(
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    gateway_client: GatewayClient,
) -> None:
    monkeypatch.setattr(sharedstate, "HEALTH_CHECK_INTERVAL_S", 1)
    client = gateway_client(redis_server.address)
    assert client.set("key", "value")

    def pings() -> int:
        stats = redis_server.client().info("commandstats")
        return int(stats.get("cmdstat_ping", {}).get("calls", 0))

    before = pings()
    assert client.get("key") == b"value"
    assert pings() == before  # used a moment ago: no PING
    time.sleep(1.1)
    assert client.get("key") == b"value"
    assert pings() == before + 1  # idle past the interval: one PING first

    connection = client.connection_pool.get_connection()
    sock = connection._sock
    assert sock is not None
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3


def flaky(times: int, error: Exception) -> Callable[[], str]:
    """A command that fails with ERROR its first TIMES calls, then answers "OK"."""
    calls = [0]

    def command() -> str:
        calls[0] += 1
        if calls[0] <= times:
            raise error
        return "OK"

    return command


def test_each_retried_failure_is_counted_and_logged_once_per_reason_not_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    retry, errors = counting_retry("rate_limit")

    with caplog.at_level(logging.WARNING, logger="gateway"):
        for reason in ("readonly", "stale_connection") * 20:
            assert retry(flaky(1, StaleConnection(reason))) == "OK"

    assert len(errors) == 40
    assert logged_reasons(caplog) == [
        ("rate_limit", "readonly"),
        ("rate_limit", "stale_connection"),
    ]


def test_only_a_stale_connection_is_sent_again_and_only_once() -> None:
    retry, errors = counting_retry()

    with pytest.raises(redis.ConnectionError):
        retry(flaky(1, redis.ConnectionError("Connection refused")))
    with pytest.raises(redis.ResponseError):
        retry(flaky(1, redis.ResponseError("WRONGTYPE")))
    with pytest.raises(StaleConnection):
        retry(flaky(2, StaleConnection("loading")))

    assert errors == [1]  # the stale first try; the rest are the caller's to report


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (StaleConnection("masterdown"), "masterdown"),
        (redis.ReadOnlyError("You can't write against a read only replica."), "readonly"),
        (redis.BusyLoadingError("Redis is loading the dataset in memory"), "loading"),
        (redis.TimeoutError("Timeout reading from socket"), "timeout"),
        (redis.ConnectionError("Error 111 connecting"), "unreachable"),
        (redis.AuthenticationError("invalid password"), "authentication"),
        (redis.ResponseError("WRONGTYPE Operation against a key"), "error"),
    ],
)
def test_a_failure_is_logged_by_a_word_never_by_what_the_wire_said(
    error: Exception, reason: str
) -> None:
    assert failure_reason(error) == reason


def test_sentinels_readonly_turned_connection_error_still_reads_as_readonly() -> None:
    def read_as_redis_py_sentinel_does() -> None:
        try:
            raise redis.ReadOnlyError("You can't write against a read only replica.")
        except redis.ReadOnlyError:
            raise redis.ConnectionError("The previous master is now a slave") from None

    with pytest.raises(redis.ConnectionError) as raised:
        read_as_redis_py_sentinel_does()

    assert failure_reason(raised.value) == "readonly"


@pytest.mark.parametrize(
    ("url", "address"),
    [
        (
            "redis+sentinel://s1.example.com:26380,s2.example.com,[::1]:5000/mymaster",
            SentinelAddress(
                (("s1.example.com", 26380), ("s2.example.com", 26379), ("::1", 5000)),
                "mymaster",
            ),
        ),
        (
            "redis+sentinel://gateway@sentinel:26379/mymaster/2",
            SentinelAddress((("sentinel", 26379),), "mymaster", 2, "gateway"),
        ),
    ],
)
def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database(
    url: str, address: SentinelAddress
) -> None:
    assert sentinel_address(url) == address


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:hunter2@sentinel:26379/mymaster",
        "redis+sentinel://sentinel:26379",
        "redis+sentinel://sentinel:26379/mymaster/zero",
        "redis+sentinel://sentinel:99999/mymaster",
        "redis+sentinel://sentinel:26379,/mymaster",
        "redis+sentinel:///mymaster",
        "redis+sentinel://sentinel/mymaster?ssl=true",
    ],
)
def test_a_bad_sentinel_url_is_refused_without_repeating_a_password(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        sentinel_address(url)

    assert "hunter2" not in str(refused.value)


def test_a_sentinel_client_asks_the_sentinels_within_the_timeouts_and_opens_nothing_yet() -> None:
    client = sharedstate.connect(
        RedisSettings(
            "redis+sentinel://s1:26379,s2:26380/mymaster/2",
            password="redis-secret",
            sentinel_password="sentinel-secret",
        )
    )

    assert client is not None
    pool = client.connection_pool
    assert pool.service_name == "mymaster"  # type: ignore[attr-defined]
    assert pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["password"] == "redis-secret"
    assert pool.connection_kwargs["socket_timeout"] == COMMAND_TIMEOUT_S
    sentinels = pool.sentinel_manager.sentinels  # type: ignore[attr-defined]
    asked = [s.connection_pool.connection_kwargs for s in sentinels]
    assert [(kwargs["host"], kwargs["port"]) for kwargs in asked] == [("s1", 26379), ("s2", 26380)]
    assert {kwargs["password"] for kwargs in asked} == {"sentinel-secret"}
    assert {kwargs["socket_timeout"] for kwargs in asked} == {COMMAND_TIMEOUT_S}
    assert {kwargs["retry"].get_retries() for kwargs in asked} == {0}
