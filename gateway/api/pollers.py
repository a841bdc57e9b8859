"""Polling Exchange for watched calls: one poller per call, however many watch it.

EWS has no notification for phone-call state, so the gateway asks
GetPhoneCallInformation; one poll per call per interval in a worker is what every
watcher of that call in the worker shares, and so is every request waiting for the
call's first state. Polls run on a small thread pool through the EWS client, so each
one holds a bulkhead slot, gets the upstream deadline and passes the circuit breaker
like any other call.

A call is polled only while someone watches it or waits for its state, one poll at a
time, each an interval after the last answer. Its poller outlives its last watcher by
that interval, so watchers that come and go (a reconnecting browser, a reloaded page,
a client opening and dropping streams in a loop) find its last answer instead of
asking Exchange again; a poll still queued when the last of them leaves is cancelled.

Everything here except `_poll` runs on one thread (gateway.api.streams' pump).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gateway.api.events import Snapshot, snapshot
from gateway.errors import GatewayError
from gateway.exchange.client import PhoneCalls

LOG = logging.getLogger("gateway")

# (mailbox, EWS call id): impersonated callers never share a poll of another mailbox.
PollKey = tuple[str | None, str]


@dataclass(frozen=True)
class PollOutcome:
    """What one poll found, and when: a snapshot or the error Exchange's answer maps to.

    Times are the pump's clock (time.monotonic): `started_at` before the request to
    Exchange was sent, `answered_at` once its answer had been read.
    """

    key: PollKey
    started_at: float
    answered_at: float
    snapshot: Snapshot | None = None
    error: GatewayError | None = None


# Offered a call's outcomes one by one; True when it takes one (and so waits no more).
Waiter = Callable[[PollOutcome], bool]


@dataclass(eq=False)
class CallPoller:
    """The shared poll of one call: who watches or waits for it, what it last found, when
    it polls next."""

    key: PollKey
    request_id: str  # of the watcher that started it, sent with each poll
    due: float
    watchers: set[Any] = field(default_factory=set)
    waiters: list[Waiter] = field(default_factory=list)
    last: PollOutcome | None = None
    polling: Future[None] | None = None

    @property
    def wanted(self) -> bool:
        return bool(self.watchers or self.waiters)


class Pollers:
    """Keep one CallPoller per watched call and start its polls when due."""

    def __init__(
        self,
        ews: PhoneCalls,
        *,
        interval_s: float,
        threads: int,
        deliver: Callable[[PollOutcome], None],
        clock: Callable[[], float] = time.monotonic,
        executor: Executor | None = None,
    ) -> None:
        self._ews = ews
        self.interval_s = interval_s
        self._threads = threads
        self._deliver = deliver
        self._clock = clock
        self._pool = executor
        self._pollers: dict[PollKey, CallPoller] = {}

    def __len__(self) -> int:
        """Return how many calls are polled now (watched or waited for)."""
        return sum(1 for poller in self._pollers.values() if poller.wanted)

    def watch(self, key: PollKey, watcher: Any, request_id: str) -> CallPoller:
        """Add a watcher to the call's poller, starting one (due at once) if none is kept."""
        poller = self._poller(key, request_id)
        poller.watchers.add(watcher)
        return poller

    def unwatch(self, key: PollKey, watcher: Any) -> None:
        """Remove a watcher; when nobody wants the call any more, its queued poll is dropped."""
        poller = self._pollers.get(key)
        if poller is not None:
            poller.watchers.discard(watcher)
            self._unwanted(poller)

    def wait(self, key: PollKey, request_id: str, waiter: Waiter) -> None:
        """Offer WAITER the call's last outcome, then each new one, until it takes one."""
        poller = self._poller(key, request_id)
        if poller.last is None or not waiter(poller.last):
            poller.waiters.append(waiter)

    def forget(self, key: PollKey, waiter: Waiter) -> None:
        """Stop offering outcomes to WAITER (its request gave up)."""
        poller = self._pollers.get(key)
        if poller is not None:
            with contextlib.suppress(ValueError):
                poller.waiters.remove(waiter)
            self._unwanted(poller)

    def start_due(self, now: float) -> float:
        """Start every poll that is due; return when the next one will be (inf: none).

        A poller nobody wants is never polled; it is dropped once its interval has passed
        (an answer it kept is by then too old to stand for the call's state).
        """
        next_due = math.inf
        for key, poller in list(self._pollers.items()):
            if poller.polling is not None:
                continue
            if not poller.wanted:
                if poller.due <= now:
                    del self._pollers[key]
            elif poller.due <= now:
                poller.polling = self._executor().submit(self._poll, key, poller.request_id)
            else:
                next_due = min(next_due, poller.due)
        return next_due

    def settle(self, outcome: PollOutcome) -> CallPoller | None:
        """Record a poll's outcome and offer it to the call's waiters; return its poller
        (whose watchers are the caller's to tell), or None if it is gone."""
        poller = self._pollers.get(outcome.key)
        if poller is None:
            return None
        poller.polling = None
        # Counted from the answer, not the start: however long a poll took to set off (a new
        # connection, say), Exchange never sees two polls of a call within one interval.
        poller.due = outcome.answered_at + self.interval_s
        poller.last = outcome
        poller.waiters = [waiter for waiter in poller.waiters if not waiter(outcome)]
        return poller

    def fail_waiters(self, error: GatewayError) -> None:
        """Answer every waiting request with ERROR (the worker is stopping)."""
        now = self._clock()
        for poller in self._pollers.values():
            failure = PollOutcome(poller.key, now, now, error=error)
            for waiter in poller.waiters:
                waiter(failure)
            poller.waiters.clear()

    def close(self) -> None:
        """Stop the poll threads; queued polls are dropped, polls in flight finish unheard."""
        if isinstance(self._pool, ThreadPoolExecutor):
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _poller(self, key: PollKey, request_id: str) -> CallPoller:
        poller = self._pollers.get(key)
        if poller is None:
            poller = self._pollers[key] = CallPoller(key, request_id, due=self._clock())
        return poller

    def _unwanted(self, poller: CallPoller) -> None:
        """Cancel the call's poll if nobody wants it and it has not set off yet."""
        if not poller.wanted and poller.polling is not None and poller.polling.cancel():
            poller.polling = None

    def _executor(self) -> Executor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="call-poll")
        return self._pool

    def _poll(self, key: PollKey, request_id: str) -> None:
        """Ask Exchange for one call's state (on a poll thread) and hand the outcome over."""
        mailbox, call_id = key
        started_at = self._clock()
        try:
            info = self._ews.get_call_information(call_id, request_id=request_id, mailbox=mailbox)
            outcome = PollOutcome(key, started_at, self._clock(), snapshot=snapshot(info))
        except GatewayError as error:
            outcome = PollOutcome(key, started_at, self._clock(), error=error)
        except Exception:  # a poll thread must always answer, or its watchers would wait forever
            LOG.exception("unexpected error polling a call", extra={"requestId": request_id})
            failure = GatewayError("an unexpected error occurred while reading the call's state")
            outcome = PollOutcome(key, started_at, self._clock(), error=failure)
        self._deliver(outcome)
