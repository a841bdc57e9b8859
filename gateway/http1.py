"""HTTP/1.1 messages to and from Exchange: one POST out, one answer back.

The transport owns sockets, pooling and the deadline; this module owns the
bytes. It reads exactly what the gateway needs and refuses the rest: framing
follows RFC 9112 section 6.3 and an answer whose length is ambiguous is an
error rather than a guess. The status line, header block, chunk size lines,
trailers and body are each capped, so no answer can make it hold much more
than the body cap. Error messages name the problem, never header values or
body bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.errors import UpstreamBadResponse, UpstreamUnreachable

# Status line and header block together, and again the trailers of a chunked body.
MAX_HEAD_BYTES = 64 * 1024
# A chunk size line: hex digits and extensions, which are ignored.
MAX_CHUNK_LINE_BYTES = 1024
# Field lines in one header block or trailer block; Exchange sends about twenty.
MAX_FIELDS = 100
# Interim (1xx) answers skipped before the final one.
MAX_INTERIM_ANSWERS = 8

# Returns the next bytes from Exchange; b"" once it has closed the connection.
Receive = Callable[[], bytes]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_TARGET = re.compile(r"/[\x21-\x7e]*")
_HOST = re.compile(r"[\x21-\x7e]+")
# Names the request formatter writes itself.
_FRAMING_FIELDS = frozenset({"host", "content-length", "transfer-encoding"})

_HTTP1 = b"HTTP/1."
_STATUS_LINE = re.compile(rb"HTTP/1\.([0-9]) ([1-5][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
_FIELD_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):([\t\x20-\x7e\x80-\xff]*)")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]+)[\t ]*(?:;[\t\x20-\x7e\x80-\xff]*)?")
_DIGITS = re.compile(r"[0-9]+")
_WHITESPACE = " \t"


@dataclass(frozen=True, slots=True)
class Answer:
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
        host = host.encode("idna").decode("ascii")  # as the resolver and TLS name it
    name = f"[{host}]" if ":" in host else host
    if _HOST.fullmatch(name) is None:
        raise ValueError("the host name must be printable ASCII")
    return name if port == default_port else f"{name}:{port}"


def format_request(target: str, host: str, headers: Mapping[str, str], body: bytes) -> bytes:
    """Return a whole POST request, head and body, as one bytes object to send at once.

    host is a value from host_field. A header that could split the request (CR,
    LF or NUL, a name that is not a token) or that would frame it differently is
    a ValueError: callers pass values they checked.
    """
    if _TARGET.fullmatch(target) is None:
        raise ValueError("the request target must be an absolute path of printable ASCII")
    lines = [f"POST {target} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers.items():
        if _TOKEN.fullmatch(name) is None or name.lower() in _FRAMING_FIELDS:
            raise ValueError(f"{name!r} cannot be sent as a header name")
        if _FIELD_VALUE.fullmatch(value) is None:
            raise ValueError(f"the {name} header's value holds a character it cannot carry")
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    return "".join(lines).encode("latin-1") + body


def read_answer(receive: Receive, max_body_bytes: int) -> Answer:
    """Read Exchange's final answer, skipping interim (1xx) ones, and its whole body."""
    reader = _Reader(receive)
    for _ in range(MAX_INTERIM_ANSWERS + 1):
        minor_version, status, headers = _read_head(reader)
        if status >= 200:
            break
        if status == 101:
            raise _invalid("it switched protocols unasked")
    else:
        raise _invalid(f"more than {MAX_INTERIM_ANSWERS} interim answers")
    body, framed = _read_body(reader, status, headers, max_body_bytes)
    # Bytes Exchange sent beyond the answer mean the stream can no longer be trusted.
    reusable = framed and minor_version == 1 and not reader.buffer and not _closes(headers)
    return Answer(status, headers, body, reusable)


class _Reader:
    """A buffer over the bytes received so far."""

    __slots__ = ("_receive", "buffer")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.buffer = bytearray()

    def fill(self) -> None:
        """Wait for more bytes; the connection closing first is an incomplete answer."""
        data = self._receive()
        if not data:
            raise UpstreamUnreachable(
                "Exchange closed the connection before its answer was complete",
                outcome="connection_error",
            )
        self.buffer += data

    def read_exact(self, size: int) -> bytes:
        """Return the next size bytes, receiving until they are all in."""
        while len(self.buffer) < size:
            self.fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def read_until(self, delimiter: bytes, limit: int, what: str) -> bytes:
        """Return the bytes before delimiter and consume both; more than limit is refused."""
        start = 0
        while (end := self.buffer.find(delimiter, start)) < 0:
            if len(self.buffer) >= limit + len(delimiter):
                break
            start = max(0, len(self.buffer) - len(delimiter) + 1)
            self.fill()
        if end < 0 or end > limit:
            raise _invalid(f"the {what} exceeded {limit} bytes")
        data = bytes(self.buffer[:end])
        del self.buffer[: end + len(delimiter)]
        return data

    def read_to_end(self, limit: int) -> bytes:
        """Return everything up to the connection's close; more than limit is refused."""
        while len(self.buffer) <= limit:
            data = self._receive()
            if not data:
                body = bytes(self.buffer)
                self.buffer.clear()
                return body
            self.buffer += data
        raise _too_large(limit)


def _read_head(reader: _Reader) -> tuple[int, int, dict[str, str]]:
    """Read a status line and its header fields: (minor version, status, fields)."""
    while not reader.buffer.startswith(_HTTP1):
        # Refused at once, not after waiting for a line end that may never come.
        if not _HTTP1.startswith(reader.buffer):
            raise _invalid("it does not start with an HTTP/1 status line")
        reader.fill()
    status_line = reader.read_until(b"\r\n", MAX_HEAD_BYTES, "status line")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise _invalid("the status line is malformed")
    headers = _read_fields(reader, MAX_HEAD_BYTES - len(status_line), "header block")
    return int(match[1]), int(match[2]), headers


def _read_fields(reader: _Reader, limit: int, what: str) -> dict[str, str]:
    """Read field lines up to the empty line that ends them."""
    while len(reader.buffer) < 2:
        reader.fill()
    if reader.buffer.startswith(b"\r\n"):
        del reader.buffer[:2]
        return {}
    lines = reader.read_until(b"\r\n\r\n", limit, what).split(b"\r\n")
    if len(lines) > MAX_FIELDS:
        raise _invalid(f"the {what} has more than {MAX_FIELDS} fields")
    fields: dict[str, str] = {}
    for line in lines:
        # A line starting with whitespace (obsolete folding) fails here too.
        match = _FIELD_LINE.fullmatch(line)
        if match is None:
            raise _invalid(f"a line of the {what} is malformed")
        name = match[1].decode("ascii").lower()
        value = match[2].decode("latin-1").strip(_WHITESPACE)
        fields[name] = f"{fields[name]}, {value}" if name in fields else value
    return fields


def _read_body(
    reader: _Reader, status: int, headers: Mapping[str, str], max_body_bytes: int
) -> tuple[bytes, bool]:
    """Read the body as RFC 9112 section 6.3 frames it; say whether its end was framed."""
    if status in (204, 304):
        return b"", True
    transfer_coding = headers.get("transfer-encoding")
    if transfer_coding is not None:
        if "content-length" in headers:
            raise _invalid("it has both Transfer-Encoding and Content-Length")
        if transfer_coding.lower() != "chunked":
            raise _invalid("its transfer coding is not chunked")
        return _read_chunked(reader, max_body_bytes), True
    length = headers.get("content-length")
    if length is not None:
        return reader.read_exact(_content_length(length, max_body_bytes)), True
    return reader.read_to_end(max_body_bytes), False


def _content_length(value: str, max_body_bytes: int) -> int:
    """Return the one length a Content-Length field gives, if within the cap."""
    lengths = {length.strip(_WHITESPACE) for length in value.split(",")}
    if len(lengths) != 1:
        raise _invalid("its Content-Length fields differ")
    (length,) = lengths
    if _DIGITS.fullmatch(length) is None:
        raise _invalid("its Content-Length is not a number")
    # A length of thousands of digits is too large; int() would refuse it anyway.
    if len(length.lstrip("0")) > len(str(max_body_bytes)) or int(length) > max_body_bytes:
        raise _too_large(max_body_bytes)
    return int(length)


def _read_chunked(reader: _Reader, max_body_bytes: int) -> bytes:
    """Read a chunked body, checking each size against the cap before reading the chunk."""
    # One buffer, not a list of chunks: a body sent a byte per chunk stays a megabyte.
    body = bytearray()
    while True:
        match = _CHUNK_SIZE.fullmatch(
            reader.read_until(b"\r\n", MAX_CHUNK_LINE_BYTES, "chunk size line")
        )
        if match is None:
            raise _invalid("a chunk size line is malformed")
        chunk_size = int(match[1], 16)
        if len(body) + chunk_size > max_body_bytes:
            raise _too_large(max_body_bytes)
        if chunk_size == 0:
            break
        body += reader.read_exact(chunk_size)
        if reader.read_exact(2) != b"\r\n":
            raise _invalid("a chunk is not followed by a line end")
    _read_fields(reader, MAX_HEAD_BYTES, "trailer block")
    return bytes(body)


def _closes(headers: Mapping[str, str]) -> bool:
    """Tell whether the answer's Connection field asks to close the connection."""
    options = headers.get("connection")
    if options is None:
        return False
    return any(option.strip(_WHITESPACE).lower() == "close" for option in options.split(","))


def _invalid(problem: str) -> UpstreamBadResponse:
    return UpstreamBadResponse(
        f"Exchange sent an invalid HTTP answer: {problem}", outcome="invalid_response"
    )


def _too_large(limit: int) -> UpstreamBadResponse:
    return UpstreamBadResponse(
        f"Exchange's answer exceeded {limit} bytes", outcome="invalid_response"
    )
