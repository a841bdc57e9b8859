"""Event streams are shared fairly: per-caller stream limits, and polls bounded however
watchers come and go, against real gunicorn and the simulator."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.integration.processes import Server, free_port, gateway_env, http, start, wait_until
from tests.integration.streams import (
    Watcher,
    events_url,
    hang_up,
    most_polls_within,
    place_call,
    poll_times,
    start_watchers,
    stepping_simulator,
)

STEP_S = 1.5
POLL_S = 0.5
WORKERS = 2
KEY_A, KEY_B = "key-of-caller-a", "key-of-caller-b"


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Server]:
    server = stepping_simulator(STEP_S, tmp_path / "sim.log")
    yield server
    server.stop()


AS_A, AS_B = {"X-API-Key": KEY_A}, {"X-API-Key": KEY_B}


@pytest.fixture
def serve(simulator: Server, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start the gateway with two API key callers, A and B."""
    keys = tmp_path / "api-keys"
    keys.write_text("".join(hashlib.sha256(k.encode()).hexdigest() + "\n" for k in (KEY_A, KEY_B)))
    started: list[Server] = []

    def start_gateway(**env: str) -> Server:
        port = free_port()
        environ = gateway_env(
            simulator,
            port,
            GATEWAY_AUTH="apikey",
            GATEWAY_API_KEYS_FILE=str(keys),
            GATEWAY_EVENTS_POLL_SECONDS=str(POLL_S),
            **env,
        )
        log_path = tmp_path / "gw.log"
        started.append(start(["serve"], environ, f"http://127.0.0.1:{port}", "/readyz", log_path))
        return started[-1]

    yield start_gateway
    for server in started:
        server.stop()


def test_one_callers_many_streams_leave_another_caller_its_stream(
    serve: Callable[..., Server],
) -> None:
    gateway = serve(
        GATEWAY_WORKERS="1",
        GATEWAY_EVENTS_MAX_STREAMS="6",
        GATEWAY_EVENTS_MAX_STREAMS_PER_CALLER="3",
    )
    as_a, as_b = AS_A, AS_B
    theirs, mine = place_call(gateway, headers=as_a), place_call(gateway, headers=as_b)
    hoard = [Watcher(events_url(gateway, theirs), f"a-{n}", headers=as_a) for n in range(3)]
    hoard_threads = start_watchers(hoard)
    wait_until(lambda: all(w.events for w in hoard), "caller A's three streams")

    refusals = [http("GET", events_url(gateway, theirs), headers=as_a) for _ in range(5)]
    watcher = Watcher(events_url(gateway, mine), "b-1", headers=as_b)
    watcher_thread = start_watchers([watcher])[0]
    wait_until(lambda: "Connected" in watcher.states(), "caller B's stream to follow its call")
    hang_up(gateway, theirs, as_a)
    hang_up(gateway, mine, as_b)
    for thread in [*hoard_threads, watcher_thread]:
        thread.join(timeout=30)

    for refused in refusals:
        assert refused.status == 429
        assert refused.headers["Content-Type"] == "application/problem+json"
        assert refused.headers["Retry-After"] == "2"
        assert refused.json()["type"] == "urn:ews-gateway:problem:too-many-streams-for-caller"
    assert watcher.status == 200
    assert watcher.states() == ["Connecting", "Alerted", "Connected", "Disconnected"]
    assert all(w.ended_cleanly and w.states()[-1] == "Disconnected" for w in hoard)


def churn(gateway: Server, call_id: str, until: float, opened: list[int]) -> None:
    """Open a stream of the call and drop it as soon as its head arrives, again and again."""
    host, port = gateway.url.removeprefix("http://").split(":")
    request = (
        f"GET /calls/{quote(call_id, safe='')}/events HTTP/1.1\r\nHost: {host}\r\n"
        f"X-API-Key: {KEY_A}\r\nX-Request-ID: churn\r\n\r\n"
    ).encode()
    while time.monotonic() < until:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(request)
            if sock.recv(4096).startswith(b"HTTP/1.1 200"):
                opened[0] += 1


def test_streams_opened_and_dropped_in_a_loop_poll_a_call_once_an_interval_per_worker(
    serve: Callable[..., Server], simulator: Server
) -> None:
    gateway = serve(GATEWAY_WORKERS=str(WORKERS))
    churned, watched = place_call(gateway, headers=AS_A), place_call(gateway, headers=AS_B)
    opened = [0]
    churn_s = 5.0
    until = time.monotonic() + churn_s
    churners = [
        threading.Thread(target=churn, args=(gateway, churned, until, opened), daemon=True)
        for _ in range(4)
    ]
    for thread in churners:
        thread.start()
    time.sleep(1)
    # Meanwhile another caller's new watcher gets its call's state at once.
    asked = time.monotonic()
    watcher = Watcher(
        events_url(gateway, watched), "another-tab", headers=AS_B, stop_at="Connecting"
    )
    watcher.run()
    first_event_s = time.monotonic() - asked
    for thread in churners:
        thread.join(timeout=30)
    churn_ended = time.time()
    time.sleep(3 * POLL_S)
    hang_up(gateway, watched, AS_B)

    times = poll_times(simulator, churned)
    assert opened[0] > 200, "the loop opened streams by the hundred"
    assert watcher.states() == ["Connecting"]
    assert first_event_s < POLL_S + 1.5, first_event_s
    assert times, "the churned call was polled"
    # Each worker asks at most once an interval, whatever the churn.
    assert most_polls_within(times, POLL_S) <= WORKERS, times
    assert len(times) <= WORKERS * (churn_s / POLL_S + 2), len(times)
    # Once nobody watches, a poll that set off may land; none follows it.
    assert not [t for t in times if t > churn_ended + POLL_S + 0.5], (churn_ended, times)
