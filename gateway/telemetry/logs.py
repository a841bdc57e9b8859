"""Logging: one JSON object per line on stderr, for the gateway and gunicorn alike.

The gateway's own loggers (`gateway`, `gateway.*`) log at GATEWAY_LOG_LEVEL. Every other
logger belongs to a library (pyspnego, urllib3, redis, OpenTelemetry, zeep, werkzeug...),
whose debug lines carry what the gateway must never write: pyspnego's hold every NTLM and
Kerberos token it reads and sends. Those pass at WARNING and above, unless
GATEWAY_LIBRARY_LOG_LEVEL asks for more; gunicorn's own lines (booting workers, signals) at
INFO. One filter on the one handler decides, so a library that sets its own logger's level
changes nothing; a second filter scrubs credentials, tokens and byte dumps out of every
library line that does pass, and out of any text the gateway's lines quote from elsewhere.
"""

from __future__ import annotations

import logging
import logging.config
import os
import re
import select
import sys
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TextIO

from pythonjsonlogger.orjson import OrjsonFormatter

from gateway.exchange.client import GuidSequence

LOG_FORMAT = "%(levelname)s %(name)s %(message)s"
RENAMED_FIELDS = {"levelname": "level", "name": "logger"}
# gunicorn's arbiter: its lifecycle lines (listening, booting workers, signals) are the server's.
SERVER_LOGGER = "gunicorn.error"
REDACTED = "[REDACTED]"


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
            line = (self._format_text(record) + "\n").encode("utf-8", "backslashreplace")
            if len(line) <= select.PIPE_BUF:
                _write_all(self._fd, line)
            else:
                with self._long_lines:
                    _write_all(self._fd, line)
        except Exception:
            self.handleError(record)

    def _format_text(self, record: logging.LogRecord) -> str:
        """Format RECORD; a string holding half a surrogate pair, which JSON text cannot carry
        and orjson refuses, is written escaped (`\\ud800`) rather than losing the line."""
        try:
            return self.format(record)
        except TypeError:
            escaped = {
                name: _escape_surrogates(value) if isinstance(value, str) else value
                for name, value in record.__dict__.items()
            }
            return self.format(logging.makeLogRecord(escaped))


def _escape_surrogates(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass(frozen=True)
class LogLevels:
    """The lowest level that is written: the gateway's lines, libraries' lines, gunicorn's."""

    gateway: int
    libraries: int
    server: int

    @classmethod
    def named(cls, level: str, library_level: str | None = None) -> LogLevels:
        """Levels from GATEWAY_LOG_LEVEL and GATEWAY_LIBRARY_LOG_LEVEL (names like "debug")."""
        gateway = _level_number(level)
        libraries = _level_number(library_level) if library_level else max(gateway, logging.WARNING)
        return cls(gateway, libraries, server=min(libraries, max(gateway, logging.INFO)))


def _level_number(name: str) -> int:
    return logging.getLevelNamesMapping()[name.upper()]


def is_own(logger_name: str) -> bool:
    """Whether a logger is the gateway's own."""
    return logger_name == "gateway" or logger_name.startswith("gateway.")


class LevelGate(logging.Filter):
    """Let a record through at the level of its owner: the gateway, gunicorn, or a library."""

    def __init__(self, gateway: int, libraries: int, server: int) -> None:
        super().__init__()
        self._gateway = gateway
        self._libraries = libraries
        self._server = server

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if is_own(name):
            return record.levelno >= self._gateway
        if name == SERVER_LOGGER:
            return record.levelno >= self._server
        return record.levelno >= self._libraries


# HTTP fields whose values are credentials or authentication tokens: the value is blanked
# to the end of its quotes, else of its line (a repr's escaped \r\n ends it too).
_SECRET_FIELD = re.compile(
    r"(?i)\b((?:proxy-)?authori[sz]ation|(?:proxy|www)-authenticate|x-api-key|set-cookie|cookie)"
    r"(['\"]?\s*[:=]\s*)(?:(['\"])(?:\\.|(?!\3).)*?\3|(?:(?!\\[rn])[^\r\n])+)"
)
# name=value and name: value pairs whose name says secret; the value ends at a blank.
_SECRET_PAIR = re.compile(
    r"(?i)\b([\w-]*(?:password|passwd|secret|token|api[_-]?key))(['\"]?\s*[:=]\s*)"
    r"(?:(['\"])(?:\\.|(?!\3).)*?\3|[^\s,;&'\"}\])]+)"
)
# Credentials inside a URL: scheme://user:password@host.
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]*:[^/\s@]*@")
# An NTLM message, base64 (of "NTLMSSP") or raw.
_NTLM_MESSAGE = re.compile(r"TlRMTVNTU[A-Za-z0-9+/]*={0,2}|NTLMSSP(?:\\x00|\x00)\S*")
# A JSON Web Token: its claims too, not only the signature's long run.
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# A bytes repr of 16 characters or more: a token, a key, a message.
_BYTES_REPR = re.compile(r"\bb(['\"])(?:\\.|(?!\1).){16,}?\1")
# A long run of base64 or base64url (SPNEGO and Kerberos tokens, bearer tokens, keys).
_BLOB = re.compile(r"(?<![\w+/=-])[A-Za-z0-9+/_-]{32,}={0,2}")
# A hex dump: 16 bytes or more as hex pairs, run together or apart.
_HEX_DUMP = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}[ :]?){15,}[0-9A-Fa-f]{2}")


def scrub(text: str) -> str:
    """Blank credentials, tokens and byte dumps out of text a log line would carry."""
    text = _SECRET_FIELD.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)
    text = _SECRET_PAIR.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)
    text = _URL_CREDENTIALS.sub(rf"\1{REDACTED}@", text)
    text = _NTLM_MESSAGE.sub(REDACTED, text)
    text = _JWT.sub(REDACTED, text)
    text = _BYTES_REPR.sub(REDACTED, text)
    text = _BLOB.sub(_blank_if_random, text)
    return _HEX_DUMP.sub(REDACTED, text)


def _blank_if_random(match: re.Match[str]) -> str:
    # Random bytes in base64 mix digits, upper and lower case; a long path or word does not.
    run = match[0]
    looks_random = (
        any(c.isdigit() for c in run) and any(c.isupper() for c in run) and not run.isupper()
    )
    return REDACTED if looks_random else run


class SecretScrubber(logging.Filter):
    """Scrub every library record, and the gateway's records where they quote other text.

    The gateway's own messages are fixed strings; what they quote (arguments, exceptions)
    and everything a library writes is scrubbed before it is formatted.
    """

    _exceptions = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args or not is_own(record.name):
            record.msg = scrub(_message(record))
            record.args = ()
        if record.exc_info:
            record.exc_text = self._exceptions.formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def _message(record: logging.LogRecord) -> str:
    """Return the record's message, with bytes arguments reduced to their length."""
    if isinstance(record.args, tuple):
        record.args = tuple(_without_bytes(arg) for arg in record.args)
    try:
        return record.getMessage()
    except (TypeError, ValueError):  # arguments that do not fit the format
        return f"{record.msg} {record.args!r}"


def _without_bytes(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    return value


def logging_config(levels: LogLevels) -> dict[str, Any]:
    """Return the logging configuration (dictConfig's schema) of the gateway and gunicorn."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "levels": {
                "()": "gateway.telemetry.logs.LevelGate",
                "gateway": levels.gateway,
                "libraries": levels.libraries,
                "server": levels.server,
            },
            "secrets": {"()": "gateway.telemetry.logs.SecretScrubber"},
        },
        "formatters": {"json": {"()": "gateway.telemetry.logs.json_formatter"}},
        "handlers": {
            "stderr": {
                "class": "gateway.telemetry.logs.LineHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
                # The gate first: only records that are written are scrubbed.
                "filters": ["levels", "secrets"],
            }
        },
        # Libraries' loggers inherit the root's level, so their suppressed lines are not
        # even built; the gate still holds those that set a level of their own.
        "root": {"level": levels.libraries, "handlers": ["stderr"]},
        "loggers": {
            "gateway": {"level": levels.gateway, "handlers": [], "propagate": True},
            SERVER_LOGGER: {"level": levels.server, "handlers": [], "propagate": True},
        },
    }


def configure_logging(levels: LogLevels) -> None:
    """Send every log record to stderr as a JSON line, through the level gate and scrubber."""
    logging.config.dictConfig(logging_config(levels))
    _route_through_root()
    # Python warnings from libraries would be plain-text lines among the JSON ones.
    logging.captureWarnings(True)
    # The lines name no source line, thread or process, so no record collects them: a fifth of
    # the cost of a line, and every request writes one or two (benchmarks/RESULTS.md; the
    # "Optimization" section of the Python Logging HOWTO).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _route_through_root() -> None:
    """Take away handlers libraries gave their own loggers, so all lines pass the filters.

    pyspnego, for one, applies a logging configuration of its own when PYSPNEGO_LOG_CFG
    names one.
    """
    for logger in list(logging.root.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger) or is_own(logger.name):
            continue
        for handler in list(logger.handlers):
            if not isinstance(handler, logging.NullHandler):
                logger.removeHandler(handler)
                logger.propagate = True


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


# Request ids in uuid4().hex's shape, for callers that send no X-Request-ID.
new_request_id = GuidSequence(separator="").next
