"""HTTP/1.1 messages to and from Exchange: one POST out, one answer back.

The transport owns sockets, pooling and the deadline; this module owns the
bytes. Answers are framed by llhttp (through httptools, the parser Node.js
uses), which refuses what RFC 9112 calls ambiguous: Content-Length with
Transfer-Encoding, repeated or malformed lengths, bare LF line ends, obsolete
folding, control characters. This module adds what llhttp leaves to its user:
the head, every chunk size line and trailer block and the body are capped, a
declared length before the body is read; only chunked is accepted as a
transfer coding; and a connection is reusable only after a complete HTTP/1.1
answer without Connection: close and with nothing sent after it. A gzip or
deflate content coding is undone within the same cap. Error messages name the
problem, never header values or body bytes.

llhttp reads an answer in less CPU than the hand-written reader it replaced
(11-14 µs for a 14-field answer, benchmarks/RESULTS.md). The request writer
stays hand-written: it is one join of checked strings.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httptools
import idna

from gateway.errors import ExchangeBadAnswer, ExchangeOutcome, ExchangeUnreachable, GatewayError

# Status line and header block together, and again the trailers of a chunked body.
MAX_HEAD_BYTES = 64 * 1024
# A chunk size line: hex digits and extensions, which are ignored.
MAX_CHUNK_LINE_BYTES = 1024
# Field lines in one header block or trailer block; Exchange sends about twenty.
MAX_FIELDS = 100
# Octets in one label of a DNS name (RFC 1035 section 2.3.4).
MAX_DNS_LABEL = 63
# Interim (1xx) answers skipped before the final one.
MAX_INTERIM_ANSWERS = 8

# Returns the next bytes from Exchange; b"" once it has closed the connection.
Receive = Callable[[], bytes]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_TARGET = re.compile(r"(?:/|http://)[\x21-\x7e]*")  # origin form, or absolute form to a proxy
_HOST = re.compile(r"[\x21-\x7e]+")
# Names the request formatter writes itself.
_FRAMING_FIELDS = frozenset({"host", "content-length", "transfer-encoding"})

_WHITESPACE = " \t"
_REASON = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """One final HTTP answer from Exchange, read whole."""

    status: int
    # Lower-cased names; a repeated field's values joined with ", " (RFC 9110 section 5.3).
    headers: Mapping[str, str]
    body: bytes
    # Whether the connection may carry the next request.
    reusable: bool

    def header(self, name: str) -> str | None:
        """Return the named field's value, whatever the case of the name."""
        return self.headers.get(name.lower())


def host_field(host: str, port: int, default_port: int) -> str:
    """Return the Host field's value for a server, its port only when not the default."""
    if not host.isascii():
        host = ascii_host(host)
    name = f"[{host}]" if ":" in host else host
    if _HOST.fullmatch(name) is None:
        raise ValueError("the host name must be printable ASCII")
    return name if port == default_port else f"{name}:{port}"


def ascii_host(host: str) -> str:
    """Return a host name as IDNA 2008 A-labels (UTS 46 mapped), as DNS and TLS name it.

    Python's own "idna" codec is IDNA 2003, which maps "ß" to "ss": another domain.
    An ASCII name is returned as it is, once its labels are checked (RFC 1035 2.3.4:
    1-63 octets; one trailing dot allowed), since getaddrinfo refuses it otherwise.
    Raises ValueError for a name IDNA 2008 or DNS does not allow.
    """
    if host.isascii():
        labels = [] if ":" in host else host.removesuffix(".").split(".")
        if any(not 1 <= len(label) <= MAX_DNS_LABEL for label in labels):
            raise ValueError(
                f"the host name has an empty label or one longer than {MAX_DNS_LABEL} characters"
            )
        return host
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError as error:
        raise ValueError(f"the host name is not a valid IDNA 2008 name ({error})") from None


def format_request(
    target: str, host: str, headers: Mapping[str, str], body: bytes, *, checked: str = ""
) -> bytes:
    """Return a whole POST request, head and body, as one bytes object to send at once.

    host is a value from host_field; checked is field lines from format_fields, sent
    after headers (the transport's own, checked once). A header that could split the
    request (CR, LF or NUL, a name that is not a token) or that would frame it
    differently is a ValueError: callers pass values they checked.
    """
    if _TARGET.fullmatch(target) is None:
        raise ValueError(
            "the request target must be an absolute path (or http URL) of printable ASCII"
        )
    return (
        f"POST {target} HTTP/1.1\r\nHost: {host}\r\n{format_fields(headers)}{checked}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1") + body


def format_fields(headers: Mapping[str, str]) -> str:
    """Return header fields as lines ending in CRLF; ValueError for one that cannot be sent."""
    lines = []
    for name, value in headers.items():
        if _TOKEN.fullmatch(name) is None or name.lower() in _FRAMING_FIELDS:
            raise ValueError(f"{name!r} cannot be sent as a header name")
        if _FIELD_VALUE.fullmatch(value) is None:
            raise ValueError(f"the {name} header's value holds a character it cannot carry")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


def format_connect(authority: str, headers: Mapping[str, str]) -> bytes:
    """Return a CONNECT request asking a proxy for a tunnel to authority (host:port)."""
    if _HOST.fullmatch(authority) is None:
        raise ValueError("the CONNECT authority must be printable ASCII")
    lines = [f"CONNECT {authority} HTTP/1.1\r\n"]
    for name, value in headers.items():
        if _TOKEN.fullmatch(name) is None or _FIELD_VALUE.fullmatch(value) is None:
            raise ValueError(f"{name!r} cannot be sent as a header")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def read_http_answer(receive: Receive, max_body_bytes: int) -> HttpAnswer:
    """Read Exchange's final answer, skipping interim (1xx) ones, and its whole body."""
    reader = _AnswerReader(max_body_bytes)
    while not reader.complete:
        data = receive()
        if not data:
            return reader.finish_at_close()
        reader.feed(data)
    return reader.answer()


def read_connect_answer(head: bytes) -> int:
    """Return the status of a proxy's answer to CONNECT, given its whole head."""
    reader = _AnswerReader(0, head_only=True)
    reader.feed(head)
    if not reader.head_complete:
        raise _invalid("the proxy's answer ended inside its head")
    return reader.status


def decode_content(body: bytes, coding: str | None, max_bytes: int) -> bytes:
    """Undo a gzip or deflate content coding (RFC 9110 section 8.4.1) within max_bytes.

    The gateway never asks for one; this reads it should Exchange compress anyway. The
    inflated size is capped, not the compressed one: kilobytes can inflate to gigabytes.
    """
    kind = (coding or "").strip().lower()
    if kind in ("", "identity") or not body:
        # No content, nothing to decode (RFC 9110 8.4 codes content): the status still counts.
        return body
    if kind not in ("gzip", "x-gzip", "deflate"):
        raise ExchangeBadAnswer(
            "Exchange's answer is in a content coding the gateway cannot read",
            outcome=ExchangeOutcome.INVALID_RESPONSE,
        )
    if kind == "deflate":
        # RFC 9110's deflate is zlib-wrapped; some servers send it raw.
        wbits = zlib.MAX_WBITS if body[:1] == b"x" else -zlib.MAX_WBITS
    else:
        wbits = 16 + zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        plain = inflater.decompress(body, max_bytes + 1)
    except zlib.error:
        raise ExchangeBadAnswer(
            f"Exchange's {kind} answer is corrupt", outcome=ExchangeOutcome.INVALID_RESPONSE
        ) from None
    if len(plain) > max_bytes:
        raise ExchangeBadAnswer(
            f"Exchange's answer exceeded {max_bytes} bytes once decompressed",
            outcome=ExchangeOutcome.INVALID_RESPONSE,
        )
    if not inflater.eof:
        raise ExchangeBadAnswer(
            f"Exchange's {kind} answer is cut short", outcome=ExchangeOutcome.INVALID_RESPONSE
        )
    return plain


class _AnswerReader:
    """Feeds what Exchange sends to llhttp and collects one final answer, within the caps.

    llhttp refuses ambiguous framing, bare LF line ends, obsolete folding and
    control characters; this class adds what llhttp leaves to its user: the
    caps, the status range, the reason phrase's characters, a transfer coding
    other than chunked, and the reuse verdict.
    """

    # Class-level defaults: only what changes is set per answer (this is on every call's path).
    _head_bytes = 0
    _quiet_bytes = 0
    _progressed = False
    # Whether the last callback was on_body: the bytes fed after it are body, not a line.
    _in_body = False
    _interim = 0
    _fields = 0
    _in_trailers = False
    _extra = False
    status = 0
    head_complete = False
    complete = False

    def __init__(self, max_body_bytes: int, *, head_only: bool = False) -> None:
        self._max_body_bytes = max_body_bytes
        self._head_only = head_only
        self._parser = httptools.HttpResponseParser(self)
        self._body = bytearray()
        self.headers: dict[str, str] = {}

    def feed(self, data: bytes) -> None:
        """Parse the next bytes received; raise a GatewayError for an invalid answer."""
        allowed = MAX_HEAD_BYTES - self._head_bytes
        if not self.head_complete and len(data) > allowed:
            # Fed up to the cap first: a head that has not ended by then is refused.
            self.feed(data[:allowed])
            if not self.head_complete:
                raise _invalid(f"its head exceeded {MAX_HEAD_BYTES} bytes")
            if self.complete:
                self._extra = True
                return
            data = data[allowed:]
        if not self.head_complete:
            self._head_bytes += len(data)
        self._progressed = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            self._raise_from(error.__context__)
        except httptools.HttpParserError as error:
            if not self.complete:
                # llhttp's reasons are fixed phrases that never quote the answer.
                raise _invalid(str(error).strip().rstrip(".") or "llhttp refused it") from None
            self._extra = True  # bytes after the answer: the stream cannot be trusted
        self._check_progress(data)

    def finish_at_close(self) -> HttpAnswer:
        """Return the answer Exchange ended by closing the connection, if it was complete."""
        if self.head_complete and self._read_until_close():
            self.complete = True
            return HttpAnswer(self.status, self.headers, bytes(self._body), reusable=False)
        raise ExchangeUnreachable(
            "Exchange closed the connection before its answer was complete",
            outcome=ExchangeOutcome.CONNECTION_ERROR,
        )

    def answer(self) -> HttpAnswer:
        reusable = (
            not self._extra
            and self._parser.get_http_version() == "1.1"
            and not _closes(self.headers)
        )
        return HttpAnswer(self.status, self.headers, bytes(self._body), reusable)

    def _raise_from(self, cause: BaseException | None) -> None:
        if isinstance(cause, _AnswerEnded):
            self._extra = True
            return
        if isinstance(cause, _HeadRead):
            return
        if isinstance(cause, GatewayError):
            raise cause from None
        raise _invalid("llhttp refused it") from None

    def _check_progress(self, data: bytes) -> None:
        """Refuse a chunk size line or trailer block that never ends."""
        if not self.head_complete or self.complete:
            return
        if not self._progressed:
            self._quiet_bytes += len(data)
        elif self._in_body:
            self._quiet_bytes = 0
        else:
            # Every callback but on_body ends at a line's LF: what follows the last LF is
            # the line still open. Counted now, not once more bytes come: a peer that sent
            # a line over the cap with the head and went quiet must not cost the deadline.
            self._quiet_bytes = len(data) - data.rfind(b"\n") - 1
        limit = MAX_HEAD_BYTES if self._in_trailers else MAX_CHUNK_LINE_BYTES
        if self._quiet_bytes > limit:
            what = "trailer block" if self._in_trailers else "chunk size line"
            raise _invalid(f"a {what} exceeded {limit} bytes")

    def _read_until_close(self) -> bool:
        """Tell whether the answer's body runs until the connection closes (RFC 9112 6.3)."""
        return not (
            self.status in (204, 304)
            or "transfer-encoding" in self.headers
            or "content-length" in self.headers
        )

    # llhttp's callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            raise _AnswerEnded
        self.headers = {}
        self._fields = 0

    def on_status(self, reason: bytes) -> None:
        if _REASON.fullmatch(reason) is None:
            raise _invalid("the status line is malformed")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        self._progressed = True
        self._in_body = False
        if self._fields > MAX_FIELDS:
            what = "trailer block" if self._in_trailers else "header block"
            raise _invalid(f"the {what} has more than {MAX_FIELDS} fields")
        if self._in_trailers:
            return
        key = name.decode("ascii").lower()
        text = value.decode("latin-1").strip(_WHITESPACE)
        headers = self.headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        self._progressed = True
        self._in_body = False
        status = self._parser.get_status_code()
        if status < 100:
            raise _invalid("the status line is malformed")
        if status == 101:
            raise _invalid("it switched protocols unasked")
        self.status = status
        if status < 200:
            return
        self.head_complete = True
        self._fields = 0
        if self._head_only:
            raise _HeadRead
        coding = self.headers.get("transfer-encoding")
        if coding is not None and coding.lower() != "chunked":
            raise _invalid("its transfer coding is not chunked")
        length = self.headers.get("content-length")
        if length is not None and status not in (204, 304):
            _check_length(length, self._max_body_bytes)

    def on_body(self, data: bytes) -> None:
        self._progressed = True
        self._in_body = True
        self._body += data
        if len(self._body) > self._max_body_bytes:
            raise _too_large(self._max_body_bytes)

    def on_chunk_header(self) -> None:
        # A chunk with data calls on_body next; the last one is followed by the trailers.
        self._progressed = True
        self._in_body = False
        self._in_trailers = True

    def on_chunk_complete(self) -> None:
        self._progressed = True
        self._in_body = False
        self._in_trailers = False
        self._fields = 0

    def on_message_complete(self) -> None:
        self._progressed = True
        if self.head_complete:
            self.complete = True
            return
        self._interim += 1
        if self._interim > MAX_INTERIM_ANSWERS:
            raise _invalid(f"more than {MAX_INTERIM_ANSWERS} interim answers")


class _AnswerEnded(Exception):
    """More bytes followed the final answer."""


class _HeadRead(Exception):
    """The head asked for has been read; the parser stops there."""


def _check_length(value: str, max_body_bytes: int) -> None:
    """Refuse a declared length above the cap before any of the body is read."""
    # llhttp checked the digits; thousands of them are too large, and int() would refuse them.
    if len(value.lstrip("0")) > len(str(max_body_bytes)) or int(value) > max_body_bytes:
        raise _too_large(max_body_bytes)


def _closes(headers: Mapping[str, str]) -> bool:
    """Tell whether the answer's Connection field asks to close the connection."""
    options = headers.get("connection")
    if options is None:
        return False
    return any(option.strip(_WHITESPACE).lower() == "close" for option in options.split(","))


def _invalid(problem: str) -> ExchangeBadAnswer:
    return ExchangeBadAnswer(
        f"Exchange sent an invalid HTTP answer: {problem}", outcome=ExchangeOutcome.INVALID_RESPONSE
    )


def _too_large(limit: int) -> ExchangeBadAnswer:
    return ExchangeBadAnswer(
        f"Exchange's answer exceeded {limit} bytes", outcome=ExchangeOutcome.INVALID_RESPONSE
    )
