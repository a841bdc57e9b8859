"""A bounded record of the requests that reached the simulator, for tests to inspect."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

JOURNAL_SIZE = 200


@dataclass(frozen=True)
class RecordedRequest:
    """One EWS request as it arrived; `operation` and `mailbox` are None where unreadable."""

    operation: str | None
    request_id: str | None
    mailbox: str | None
    soap_action: str | None
    body: bytes
    # Recorded so tests can check the credentials a gateway sent; this is a test double.
    authorization: str | None = None

    def as_json(self) -> dict[str, object]:
        """Describe the request as the control API shows it."""
        return {
            "operation": self.operation,
            "requestId": self.request_id,
            "mailbox": self.mailbox,
            "soapAction": self.soap_action,
            "body": self.body.decode("utf-8", errors="replace"),
            "authorization": self.authorization,
        }


class RequestJournal:
    """Keep the last JOURNAL_SIZE requests; safe to share between handler threads."""

    def __init__(self, size: int = JOURNAL_SIZE) -> None:
        self._requests: deque[RecordedRequest] = deque(maxlen=size)
        self._lock = threading.Lock()

    def record(self, request: RecordedRequest) -> None:
        """Remember a request, forgetting the oldest once full."""
        with self._lock:
            self._requests.append(request)

    def recorded(self) -> list[RecordedRequest]:
        """Return the remembered requests, newest last."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget every request."""
        with self._lock:
            self._requests.clear()
