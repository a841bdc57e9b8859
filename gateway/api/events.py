"""Server-Sent Events for a watched call: what each event says and how it is framed.

Pure functions over plain data; gateway.api.streams decides when to send them. The
event stream format is the WHATWG HTML standard's (section 9.2, "Server-sent
events"); framing on the wire is HTTP/1.1 chunked transfer coding (RFC 9112 7.1).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from gateway.api import rendering
from gateway.errors import GatewayError, InvalidRequest
from gateway.exchange.replies import CallInformation

DISCONNECTED = "Disconnected"
# "<sequence>-<fingerprint>": the sequence orders events for people reading them; the
# fingerprint names the state itself, so any instance can resume without shared memory.
EVENT_ID = re.compile(r"([0-9]{1,9})-([0-9a-f]{12})")
FINGERPRINT_HEX = 12
HEARTBEAT = b": heartbeat\n\n"


@dataclass(frozen=True)
class Snapshot:
    """A call's state as GET /calls/{callId} shows it (callId aside), and its fingerprint."""

    body: dict[str, Any]
    fingerprint: str

    @property
    def ended(self) -> bool:
        return bool(self.body["state"] == DISCONNECTED)


@dataclass(frozen=True)
class Resume:
    """Where a reconnecting watcher left off (its Last-Event-ID)."""

    sequence: int
    fingerprint: str


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
    """Return the call's state with a fingerprint of what a watcher would see change."""
    body = call_body(info)
    # Only the call's own fields: a warning or response code alone is not a change of state.
    seen = [body["state"], body["connectionFailureCause"]]
    seen += [body.get("sipResponseCode"), body.get("sipResponseText")]
    digest = hashlib.sha256(json.dumps(seen).encode()).hexdigest()
    return Snapshot(body, digest[:FINGERPRINT_HEX])


def parse_last_event_id(header: str | None) -> Resume | None:
    """Read a Last-Event-ID header this gateway sent; raise InvalidRequest for anything else."""
    if header is None or not header.strip():
        return None
    match = EVENT_ID.fullmatch(header.strip())
    if match is None:
        raise InvalidRequest("Last-Event-ID is not an id this gateway sent, like 3-0123456789ab")
    return Resume(int(match[1]), match[2])


def state_event(sequence: int, call_id: str, state: Snapshot) -> bytes:
    """Frame one state of the call the watcher knows as CALL_ID as an SSE `state` event."""
    data = json.dumps({"callId": call_id, **state.body}, separators=(",", ":"))
    return f"id: {sequence}-{state.fingerprint}\nevent: state\ndata: {data}\n\n".encode()


def problem(error: GatewayError, request_id: str) -> dict[str, Any]:
    """Return the problem+json body for an error, as the API's error handler writes it, with
    the seconds to wait (`retryAfter`) that a Retry-After header would carry."""
    body = rendering.problem_of(error, request_id)
    if error.retry_after_s is not None:
        body["retryAfter"] = error.retry_after_s
    return body


def error_event(error: GatewayError, request_id: str) -> bytes:
    """Frame a failure as an SSE `error` event; a Retry-After becomes the `retry` hint."""
    data = json.dumps(problem(error, request_id), separators=(",", ":"))
    retry = "" if error.retry_after_s is None else f"retry: {error.retry_after_s * 1000}\n"
    return f"{retry}event: error\ndata: {data}\n\n".encode()


def retry_hint(milliseconds: int) -> bytes:
    """Tell the client to reconnect after MILLISECONDS (sent when this instance stops)."""
    return f": this instance is stopping; reconnect\nretry: {milliseconds}\n\n".encode()


def chunk(data: bytes) -> bytes:
    """Frame bytes as one HTTP/1.1 chunk."""
    return b"%X\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
