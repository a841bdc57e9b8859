"""Logging: one JSON object per line on stderr, for the gateway and gunicorn alike."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

LOG_FORMAT = "%(levelname)s %(name)s %(message)s"
RENAMED_FIELDS = {"levelname": "level", "name": "logger"}


def json_formatter() -> logging.Formatter:
    """Return the formatter every handler of the gateway uses."""
    return JsonFormatter(LOG_FORMAT, rename_fields=RENAMED_FIELDS, timestamp="time")


def configure_logging(level: str) -> None:
    """Send every log record to stderr as a JSON line."""
    handler = logging.StreamHandler(sys.stderr)
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
