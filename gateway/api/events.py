"""Server-Sent Events for a watched call: what each event says, how it is framed, and
which states a watcher is sent.

Pure functions over plain data; gateway.api.streams decides when to send them. The
event stream format is the WHATWG HTML standard's (section 9.2, "Server-sent
events"); framing on the wire is HTTP/1.1 chunked transfer coding (RFC 9112 7.1).

An event's id says how far the watcher has seen the call, as a position that only
moves forward in the call's life: the rank of its state in a call's progression, and a
fingerprint of the state for changes within one rank. Any instance can compare a
watcher's Last-Event-ID with what it reads from Exchange, with no memory shared
between instances, and never send a state the watcher saw or one that came before it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from gateway import wire
from gateway.api import rendering
from gateway.errors import GatewayError, InvalidRequest
from gateway.exchange.replies import CallInformation

DISCONNECTED = "Disconnected"
# Where each PhoneCallStateType stands in a call's life: Idle < Connecting < Alerted <
# Connected < Disconnected. An incoming call rings like one being connected; a call is
# forwarded before it is answered and transferred while it is connected.
RANK_BY_STATE = {
    "Idle": 0,
    "Connecting": 1,
    "Incoming": 1,
    "Alerted": 2,
    "Forwarding": 2,
    "Connected": 3,
    "Transferring": 3,
    DISCONNECTED: 4,
}
FINAL_RANK = RANK_BY_STATE[DISCONNECTED]
# A state a later Exchange might add: the call goes on, and it is never taken for the end.
UNKNOWN_STATE_RANK = FINAL_RANK - 1
if set(RANK_BY_STATE) != set(wire.PHONE_CALL_STATES):
    raise RuntimeError("every PhoneCallStateType needs a rank in a call's progression")
# "<rank>.<fingerprint>", e.g. 3.c85a957055e6 (Connected).
EVENT_ID = re.compile(rf"([0-{FINAL_RANK}])\.([0-9a-f]{{12}})")
FINGERPRINT_HEX = 12
HEARTBEAT = b": heartbeat\n\n"


@dataclass(frozen=True)
class Position:
    """How far a watcher has seen a call: its state's rank, and which state of that rank."""

    rank: int
    fingerprint: str

    @property
    def final(self) -> bool:
        """Whether the call had ended: nothing can follow."""
        return self.rank == FINAL_RANK

    @property
    def event_id(self) -> str:
        return f"{self.rank}.{self.fingerprint}"


@dataclass(frozen=True)
class Snapshot:
    """A call's state as GET /calls/{callId} shows it (callId aside), and its position."""

    body: dict[str, Any]
    position: Position

    @property
    def fingerprint(self) -> str:
        return self.position.fingerprint

    @property
    def ended(self) -> bool:
        return self.position.final


def call_body(info: CallInformation) -> dict[str, Any]:
    """Return the fields of GET /calls/{callId} for this call information, callId aside."""
    body: dict[str, Any] = {
        "state": info.state,
        "connectionFailureCause": info.connection_failure_cause,
        "ewsResponseCode": info.ews_code,
    }
    if info.sip_response_code is not None:
        body["sipResponseCode"] = info.sip_response_code
    if info.sip_response_text is not None:
        body["sipResponseText"] = info.sip_response_text
    if info.warning:
        body["warning"] = info.warning
    return body


def snapshot(info: CallInformation) -> Snapshot:
    """Return the call's state with its position: its rank and a fingerprint of what a
    watcher would see change."""
    body = call_body(info)
    # Only the call's own fields: a warning or response code alone is not a change of state.
    seen = [body["state"], body["connectionFailureCause"]]
    seen += [body.get("sipResponseCode"), body.get("sipResponseText")]
    digest = hashlib.sha256(json.dumps(seen).encode()).hexdigest()
    rank = RANK_BY_STATE.get(info.state, UNKNOWN_STATE_RANK)
    return Snapshot(body, Position(rank, digest[:FINGERPRINT_HEX]))


def is_news(state: Snapshot, seen: Position | None, *, read_after_seen: bool) -> bool:
    """Tell whether a watcher that has seen SEEN should be sent STATE.

    A later rank is always news and an earlier one never. Another state of the same rank
    is news only when it was read after the watcher saw its own (READ_AFTER_SEEN): read
    before, it may be the very state the watcher's replaced.
    """
    if seen is None:
        return True
    if state.position.rank != seen.rank:
        return state.position.rank > seen.rank
    return read_after_seen and state.fingerprint != seen.fingerprint


class Progress:
    """What one watcher has seen of a call, and so which states it is sent next.

    Times are the pump's clock (time.monotonic): a state was read by a poll that started
    at `started_at` and was answered at `answered_at`.
    """

    def __init__(self, resume: Position | None, asked_at: float) -> None:
        self.seen = resume
        self.asked_at = asked_at
        # A poll that started at or after this reads the call after the watcher saw `seen`.
        self._since = asked_at

    def can_start_from(
        self, state: Snapshot | None, started_at: float, answered_at: float, max_age_s: float
    ) -> bool:
        """Tell whether a poll's outcome may stand for the call now, to start the stream from.

        A poll started after the watcher asked always may (failures too: they are the
        answer). An earlier answer may when it is at most MAX_AGE_S old and does not rank
        below what the watcher has seen: an instance whose last answer is older than the
        watcher's reads Exchange again.
        """
        if started_at >= self.asked_at:
            return True
        if state is None or answered_at < self.asked_at - max_age_s:
            return False
        return self.seen is None or state.position.rank >= self.seen.rank

    def offer(self, state: Snapshot, started_at: float, answered_at: float) -> bool:
        """Take a state a poll read; True when it is news the watcher must be sent."""
        if not is_news(state, self.seen, read_after_seen=started_at >= self._since):
            return False
        self.seen = state.position
        # Polls of one call follow each other: the next one starts after this answer.
        self._since = answered_at
        return True


def parse_last_event_id(header: str | None) -> Position | None:
    """Read a Last-Event-ID header this gateway sent; raise InvalidRequest for anything else."""
    if header is None or not header.strip():
        return None
    match = EVENT_ID.fullmatch(header.strip())
    if match is None:
        raise InvalidRequest(
            "Last-Event-ID is not an id this gateway sent, like 3.0123456789ab; "
            "watch again without it"
        )
    return Position(int(match[1]), match[2])


def state_event(call_id: str, state: Snapshot) -> bytes:
    """Frame one state of the call the watcher knows as CALL_ID as an SSE `state` event."""
    data = json.dumps({"callId": call_id, **state.body}, separators=(",", ":"))
    return f"id: {state.position.event_id}\nevent: state\ndata: {data}\n\n".encode()


def problem(error: GatewayError, request_id: str) -> dict[str, Any]:
    """Return the problem+json body for an error, as the API's error handler writes it, with
    the seconds to wait (`retryAfter`) that a Retry-After header would carry."""
    body = rendering.problem_of(error, request_id)
    if error.retry_after_s is not None:
        body["retryAfter"] = error.retry_after_s
    return body


def problem_event(error: GatewayError, request_id: str) -> bytes:
    """Frame a failure as an SSE `problem` event; a Retry-After becomes the `retry` hint.

    Not `error`: EventSource fires its own `error` for a lost connection, so a listener
    for the gateway's event would take both for one.
    """
    data = json.dumps(problem(error, request_id), separators=(",", ":"))
    retry = "" if error.retry_after_s is None else f"retry: {error.retry_after_s * 1000}\n"
    return f"{retry}event: problem\ndata: {data}\n\n".encode()


def retry_hint(milliseconds: int) -> bytes:
    """Tell the client to reconnect after MILLISECONDS (sent when this instance stops)."""
    return f": this instance is stopping; reconnect\nretry: {milliseconds}\n\n".encode()


def chunk(data: bytes) -> bytes:
    """Frame bytes as one HTTP/1.1 chunk."""
    return b"%X\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
