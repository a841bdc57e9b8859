"""Staying up while Exchange is slow, busy or gone: a circuit breaker and a bulkhead.

Both are small and hand-written on purpose: the common breaker library
(pybreaker) holds one lock across the protected call, which would let only
one thread per process talk to Exchange at a time.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from enum import Enum

from gateway import wire
from gateway.errors import (
    CircuitOpen,
    ExchangeBusy,
    ExchangeOutcome,
    ExchangeTimeout,
    ExchangeUnavailable,
    ExchangeUnreachable,
    GatewayOverloaded,
)


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Fail fast after repeated connection failures or timeouts, then probe with one call."""

    def __init__(
        self,
        failure_threshold: int,
        cooldown_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self._failure_threshold = failure_threshold
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def before_call(self) -> None:
        """Let the call through, or raise CircuitOpen while Exchange is presumed down."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return
            remaining_s = self._opened_at + self._cooldown_s - self._clock()
            if self._state is BreakerState.OPEN and remaining_s <= 0:
                self._change(BreakerState.HALF_OPEN)
            if self._state is BreakerState.HALF_OPEN and not self._probing:
                self._probing = True  # exactly one probe at a time
                return
        raise CircuitOpen(
            "Exchange failed repeatedly; calls are paused until it recovers",
            retry_after_s=max(1, math.ceil(remaining_s)),
            outcome=ExchangeOutcome.REJECTED,
        )

    def record_success(self) -> None:
        """Exchange answered (whatever it said): close the circuit."""
        with self._lock:
            self._failures = 0
            self._probing = False
            if self._state is not BreakerState.CLOSED:
                self._change(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """Exchange could not be reached or did not answer in time."""
        with self._lock:
            self._failures += 1
            self._probing = False
            tripped = self._failures >= self._failure_threshold
            if self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and tripped
            ):
                self._opened_at = self._clock()
                self._change(BreakerState.OPEN)

    def _change(self, state: BreakerState) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state)


class Bulkhead:
    """Bound the calls to Exchange in flight in this process; refuse the rest at once."""

    def __init__(self, max_in_flight: int) -> None:
        self._slots = threading.BoundedSemaphore(max_in_flight)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the duration of a call, or raise GatewayOverloaded."""
        with self.held() as held:
            if not held:
                raise GatewayOverloaded(
                    "too many calls to Exchange are in flight; try again shortly",
                    retry_after_s=1,
                    outcome=ExchangeOutcome.REJECTED,
                )
            yield

    @contextmanager
    def held(self) -> Iterator[bool]:
        """Hold one slot if one is free, without waiting; yield whether it is held."""
        held = self._slots.acquire(blocking=False)
        try:
            yield held
        finally:
            if held:
                self._slots.release()


# Retrying these repeats nothing a caller could notice; retrying PlayOnPhone dials twice.
IDEMPOTENT_OPERATIONS = frozenset({wire.GET_PHONE_CALL_INFORMATION, wire.DISCONNECT_PHONE_CALL})
# Time an attempt after a back-off must still have before the deadline to be worth it.
MIN_ATTEMPT_S = 0.5


@dataclass(frozen=True)
class ExchangePolicy:
    """How calls to Exchange are bounded: deadline, retry, circuit breaker and bulkhead."""

    timeout_s: float = 10.0
    max_retry_back_off_s: float = 2.0
    breaker: CircuitBreaker | None = None
    bulkhead: Bulkhead | None = None

    def may_retry(self, operation: str, error: BaseException, deadline: float) -> bool:
        """Retry once when Exchange asked for a short, known back-off that fits the deadline."""
        if operation not in IDEMPOTENT_OPERATIONS or not isinstance(
            error, ExchangeBusy | ExchangeUnavailable
        ):
            return False
        back_off_s = error.back_off_s
        return (
            back_off_s is not None
            and back_off_s <= self.max_retry_back_off_s
            and time.monotonic() + back_off_s + MIN_ATTEMPT_S < deadline
        )

    def call_slot(self) -> AbstractContextManager[None]:
        """Hold a bulkhead slot for a whole call, back-off and retry included."""
        return self.bulkhead.slot() if self.bulkhead else nullcontext()

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run one attempt inside the circuit breaker."""
        if self.breaker is None:
            yield
            return
        self.breaker.before_call()
        try:
            yield
        except (ExchangeTimeout, ExchangeUnreachable):
            self.breaker.record_failure()
            raise
        except BaseException:
            self.breaker.record_success()
            raise
        self.breaker.record_success()
