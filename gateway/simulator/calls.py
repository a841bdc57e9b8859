"""The simulator's in-memory call book: who placed which call and where it stands now."""

from __future__ import annotations

import base64
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway import wire


def _schema_value(value: str, allowed: tuple[str, ...]) -> str:
    """Return the value, failing at import time if the schema's list does not hold it."""
    if value not in allowed:
        raise RuntimeError(f"{value!r} is not one of {allowed}")
    return value


CONNECTING = _schema_value("Connecting", wire.PHONE_CALL_STATES)
ALERTED = _schema_value("Alerted", wire.PHONE_CALL_STATES)
CONNECTED = _schema_value("Connected", wire.PHONE_CALL_STATES)
DISCONNECTED = _schema_value("Disconnected", wire.PHONE_CALL_STATES)
NO_FAILURE = _schema_value("None", wire.CONNECTION_FAILURE_CAUSES)
USER_BUSY = _schema_value("UserBusy", wire.CONNECTION_FAILURE_CAUSES)

# Long enough for a caller to read how a call ended; short enough that a demo left
# running for days does not grow without bound.
FORGET_ENDED_CALLS_AFTER_S = 600.0

_DIALABLE = re.compile(r"\+?[0-9*#]+|sip:\S+", re.IGNORECASE)


@dataclass(frozen=True)
class Phase:
    """One point of a call's state timeline, reached `after_steps` steps after dialling.

    No phase carries a SIP response: MS-OXWUMS leaves SIPResponseCode and
    SIPResponseText out of a successful GetPhoneCallInformation answer, so how
    a call ended shows in its failure cause alone (a `sip` fault rule adds them).
    """

    after_steps: float
    state: str
    failure_cause: str = NO_FAILURE


ANSWERED = (Phase(0, CONNECTING), Phase(1, ALERTED), Phase(2, CONNECTED))
BUSY = (Phase(0, CONNECTING), Phase(1, DISCONNECTED, USER_BUSY))
# Of the failure causes, only None and UserBusy reach a client (MS-OXWUMS 3.1.4.4.4.1): a call
# nobody answers rings, then ends Disconnected with None, as a hung-up call does.
UNANSWERED = (Phase(0, CONNECTING), Phase(1, ALERTED), Phase(5, DISCONNECTED))


def is_dialable(dial_string: str) -> bool:
    """Tell whether Exchange UM would accept the dial string."""
    return _DIALABLE.fullmatch(dial_string.strip()) is not None


def timeline_for(dial_string: str) -> tuple[Phase, ...]:
    """Pick the scripted timeline a dial string asks for (see the module's conventions)."""
    digits = dial_string.strip()
    if digits.endswith("486"):
        return BUSY
    if digits.endswith("480"):
        return UNANSWERED
    return ANSWERED


def new_phone_call_id() -> str:
    """Return an opaque id shaped like Exchange's: 48 URL-safe base64 characters."""
    return base64.urlsafe_b64encode(secrets.token_bytes(36)).decode("ascii")


@dataclass(frozen=True)
class CallView:
    """A snapshot of one call, safe to hand to another thread."""

    call_id: str
    mailbox: str | None
    dial_string: str
    phase: Phase


@dataclass
class _Call:
    call_id: str
    mailbox: str | None
    dial_string: str
    started_at: float
    timeline: tuple[Phase, ...]
    hung_up: Phase | None = None
    hung_up_at: float | None = None

    def phase_at(self, now: float, step_seconds: float) -> Phase:
        if self.hung_up is not None:
            return self.hung_up
        reached = [
            p for p in self.timeline if self.started_at + p.after_steps * step_seconds <= now
        ]
        return reached[-1] if reached else self.timeline[0]

    def ended_at(self, step_seconds: float) -> float | None:
        if self.hung_up_at is not None:
            return self.hung_up_at
        last = self.timeline[-1]
        if last.state != DISCONNECTED:
            return None
        return self.started_at + last.after_steps * step_seconds


class CallBook:
    """Keep the calls of every mailbox; safe to share between handler threads."""

    def __init__(
        self, *, step_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if step_seconds <= 0:
            raise ValueError(f"step_seconds must be positive, not {step_seconds!r}")
        self._step_seconds = step_seconds
        self._clock = clock
        self._calls: dict[str, _Call] = {}
        self._lock = threading.Lock()

    def place(self, mailbox: str | None, dial_string: str) -> CallView:
        """Start a call for the mailbox and return it in its first state."""
        call = _Call(
            call_id=new_phone_call_id(),
            mailbox=mailbox,
            dial_string=dial_string,
            started_at=self._clock(),
            timeline=timeline_for(dial_string),
        )
        with self._lock:
            self._forget_old_calls()
            self._calls[call.call_id] = call
            return self._view(call)

    def look_up(self, mailbox: str | None, call_id: str) -> CallView | None:
        """Return the call as its mailbox sees it now, or None for another mailbox's id."""
        with self._lock:
            self._forget_old_calls()
            call = self._calls.get(call_id)
            if call is None or call.mailbox != mailbox:
                return None
            return self._view(call)

    def hang_up(self, mailbox: str | None, call_id: str) -> CallView | None:
        """End the call; a call that already ended keeps its cause; twice succeeds twice."""
        with self._lock:
            self._forget_old_calls()
            call = self._calls.get(call_id)
            if call is None or call.mailbox != mailbox:
                return None
            now = self._clock()
            current = call.phase_at(now, self._step_seconds)
            if current.state != DISCONNECTED:
                call.hung_up = Phase(0, DISCONNECTED, NO_FAILURE)
                call.hung_up_at = now
            return self._view(call)

    def all_calls(self) -> list[CallView]:
        """Return every call of every mailbox, oldest first."""
        with self._lock:
            self._forget_old_calls()
            return [self._view(call) for call in self._calls.values()]

    def _view(self, call: _Call) -> CallView:
        phase = call.phase_at(self._clock(), self._step_seconds)
        return CallView(call.call_id, call.mailbox, call.dial_string, phase)

    def _forget_old_calls(self) -> None:
        horizon = self._clock() - FORGET_ENDED_CALLS_AFTER_S
        for call_id, call in list(self._calls.items()):
            ended_at = call.ended_at(self._step_seconds)
            if ended_at is not None and ended_at <= horizon:
                del self._calls[call_id]
