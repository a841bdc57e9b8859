"""Logging: one JSON object per line on stderr, for the gateway and gunicorn alike."""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import select
import sys
import threading
from contextvars import ContextVar
from typing import TextIO

from pythonjsonlogger.orjson import OrjsonFormatter

LOG_FORMAT = "%(levelname)s %(name)s %(message)s"
RENAMED_FIELDS = {"levelname": "level", "name": "logger"}


def json_formatter() -> logging.Formatter:
    """Return the formatter every handler of the gateway uses."""
    return OrjsonFormatter(LOG_FORMAT, rename_fields=RENAMED_FIELDS, timestamp="time")


class LineHandler(logging.Handler):
    """Write each record as one line straight to a file descriptor, without a lock.

    POSIX makes a write(2) of at most PIPE_BUF bytes to a pipe atomic, so lines written by many
    threads at once never interleave and need no lock; a longer line (a traceback) takes one.
    logging.StreamHandler takes its lock for every line: with 16 request threads writing two
    lines a request, waiting for it was a fifth of a worker's CPU (benchmarks/RESULTS.md).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        stream = sys.stderr if stream is None else stream
        stream.flush()  # what was printed before goes out first
        self._fd = stream.fileno()
        self._long_lines = threading.Lock()

    def createLock(self) -> None:
        self.lock = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            if len(line) <= select.PIPE_BUF:
                _write_all(self._fd, line)
            else:
                with self._long_lines:
                    _write_all(self._fd, line)
        except Exception:
            self.handleError(record)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def configure_logging(level: str) -> None:
    """Send every log record to stderr as a JSON line."""
    handler = LineHandler(sys.stderr)
    handler.setFormatter(json_formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Python warnings from libraries would be plain-text lines among the JSON ones.
    logging.captureWarnings(True)
    # The lines name no source line, thread or process, so no record collects them: a fifth of
    # the cost of a line, and every request writes one or two (benchmarks/RESULTS.md; the
    # "Optimization" section of the Python Logging HOWTO).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


# Fields the layers below the HTTP API add to the current request's log line
# (Exchange's correlation ids); gateway.api.routes starts a fresh set per request.
_REQUEST_FIELDS: ContextVar[dict[str, str] | None] = ContextVar("request_fields", default=None)


def start_request_fields() -> dict[str, str]:
    """Begin the current request's extra log fields; return them (empty) for its log line."""
    fields: dict[str, str] = {}
    _REQUEST_FIELDS.set(fields)
    return fields


def add_request_fields(fields: dict[str, str]) -> None:
    """Add fields to the current request's log line (nothing outside a request)."""
    current = _REQUEST_FIELDS.get()
    if current is not None:
        current.update(fields)


class RequestIds:
    """Request ids of uuid4().hex's shape (32 hex digits), unique and cheap to make.

    A random prefix per process (80 bits, drawn again in a forked child) and a counter for
    the last 48 bits: no system call per request, where uuid4 reads the kernel's random
    source each time (0.65 against 2.15 µs, benchmarks/RESULTS.md). Ids correlate log lines,
    traces and Exchange's logs; they are no secret.
    """

    def __init__(self) -> None:
        self._pid = -1
        self._prefix = ""
        self._counter = itertools.count()

    def next(self) -> str:
        """Return a new id."""
        if self._pid != os.getpid():
            self._prefix = f"{secrets.randbits(80):020x}"
            self._counter = itertools.count()
            self._pid = os.getpid()
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFF:012x}"


new_request_id = RequestIds().next
