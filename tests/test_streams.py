"""Event streams: the pump writes each change to every watcher, from one poll per call.

Watchers are socket pairs (no network); Exchange is a fake that answers each
call's polls from a script and counts them.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from gateway.api import events
from gateway.api.events import Position
from gateway.api.handoff import HandedOff, response_head
from gateway.api.streams import EventStreams, Watch
from gateway.errors import (
    CallerStreamLimitReached,
    CallNotFound,
    ExchangeBusy,
    GatewayError,
    ShuttingDown,
    StreamLimitReached,
)
from gateway.exchange.client import CallInformation

STATES = ("Connecting", "Alerted", "Connected", "Disconnected")


def info(state: str) -> CallInformation:
    return CallInformation(
        state=state,
        connection_failure_cause="None",
        sip_response_code=None,
        sip_response_text=None,
        ews_code="NoError",
    )


# A script item that holds the call's next answer until the test sets it.
Hold = threading.Event
Answer = CallInformation | GatewayError | Hold


class ScriptedExchange:
    """Answers each call's polls with the next item of its script (the last one repeats)."""

    def __init__(self, scripts: dict[str, list[Answer]]) -> None:
        self.scripts = scripts
        self.polls: dict[str, int] = defaultdict(int)
        self.mailboxes: list[str | None] = []
        self.gate = threading.Event()
        self.gate.set()

    def get_call_information(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> CallInformation:
        self.gate.wait(5)
        # Watchers know a call by their own id; Exchange is asked with the EWS id behind it.
        assert call_id.startswith("ews-")
        call_id = call_id.removeprefix("ews-")
        script = self.scripts[call_id]
        self.polls[call_id] += 1
        self.mailboxes.append(mailbox)
        answer = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(answer, Hold):
            answer.wait(5)
            answer = script.pop(0) if len(script) > 1 else script[0]
        assert not isinstance(answer, Hold)
        if isinstance(answer, GatewayError):
            raise answer
        return answer

    def disconnect_call(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def play_on_phone(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


_WATCHERS: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_watchers() -> Iterator[None]:
    yield
    while _WATCHERS:
        _WATCHERS.pop().close()


@pytest.fixture
def streams() -> Iterator[EventStreams]:
    exchange = ScriptedExchange({"call-1": [info(state) for state in STATES]})
    pump = EventStreams(exchange, poll_interval_s=0.05, max_streams=4, poll_threads=2)
    yield pump
    pump.drain()
    pump.wait_closed(2)


def open_stream(
    streams: EventStreams,
    call_id: str = "call-1",
    resume: Position | None = None,
    owner: str = "alice",
) -> socket.socket:
    """Start watching CALL_ID as a request thread would; return the watcher's end."""
    server_end, watcher_end = socket.socketpair()
    watcher_end.settimeout(5)
    _WATCHERS.append(watcher_end)
    watch = Watch(call_id, f"ews-{call_id}", "alice@example.com", f"req-{call_id}", resume, owner)
    try:
        response = streams.response(watch, server_end, "HTTP/1.1")
    except GatewayError:
        server_end.close()
        raise
    with pytest.raises(HandedOff):
        response({}, lambda *args: None)
    assert streams.handed_off(server_end)
    return watcher_end


def read_all(watcher: socket.socket) -> tuple[bytes, list[dict[str, str]]]:
    """Read the whole response; return its head and its events (fields by name)."""
    data = b""
    while chunk := watcher.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert body.endswith(b"0\r\n\r\n"), "the body ends with the last chunk"
    return head, parse_events(dechunk(body))


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        out += body[:size]
        body = body[size + 2 :]
    return out


def parse_events(text: bytes) -> list[dict[str, str]]:
    parsed = []
    for block in text.decode().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            fields[name] = value
        if fields:
            parsed.append(fields)
    return parsed


def test_a_watcher_gets_every_state_in_order_then_the_end(streams: EventStreams) -> None:
    head, received = read_all(open_stream(streams))

    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/event-stream; charset=utf-8" in head
    assert b"Transfer-Encoding: chunked" in head
    assert b"Content-Length" not in head
    assert [json.loads(event["data"])["state"] for event in received] == list(STATES)
    assert [event["event"] for event in received] == ["state"] * 4
    # Each id starts with the rank of its state in a call's life.
    assert [event["id"].split(".")[0] for event in received] == ["1", "2", "3", "4"]
    first = json.loads(received[0]["data"])
    assert first == {
        "callId": "call-1",
        "state": "Connecting",
        "connectionFailureCause": "None",
        "ewsResponseCode": "NoError",
    }


def test_watchers_of_one_call_share_its_polls_and_the_first_one() -> None:
    exchange = ScriptedExchange({"call-1": [info(state) for state in STATES]})
    exchange.gate.clear()  # hold the first poll until every watcher waits for it
    pump = EventStreams(exchange, poll_interval_s=0.05, max_streams=10, poll_threads=4)
    with ThreadPoolExecutor(5) as requests:
        opening = [requests.submit(open_stream, pump) for _ in range(5)]
        time.sleep(0.2)
        exchange.gate.set()
        watchers = [future.result() for future in opening]

    for watcher in watchers:
        _, received = read_all(watcher)
        assert [json.loads(event["data"])["state"] for event in received] == list(STATES)
    assert exchange.polls["call-1"] == 4, "one poll per state, not one per watcher"
    assert set(exchange.mailboxes) == {"alice@example.com"}


def test_an_unchanged_state_is_not_sent_again() -> None:
    script = [info("Connecting"), info("Connecting"), info("Alerted"), info("Disconnected")]
    pump = EventStreams(
        ScriptedExchange({"call-1": script}), poll_interval_s=0.02, max_streams=1, poll_threads=1
    )
    _, received = read_all(open_stream(pump))

    assert [json.loads(event["data"])["state"] for event in received] == [
        "Connecting",
        "Alerted",
        "Disconnected",
    ]


def test_resuming_with_the_last_event_id_does_not_repeat_that_event() -> None:
    script = [info("Connected"), info("Connected"), info("Disconnected")]
    pump = EventStreams(
        ScriptedExchange({"call-1": script}), poll_interval_s=0.02, max_streams=1, poll_threads=1
    )
    seen = events.snapshot(info("Connected")).position
    _, received = read_all(open_stream(pump, resume=seen))

    assert len(received) == 1
    assert json.loads(received[0]["data"])["state"] == "Disconnected"
    assert received[0]["id"].startswith("4."), "the id names the rank of Disconnected"


def test_a_resumed_watcher_never_gets_a_state_older_than_the_one_it_saw() -> None:
    later = Hold()
    script = [info("Connecting"), later, info("Connected"), info("Disconnected")]
    exchange = ScriptedExchange({"call-1": script})
    pump = EventStreams(exchange, poll_interval_s=0.05, max_streams=2, poll_threads=1)
    early = open_stream(pump)  # this instance's poller has read Connecting, and waits
    assert b'"state":"Connecting"' in early.recv(65536)
    # The watcher saw Connected on another instance, and comes back here.
    seen = events.snapshot(info("Connected")).position
    with ThreadPoolExecutor(1) as requests:
        resuming = requests.submit(open_stream, pump, resume=seen)
        time.sleep(0.2)
        assert not resuming.done(), "an older last answer does not start the stream"
        later.set()
        resumed = resuming.result()
    _, received = read_all(resumed)

    assert [json.loads(event["data"])["state"] for event in received] == ["Disconnected"]


def test_a_same_rank_state_read_before_the_watcher_came_back_is_not_taken_for_news() -> None:
    ringing = CallInformation(
        state="Alerted",
        connection_failure_cause="None",
        sip_response_code=180,
        sip_response_text="Ringing",
        ews_code="NoError",
    )
    script = [info("Alerted"), ringing, info("Disconnected")]
    pump = EventStreams(
        ScriptedExchange({"call-1": script}), poll_interval_s=0.5, max_streams=2, poll_threads=1
    )
    early = open_stream(pump)
    assert b'"state":"Alerted"' in early.recv(65536)
    # Elsewhere the watcher saw the ringing Alerted: the Alerted read here may be older.
    seen = events.snapshot(ringing).position
    _, received = read_all(open_stream(pump, resume=seen))

    assert [json.loads(event["data"])["state"] for event in received] == ["Disconnected"]


def test_an_unknown_call_is_its_404_before_any_stream_and_frees_its_slot() -> None:
    unknown = CallNotFound(
        "Exchange answered ErrorInvalidPhoneCallId", ews_code="ErrorInvalidPhoneCallId"
    )
    exchange = ScriptedExchange({"nope": [unknown], "call-1": [info("Disconnected")]})
    pump = EventStreams(exchange, poll_interval_s=0.02, max_streams=1, poll_threads=1)

    with pytest.raises(CallNotFound) as refused:
        open_stream(pump, "nope")
    assert refused.value.status == 404
    assert refused.value.ews_code == "ErrorInvalidPhoneCallId"
    assert pump.wait_closed(0), "no slot is held"
    read_all(open_stream(pump, "call-1"))


def test_a_throttled_first_read_is_its_503_with_retry_after_before_any_stream() -> None:
    busy = ExchangeBusy(
        "Exchange answered ErrorServerBusy", ews_code="ErrorServerBusy", retry_after_s=3
    )
    pump = EventStreams(
        ScriptedExchange({"call-1": [busy]}), poll_interval_s=0.02, max_streams=1, poll_threads=1
    )

    with pytest.raises(ExchangeBusy) as refused:
        open_stream(pump)
    assert refused.value.retry_after_s == 3


def test_a_problem_during_a_stream_is_a_problem_event_with_its_retry_then_the_end() -> None:
    busy = ExchangeBusy(
        "Exchange answered ErrorServerBusy", ews_code="ErrorServerBusy", retry_after_s=3
    )
    pump = EventStreams(
        ScriptedExchange({"call-1": [info("Connected"), busy]}),
        poll_interval_s=0.02,
        max_streams=1,
        poll_threads=1,
    )
    _, received = read_all(open_stream(pump))

    assert [event["event"] for event in received] == ["state", "problem"]
    assert "id" not in received[1]
    assert received[1]["retry"] == "3000"
    assert json.loads(received[1]["data"]) == {
        "type": "urn:ews-gateway:problem:exchange-busy",
        "title": "Exchange is throttling requests",
        "status": 503,
        "detail": "Exchange answered ErrorServerBusy",
        "requestId": "req-call-1",
        "ewsResponseCode": "ErrorServerBusy",
        "retryAfter": 3,
    }


def closing_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "event stream closed"]


def test_a_stream_ended_by_a_problem_logs_what_its_watcher_was_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    unknown = CallNotFound(
        "Exchange answered ErrorInvalidPhoneCallId", ews_code="ErrorInvalidPhoneCallId"
    )
    busy = ExchangeBusy(
        "Exchange answered ErrorServerBusy", ews_code="ErrorServerBusy", retry_after_s=3
    )
    busy.upstream_status = 500
    exchange = ScriptedExchange(
        {"nope": [info("Connected"), unknown], "busy": [info("Connected"), busy]}
    )
    pump = EventStreams(exchange, poll_interval_s=0.02, max_streams=2, poll_threads=1)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        read_all(open_stream(pump, "nope"))
        read_all(open_stream(pump, "busy"))

    lines = {line.requestId: line for line in closing_lines(caplog)}  # type: ignore[attr-defined]
    assert lines["req-nope"].levelno == logging.INFO
    assert lines["req-nope"].problemStatus == 404  # type: ignore[attr-defined]
    assert lines["req-nope"].ewsResponseCode == "ErrorInvalidPhoneCallId"  # type: ignore[attr-defined]
    assert lines["req-nope"].detail == "Exchange answered ErrorInvalidPhoneCallId"  # type: ignore[attr-defined]
    assert lines["req-busy"].levelno == logging.WARNING
    assert lines["req-busy"].problemStatus == 503  # type: ignore[attr-defined]
    assert lines["req-busy"].upstreamStatus == 500  # type: ignore[attr-defined]


def test_a_stream_that_ends_with_its_call_logs_no_problem(
    streams: EventStreams, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        read_all(open_stream(streams))

    (line,) = closing_lines(caplog)
    assert line.levelno == logging.INFO
    assert line.reason == "ended"  # type: ignore[attr-defined]
    assert line.events == 4  # type: ignore[attr-defined]
    assert not hasattr(line, "problemStatus")
    assert not hasattr(line, "detail")


def test_draining_ends_each_stream_with_a_retry_hint_and_refuses_new_ones() -> None:
    exchange = ScriptedExchange({"call-1": [info("Connected")]})
    pump = EventStreams(exchange, poll_interval_s=0.05, max_streams=4, poll_threads=1)
    watchers = [open_stream(pump) for _ in range(3)]
    time.sleep(0.2)

    pump.drain()

    for watcher in watchers:
        _, received = read_all(watcher)
        assert json.loads(received[0]["data"])["state"] == "Connected"
        assert received[-1]["retry"] == str(1000)
    assert pump.wait_closed(2)
    with pytest.raises(ShuttingDown) as refused:
        open_stream(pump)
    assert refused.value.status == 503
    assert refused.value.retry_after_s == 1


def test_the_stream_limit_refuses_one_more_and_frees_slots_as_streams_end() -> None:
    ending = Hold()
    exchange = ScriptedExchange(
        {"call-1": [info("Connected")], "call-2": [info("Connected"), ending, info("Disconnected")]}
    )
    pump = EventStreams(
        exchange, poll_interval_s=0.02, max_streams=2, max_streams_per_caller=2, poll_threads=2
    )
    open_stream(pump)
    last = open_stream(pump, "call-2", owner="bob")

    with pytest.raises(StreamLimitReached) as refused:
        open_stream(pump, owner="carol")
    assert refused.value.status == 503
    assert refused.value.retry_after_s == 2

    ending.set()
    read_all(last)  # call-2 is over: its slot is free again
    open_stream(pump, owner="carol")
    pump.drain()


def test_one_caller_beyond_its_own_limit_is_429_and_leaves_the_others_their_slots() -> None:
    exchange = ScriptedExchange({"call-1": [info("Connected")], "call-2": [info("Connected")]})
    pump = EventStreams(
        exchange, poll_interval_s=0.05, max_streams=10, max_streams_per_caller=3, poll_threads=2
    )
    alices = [open_stream(pump, owner="alice") for _ in range(3)]

    with pytest.raises(CallerStreamLimitReached) as refused:
        open_stream(pump, owner="alice")
    assert refused.value.status == 429
    assert refused.value.retry_after_s == 2
    bobs = open_stream(pump, "call-2", owner="bob")
    assert b'"state":"Connected"' in bobs.recv(65536)

    alices[0].close()  # hanging up gives the caller its slot back
    deadline = time.monotonic() + 5
    while True:
        try:
            open_stream(pump, owner="alice")
            break
        except CallerStreamLimitReached:
            assert time.monotonic() < deadline, "the slot came back"
            time.sleep(0.01)
    pump.drain()
    assert pump.wait_closed(2)


def test_polling_stops_when_the_last_watcher_hangs_up() -> None:
    exchange = ScriptedExchange({"call-1": [info("Connected")]})
    pump = EventStreams(exchange, poll_interval_s=0.02, max_streams=1, poll_threads=1)
    watcher = open_stream(pump)
    watcher.recv(4096)
    time.sleep(0.1)
    watcher.close()
    time.sleep(0.1)
    polls = exchange.polls["call-1"]
    time.sleep(0.2)

    assert exchange.polls["call-1"] == polls
    assert pump.wait_closed(1), "the hung-up stream's slot is free"


def test_a_quiet_stream_gets_a_heartbeat_comment_each_interval() -> None:
    exchange = ScriptedExchange({"call-1": [info("Connected")]})
    pump = EventStreams(exchange, poll_interval_s=5, max_streams=1, poll_threads=1, heartbeat_s=0.2)
    watcher = open_stream(pump)
    received = b""
    deadline = time.monotonic() + 5
    while received.count(b": heartbeat\n\n") < 2 and time.monotonic() < deadline:
        received += watcher.recv(4096)

    assert received.count(b"event: state") == 1
    assert received.count(b": heartbeat\n\n") >= 2
    pump.drain()
    assert pump.wait_closed(2)


class RecordingObserver:
    def __init__(self) -> None:
        self.delays: list[float] = []
        self.open = 0
        self.polled: list[int] = []

    def stream_opened(self) -> None:
        self.open += 1

    def stream_closed(self) -> None:
        self.open -= 1

    def calls_polled(self, count: int) -> None:
        self.polled.append(count)

    def event_delivered(self, seconds: float) -> None:
        self.delays.append(seconds)


def test_each_change_a_poll_saw_is_timed_to_its_watcher_but_a_late_joiner_s_first_is_not() -> None:
    exchange = ScriptedExchange({"call-1": [info(state) for state in STATES]})
    observer = RecordingObserver()
    pump = EventStreams(
        exchange, poll_interval_s=0.3, max_streams=2, poll_threads=1, observer=observer
    )
    early = open_stream(pump)
    deadline = time.monotonic() + 5
    while not observer.delays and time.monotonic() < deadline:
        time.sleep(0.01)  # until the first poll's Connecting reached the early watcher
    late = open_stream(pump)  # gets that Connecting from the poller, not from a poll of its own
    _, early_events = read_all(early)
    _, late_events = read_all(late)

    assert len(early_events) == len(late_events) == 4
    assert len(observer.delays) == 4 + 3, "every change for both; not the late joiner's first"
    assert all(0 <= delay < 1 for delay in observer.delays)
    assert observer.open == 0
    assert observer.polled[-1] == 0, "nothing is polled once both streams ended"


class FlappingExchange(ScriptedExchange):
    """A connected call transferred back and forth at every poll, for as long as anyone asks."""

    def get_call_information(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> CallInformation:
        self.polls[call_id] += 1
        return info("Transferring" if self.polls[call_id] % 2 else "Connected")


def test_a_watcher_that_stops_reading_is_dropped_and_its_slot_freed() -> None:
    pump = EventStreams(FlappingExchange({}), poll_interval_s=0.001, max_streams=1, poll_threads=1)
    server_end, watcher_end = socket.socketpair()
    _WATCHERS.append(watcher_end)
    for end in (server_end, watcher_end):  # small buffers: the backlog builds up in the pump
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    response = pump.response(
        Watch("c", "ews-c", None, "slow", None, "alice"), server_end, "HTTP/1.1"
    )
    with pytest.raises(HandedOff):
        response({}, lambda *args: None)

    assert pump.wait_closed(20), "the pump gave up on the watcher that never read"
    watcher_end.settimeout(5)
    received = b""
    while chunk := watcher_end.recv(65536):
        received += chunk
    assert not received.endswith(b"0\r\n\r\n"), "dropped, not ended: it never got the end"
    open_stream(pump, "c")  # its slot is free again
    pump.drain()
    assert pump.wait_closed(5)


def test_a_response_head_for_http_1_0_has_no_chunking() -> None:
    head = response_head("200 OK", [("Content-Length", "0"), ("X-Request-ID", "r")], False)

    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"Transfer-Encoding" not in head
    assert b"Content-Length" not in head
    assert head.endswith(b"X-Request-ID: r\r\n\r\n")
