"""The front door: reading requests off the socket, and answering those that cannot be read.

gunicorn parses each request before the app sees it and answers the ones it refuses (a head
or URL over its limits, a malformed request line or chunked body) with its own HTML page.
Here the gateway takes that over: its parser keeps what it read of a refused head, so the
answer is a problem+json with the caller's X-Request-ID and, for an allowed origin, CORS
headers a browser needs to read it; and one deadline bounds reading a request's head and
body, so a client that trickles bytes gets 408. While a request arrives, its bytes wait in the
worker's main thread (RequestArrival says when it is whole), so a trickling client holds no
thread meanwhile.

Rests on gunicorn 27's HTTP/1 parser (gunicorn.http.parser, gunicorn.http.message): the
Python parser reads the head through `Request.read_into`, and bodies through the unreader's
`chunk`. A plain head (the kind browsers, clients and balancers send) that arrived whole is
read by llhttp through httptools instead, and given gunicorn's header policy; gunicorn's
parser reads every other head, so each refusal is its own.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

import httptools
from gunicorn.http import errors as parse_errors
from gunicorn.http.body import Body, ChunkedReader
from gunicorn.http.message import (
    RFC9110_5_5_INVALID_AND_DANGEROUS,
    RFC9112_TARGET_INVALID,
    TOKEN_RE,
    Request,
)
from gunicorn.http.parser import RequestParser
from gunicorn.http.unreader import SocketUnreader
from gunicorn.util import split_request_uri

from gateway import errors
from gateway.api import rendering
from gateway.api.routes import UNMATCHED_ROUTE
from gateway.guards import validation
from gateway.telemetry import logs
from gateway.telemetry.metrics import OTHER_METHOD, STANDARD_METHODS, Metrics

LOG = logging.getLogger("gateway")

# What gunicorn may hold of one request head, set deliberately (docs/operations.md, "Limits"):
# a request line of up to 8,190 bytes (gunicorn's maximum short of unlimited; a call id
# percent-encoded is at most 1,536), 100 header lines, each up to 16 KiB, which fits the
# largest bearer tokens identity providers issue (10-12 KB with many group claims).
LIMIT_REQUEST_LINE = 8190
LIMIT_REQUEST_FIELDS = 100
LIMIT_REQUEST_FIELD_SIZE = 16 * 1024
# How much more of a refused head is read to find its Origin and X-Request-ID headers.
MAX_EXTRA_HEAD_BYTES = 64 * 1024
EXTRA_HEAD_WAIT_S = 0.5

# The methods whose heads llhttp may read (below): each passes gunicorn's method checks.
_PLAIN_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})
_PLAIN_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}

_HEADER = re.compile(rb"^(origin|x-request-id)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?$", re.I | re.M)

# Where a refused request's CallerFacts travel: on the exception gunicorn hands to the worker.
_FACTS = "gateway_caller_facts"
_MALFORMED = "the request is not valid HTTP/1.1 (RFC 9112)"
_CODINGS_SUPPORTED = "send the body with Content-Length or Transfer-Encoding: chunked"
_HEADERS_TOO_LARGE = (
    f"send at most {LIMIT_REQUEST_FIELDS} header lines of at most "
    f"{LIMIT_REQUEST_FIELD_SIZE // 1024} KiB each"
)
# gunicorn's parse errors as the gateway's, with what the caller reads (never its own bytes,
# which may hold a token). Anything else gunicorn raises is the gateway's own 500.
_ERROR_BY_PARSE_ERROR: tuple[tuple[type[Exception], type[errors.GatewayError], str], ...] = (
    (
        parse_errors.LimitRequestLine,
        errors.UriTooLong,
        f"the request line must be at most {LIMIT_REQUEST_LINE} bytes",
    ),
    (parse_errors.LimitRequestHeaders, errors.HeadersTooLarge, _HEADERS_TOO_LARGE),
    (
        parse_errors.UnsupportedTransferCoding,
        errors.TransferCodingNotImplemented,
        _CODINGS_SUPPORTED,
    ),
    (parse_errors.ExpectationFailed, errors.ExpectationFailed, "only 100-continue is supported"),
    (parse_errors.ForbiddenProxyRequest, errors.Forbidden, "this peer may not send PROXY lines"),
    (parse_errors.InvalidChunkSize, errors.MalformedRequest, "the chunked body is malformed"),
    (
        parse_errors.ChunkMissingTerminator,
        errors.MalformedRequest,
        "the chunked body is malformed",
    ),
    (parse_errors.InvalidChunkExtension, errors.MalformedRequest, "the chunked body is malformed"),
    (parse_errors.ParseException, errors.MalformedRequest, _MALFORMED),
)


def _undecoded_codings(value: str) -> list[str]:
    """Return the codings of a Transfer-Encoding VALUE other than chunked (and identity)."""
    codings = (coding.strip(" \t").lower() for coding in value.split(","))
    return [coding for coding in codings if coding not in ("chunked", "identity")]


def as_gateway_error(error: BaseException) -> errors.GatewayError | None:
    """Return the gateway error for a refused request, or None if the gateway itself failed."""
    if isinstance(error, errors.GatewayError):
        return error
    if isinstance(error, parse_errors.ConfigurationProblem):
        return None
    for parse_error, gateway_error, detail in _ERROR_BY_PARSE_ERROR:
        if isinstance(error, parse_error):
            return gateway_error(detail)
    return None


class DeadlineUnreader(SocketUnreader):  # type: ignore[misc]
    """Read a request off its socket, all of it (head and body) within TIMEOUT_S seconds.

    The clock starts when the request's first bytes arrive (the worker reads a request ahead
    in its main thread until it is whole, see RequestArrival); an idle connection waits in
    the poller instead.
    Bytes already waiting are read as gunicorn reads them, with no timeout to arm, so the
    deadline costs a kept-alive request no measurable CPU (benchmarks/RESULTS.md).
    """

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        super().__init__(sock)
        self.timeout_s = timeout_s
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        # How long the next request took to arrive, if the worker read it ahead (seconds).
        self.spent_arriving = 0.0
        # Whether a read waits for bytes to come (False while draining: see start_drain).
        self._waits = True
        # What this connection's peer may say in forwarding headers (GatewayRequest).
        self.peer_trust: tuple[Any, Any] | None = None

    def start_request(self) -> None:
        """Start the clock for the next request on this connection, counting the time it spent
        arriving while the worker read it ahead (`spent_arriving`), not the time it then
        waited for a thread."""
        self.started = time.monotonic() - self.spent_arriving
        self.spent_arriving = 0.0
        self.deadline = self.started + self.timeout_s
        self._waits = True

    def start_drain(self) -> None:
        """Read on only what has arrived (the rest of a body the app left unread): a read that
        would wait raises RequestTimeout instead, so no thread waits on a slow client."""
        self.start_request()
        self._waits = False

    def read_arrived(self, size: int) -> bytes | None:
        """Buffer, for the request's parser, up to SIZE bytes that have arrived, without waiting.

        Returns them (b"" once the peer has closed), or None if nothing had arrived.
        Raises OSError if the connection failed.
        """
        try:
            data = cast(bytes, self.sock.recv(size, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return None
        self.buf.seek(0, io.SEEK_END)
        self.buf.write(data)
        return data

    def chunk(self, size_hint: int | None = None) -> bytes:
        size = self.mxchunk
        if size_hint and size_hint > size:
            size = min(size_hint, self.max_body_chunk)
        # Checked before every read: a client trickling just fast enough that each read
        # finds a byte waiting must not escape the deadline either.
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._too_slow()
        if self._waits:
            try:
                # What has arrived costs no more than gunicorn's own read: no timeout to set.
                return cast(bytes, self.sock.recv(size, socket.MSG_DONTWAIT))
            except BlockingIOError:
                pass
        # Draining, gunicorn gives the socket a timeout, which makes even MSG_DONTWAIT wait.
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        if not poll.poll(remaining * 1000 if self._waits else 0):
            raise self._too_slow()
        return cast(bytes, self.sock.recv(size))

    def _too_slow(self) -> errors.RequestTimeout:
        return errors.RequestTimeout(
            f"the whole request must arrive within {self.timeout_s:g} seconds"
        )


class RequestArrival:
    """One request arriving on a connection, followed by llhttp (httptools) as its bytes come,
    so that they can wait in the worker's main thread, holding no thread, until all are here.

    `feed` says when a thread should take the request over: once it is whole (the head, and a
    body framed by Content-Length or chunked), and before that as soon as gunicorn's parser
    would answer it without reading further, so its refusals come as early as they always did:
    a request line or field line over its limit, too many fields, bytes llhttp cannot read,
    any Expect (a client expecting `100-continue` waits for it before it sends the body), a
    transfer coding other than chunked, a body declared or chunked over MAX_BODY bytes. Past
    MAX_BYTES it is handed over too. Bytes pipelined behind the request come along unread.
    """

    def __init__(self, *, max_body: int, max_bytes: int) -> None:
        self.started = time.monotonic()
        self.size = 0
        self.ready = False
        # Seconds it spent arriving before it was handed to a thread (hand_over).
        self.spent = 0.0
        self._max_body = max_body
        self._max_bytes = max_bytes
        self._head_done = False
        self._line_start = 0  # where the head's line being read began (0: the request line)
        self._fields = 0
        self._codings: list[bytes] = []
        self._answer_early = False
        self._body = 0
        self._parser = httptools.HttpRequestParser(self)

    def feed(self, data: bytes) -> bool:
        """Take the next bytes of the request; return whether a thread should take it now."""
        start, self.size = self.size, self.size + len(data)
        line_too_long = not self._head_done and self._line_too_long(start, data)
        if line_too_long or self.size > self._max_bytes:
            self.ready = True
        else:
            try:
                self._parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade):
                # Stopped here (_stop), or llhttp cannot read it: gunicorn's parser answers it.
                self.ready = True
        return self.ready

    def hand_over(self) -> None:
        """Note that the request goes to a thread now: the time it spent arriving counts
        toward its read deadline, the time it may wait for a thread does not."""
        self.spent = time.monotonic() - self.started

    def _line_too_long(self, start: int, data: bytes) -> bool:
        newline = data.rfind(b"\n")
        if newline >= 0:
            self._line_start = start + newline + 1
        limit = LIMIT_REQUEST_FIELD_SIZE if self._line_start else LIMIT_REQUEST_LINE
        return self.size - self._line_start > limit

    def _stop(self) -> None:
        """Hand the request over now; llhttp reads nothing more of it (not the next one either)."""
        self.ready = True
        raise _Arrived

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        name, value = name.lower(), value.strip(b" \t")
        if name == b"expect":
            self._answer_early = True
        elif name == b"transfer-encoding":
            self._codings.append(value.lower())
        elif name == b"content-length" and value.isdigit():
            self._answer_early |= len(value) > 18 or int(value) > self._max_body
        if self._fields > LIMIT_REQUEST_FIELDS:
            self._stop()

    def on_headers_complete(self) -> None:
        self._head_done = True
        plain = not self._codings or (
            self._codings == [b"chunked"] and self._parser.get_http_version() == "1.1"
        )
        if self._answer_early or not plain:
            self._stop()

    def on_body(self, body: bytes) -> None:
        self._body += len(body)
        if self._body > self._max_body:
            self._stop()

    def on_message_complete(self) -> None:
        self._stop()


class _Arrived(Exception):
    """Raised in an llhttp callback to stop reading a request that a thread should take now."""


class CallerBody(Body):  # type: ignore[misc]
    """A chunked request body whose framing errors are the caller's (400), not the gateway's."""

    def _read_reader(self, size: int) -> bytes:
        try:
            data: bytes = super()._read_reader(size)
        except parse_errors.ParseException as error:
            refused = as_gateway_error(error)
            raise (refused or errors.MalformedRequest(_MALFORMED)) from None
        return data


class GatewayRequest(Request):  # type: ignore[misc]
    """gunicorn's request, timed by the deadline, keeping what it read of a head it refuses."""

    body: Any

    def __init__(self, cfg: Any, unreader: Any, peer_addr: Any, req_number: int = 1) -> None:
        self.head = bytearray()
        unreader.start_request()
        try:
            super().__init__(cfg, unreader, peer_addr, req_number)
        except (parse_errors.ParseException, errors.GatewayError) as error:
            if isinstance(error, parse_errors.LimitRequestLine):
                self._read_more_of_head(unreader)
            facts = CallerFacts.from_head(bytes(self.head), getattr(self, "method", None))
            setattr(error, _FACTS, replace(facts, started=unreader.started))
            raise

    def parse(self, unreader: Any) -> bytes:
        """Read the head; return what followed it. A plain head is read by llhttp (httptools),
        anything else by gunicorn's parser, which refuses it or reads it as it always has."""
        buf = bytearray()
        self.read_into(unreader, buf, stop=True)
        if self.cfg.proxy_protocol != "off" and self.req_number == 1:
            buf = self._handle_proxy_protocol(unreader, buf, self.cfg.proxy_protocol)
        if self._use_fast:
            return cast(bytes, self._parse_fast(unreader, buf))
        rest = self._parse_plain(buf)
        if rest is None:
            rest = self._parse_python(unreader, buf)
        return cast(bytes, rest)

    def _parse_plain(self, buf: bytearray) -> bytes | None:
        """Read a plain head whole from BUF and return what followed it; None leaves the head
        to gunicorn's parser.

        Plain: all of it came in the first read (8 KiB), within every limit, with a request
        line of a common method, an origin-form target and HTTP/1.0 or 1.1, single-spaced, and
        field lines that end in CRLF, none folded, each accepted by llhttp and by gunicorn's own
        checks. Both parsers read such a head alike, llhttp in a fraction of the time
        (benchmarks/RESULTS.md); every refusal still comes from gunicorn's parser, word for word.
        """
        end = buf.find(b"\r\n\r\n")
        if end <= 0 or end + 4 > self.limit_request_field_size:
            return None
        read = _read_plain_head(bytes(buf[: end + 4]), self.limit_request_line)
        if read is None or len(read.fields) > self.limit_request_fields:
            return None
        fields = _plain_fields(read.fields)
        if fields is None:
            return None
        self.method, self.uri, self.version = read.method.decode(), read.uri, read.version_info
        self.path, self.query, self.fragment = read.uri_parts
        self.headers = self._kept_by_policy(fields)
        return bytes(buf[end + 4 :])

    def _kept_by_policy(self, fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Apply gunicorn's header policy to checked fields, as its own parser does."""
        kept = []
        scheme_state = [False]
        seen: set[str] = set()
        secure_scheme_headers, forwarder_headers = self._peer_trusted_for_forwarded()
        for name, value in fields:
            field = self._apply_header_policy(
                name, value, scheme_state, seen, secure_scheme_headers, forwarder_headers
            )
            if field is not None:
                kept.append(field)
        return kept

    def _peer_trusted_for_forwarded(self) -> tuple[Any, Any]:
        """gunicorn's answer, asked once per connection rather than once per request: it
        parses the peer's address each time, a sixth of reading a head (benchmarks/RESULTS.md),
        and a connection's peer and the worker's settings never change."""
        trust = self.unreader.peer_trust
        if trust is None:
            trust = self.unreader.peer_trust = super()._peer_trusted_for_forwarded()
        return cast(tuple[Any, Any], trust)

    def read_into(self, unreader: Any, buf: bytearray, stop: bool = False) -> None:
        self.head = buf  # the buffer the head is read into: kept for a refusal's answer
        super().read_into(unreader, buf, stop)

    def set_body_reader(self) -> None:
        """Frame the body as gunicorn does; a coding under the chunking is refused (501).

        gunicorn takes `Transfer-Encoding: gzip, chunked` (also deflate, compress) and
        removes only the chunking, leaving the gzip bytes for the app to read as JSON. The
        gateway decodes no transfer coding but chunked, so, as RFC 9112 section 6.1 says of
        codings a server does not understand, such a request is 501.
        """
        super().set_body_reader()
        for name, value in self.headers:
            if name == "TRANSFER-ENCODING" and _undecoded_codings(value):
                raise errors.TransferCodingNotImplemented(_CODINGS_SUPPORTED)
        if isinstance(self.body.reader, ChunkedReader):
            self.body = CallerBody(self.body.reader)

    def _read_more_of_head(self, unreader: Any) -> None:
        """Read on past an overlong request line to the headers, within bounds."""
        limit = len(self.head) + MAX_EXTRA_HEAD_BYTES
        # The headers come along with the line, or not at all: the answer waits briefly.
        unreader.deadline = min(unreader.deadline, time.monotonic() + EXTRA_HEAD_WAIT_S)
        try:
            while b"\r\n\r\n" not in self.head and len(self.head) < limit:
                data = unreader.read()
                if not data:
                    return
                self.head.extend(data)
        except (OSError, errors.GatewayError):
            return


class _PlainHead:
    """What llhttp read of one request head: the request line's parts and the field lines."""

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = ""
        # Set once the request line is found plain: as gunicorn's Request holds them.
        self.uri = ""
        self.uri_parts = ("", "", "")
        self.version_info = (1, 1)
        self.fields: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def _read_plain_head(head: bytes, limit_request_line: int) -> _PlainHead | None:
    """Read HEAD with llhttp; None unless its lines end in CRLF, none folded, and its request
    line is plain (see _plain_request_line)."""
    if head.count(b"\n") != head.count(b"\r\n") or b"\n " in head or b"\n\t" in head:
        return None
    read = _PlainHead()
    parser = httptools.HttpRequestParser(read)
    try:
        parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # left to gunicorn
        return None
    read.method = parser.get_method()
    read.version = parser.get_http_version()
    line = head[: head.find(b"\r\n")]
    return read if read.complete and _plain_request_line(read, line, limit_request_line) else None


def _plain_request_line(read: _PlainHead, line: bytes, limit: int) -> bool:
    """Whether LINE, as llhttp READ it, is a common method, an origin-form target gunicorn
    accepts and HTTP/1.0 or 1.1, single-spaced, within LIMIT; if so, complete READ."""
    version_info = _PLAIN_VERSIONS.get(read.version)
    if (
        version_info is None
        or read.method not in _PLAIN_METHODS
        or len(line) > limit
        or line != b"%s %s HTTP/%s" % (read.method, read.target, read.version.encode())
    ):
        return False
    uri = read.target.decode("latin-1")
    if not uri.startswith("/") or RFC9112_TARGET_INVALID.search(uri):
        return False
    try:
        parts = split_request_uri(uri)
    except ValueError:
        return False
    read.uri, read.version_info = uri, version_info
    read.uri_parts = (parts.path, parts.query, parts.fragment)
    return True


def _plain_fields(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]] | None:
    """Return field lines as gunicorn names them (upper case, value trimmed), or None if one has
    a name or value gunicorn's parser refuses. The body is framed alike either way, by
    `set_body_reader`."""
    fields = []
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1").strip(" \t")
        if not TOKEN_RE.fullmatch(name) or RFC9110_5_5_INVALID_AND_DANGEROUS.search(value):
            return None
        fields.append((name.upper(), value))
    return fields


class GatewayRequestParser(RequestParser):  # type: ignore[misc]
    """gunicorn's HTTP/1 parser with the gateway's request class and read deadline."""

    mesg_class = GatewayRequest

    def __init__(
        self, cfg: Any, source: socket.socket, source_addr: Any, *, read_timeout_s: float
    ) -> None:
        super().__init__(cfg, source, source_addr)
        self.unreader = DeadlineUnreader(source, read_timeout_s)


@dataclass(frozen=True)
class CallerFacts:
    """What the answer to a refused request needs from it: each field may be unknown."""

    method: str | None = None
    request_id: str | None = None
    origin: str | None = None
    # When reading the request began (time.monotonic()), if known.
    started: float | None = None

    @classmethod
    def from_head(cls, head: bytes, method: str | None = None) -> CallerFacts:
        """Read the method, X-Request-ID and Origin from the raw bytes of a request head."""
        head = head.split(b"\r\n\r\n", 1)[0]  # the body is no place for headers
        if method is None:
            method = head.split(b" ", 1)[0].decode("latin-1") if b" " in head[:16] else None
        found = {name.lower(): value for name, value in _HEADER.findall(head)}
        return cls(
            method=method,
            request_id=_text(found.get(b"x-request-id")),
            origin=_text(found.get(b"origin")),
        )

    @classmethod
    def of_failure(cls, error: BaseException, request: Any) -> CallerFacts:
        """Return the facts a refused head left on ERROR, else those of the parsed REQUEST."""
        facts: CallerFacts | None = getattr(error, _FACTS, None)
        if facts is not None:
            return facts
        if request is None:
            return cls()
        headers = dict(request.headers)
        return cls(
            request.method,
            headers.get("X-REQUEST-ID"),
            headers.get("ORIGIN"),
            getattr(request.unreader, "started", None),
        )

    @property
    def method_label(self) -> str:
        return self.method if self.method in STANDARD_METHODS else OTHER_METHOD


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def answer(
    problem: errors.GatewayError, request_id: str, origin: str | None, cors_origins: Sequence[str]
) -> bytes:
    """Render a whole HTTP/1.1 answer: problem+json, X-Request-ID, CORS for an allowed origin."""
    body = json.dumps(rendering.problem_of(problem, request_id)).encode()
    lines = [
        f"HTTP/1.1 {problem.status} {HTTPStatus(problem.status).phrase}",
        f"Date: {formatdate(usegmt=True)}",
        f"Content-Type: {rendering.PROBLEM_JSON}",
        f"Content-Length: {len(body)}",
        f"X-Request-ID: {request_id}",
        "Connection: close",
    ]
    if origin is not None and rendering.is_allowed_origin(origin, cors_origins):
        lines += [f"{name}: {value}" for name, value in rendering.cors_headers(origin).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def request_id_for(caller_id: str | None) -> str:
    """Return the caller's X-Request-ID if it is sane, else a new one (as the app does)."""
    if caller_id is not None and validation.is_sane_request_id(caller_id):
        return caller_id
    return logs.new_request_id()


def refuse(
    sock: socket.socket,
    error: BaseException,
    request: Any,
    *,
    cors_origins: Sequence[str],
    metrics: Metrics,
) -> None:
    """Answer a request that failed before the app could, then count and log it like any other.

    ERROR is what gunicorn raised; REQUEST is the parsed request, if parsing got that far.
    """
    problem = as_gateway_error(error)
    if problem is None:
        LOG.error("unexpected error before the app was called", exc_info=error)
        problem = errors.GatewayError("an unexpected error occurred")
    facts = CallerFacts.of_failure(error, request)
    request_id = request_id_for(facts.request_id)
    # If the caller is gone, the refusal is still counted and logged.
    with contextlib.suppress(OSError):
        sock.sendall(answer(problem, request_id, facts.origin, cors_origins))
    seconds = 0.0 if facts.started is None else time.monotonic() - facts.started
    metrics.http_request(facts.method_label, UNMATCHED_ROUTE, problem.status, seconds)
    rendering.log_request(
        request_id,
        method=facts.method_label,
        route=UNMATCHED_ROUTE,
        status=problem.status,
        seconds=seconds,
        detail=problem.detail,
    )
