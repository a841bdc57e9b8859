"""Open event streams: one pump per worker writes every watcher's events.

A request thread answers `GET /calls/{callId}/events` up to the response head: it
reserves a stream (within the worker's limit and the caller's), waits for the
call's first state from the call's poller (so an unknown call is its 404, not a
stream), then hands the socket to the pump and is free again: a watcher never holds
a request thread while it watches. The pump is one selector thread that owns the
streaming sockets from then on. It starts the polls of gateway.api.pollers, writes
each change to every watcher of the call, sends heartbeats, notices watchers that
hang up, and ends every stream with a reconnect hint when the worker stops.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from flask import Response

from gateway.api import events, rendering
from gateway.api.events import Position, Progress
from gateway.api.handoff import HandOffResponse, relayed_response
from gateway.api.pollers import Pollers, PollKey, PollOutcome
from gateway.api.slots import StreamSlots, shutting_down
from gateway.errors import ExchangeTimeout, GatewayError
from gateway.exchange.client import PhoneCalls

LOG = logging.getLogger("gateway.access")
# Proxies and balancers close connections idle for 60 s or more; a comment every 15 s
# keeps a quiet stream open through them (the interval the SSE standard suggests).
HEARTBEAT_S = 15.0
# A watcher that has not read this much of its events is too slow to keep: events are
# about 300 bytes, so this is hundreds of unread events.
MAX_UNSENT_BYTES = 64 * 1024
# A stopping worker tells its watchers to come back after this long (to another instance).
RECONNECT_MS = 1000
_READ = selectors.EVENT_READ
_READ_WRITE = selectors.EVENT_READ | selectors.EVENT_WRITE


class StreamObserver(Protocol):
    """Receives what the pump does (gateway.telemetry.metrics.Metrics implements it)."""

    def stream_opened(self) -> None:
        """A watcher's stream was handed to the pump."""

    def stream_closed(self) -> None:
        """A watcher's stream ended."""

    def calls_polled(self, count: int) -> None:
        """COUNT calls are being polled now."""

    def event_delivered(self, seconds: float) -> None:
        """An event left for its watcher SECONDS after Exchange's answer was read."""


@dataclass(frozen=True)
class Watch:
    """One watcher's request: which call, as whom, from where it resumes."""

    call_id: str  # as the caller knows it, shown in each event
    ews_call_id: str  # as Exchange knows it, polled
    mailbox: str | None
    request_id: str
    resume: Position | None
    owner: str  # the caller, as its calls and quotas know it (gateway.guards.ownership)

    @property
    def key(self) -> PollKey:
        return (self.mailbox, self.ews_call_id)


@dataclass(frozen=True)
class FirstState:
    """The call's state a stream starts from, read before the answer's status was chosen."""

    outcome: PollOutcome
    progress: Progress


@dataclass(eq=False)
class _Stream:
    sock: socket.socket
    watch: Watch
    first: FirstState
    chunked: bool
    release: Callable[[], None]
    out: bytearray = field(default_factory=bytearray)
    ending: bool = False
    last_write: float = 0.0
    events: int = 0
    # The failure a `problem` event ended the stream with, for its log line.
    problem: GatewayError | None = None
    # When Exchange's answer behind each unsent event was read (for the delivery metric).
    answered: list[float] = field(default_factory=list)

    @property
    def key(self) -> PollKey:
        return self.watch.key

    @property
    def progress(self) -> Progress:
        return self.first.progress


class _FirstStateWaiter:
    """A request thread waiting for an outcome of the call's poller to start its stream from."""

    def __init__(self, progress: Progress, max_age_s: float) -> None:
        self.progress = progress
        self._max_age_s = max_age_s
        self.outcome: PollOutcome | None = None
        self.answered = threading.Event()

    def __call__(self, outcome: PollOutcome) -> bool:
        """Take OUTCOME if it stands for the call's state now (called on the pump thread)."""
        if not self.progress.can_start_from(
            outcome.snapshot, outcome.started_at, outcome.answered_at, self._max_age_s
        ):
            return False
        self.outcome = outcome
        self.answered.set()
        return True


class EventStreams:
    """This worker's open event streams, their pump thread and their pollers."""

    def __init__(
        self,
        ews: PhoneCalls,
        *,
        poll_interval_s: float,
        max_streams: int,
        poll_threads: int,
        max_streams_per_caller: int | None = None,
        first_state_wait_s: float = 30.0,
        observer: StreamObserver | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.slots = StreamSlots(max_streams, max_streams_per_caller or max_streams)
        self._first_state_wait_s = first_state_wait_s
        self._poll_interval_s = poll_interval_s
        self._heartbeat_s = heartbeat_s
        self._observer = observer
        self._pollers = Pollers(
            ews, interval_s=poll_interval_s, threads=poll_threads, deliver=self._post_outcome
        )
        self._lock = threading.Lock()
        self._handed_off: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._selector: selectors.BaseSelector | None = None
        self._streams: set[_Stream] = set()

    def response(self, watch: Watch, sock: socket.socket | None, protocol: str) -> Response:
        """Reserve a stream for WATCH, read its first state and return the response that
        hands SOCK to the pump.

        Without SOCK (a server that lends no socket) the pump's writing is relayed through
        the request thread. Before anything is sent, raises CallerStreamLimitReached (429)
        when the caller holds max_streams_per_caller of this worker's streams already,
        StreamLimitReached (503) when the worker holds max_streams, ShuttingDown (503)
        while it drains, and the error reading the first state met (404 for an unknown call).
        """
        release = self.slots.reserve(watch.owner)
        try:
            first = self.first_state(watch)
        except BaseException:
            release()
            raise
        if sock is None:
            return relayed_response(
                lambda pump_end: self.adopt(
                    pump_end, b"", watch, first, chunked=False, release=release
                )
            )
        chunked = protocol == "HTTP/1.1"

        def adopt(head: bytes, release: Callable[[], None]) -> None:
            self.adopt(sock, head, watch, first, chunked=chunked, release=release)

        return HandOffResponse(adopt, release, chunked=chunked)

    def first_state(self, watch: Watch) -> FirstState:
        """Wait for the call's state now, as its poller reads it; raise the error it met.

        The poller's last answer serves when it is at most one interval old and not older
        than what the watcher has seen; otherwise the request waits for the next poll,
        which is due within an interval (so however many watchers come and go, Exchange is
        asked once an interval).
        """
        self.slots.check_open()
        waiter = _FirstStateWaiter(Progress(watch.resume, time.monotonic()), self._poll_interval_s)
        self._start()
        self._post(lambda: self._wait(watch, waiter))
        if not waiter.answered.wait(self._first_state_wait_s):
            self._post(lambda: self._pollers.forget(watch.key, waiter))
            raise ExchangeTimeout(
                f"the call's state was not read within {self._first_state_wait_s:g} seconds"
            )
        assert waiter.outcome is not None  # set before answered
        if waiter.outcome.error is not None:
            # Every request waiting on this poll gets the error: each raises its own copy.
            raise copy.copy(waiter.outcome.error)
        return FirstState(waiter.outcome, waiter.progress)

    def handed_off(self, sock: Any) -> bool:
        """Whether SOCK belongs to the pump now (the worker must leave it alone)."""
        return sock in self._handed_off

    def drain(self) -> None:
        """End every open stream with a reconnect hint and refuse new ones."""
        self.slots.refuse_new()
        if self._thread is not None:
            self._post(self._end_all)

    def wait_closed(self, timeout_s: float) -> bool:
        """Wait until every stream has ended; False if some are still open after TIMEOUT_S."""
        return self.slots.wait_all_free(timeout_s)

    # Request threads.

    def adopt(
        self,
        sock: socket.socket,
        head: bytes,
        watch: Watch,
        first: FirstState,
        *,
        chunked: bool,
        release: Callable[[], None],
    ) -> None:
        """Take over SOCK, whose response head is HEAD (called by the request thread)."""
        self._handed_off.add(sock)
        stream = _Stream(sock, watch, first, chunked, release, bytearray(head))
        self._start()
        self._post(lambda: self._open(stream))

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._selector = selectors.DefaultSelector()
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self._selector.register(self._wake_r, _READ, None)
            self._thread = threading.Thread(target=self._run, name="event-pump", daemon=True)
            self._thread.start()

    def _post(self, task: Callable[[], None]) -> None:
        self._inbox.put(task)
        # A full pipe holds wake-ups already: the pump is awake.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _post_outcome(self, outcome: PollOutcome) -> None:
        self._post(lambda: self._settle(outcome))

    # The pump thread.

    def _run(self) -> None:
        next_heartbeat_scan = time.monotonic() + self._heartbeat_s
        while True:
            try:
                next_heartbeat_scan = self._turn(next_heartbeat_scan)
            except Exception:  # the pump must outlive any one failure, or every stream stalls
                LOG.exception("event pump failed a turn")
                time.sleep(0.1)

    def _turn(self, next_heartbeat_scan: float) -> float:
        """Wait for sockets, wake-ups and timers once; return when heartbeats are due next."""
        assert self._selector is not None
        now = time.monotonic()
        next_poll = self._pollers.start_due(now)
        timeout = max(0.0, min(next_poll, next_heartbeat_scan) - now)
        for key, mask in self._selector.select(min(timeout, self._heartbeat_s)):
            if key.data is None:
                self._run_inbox()
            else:
                self._ready(key.data, mask)
        now = time.monotonic()
        if now >= next_heartbeat_scan:
            self._heartbeats(now)
            # Each stream's own heartbeat is due HEARTBEAT_S after its last write: look often.
            next_heartbeat_scan = now + min(1.0, self._heartbeat_s)
        return next_heartbeat_scan

    def _run_inbox(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        while True:
            try:
                task = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                task()
            except Exception:  # the pump must outlive any one stream's failure
                LOG.exception("event pump task failed")

    def _wait(self, watch: Watch, waiter: _FirstStateWaiter) -> None:
        if self.slots.draining:
            now = time.monotonic()
            waiter(PollOutcome(watch.key, now, now, error=shutting_down()))
            return
        self._pollers.wait(watch.key, watch.request_id, waiter)
        self._observe_pollers()

    def _open(self, stream: _Stream) -> None:
        assert self._selector is not None
        stream.sock.setblocking(False)
        stream.last_write = time.monotonic()
        self._streams.add(stream)
        self._selector.register(stream.sock, _READ_WRITE, stream)
        if self._observer is not None:
            self._observer.stream_opened()
        if self.slots.draining:
            self._end(stream, events.retry_hint(RECONNECT_MS))
            return
        poller = self._pollers.watch(stream.key, stream, stream.watch.request_id)
        self._observe_pollers()
        first = stream.first.outcome
        # Read for this watcher: a change it sees now. An earlier answer is not timed.
        self._offer(stream, first, timed=first.started_at >= stream.progress.asked_at)
        latest = poller.last
        if latest is not None and latest.answered_at > first.answered_at and not stream.ending:
            self._offer(stream, latest, timed=False)  # polled while the head was on its way
        self._flush(stream)

    def _settle(self, outcome: PollOutcome) -> None:
        poller = self._pollers.settle(outcome)
        if poller is None:
            return
        for stream in list(poller.watchers):
            self._offer(stream, outcome, timed=True)
        self._observe_pollers()

    def _offer(self, stream: _Stream, outcome: PollOutcome, *, timed: bool) -> None:
        """Send a poll's outcome if it is news to the watcher; a failure or the end ends it."""
        if outcome.error is not None:
            stream.problem = outcome.error
            self._end(stream, events.problem_event(outcome.error, stream.watch.request_id))
            return
        state = outcome.snapshot
        assert state is not None  # an outcome holds a snapshot or an error
        if stream.progress.offer(state, outcome.started_at, outcome.answered_at):
            if timed:
                stream.answered.append(outcome.answered_at)
            self._write(stream, events.state_event(stream.watch.call_id, state))
        if state.ended:
            self._end(stream)

    def _write(self, stream: _Stream, data: bytes) -> None:
        stream.out += events.chunk(data) if stream.chunked else data
        stream.events += 1
        self._flush(stream)

    def _end(self, stream: _Stream, last: bytes = b"") -> None:
        """Send LAST, then the end of the body; the socket closes once all is written."""
        if stream.ending:
            return
        if last:
            self._write(stream, last)
        if stream.chunked:
            stream.out += events.LAST_CHUNK
        stream.ending = True
        self._pollers.unwatch(stream.key, stream)
        self._observe_pollers()
        self._flush(stream)

    def _end_all(self) -> None:
        for stream in list(self._streams):
            self._end(stream, events.retry_hint(RECONNECT_MS))
        self._pollers.fail_waiters(shutting_down())
        self._pollers.close()

    def _flush(self, stream: _Stream) -> None:
        assert self._selector is not None
        if stream not in self._streams:
            return
        try:
            sent = stream.sock.send(stream.out) if stream.out else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(stream, "watcher gone")
            return
        if sent:
            del stream.out[:sent]
            stream.last_write = time.monotonic()
        if stream.out:
            if len(stream.out) > MAX_UNSENT_BYTES:
                self._close(stream, "watcher too slow")
                return
            self._selector.modify(stream.sock, _READ_WRITE, stream)
            return
        self._delivered(stream)
        if stream.ending:
            self._close(stream, "ended")
        else:
            self._selector.modify(stream.sock, _READ, stream)

    def _delivered(self, stream: _Stream) -> None:
        if self._observer is not None:
            now = time.monotonic()
            for answered_at in stream.answered:
                self._observer.event_delivered(max(0.0, now - answered_at))
        stream.answered.clear()

    def _ready(self, stream: _Stream, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                # A watcher sends nothing after its request; end of file means it hung up.
                if not stream.sock.recv(4096):
                    self._close(stream, "watcher hung up")
                    return
            except BlockingIOError:
                pass
            except OSError:
                self._close(stream, "watcher gone")
                return
        if mask & selectors.EVENT_WRITE:
            self._flush(stream)

    def _heartbeats(self, now: float) -> None:
        for stream in list(self._streams):
            if not stream.ending and now - stream.last_write >= self._heartbeat_s:
                stream.out += events.chunk(events.HEARTBEAT) if stream.chunked else events.HEARTBEAT
                self._flush(stream)

    def _close(self, stream: _Stream, reason: str) -> None:
        assert self._selector is not None
        self._streams.discard(stream)
        self._pollers.unwatch(stream.key, stream)
        self._observe_pollers()
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(stream.sock)
        # The slot is free (and counted so) before the watcher sees the end: it may watch again.
        stream.release()
        if self._observer is not None:
            self._observer.stream_closed()
        # Logged before the watcher sees the end, so a line is never missing when it has.
        rendering.log_stream_closed(stream.watch.request_id, reason, stream.events, stream.problem)
        stream.sock.close()

    def _observe_pollers(self) -> None:
        if self._observer is not None:
            self._observer.calls_polled(len(self._pollers))
