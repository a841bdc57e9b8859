"""What the HTTP layer is asked to do with one EWS request: answer, stream, stay silent or reset."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

XML_CONTENT_TYPE = "text/xml; charset=utf-8"
HTML_CONTENT_TYPE = "text/html; charset=utf-8"


@dataclass(frozen=True)
class Reply:
    """An HTTP answer held in memory; a None content type sends no Content-Type header."""

    status: int
    body: bytes = b""
    content_type: str | None = XML_CONTENT_TYPE
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StreamedReply:
    """An HTTP answer too big to hold, written chunk by chunk with a known length."""

    status: int
    length: int
    chunks: Callable[[], Iterator[bytes]]
    content_type: str = XML_CONTENT_TYPE


@dataclass(frozen=True)
class Silence:
    """Say nothing until `wait_seconds` pass or `released` is set, then close the connection."""

    wait_seconds: float
    released: threading.Event


@dataclass(frozen=True)
class ConnectionReset:
    """Drop the connection at once with a TCP reset."""


Outcome = Reply | StreamedReply | Silence | ConnectionReset
