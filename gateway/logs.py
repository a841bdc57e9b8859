"""Logging: one JSON object per line on stderr, for the gateway and gunicorn alike."""

from __future__ import annotations

import logging
import sys

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
