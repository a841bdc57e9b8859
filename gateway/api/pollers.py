"""Polling Exchange for watched calls: one poller per call, however many watch it.

EWS has no notification for phone-call state, so the gateway asks
GetPhoneCallInformation; one poll per call per interval in a worker is what
every watcher of that call in the worker shares. Polls run on a small thread
pool through the EWS client, so each one holds a bulkhead slot, gets the
upstream deadline and passes the circuit breaker like any other call.

Everything here except `_poll` runs on one thread (gateway.api.streams' pump).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    """What one poll found: a snapshot or the error Exchange's answer maps to."""

    key: PollKey
    generation: int
    answered_at: float  # time.monotonic() when Exchange's answer had been read
    snapshot: Snapshot | None = None
    error: GatewayError | None = None


@dataclass(eq=False)
class CallPoller:
    """The shared poll of one call: who watches it, what it last saw, when it polls next."""

    key: PollKey
    generation: int
    request_id: str
    watchers: set[Any] = field(default_factory=set)
    latest: Snapshot | None = None
    in_flight: bool = False
    due: float = 0.0


class Pollers:
    """Keep one CallPoller per watched call and start its polls when due."""

    def __init__(
        self,
        ews: PhoneCalls,
        *,
        interval_s: float,
        threads: int,
        deliver: Callable[[PollOutcome], None],
    ) -> None:
        self._ews = ews
        self._interval_s = interval_s
        self._threads = threads
        self._deliver = deliver
        self._pool: ThreadPoolExecutor | None = None
        self._pollers: dict[PollKey, CallPoller] = {}
        self._generations = itertools.count(1)

    def __len__(self) -> int:
        return len(self._pollers)

    def watch(self, key: PollKey, watcher: Any, request_id: str) -> CallPoller:
        """Add a watcher to the call's poller, starting one (due at once) if none runs."""
        poller = self._pollers.get(key)
        if poller is None:
            poller = CallPoller(key, next(self._generations), request_id, due=time.monotonic())
            self._pollers[key] = poller
        poller.watchers.add(watcher)
        return poller

    def unwatch(self, key: PollKey, watcher: Any) -> None:
        """Remove a watcher; the last one to leave stops the call's polling."""
        poller = self._pollers.get(key)
        if poller is None:
            return
        poller.watchers.discard(watcher)
        if not poller.watchers:
            del self._pollers[key]

    def start_due(self, now: float) -> float:
        """Start every poll that is due; return when the next one will be (inf: none)."""
        next_due = math.inf
        for poller in self._pollers.values():
            if poller.in_flight:
                continue
            if poller.due <= now:
                poller.in_flight = True
                self._executor().submit(
                    self._poll, poller.key, poller.generation, poller.request_id
                )
            else:
                next_due = min(next_due, poller.due)
        return next_due

    def settle(self, outcome: PollOutcome) -> CallPoller | None:
        """Record a poll's outcome; return its poller, or None if nobody watches any more."""
        poller = self._pollers.get(outcome.key)
        if poller is None or poller.generation != outcome.generation:
            return None
        poller.in_flight = False
        # Counted from the answer, not the start: however long a poll took to set off (a new
        # connection, say), Exchange never sees two polls of a call within one interval.
        poller.due = outcome.answered_at + self._interval_s
        if outcome.snapshot is not None:
            poller.latest = outcome.snapshot
        return poller

    def close(self) -> None:
        """Stop the poll threads; polls in flight finish and are dropped."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="call-poll")
        return self._pool

    def _poll(self, key: PollKey, generation: int, request_id: str) -> None:
        """Ask Exchange for one call's state (on a poll thread) and hand the outcome over."""
        mailbox, call_id = key
        try:
            info = self._ews.get_call_information(call_id, request_id=request_id, mailbox=mailbox)
            state = snapshot(info)
            outcome = PollOutcome(key, generation, time.monotonic(), snapshot=state)
        except GatewayError as error:
            outcome = PollOutcome(key, generation, time.monotonic(), error=error)
        except Exception:  # a poll thread must always answer, or its watchers would wait forever
            LOG.exception("unexpected error polling a call", extra={"requestId": request_id})
            failure = GatewayError("an unexpected error occurred while reading the call's state")
            outcome = PollOutcome(key, generation, time.monotonic(), error=failure)
        self._deliver(outcome)
