"""GET /calls/{callId}/events against real gunicorn and the simulator.

The simulator moves a call on every STEP_S (Connecting, Alerted, Connected), well
above the poll interval, so every watcher must see every state.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from tests.integration.load import LoadClient
from tests.integration.processes import (
    Server,
    free_port,
    gateway_env,
    http,
    port_of,
    set_faults,
    simulator_requests,
    start,
    wait_until,
)

STEP_S = 1.5
POLL_S = 0.5
WORKERS = 2
ORDER = ["Connecting", "Alerted", "Connected", "Disconnected"]
CALL_ID_IN_BODY = re.compile(r'PhoneCallId Id="([^"]+)"')


@dataclass
class Watcher:
    """Reads one event stream to its end in a thread, keeping every event."""

    url: str
    request_id: str
    last_event_id: str | None = None
    events: list[dict[str, str]] = field(default_factory=list)
    ended_cleanly: bool = False
    status: int | None = None
    error: str | None = None

    def run(self) -> None:
        parts = urlsplit(self.url)
        connection = HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        headers = {"X-Request-ID": self.request_id}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        try:
            connection.request("GET", parts.path, headers=headers)
            response = connection.getresponse()
            self.status = response.status
            block: dict[str, str] = {}
            # readline raises IncompleteRead if the body is cut before its last chunk.
            while line := response.readline():
                text = line.decode().rstrip("\n")
                if text:
                    name, _, value = text.partition(":")
                    block[name] = value.removeprefix(" ")
                elif block:
                    self.events.append(block)
                    block = {}
            self.ended_cleanly = True
        except (OSError, HTTPException) as error:
            self.error = repr(error)
        finally:
            connection.close()

    def states(self) -> list[str]:
        return [json.loads(e["data"])["state"] for e in self.events if e.get("event") == "state"]


def start_watchers(watchers: list[Watcher]) -> list[threading.Thread]:
    threads = [threading.Thread(target=watcher.run, daemon=True) for watcher in watchers]
    for thread in threads:
        thread.start()
    return threads


@pytest.fixture
def slow_simulator(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    args = ["simulator", "--bind", f"127.0.0.1:{port}", "--step-seconds", str(STEP_S)]
    server = start(args, {}, f"http://127.0.0.1:{port}", "/simulator/health", tmp_path / "sim.log")
    yield server
    server.stop()


@pytest.fixture
def serve(slow_simulator: Server, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start_gateway(**env: str) -> Server:
        port = free_port()
        environ = gateway_env(slow_simulator, port, GATEWAY_EVENTS_POLL_SECONDS=str(POLL_S), **env)
        server = start(
            ["serve"], environ, f"http://127.0.0.1:{port}", "/readyz", tmp_path / "gw.log"
        )
        started.append(server)
        return server

    yield start_gateway
    for server in started:
        server.stop()


def place_call(gateway: Server) -> str:
    placed = http("POST", f"{gateway.url}/calls", {"itemId": "AAMkVoice", "dialString": "+1555"})
    assert placed.status == 201, placed.body
    call_id: str = placed.json()["callId"]
    return call_id


def events_url(gateway: Server, call_id: str) -> str:
    return f"{gateway.url}/calls/{quote(call_id, safe='')}/events"


def polls_by_call(simulator: Server, request_id_prefix: str) -> dict[str, dict[str, list[float]]]:
    """The arrival times of the polls watchers caused, by call id and poller.

    A poller sends the request id of the watcher that started it, and each worker has
    its own poller of a call: the request id tells the workers' polls apart.
    """
    polls: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for seen in simulator_requests(simulator):
        if seen["operation"] == "GetPhoneCallInformation" and (seen["requestId"] or "").startswith(
            request_id_prefix
        ):
            match = CALL_ID_IN_BODY.search(seen["body"])
            assert match is not None
            polls[match[1]][seen["requestId"]].append(seen["receivedAt"])
    return polls


def test_200_watchers_of_20_calls_see_every_state_from_one_poll_per_call_per_worker(
    serve: Callable[..., Server], slow_simulator: Server
) -> None:
    gateway = serve(GATEWAY_WORKERS=str(WORKERS))
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
        ids = [int(event["id"].split("-")[0]) for event in watcher.events]
        assert ids == [1, 2, 3, 4]
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
    assert [event["id"].split("-")[0] for event in resumed.events] == ["2", "3", "4"]
    assert resumed.ended_cleanly
    assert first.states() == ORDER


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


def test_a_throttled_exchange_is_an_error_event_with_the_problem_and_its_retry(
    serve: Callable[..., Server], slow_simulator: Server
) -> None:
    gateway = serve()
    call_id = place_call(gateway)
    set_faults(
        slow_simulator,
        {"kind": "busy", "backOffMs": 3000, "operation": "GetPhoneCallInformation"},
    )
    watcher = Watcher(events_url(gateway, call_id), "throttled-1")
    watcher.run()

    assert watcher.status == 200
    assert watcher.ended_cleanly
    assert len(watcher.events) == 1
    [event] = watcher.events
    assert event["event"] == "error"
    assert event["retry"] == "3000"
    problem = json.loads(event["data"])
    assert problem["status"] == 503
    assert problem["type"] == "urn:ews-gateway:problem:exchange-busy"
    assert problem["ewsResponseCode"] == "ErrorServerBusy"
    assert problem["retryAfter"] == 3
    assert problem["requestId"] == "throttled-1"
