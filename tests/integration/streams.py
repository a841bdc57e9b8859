"""Watching a real gateway's event streams, for the integration tests (not a test module)."""

from __future__ import annotations

import json
import re
import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, urlsplit

from tests.integration.processes import (
    Server,
    free_port,
    http,
    simulator_requests,
    start,
)

CALL_ID_IN_BODY = re.compile(r'PhoneCallId Id="([^"]+)"')
T = TypeVar("T")


@dataclass
class Watcher:
    """Reads one event stream to its end (or to the state `stop_at`), keeping every event."""

    url: str
    request_id: str
    last_event_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stop_at: str | None = None
    events: list[dict[str, str]] = field(default_factory=list)
    ended_cleanly: bool = False
    status: int | None = None
    # Looked up as HTTP does, whatever the case of a name (Node sends them in lower case).
    response_headers: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None

    def run(self) -> None:
        parts = urlsplit(self.url)
        connection = HTTPConnection(parts.hostname or "", parts.port, timeout=30)
        headers = {"X-Request-ID": self.request_id, **self.headers}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        try:
            connection.request("GET", parts.path, headers=headers)
            response = connection.getresponse()
            self.response_headers = response.headers
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
                    if self.stop_at is not None and self.stop_at in self.states():
                        return
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


def stepping_simulator(step_s: float, log_path: Path) -> Server:
    """The simulator, moving each call to its next state every STEP_S."""
    port = free_port()
    args = ["simulator", "--bind", f"127.0.0.1:{port}", "--step-seconds", str(step_s)]
    return start(args, {}, f"http://127.0.0.1:{port}", "/simulator/health", log_path)


def place_call(
    gateway: Server, dial_string: str = "+1555", headers: Mapping[str, str] | None = None
) -> str:
    placed = http(
        "POST",
        f"{gateway.url}/calls",
        {"itemId": "AAMkVoice", "dialString": dial_string},
        headers=headers,
    )
    assert placed.status == 201, placed.body
    call_id: str = placed.json()["callId"]
    return call_id


def hang_up(gateway: Server, call_id: str, headers: Mapping[str, str] | None = None) -> None:
    answer = http("DELETE", f"{gateway.url}/calls/{quote(call_id, safe='')}", headers=headers)
    assert answer.status == 200, answer.body


def events_url(gateway: Server, call_id: str) -> str:
    return f"{gateway.url}/calls/{quote(call_id, safe='')}/events"


def ews_id(call_id: str) -> str:
    """The id Exchange knows a call by: the last part of the gateway's (gw1.*.*.ID)."""
    return call_id.split(".", 3)[3] if call_id.startswith("gw1.") else call_id


def polls_by_call(
    simulator: Server, request_id_prefix: str = ""
) -> dict[str, dict[str, list[float]]]:
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


def poll_times(simulator: Server, call_id: str) -> list[float]:
    """When each GetPhoneCallInformation of the call reached Exchange, in order."""
    by_poller = polls_by_call(simulator).get(ews_id(call_id), {})
    return sorted(t for times in by_poller.values() for t in times)


def most_polls_within(times: list[float], window_s: float) -> int:
    """The most polls that arrived within any WINDOW_S."""
    return max(
        (
            sum(1 for t in times[index:] if t - first < window_s)
            for index, first in enumerate(times)
        ),
        default=0,
    )
