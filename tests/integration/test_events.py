"""GET /calls/{callId}/events against real gunicorn and the simulator.

The simulator moves a call on every STEP_S (Connecting, Alerted, Connected), well
above the poll interval, so every watcher must see every state.
"""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.integration.load import LoadClient
from tests.integration.processes import (
    Server,
    free_port,
    gateway_env,
    http,
    port_of,
    set_faults,
    start,
    wait_until,
)
from tests.integration.streams import (
    Watcher,
    events_url,
    hang_up,
    place_call,
    polls_by_call,
    start_watchers,
    stepping_simulator,
)

STEP_S = 1.5
POLL_S = 0.5
WORKERS = 2
ORDER = ["Connecting", "Alerted", "Connected", "Disconnected"]


@pytest.fixture
def slow_simulator(tmp_path: Path) -> Iterator[Server]:
    server = stepping_simulator(STEP_S, tmp_path / "sim.log")
    yield server
    server.stop()


@pytest.fixture
def serve(slow_simulator: Server, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start_gateway(**env: str) -> Server:
        port = free_port()
        environ = gateway_env(
            slow_simulator, port, **{"GATEWAY_EVENTS_POLL_SECONDS": str(POLL_S), **env}
        )
        log_path = tmp_path / f"gw-{len(started)}.log"
        server = start(["serve"], environ, f"http://127.0.0.1:{port}", "/readyz", log_path)
        started.append(server)
        return server

    yield start_gateway
    for server in started:
        server.stop()


def test_200_watchers_of_20_calls_see_every_state_from_one_poll_per_call_per_worker(
    serve: Callable[..., Server], slow_simulator: Server
) -> None:
    # GATEWAY_AUTH=none: every watcher is the same caller.
    gateway = serve(GATEWAY_WORKERS=str(WORKERS), GATEWAY_EVENTS_MAX_STREAMS_PER_CALLER="1000")
    call_ids = [place_call(gateway) for _ in range(20)]
    watchers = [Watcher(events_url(gateway, call_ids[n % 20]), f"watch-{n}") for n in range(200)]
    probes: list[tuple[int, float]] = []
    stop_probing = threading.Event()

    def probe() -> None:
        while not stop_probing.is_set():
            started = time.monotonic()
            status = http("GET", f"{gateway.url}/livez", timeout=5).status
            probes.append((status, time.monotonic() - started))
            time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    threads = start_watchers(watchers)
    wait_until(
        lambda: all("Connected" in w.states() for w in watchers), "every watcher to see Connected"
    )
    ordinary = http("GET", f"{gateway.url}/calls/{quote(call_ids[0], safe='')}")
    assert ordinary.status == 200, "ordinary requests are served while 200 streams are open"
    for call_id in call_ids:
        assert http("DELETE", f"{gateway.url}/calls/{quote(call_id, safe='')}").status == 200
    for thread in threads:
        thread.join(timeout=30)
    stop_probing.set()
    prober.join(timeout=10)

    for watcher in watchers:
        assert watcher.error is None, watcher.error
        assert watcher.status == 200
        assert watcher.states() == ORDER, watcher.request_id
        assert watcher.ended_cleanly, "the stream ends after Disconnected"
        ranks = [int(event["id"].split(".")[0]) for event in watcher.events]
        assert ranks == [1, 2, 3, 4]
    assert probes, "/livez was asked while the streams were open"
    assert all(status == 200 for status, _ in probes)
    polls = polls_by_call(slow_simulator, "watch-")
    # The simulator sees Exchange's ids: the last part of the ids the gateway signs (gw1.*.*.ID).
    assert set(polls) == {call_id.split(".", 3)[3] for call_id in call_ids}
    for call_id, pollers in polls.items():
        assert len(pollers) <= WORKERS, "one poller per call per worker"
        for times in pollers.values():
            times.sort()
            gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
            # A poller waits an interval from each answer, so arrivals are at least that apart.
            assert min(gaps) >= POLL_S, (call_id, gaps)
        every = sorted(t for times in pollers.values() for t in times)
        for index, first in enumerate(every):
            within = [t for t in every[index:] if t - first < POLL_S]
            assert len(within) <= WORKERS, (call_id, within)


def test_resuming_with_last_event_id_does_not_repeat_what_was_seen(
    serve: Callable[..., Server],
) -> None:
    gateway = serve()
    call_id = place_call(gateway)
    url = events_url(gateway, call_id)
    first = Watcher(url, "resume-1")
    first_thread = start_watchers([first])[0]
    wait_until(lambda: first.states()[:1] == ["Connecting"], "the first state")
    last_id = first.events[0]["id"]

    resumed = Watcher(url, "resume-2", last_event_id=last_id)
    resumed_thread = start_watchers([resumed])[0]
    wait_until(lambda: "Connected" in resumed.states(), "the resumed watcher to see Connected")
    assert http("DELETE", f"{gateway.url}/calls/{quote(call_id, safe='')}").status == 200
    resumed_thread.join(timeout=30)
    first_thread.join(timeout=30)

    assert resumed.states() == ["Alerted", "Connected", "Disconnected"]
    assert [event["id"].split(".")[0] for event in resumed.events] == ["2", "3", "4"]
    assert resumed.ended_cleanly
    assert first.states() == ORDER
    after_the_end = Watcher(url, "resume-3", last_event_id=resumed.events[-1]["id"])
    after_the_end.run()
    assert after_the_end.status == 204, "a reconnection after the end is told to stop"
    assert after_the_end.events == []


def test_sigterm_ends_every_open_stream_with_a_retry_hint_and_loses_no_request(
    serve: Callable[..., Server],
) -> None:
    gateway = serve(GATEWAY_WORKERS="2", GATEWAY_THREADS="16")
    call_ids = [place_call(gateway) for _ in range(3)]
    watchers = [Watcher(events_url(gateway, call_ids[n % 3]), f"drain-{n}") for n in range(12)]
    threads = start_watchers(watchers)
    wait_until(lambda: all(w.events for w in watchers), "every watcher's first event")
    give_up_at = time.monotonic() + 40
    path = f"/calls/{quote(call_ids[0], safe='')}"
    clients = [
        LoadClient(port_of(gateway), "GET", path, keep_alive, give_up_at)
        for keep_alive in (True, False, True, False)
    ]
    client_threads = [threading.Thread(target=client.run) for client in clients]
    for thread in client_threads:
        thread.start()
    try:
        wait_until(lambda: sum(len(c.attempts) for c in clients) >= 8, "load to flow")
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=30) == 0
    finally:
        for thread in [*threads, *client_threads]:
            thread.join(timeout=30)

    for watcher in watchers:
        assert watcher.error is None, watcher.error
        assert watcher.ended_cleanly
        assert watcher.events[-1].get("retry") == "1000", watcher.events[-1]
        assert "Disconnected" not in watcher.states()
    attempts = [attempt for client in clients for attempt in client.attempts]
    assert not [a for a in attempts if a.error is not None], "accepted requests all answered"
    assert all(a.status == 200 for a in attempts)
    assert all(client.refused for client in clients), "once stopped, the gateway refuses"


def test_beyond_the_stream_limit_a_watcher_gets_503_with_retry_after(
    serve: Callable[..., Server],
) -> None:
    gateway = serve(GATEWAY_WORKERS="1", GATEWAY_EVENTS_MAX_STREAMS="2")
    call_id = place_call(gateway)
    watchers = [Watcher(events_url(gateway, call_id), f"limit-{n}") for n in range(2)]
    threads = start_watchers(watchers)
    wait_until(lambda: all(w.events for w in watchers), "both streams to be open")

    refused = http("GET", events_url(gateway, call_id))

    assert refused.status == 503
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert refused.headers["Retry-After"] == "2"
    assert refused.json()["type"] == "urn:ews-gateway:problem:too-many-streams"
    assert http("DELETE", f"{gateway.url}/calls/{quote(call_id, safe='')}").status == 200
    for thread in threads:
        thread.join(timeout=30)
    assert all(w.ended_cleanly and w.states()[-1] == "Disconnected" for w in watchers)
    wait_until(
        lambda: http("GET", f"{gateway.url}/metrics").body.count(b"event_streams_open 0.0"),
        "the slots to be free again",
    )


def test_a_throttled_exchange_is_the_503_of_the_first_read_then_a_problem_event_in_a_stream(
    serve: Callable[..., Server], slow_simulator: Server
) -> None:
    gateway = serve()
    call_id = place_call(gateway)
    busy = {"kind": "busy", "backOffMs": 3000, "operation": "GetPhoneCallInformation"}
    set_faults(slow_simulator, {**busy, "count": 1})

    refused = http("GET", events_url(gateway, call_id), headers={"X-Request-ID": "throttled-1"})

    assert refused.status == 503
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert refused.headers["Retry-After"] == "3"
    assert refused.json()["type"] == "urn:ews-gateway:problem:exchange-busy"

    watcher = Watcher(events_url(gateway, call_id), "throttled-2")
    thread = start_watchers([watcher])[0]
    wait_until(lambda: bool(watcher.events), "the first state")
    set_faults(slow_simulator, busy)
    thread.join(timeout=30)

    assert watcher.status == 200
    assert watcher.ended_cleanly
    assert [event["event"] for event in watcher.events] == ["state", "problem"]
    problem_event = watcher.events[-1]
    assert problem_event["retry"] == "3000"
    problem = json.loads(problem_event["data"])
    assert problem["status"] == 503
    assert problem["type"] == "urn:ews-gateway:problem:exchange-busy"
    assert problem["ewsResponseCode"] == "ErrorServerBusy"
    assert problem["retryAfter"] == 3
    assert problem["requestId"] == "throttled-2"


def test_a_watcher_resumed_on_another_instance_never_gets_a_state_again_or_an_older_one(
    serve: Callable[..., Server],
) -> None:
    here = serve(GATEWAY_WORKERS="1", GATEWAY_EVENTS_POLL_SECONDS="0.25")
    # The other instance polls slowly: when the watcher comes, its last answer is Connecting.
    there = serve(GATEWAY_WORKERS="1", GATEWAY_EVENTS_POLL_SECONDS="4")
    call_id = place_call(here)
    keeper = Watcher(events_url(there, call_id), "keeps-there-polling")
    keeper_thread = start_watchers([keeper])[0]
    wait_until(lambda: keeper.states() == ["Connecting"], "the other instance to read Connecting")
    seen_here = Watcher(events_url(here, call_id), "tab-here", stop_at="Connected")
    seen_here.run()
    assert seen_here.states() == ["Connecting", "Alerted", "Connected"]

    resumed = Watcher(
        events_url(there, call_id), "tab-there", last_event_id=seen_here.events[-1]["id"]
    )
    resumed_thread = start_watchers([resumed])[0]
    wait_until(lambda: resumed.status is not None, "the resumed stream's head")
    hang_up(here, call_id)
    resumed_thread.join(timeout=30)
    keeper_thread.join(timeout=30)

    assert resumed.status == 200
    assert resumed.states() == ["Disconnected"], "nothing it saw, nothing older"
    assert resumed.ended_cleanly
    assert [*seen_here.states(), *resumed.states()] == ORDER
    ranks = [int(event["id"].split(".")[0]) for event in [*seen_here.events, *resumed.events]]
    assert ranks == [1, 2, 3, 4]
