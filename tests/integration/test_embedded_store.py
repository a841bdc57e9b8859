"""One `serve` without Redis is one instance: its workers share idempotency keys and quota
counts through the embedded store, which outlives a recycled worker and goes with the
instance."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path

import pytest

from tests.integration.processes import (
    Response,
    Server,
    free_port,
    gateway_env,
    http,
    simulator_requests,
    start,
    worker_holding,
    worker_pids,
)

PLACE = {"itemId": "AAMkVoiceMail", "dialString": "+15551234567"}
# Connections opened to find one that a given worker accepts; each lands on either.
CONNECT_TRIES = 200
WORKERS = 2  # as gateway_env starts them
StartGateway = Callable[..., Server]


@pytest.fixture
def start_gateway(simulator: Server, tmp_path: Path) -> Iterator[StartGateway]:
    """Start `ews-gateway serve` (two workers, no GATEWAY_REDIS_URL) with extra settings."""
    started: list[Server] = []

    def start_one(**extra: str) -> Server:
        port = free_port()
        env = gateway_env(simulator, port, **extra)
        log = tmp_path / f"gateway-{len(started)}.log"
        server = start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", log)
        started.append(server)
        deadline = time.monotonic() + 10
        while len(worker_pids(server.process.pid)) < WORKERS and time.monotonic() < deadline:
            time.sleep(0.01)
        return server

    yield start_one
    for server in started:
        server.stop()


def holder(connection: HTTPConnection, workers: set[int]) -> int:
    """Return the worker that accepted CONNECTION, waiting a moment for the accept."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return worker_holding(connection.sock, workers)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def connection_to(gateway: Server, worker: int) -> HTTPConnection:
    """Open new connections until WORKER accepts one; close the others."""
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    workers = set(worker_pids(gateway.process.pid))
    for _ in range(CONNECT_TRIES):
        connection = HTTPConnection(host, int(port), timeout=30)
        connection.connect()
        if holder(connection, workers) == worker:
            return connection
        connection.close()
    raise AssertionError(f"worker {worker} accepted none of {CONNECT_TRIES} connections")


def post_through(gateway: Server, worker: int, headers: dict[str, str] | None = None) -> Response:
    """POST a call over a new connection that WORKER accepted."""
    connection = connection_to(gateway, worker)
    try:
        body = json.dumps(PLACE).encode()
        connection.request(
            "POST", "/calls", body, {**(headers or {}), "Content-Type": "application/json"}
        )
        answer = connection.getresponse()
        return Response(answer.status, answer.headers, answer.read())
    finally:
        connection.close()


def placed_calls(simulator: Server) -> int:
    return [request["operation"] for request in simulator_requests(simulator)].count("PlayOnPhone")


def until_answered(method: str, url: str, headers: dict[str, str] | None = None) -> Response:
    """Send a request, retrying a refused connection (every worker may be restarting at once)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return http(method, url, PLACE if method == "POST" else None, headers=headers)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_six_retries_with_one_key_over_new_connections_dial_once(
    start_gateway: StartGateway, simulator: Server
) -> None:
    gateway = start_gateway()
    workers = worker_pids(gateway.process.pid)
    keyed = {"Idempotency-Key": '"order-6-retries"'}

    # Each retry is a new connection, accepted by one worker and then the other.
    answers = [post_through(gateway, workers[n % 2], keyed) for n in range(6)]

    assert [answer.status for answer in answers] == [201] * 6, [a.body for a in answers]
    assert len({answer.json()["callId"] for answer in answers}) == 1
    assert len({answer.headers["Location"] for answer in answers}) == 1
    assert placed_calls(simulator) == 1


def test_a_three_per_minute_calls_quota_holds_for_the_instance(
    start_gateway: StartGateway, simulator: Server
) -> None:
    gateway = start_gateway(GATEWAY_RATE_LIMIT_CALLS="3/minute")
    workers = worker_pids(gateway.process.pid)

    answers = [post_through(gateway, workers[n % 2]) for n in range(8)]

    assert [answer.status for answer in answers] == [201] * 3 + [429] * 5
    assert answers[2].headers["RateLimit"] == '"calls";r=0'
    assert all(1 <= int(answer.headers["Retry-After"]) <= 60 for answer in answers[3:])
    assert placed_calls(simulator) == 3


def test_a_retry_with_an_old_key_replays_after_every_worker_was_recycled(
    start_gateway: StartGateway, simulator: Server
) -> None:
    gateway = start_gateway(GATEWAY_MAX_REQUESTS="3")
    keyed = {"Idempotency-Key": '"before-the-restarts"'}
    first = until_answered("POST", f"{gateway.url}/calls", keyed)
    assert first.status == 201, first.body
    booted = set(worker_pids(gateway.process.pid))

    deadline = time.monotonic() + 60
    while booted & set(worker_pids(gateway.process.pid)) and time.monotonic() < deadline:
        until_answered("GET", f"{gateway.url}/livez")
    assert not booted & set(worker_pids(gateway.process.pid)), "the workers were not recycled"

    retry = until_answered("POST", f"{gateway.url}/calls", keyed)

    assert retry.status == 201, retry.body
    assert retry.json() == first.json()
    assert placed_calls(simulator) == 1


def test_the_store_lives_in_a_private_directory_removed_when_the_instance_stops(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    parent = tmp_path / "state"
    parent.mkdir()
    gateway = start_gateway(GATEWAY_STATE_DIR=str(parent))
    keyed = {"Idempotency-Key": '"kept-on-disk"'}
    assert http("POST", f"{gateway.url}/calls", PLACE, headers=keyed).status == 201

    [instance_dir] = parent.iterdir()
    assert instance_dir.stat().st_mode & 0o777 == 0o700
    assert (instance_dir / "state.sqlite3").is_file()

    gateway.stop()

    assert list(parent.iterdir()) == []
