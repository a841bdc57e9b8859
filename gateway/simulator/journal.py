"""A bounded record of the requests that reached the simulator, for tests to inspect."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

# Enough for event-stream tests to count every poll of a minute's watching (100 calls
# polled each second by two workers is 12,000 requests); a request is about 1 KB.
JOURNAL_SIZE = 20_000


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
    anchor_mailbox: str | None = None
    # With several mailbox servers: the one the front end sent the request to, and the one
    # the mailbox (else the authenticated account) lives on.
    server: str | None = None
    home_server: str | None = None
    # Wall-clock seconds when the request arrived, so tests can count requests per interval.
    received_at: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, object]:
        """Describe the request as the control API shows it."""
        described: dict[str, object] = {
            "operation": self.operation,
            "requestId": self.request_id,
            "mailbox": self.mailbox,
            "soapAction": self.soap_action,
            "body": self.body.decode("utf-8", errors="replace"),
            "authorization": self.authorization,
            "receivedAt": self.received_at,
        }
        # Shown only where they say something: an anchor sent, several mailbox servers.
        optional = {
            "anchorMailbox": self.anchor_mailbox,
            "server": self.server,
            "homeServer": self.home_server,
        }
        described.update((name, value) for name, value in optional.items() if value is not None)
        return described


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
