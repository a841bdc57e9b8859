"""HTTP/1.1 to and from Exchange: requests formatted exactly, answers read strictly.

Answers are fed through a fake connection, in whatever pieces a test chooses. The
standard library's http.client is the oracle for valid answers: the gateway must
read them as it does, and only tell apart, more strictly, when a connection may
carry the next request.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import itertools
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ExchangeBadAnswer, ExchangeUnreachable
from gateway.exchange.http1 import (
    MAX_CHUNK_LINE_BYTES,
    MAX_FIELDS,
    MAX_HEAD_BYTES,
    MAX_INTERIM_ANSWERS,
    HttpAnswer,
    Receive,
    format_request,
    host_field,
    read_http_answer,
)

CAP = 4096
SOAP_XML = "text/xml; charset=utf-8"
# The fields the transport reads from an answer, with the reuse verdict's Connection.
FIELDS_USED = ("Content-Type", "Retry-After", "Location", "Connection")


class ReadPastTheAnswer(AssertionError):
    """The reader asked for more bytes than a peer keeping its connection open sent."""


def receiving(data: bytes, cuts: Sequence[int] = (), *, closes: bool = False) -> Receive:
    """Hand out data in pieces cut at the given offsets; then b"" if the peer closes.

    On a connection that stays open a further read would wait for the deadline; here
    it fails the test, so a reader that does not know where an answer ends is caught.
    """
    bounds = [0, *sorted({cut for cut in cuts if 0 < cut < len(data)}), len(data)]
    pieces = iter([data[start:end] for start, end in itertools.pairwise(bounds)])

    def receive() -> bytes:
        piece = next(pieces, None)
        if piece is not None:
            return piece
        if closes:
            return b""
        raise ReadPastTheAnswer

    return receive


def read(data: bytes, cuts: Sequence[int] = (), *, closes: bool = False) -> HttpAnswer:
    return read_http_answer(receiving(data, cuts, closes=closes), CAP)


def answer(head: bytes, body: bytes = b"") -> bytes:
    """An answer from a status line and header lines, each ending in CRLF, and a body."""
    return head + b"\r\n" + body


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/xml; charset=utf-8\r\n"


def with_length(body: bytes, head: bytes = OK_HEAD) -> bytes:
    return answer(head + b"Content-Length: %d\r\n" % len(body), body)


def chunked(*chunks: bytes, trailers: bytes = b"", head: bytes = OK_HEAD) -> bytes:
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return answer(head + b"Transfer-Encoding: chunked\r\n", encoded + b"0\r\n" + trailers + b"\r\n")


# What http.client makes of the same bytes


@dataclass(frozen=True)
class Reading:
    status: int
    fields: dict[str, str | None]
    body: bytes


class _BytesSocket:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, _mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


def read_with_http_client(data: bytes) -> Reading:
    response = http.client.HTTPResponse(_BytesSocket(data), method="POST")  # type: ignore[arg-type]
    response.begin()
    fields = {name: response.getheader(name) for name in FIELDS_USED}
    return Reading(response.status, fields, response.read())


def read_with_gateway(reply: HttpAnswer) -> Reading:
    return Reading(reply.status, {name: reply.header(name) for name in FIELDS_USED}, reply.body)


# Valid answers, generated


TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
# Latin-1 letters stand for obs-text; http.client splits lines at some C1 controls.
VALUE_CHARS = string.ascii_letters + string.digits + string.punctuation + "àéßÿ"
FRAMING_NAMES = {"content-length", "transfer-encoding", "connection"}

field_names = st.sampled_from(
    ["Content-Type", "content-type", "Retry-After", "RETRY-AFTER", "Location", "X-Repeated"]
) | st.text(TOKEN, min_size=1, max_size=12).filter(lambda name: name.lower() not in FRAMING_NAMES)
# Leading whitespace is not part of a value; trailing whitespace, which http.client
# keeps, is tested by hand.
field_values = st.builds(
    lambda leading, words: leading + " \t".join(words),
    st.sampled_from(["", " ", "  ", "\t"]),
    st.lists(st.text(VALUE_CHARS, min_size=1, max_size=10), max_size=4),
)
field_lines = st.lists(st.tuples(field_names, field_values), max_size=12)
status_lines = st.builds(
    lambda version, status, reason: b"HTTP/1.%d %d%s" % (version, status, reason),
    st.sampled_from([1, 1, 1, 0]),
    st.sampled_from([200, 201, 202, 204, 301, 302, 304, 400, 401, 403, 404, 500, 502, 503]),
    st.sampled_from([b"", b" ", b" OK", b" Internal Server Error", b" Found", b" any  words"]),
)
connection_values = st.sampled_from(
    [None, "close", "Close", "keep-alive", "Keep-Alive", "keep-alive, close", "TE"]
)


@dataclass(frozen=True)
class GeneratedAnswer:
    data: bytes
    reusable: bool
    closes: bool


def encode_field(name: str, value: str) -> bytes:
    return f"{name}:{value}\r\n".encode("latin-1")


def encode_chunked(body: bytes, cuts: list[int], draw: st.DrawFn) -> bytes:
    """The body in chunks cut at these offsets, sizes in any hex form, with extensions."""
    inner = sorted({cut for cut in cuts if 0 < cut < len(body)})
    bounds = [0, *inner, len(body)] if body else [0]
    # Whitespace before an extension, which RFC 9112 tolerates, llhttp refuses: tested by hand.
    extensions = st.sampled_from([b"", b";name", b";name=value", b';a="quoted";b', b";x=1;y"])
    sizes = st.sampled_from(["{:x}", "{:X}", "{:04x}"])
    encoded = b""
    for start, end in itertools.pairwise(bounds):
        size = draw(sizes).format(end - start).encode()
        encoded += size + draw(extensions) + b"\r\n" + body[start:end] + b"\r\n"
    trailers = b"".join(encode_field(n, v) for n, v in draw(field_lines.map(lambda f: f[:3])))
    return encoded + b"0" + draw(extensions) + b"\r\n" + trailers + b"\r\n"


@st.composite
def valid_answers(draw: st.DrawFn) -> GeneratedAnswer:
    status_line = draw(status_lines)
    status = int(status_line[9:12])
    fields = b"".join(encode_field(name, value) for name, value in draw(field_lines))
    connection = draw(connection_values)
    if connection is not None:
        fields += encode_field("Connection", connection)
    if status in (204, 304):
        # No body, so nothing to chunk: a last chunk would be bytes beyond the answer.
        body, framing = b"", draw(st.sampled_from(["length", "close"]))
    else:
        body = draw(st.binary(max_size=CAP))
        framing = draw(st.sampled_from(["length", "chunked", "close"]))
    if framing == "chunked":
        cuts = draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=6))
        fields += b"Transfer-Encoding: chunked\r\n"
        payload = encode_chunked(body, cuts, draw)
    elif framing == "close":
        payload = body
    else:
        fields += b"Content-Length: %d\r\n" % len(body)
        payload = body
    interim = draw(st.sampled_from([b"", b"HTTP/1.1 100 Continue\r\n\r\n"]))
    data = interim + status_line + b"\r\n" + fields + b"\r\n" + payload
    framed = framing != "close" or status in (204, 304)
    keeps_alive = connection is None or "close" not in connection.lower()
    reusable = framed and status_line.startswith(b"HTTP/1.1") and keeps_alive
    return GeneratedAnswer(data, reusable, closes=not framed)


@settings(max_examples=400, deadline=None)
@given(valid_answers(), st.data())
def test_a_valid_answer_in_any_pieces_reads_as_http_client_reads_it(
    generated: GeneratedAnswer, data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(generated.data)), max_size=12))
    reply = read(generated.data, cuts, closes=generated.closes)
    assert read_with_gateway(reply) == read_with_http_client(generated.data)


@settings(max_examples=400, deadline=None)
@given(valid_answers())
def test_a_connection_is_reusable_only_after_a_framed_http_1_1_answer_without_close(
    generated: GeneratedAnswer,
) -> None:
    reply = read(generated.data, closes=generated.closes)
    assert reply.reusable is generated.reusable


@settings(max_examples=400, deadline=None)
@given(valid_answers(), st.data())
def test_any_damage_to_an_answer_is_read_or_refused_as_a_gateway_error(
    generated: GeneratedAnswer, data: st.DataObject
) -> None:
    damaged = bytearray(generated.data)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(damaged)))
        if data.draw(st.booleans()):
            damaged[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        else:
            del damaged[at : at + data.draw(st.integers(1, 8))]
    with contextlib.suppress(ExchangeBadAnswer, ExchangeUnreachable):
        read(bytes(damaged), closes=True)


@given(st.binary(max_size=300))
def test_any_bytes_at_all_are_read_or_refused_as_a_gateway_error(data: bytes) -> None:
    with contextlib.suppress(ExchangeBadAnswer, ExchangeUnreachable):
        read(data, closes=True)


# Valid answers, by hand


def test_a_content_length_answer_is_read_whole_and_its_connection_reusable() -> None:
    reply = read(with_length(b"<s:Envelope/>"))
    assert (reply.status, reply.header("content-type"), reply.body) == (
        200,
        SOAP_XML,
        b"<s:Envelope/>",
    )
    assert reply.reusable


def test_field_names_are_matched_whatever_their_case() -> None:
    reply = read(with_length(b"", b"HTTP/1.1 503 Busy\r\nretry-AFTER: 30\r\n"))
    assert reply.header("Retry-After") == reply.header("RETRY-after") == "30"
    assert reply.header("Location") is None


def test_whitespace_around_a_field_value_is_not_part_of_it() -> None:
    reply = read(with_length(b"", b"HTTP/1.1 302 Found\r\nLocation: \t /owa/ \t\r\n"))
    assert reply.header("Location") == "/owa/"


def test_repeated_fields_are_joined_in_order() -> None:
    reply = read(with_length(b"", OK_HEAD + b"X-Seen: one\r\nX-Seen: two\r\n"))
    assert reply.header("X-Seen") == "one, two"


def test_a_chunked_answer_is_joined_and_its_trailers_discarded() -> None:
    reply = read(chunked(b"<s:Env", b"elope/>", trailers=b"X-Checksum: 1\r\n"))
    assert (reply.body, reply.header("X-Checksum"), reply.reusable) == (
        b"<s:Envelope/>",
        None,
        True,
    )


def test_transfer_encoding_chunked_is_matched_whatever_its_case() -> None:
    data = answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n", b"2\r\nok\r\n0\r\n\r\n")
    assert read(data).body == b"ok"


def test_an_answer_without_a_length_is_read_until_the_close_and_not_reused() -> None:
    reply = read(answer(OK_HEAD, b"<s:Envelope/>"), [20, 40], closes=True)
    assert (reply.body, reply.reusable) == (b"<s:Envelope/>", False)


def test_no_content_and_not_modified_have_no_body_whatever_their_fields() -> None:
    for status in (b"204 No Content", b"304 Not Modified"):
        reply = read(answer(b"HTTP/1.1 " + status + b"\r\nContent-Length: 10\r\n"))
        assert (reply.body, reply.reusable) == (b"", True)


def test_an_http_1_0_answer_is_read_but_its_connection_not_reused() -> None:
    head = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n"
    reply = read(with_length(b"<s:Envelope/>", head))
    assert (reply.body, reply.reusable) == (b"<s:Envelope/>", False)


def test_connection_close_among_other_options_forbids_reuse() -> None:
    reply = read(with_length(b"", OK_HEAD + b"Connection: Keep-Alive , CLOSE\r\n"))
    assert not reply.reusable


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n",
    ],
)
def test_interim_answers_are_skipped_for_the_final_one(interim: bytes) -> None:
    reply = read(interim + with_length(b"done"))
    assert (reply.status, reply.body, reply.reusable) == (200, b"done", True)


def test_bytes_beyond_a_complete_answer_forbid_reusing_its_connection() -> None:
    unasked = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"
    reply = read(with_length(b"<s:Envelope/>") + unasked)
    assert (reply.status, reply.body, reply.reusable) == (200, b"<s:Envelope/>", False)


def test_a_body_after_no_content_forbids_reusing_the_connection() -> None:
    reply = read(answer(b"HTTP/1.1 204 No Content\r\n", b"surprise"))
    assert (reply.status, reply.body, reply.reusable) == (204, b"", False)


def test_a_body_of_exactly_the_cap_is_accepted_with_every_framing() -> None:
    body = b"x" * CAP
    assert read(with_length(body)).body == body
    assert read(chunked(body[:100], body[100:])).body == body
    assert read(answer(OK_HEAD, body), closes=True).body == body


# Invalid answers: refused, never guessed at


def refusal(data: bytes, cuts: Sequence[int] = (), *, closes: bool = False) -> ExchangeBadAnswer:
    with pytest.raises(ExchangeBadAnswer) as raised:
        read(data, cuts, closes=closes)
    assert raised.value.outcome == "invalid_response"
    return raised.value


INVALID_ANSWERS = {
    "both lengths": answer(
        OK_HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", b"2\r\nok\r\n0\r\n\r\n"
    ),
    # RFC 9112 section 6.3 lets a recipient refuse even identical repeats; llhttp does.
    "repeated identical lengths": answer(
        OK_HEAD + b"Content-Length: 2\r\nContent-Length: 2\r\n", b"ok"
    ),
    "differing lengths": answer(OK_HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n", b"ok!"),
    "differing lengths in one field": answer(OK_HEAD + b"Content-Length: 2, 3\r\n", b"ok!"),
    "negative length": answer(OK_HEAD + b"Content-Length: -1\r\n"),
    "signed length": answer(OK_HEAD + b"Content-Length: +2\r\n", b"ok"),
    "hex length": answer(OK_HEAD + b"Content-Length: 0x2\r\n", b"ok"),
    "empty length": answer(OK_HEAD + b"Content-Length:\r\n"),
    "length with a unit": answer(OK_HEAD + b"Content-Length: 2 bytes\r\n", b"ok"),
    "length in other digits": answer(OK_HEAD + "Content-Length: ²\r\n".encode("latin-1")),
    "gzip coding": answer(OK_HEAD + b"Transfer-Encoding: gzip\r\n", b"ok"),
    "chunked after gzip": answer(
        OK_HEAD + b"Transfer-Encoding: gzip, chunked\r\n", b"2\r\nok\r\n0\r\n\r\n"
    ),
    "chunked twice": answer(
        OK_HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"2\r\nok\r\n0\r\n\r\n",
    ),
    "identity coding": answer(OK_HEAD + b"Transfer-Encoding: identity\r\n", b"ok"),
    "chunk size not hex": answer(
        OK_HEAD + b"Transfer-Encoding: chunked\r\n", b"zz\r\nok\r\n0\r\n\r\n"
    ),
    "negative chunk size": answer(OK_HEAD + b"Transfer-Encoding: chunked\r\n", b"-2\r\nok\r\n"),
    "chunk size after whitespace": answer(
        OK_HEAD + b"Transfer-Encoding: chunked\r\n", b" 2\r\nok\r\n0\r\n\r\n"
    ),
    "whitespace before a chunk extension": answer(
        OK_HEAD + b"Transfer-Encoding: chunked\r\n", b"2 ;a=b\r\nok\r\n0\r\n\r\n"
    ),
    "chunk without its line end": answer(
        OK_HEAD + b"Transfer-Encoding: chunked\r\n", b"2\r\nokXX0\r\n\r\n"
    ),
    "chunk longer than its size": answer(
        OK_HEAD + b"Transfer-Encoding: chunked\r\n", b"2\r\nokay\r\n0\r\n\r\n"
    ),
    "control character in a chunk extension": answer(
        OK_HEAD + b"Transfer-Encoding: chunked\r\n", b"2;a\x00b\r\nok\r\n0\r\n\r\n"
    ),
    "malformed trailer": chunked(b"ok", trailers=b"no colon here\r\n"),
    "obsolete line folding": with_length(b"", OK_HEAD + b"X-Folded: one\r\n two\r\n"),
    "folding right after the status line": with_length(b"", b"HTTP/1.1 200 OK\r\n X: y\r\n"),
    "header line without a colon": with_length(b"", OK_HEAD + b"X-No-Colon\r\n"),
    "space before the colon": with_length(b"", OK_HEAD + b"Content-Type : text/html\r\n"),
    "empty field name": with_length(b"", OK_HEAD + b": value\r\n"),
    "NUL in a value": with_length(b"", OK_HEAD + b"X-Bad: a\x00b\r\n"),
    "CR in a value": with_length(b"", OK_HEAD + b"X-Bad: a\rb\r\n"),
    "LF alone ending a line": with_length(b"", OK_HEAD + b"X-Bad: a\nX-More: b\r\n"),
    "control character in a value": with_length(b"", OK_HEAD + b"X-Bad: a\x1bb\r\n"),
    "NUL in the status line": with_length(b"", b"HTTP/1.1 200 O\x00K\r\n"),
    "HTML page with no status line": b"<html><body><h1>Server Error</h1></body></html>\r\n",
    "HTML page with LF line ends": b"<!DOCTYPE html>\n<html>\n",
    "lower-case protocol": with_length(b"", b"http/1.1 200 OK\r\n"),
    "HTTP/2": with_length(b"", b"HTTP/2 200 OK\r\n"),
    "two-digit status": with_length(b"", b"HTTP/1.1 20 OK\r\n"),
    "four-digit status": with_length(b"", b"HTTP/1.1 2000 OK\r\n"),
    "status out of range": with_length(b"", b"HTTP/1.1 099 Odd\r\n"),
    "status glued to its reason": with_length(b"", b"HTTP/1.1 200OK\r\n"),
    "no status at all": with_length(b"", b"HTTP/1.1\r\n"),
    "switching protocols unasked": answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"),
    "endless interim answers": b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_INTERIM_ANSWERS + 1),
}


@pytest.mark.parametrize("data", INVALID_ANSWERS.values(), ids=INVALID_ANSWERS.keys())
def test_an_invalid_answer_is_refused_as_invalid(data: bytes) -> None:
    refusal(data, closes=True)


@pytest.mark.parametrize("data", INVALID_ANSWERS.values(), ids=INVALID_ANSWERS.keys())
def test_an_invalid_answer_is_refused_however_it_arrives(data: bytes) -> None:
    refusal(data, range(len(data)), closes=True)


def test_a_refusal_quotes_neither_field_values_nor_the_body() -> None:
    secret = b"Set-Cookie: session=SECRET\r\nX-Bad: SECRET\x00\r\n"
    error = refusal(with_length(b"<html>SECRET</html>", OK_HEAD + secret))
    assert "SECRET" not in str(error)
    error = refusal(b"<html>SECRET</html>\r\n")
    assert "SECRET" not in str(error)


def test_a_page_that_is_not_http_is_refused_without_waiting_for_more() -> None:
    # The peer keeps the connection open: waiting for a line end would take the deadline.
    refusal(b"<html>")


def test_a_content_length_above_the_cap_is_refused_before_the_body_is_read() -> None:
    refusal(answer(OK_HEAD + b"Content-Length: %d\r\n" % (CAP + 1)))
    refusal(answer(OK_HEAD + b"Content-Length: 1" + b"0" * 5000 + b"\r\n"))


def test_a_chunk_size_too_large_to_hold_is_refused_at_once() -> None:
    refusal(answer(OK_HEAD + b"Transfer-Encoding: chunked\r\n", b"f" * 1000 + b"\r\n"))


def test_a_chunk_above_the_cap_is_refused_once_the_body_passes_the_cap() -> None:
    # llhttp does not tell a chunk's size; its data is refused at the cap's first excess byte.
    chunk = b"%x\r\n" % (CAP + 1) + b"x" * (CAP + 1)
    refusal(answer(OK_HEAD + b"Transfer-Encoding: chunked\r\n", chunk))


def test_chunks_adding_up_to_more_than_the_cap_are_refused_at_the_first_excess_byte() -> None:
    half = CAP // 2
    first = b"%x\r\n%s\r\n" % (half, b"x" * half)
    second = b"%x\r\n%s" % (half + 1, b"x" * (half + 1))
    refusal(answer(OK_HEAD + b"Transfer-Encoding: chunked\r\n", first + second))


def test_a_body_sent_a_byte_per_chunk_is_read_whole() -> None:
    body = bytes(range(256)) * (CAP // 256)
    assert read(chunked(*(body[i : i + 1] for i in range(len(body))))).body == body


def test_bare_lf_line_ends_are_refused_at_once_on_a_connection_left_open() -> None:
    # Waiting for a CRLF that never comes would cost the whole deadline.
    refusal(b"HTTP/1.1 200 OK\nContent-Type: text/xml\nContent-Length: 2\n\nok")


def test_a_body_running_past_the_cap_until_the_close_is_refused() -> None:
    refusal(answer(OK_HEAD, b"x" * (CAP + 1)), closes=True)


def endless(first: bytes, line: bytes) -> tuple[Receive, Callable[[], int]]:
    """A peer sending first and then line after line forever; and how much it sent."""
    sent = 0

    def lines() -> Iterator[bytes]:
        yield first
        while True:
            yield line * 16

    source = lines()

    def receive() -> bytes:
        nonlocal sent
        piece = next(source)
        sent += len(piece)
        return piece

    return receive, lambda: sent


@pytest.mark.parametrize(
    ("first", "line"),
    [
        (b"HTTP/1.1 200 OK\r\n", b"X-Filler: " + b"x" * 90 + b"\r\n"),
        (b"HTTP/1.1 200 OK", b"x" * 100),
        (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2;", b"x" * 100),
        (
            OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\n",
            b"X-Trailer: " + b"x" * 89 + b"\r\n",
        ),
    ],
    ids=["header block", "status line", "chunk size line", "trailers"],
)
def test_an_endless_head_line_or_trailer_is_refused_at_its_cap(first: bytes, line: bytes) -> None:
    receive, sent = endless(first, line)
    with pytest.raises(ExchangeBadAnswer):
        read_http_answer(receive, CAP)
    assert sent() <= MAX_HEAD_BYTES + 2 * len(line) * 16 + len(first)


@pytest.mark.parametrize(
    "pending",
    [
        b"2;" + b"x" * MAX_CHUNK_LINE_BYTES,  # a chunk size line
        b"X-Trailer: " + b"x" * MAX_HEAD_BYTES,  # a trailer line
    ],
    ids=["chunk size line", "trailers"],
)
@pytest.mark.parametrize("before", [b"", b"4\r\nbody\r\n"], ids=["first chunk", "after a chunk"])
def test_a_line_over_its_cap_is_refused_at_once_when_it_came_with_the_head(
    pending: bytes, before: bytes
) -> None:
    # Sent in one write with the head, then nothing: the line is over its cap already,
    # and waiting for its end would turn a bad answer into a timeout at the deadline.
    head = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + before
    if pending.startswith(b"X-Trailer"):
        head += b"0\r\n"
    with pytest.raises(ExchangeBadAnswer, match="exceeded"):
        read_http_answer(receiving(head + pending), CAP + MAX_HEAD_BYTES)


def test_a_chunk_size_line_at_its_cap_coming_with_the_head_is_waited_for() -> None:
    line = b"4;" + b"x" * (MAX_CHUNK_LINE_BYTES - 2)
    data = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + line
    with pytest.raises(ReadPastTheAnswer):
        read_http_answer(receiving(data), CAP)
    rest = b"\r\nbody\r\n0\r\n\r\n"
    assert read_http_answer(receiving(data + rest, cuts=[len(data)]), CAP).body == b"body"


def test_a_header_block_of_the_most_fields_allowed_is_accepted_and_one_more_refused() -> None:
    def head_with(count: int) -> bytes:
        # Content-Length, added by with_length, is the last of the count fields.
        fields = b"".join(b"X-Field-%d: %d\r\n" % (number, number) for number in range(count - 1))
        return b"HTTP/1.1 200 OK\r\n" + fields

    assert read(with_length(b"", head_with(MAX_FIELDS))).reusable
    refusal(with_length(b"", head_with(MAX_FIELDS + 1)))


def test_a_trailer_block_of_more_fields_than_allowed_is_refused() -> None:
    trailers = b"".join(b"X-Trailer: %d\r\n" % number for number in range(MAX_FIELDS + 1))
    refusal(chunked(b"ok", trailers=trailers))


def test_a_head_at_its_cap_is_accepted_and_one_byte_more_refused() -> None:
    # The cap counts every byte of the head, line ends and the empty line included.
    status_line = b"HTTP/1.1 200 OK"
    filler = b"X-Filler: " + b"x" * (MAX_HEAD_BYTES - len(status_line) - 10 - 6)
    assert read(answer(status_line + b"\r\n" + filler + b"\r\n"), closes=True).status == 200
    refusal(answer(status_line + b"\r\n" + filler + b"x\r\n"))


# Answers cut short


def cut_short(data: bytes) -> ExchangeUnreachable:
    with pytest.raises(ExchangeUnreachable) as raised:
        read(data, closes=True)
    assert raised.value.outcome == "connection_error"
    return raised.value


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"HTT",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        with_length(b"<s:Envelope/>")[:-1],
        chunked(b"<s:Envelope/>")[:-1],
        chunked(b"<s:Envelope/>")[:-12],
        chunked(b"<s:Envelope/>", trailers=b"X-Checksum: 1\r\n")[:-3],
    ],
    ids=[
        "nothing",
        "in the protocol name",
        "in the status line",
        "in the headers",
        "after an interim answer",
        "in a Content-Length body",
        "in the last line end",
        "in a chunk",
        "in the trailers",
    ],
)
def test_a_connection_closed_before_the_answer_is_complete_is_a_connection_error(
    data: bytes,
) -> None:
    cut_short(data)


# Requests


REQUEST_HEADERS = {
    "Content-Type": SOAP_XML,
    "SOAPAction": '"http://schemas.microsoft.com/exchange/services/2006/messages/GetPhoneCallInformation"',
    "X-Request-ID": "req-7",
}


def test_a_request_is_one_bytes_object_with_exactly_these_bytes() -> None:
    request = format_request(
        "/EWS/Exchange.asmx?x=1",
        host_field("mail.example.com", 8443, 443),
        REQUEST_HEADERS,
        b"<e/>",
    )
    assert request == (
        b"POST /EWS/Exchange.asmx?x=1 HTTP/1.1\r\n"
        b"Host: mail.example.com:8443\r\n"
        b"Content-Type: text/xml; charset=utf-8\r\n"
        b'SOAPAction: "http://schemas.microsoft.com/exchange/services/2006/messages/'
        b'GetPhoneCallInformation"\r\n'
        b"X-Request-ID: req-7\r\n"
        b"Content-Length: 4\r\n"
        b"\r\n"
        b"<e/>"
    )


@pytest.mark.parametrize(
    ("host", "port", "default_port", "field"),
    [
        ("mail.example.com", 443, 443, "mail.example.com"),
        ("mail.example.com", 8080, 80, "mail.example.com:8080"),
        ("10.0.0.7", 80, 80, "10.0.0.7"),
        ("::1", 8080, 80, "[::1]:8080"),
        ("2001:db8::7", 443, 443, "[2001:db8::7]"),
        ("exchänge.example.com", 443, 443, "xn--exchnge-8wa.example.com"),
        # IDNA 2008: "ß" is a letter of its own, not "ss" as IDNA 2003 had it.
        ("straße.example", 443, 443, "xn--strae-oqa.example"),
        ("EXCHÄNGE.example.com", 443, 443, "xn--exchnge-8wa.example.com"),
    ],
)
def test_the_host_field_names_the_port_only_when_not_the_default_in_ascii_ipv6_bracketed(
    host: str, port: int, default_port: int, field: str
) -> None:
    assert host_field(host, port, default_port) == field


@given(
    st.dictionaries(
        st.text(TOKEN, min_size=1, max_size=20).filter(
            lambda name: name.lower() not in {"host", "content-length", "transfer-encoding"}
        ),
        st.text(VALUE_CHARS + " \t", max_size=40).map(lambda value: value.strip(" \t")),
        max_size=10,
    ),
    st.binary(max_size=200),
)
def test_any_valid_headers_and_body_are_sent_as_given(headers: dict[str, str], body: bytes) -> None:
    request = format_request("/EWS/Exchange.asmx", "mail.example.com", headers, body)
    request_line, _, rest = request.partition(b"\r\n")
    stream = io.BytesIO(rest)
    received = http.client.parse_headers(stream)
    assert request_line == b"POST /EWS/Exchange.asmx HTTP/1.1"
    assert {name.lower(): value for name, value in received.items()} == {
        "host": "mail.example.com",
        **{name.lower(): value for name, value in headers.items()},
        "content-length": str(len(body)),
    }
    assert stream.read() == body


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Request-ID", "req-7\r\nX-Injected: yes"),
        ("X-Request-ID", "req-7\nX-Injected: yes"),
        ("X-Request-ID", "req-7\rX-Injected: yes"),
        ("X-Request-ID", "req\x007"),
        ("X-Request-ID", "req\x1b7"),
        ("X-Request-ID", "req-€"),
        ("X-Injected: yes\r\nX-Request-ID", "req-7"),
        ("X-Request-ID\n", "req-7"),
        ("X-Request\x00ID", "req-7"),
        ("X Request ID", "req-7"),
        ("X-Request-ID:", "req-7"),
        ("", "req-7"),
        ("Content-Length", "0"),
        ("content-length", "0"),
        ("Transfer-Encoding", "chunked"),
        ("Host", "elsewhere.example.com"),
    ],
)
def test_a_header_that_could_split_or_reframe_the_request_is_a_value_error(
    name: str, value: str
) -> None:
    with pytest.raises(ValueError, match="header"):
        format_request("/EWS/Exchange.asmx", "mail.example.com", {name: value}, b"<e/>")


@pytest.mark.parametrize("target", ["/EWS/Exchange.asmx\r\nX: y", "/a b", "EWS", "/é", ""])
def test_a_target_that_is_not_a_printable_absolute_path_is_a_value_error(target: str) -> None:
    with pytest.raises(ValueError, match="target"):
        format_request(target, "mail.example.com", {}, b"")


@pytest.mark.parametrize("host", ["", "mail.example.com\r\nX: y", "mail example", "mail\x00.com"])
def test_a_host_that_cannot_be_sent_is_a_value_error(host: str) -> None:
    with pytest.raises(ValueError, match="host"):
        host_field(host, 443, 443)
