"""The front door's pieces: facts read from a refused head, the answer it gets, the mapping."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from unittest import mock

import hypothesis
import pytest
from gunicorn.config import Config as GunicornConfig
from gunicorn.http import errors as parse_errors
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway import errors
from gateway.config import Config
from gateway.serving import frontdoor, server
from gateway.serving.frontdoor import CallerFacts
from gateway.telemetry.metrics import Metrics

APP_ORIGIN = "https://app.example.com"


def test_the_method_request_id_and_origin_are_read_from_a_raw_head() -> None:
    head = (
        b"GET /calls/abc HTTP/1.1\r\nHost: x\r\norigin:  https://app.example.com \r\n"
        b"X-REQUEST-ID: trace-1\r\n\r\n"
    )

    facts = CallerFacts.from_head(head)

    assert facts == CallerFacts("GET", "trace-1", "https://app.example.com")


def test_headers_are_not_read_from_the_body_after_the_head() -> None:
    head = b"POST /calls HTTP/1.1\r\nHost: x\r\n\r\nOrigin: https://app.example.com\r\n"

    assert CallerFacts.from_head(head).origin is None


def test_a_head_cut_short_still_gives_what_it_holds() -> None:
    facts = CallerFacts.from_head(b"DELETE /calls/abc HTTP/1.1\r\nX-Request-ID: trace-2\r\nX-Pad")

    assert (facts.method, facts.request_id, facts.origin) == ("DELETE", "trace-2", None)


def test_an_unknown_method_is_labelled_other() -> None:
    assert CallerFacts.from_head(b"BREW /pot HTTP/1.1\r\n").method_label == "other"
    assert CallerFacts.from_head(b"\x16\x03\x01garbage").method_label == "other"


def parse_answer(raw: bytes) -> tuple[str, dict[str, str], dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    assert int(headers["Content-Length"]) == len(body)
    return status_line, headers, json.loads(body)


def test_a_refusal_is_a_problem_with_the_request_id_and_cors_for_a_listed_origin() -> None:
    raw = frontdoor.answer(
        errors.HeadersTooLarge("too large"), "trace-3", "https://APP.example.com", (APP_ORIGIN,)
    )

    status_line, headers, problem = parse_answer(raw)
    assert status_line == "HTTP/1.1 431 Request Header Fields Too Large"
    assert headers["Content-Type"] == "application/problem+json"
    assert headers["X-Request-ID"] == "trace-3"
    assert headers["Connection"] == "close"
    assert headers["Access-Control-Allow-Origin"] == "https://APP.example.com"
    assert headers["Access-Control-Expose-Headers"] == (
        "Location, Retry-After, X-Request-ID, RateLimit, RateLimit-Policy"
    )
    assert headers["Vary"] == "Origin"
    assert problem == {
        "type": "urn:ews-gateway:problem:request-header-fields-too-large",
        "title": errors.HeadersTooLarge.title,
        "status": 431,
        "detail": "too large",
        "requestId": "trace-3",
    }


@pytest.mark.parametrize("origin", [None, "https://evil.example.com", APP_ORIGIN + ".evil.com"])
def test_a_refusal_carries_no_cors_headers_for_any_other_origin(origin: str | None) -> None:
    raw = frontdoor.answer(errors.MalformedRequest("bad"), "trace-4", origin, (APP_ORIGIN,))

    _, headers, _ = parse_answer(raw)
    assert not [name for name in headers if name.startswith("Access-Control-")]


@pytest.mark.parametrize(
    ("raised", "error_class"),
    [
        (parse_errors.LimitRequestLine(9000, 8190), errors.UriTooLong),
        (parse_errors.LimitRequestHeaders("limit request headers fields"), errors.HeadersTooLarge),
        (parse_errors.InvalidRequestLine("GET / HTTP/1.1 x"), errors.MalformedRequest),
        (parse_errors.InvalidHeaderName("X Y"), errors.MalformedRequest),
        (parse_errors.InvalidChunkSize(b"zz"), errors.MalformedRequest),
        (parse_errors.UnsupportedTransferCoding("zstd"), errors.TransferCodingNotImplemented),
        (parse_errors.ExpectationFailed("teapot"), errors.ExpectationFailed),
    ],
)
def test_each_parse_error_is_the_gateway_error_for_it_without_echoing_the_callers_bytes(
    raised: Exception, error_class: type[errors.GatewayError]
) -> None:
    error = frontdoor.as_gateway_error(raised)

    assert type(error) is error_class
    assert error is not None
    assert str(raised) not in error.detail


def test_a_failure_of_the_gateway_itself_is_not_taken_for_the_callers() -> None:
    assert frontdoor.as_gateway_error(RuntimeError("boom")) is None
    assert frontdoor.as_gateway_error(parse_errors.ConfigurationProblem("x")) is None


def pipelined(sock: socket.socket, data: bytes) -> SimpleNamespace:
    """A connection on SOCK whose parser already read DATA along with the last request."""
    unreader = frontdoor.DeadlineUnreader(sock, 10.0)
    unreader.buf.write(data)
    return SimpleNamespace(sock=sock, parser=SimpleNamespace(unreader=unreader), arrival=None)


def test_a_pipelined_request_already_read_is_served_without_waiting_for_the_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Were the socket polled, this would wait five seconds and then say no."""
    monkeypatch.setattr(server, "NEXT_REQUEST_WAIT_S", 5.0)
    quiet, peer = socket.socketpair()
    with quiet, peer:
        conn = pipelined(quiet, b"GET /livez HTTP/1.1\r\n\r\n")
        worker = SimpleNamespace(alive=True, _waiting_for_thread=0)

        assert server.GatewayThreadWorker._next_request_is_here(worker, conn) is True


def test_a_pipelined_request_read_only_in_part_is_left_to_arrive_in_the_poller() -> None:
    """The thread that answered does not wait for the rest of a request that trickles."""
    quiet, peer = socket.socketpair()
    with quiet, peer:
        conn = pipelined(quiet, b"POST /calls HTTP/1.1\r\nContent-Length: 40\r\n\r\n{")
        worker = SimpleNamespace(alive=True, _waiting_for_thread=0)

        assert server.GatewayThreadWorker._next_request_is_here(worker, conn) is False
        assert server._partly_arrived(conn)


# Requests arriving: when the worker's main thread hands one to a thread

ARRIVAL_BODY = b'{"itemId": "AAMkADemo", "dialString": "100"}'
WHOLE_WHEN_ALL_HERE = [
    b"DELETE /calls/abc HTTP/1.1\r\nHost: x\r\nX-Request-ID: r-1\r\n\r\n",
    b"GET /livez HTTP/1.0\r\n\r\n",
    b"POST /calls HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
    % (len(ARRIVAL_BODY), ARRIVAL_BODY),
    b"POST /calls HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\n"
    + ARRIVAL_BODY[:5]
    + b"\r\n%x;ext=1\r\n%s\r\n0\r\nTrailer: t\r\n\r\n" % (len(ARRIVAL_BODY) - 5, ARRIVAL_BODY[5:]),
]
# Requests whose head is enough: the client waits for 100 Continue, or the body is refused.
WHOLE_ONCE_THE_HEAD_IS_HERE = [
    (b"POST /calls HTTP/1.1\r\nHost: x\r\nExpect: something\r\nContent-Length: 40\r\n\r\n", b"{"),
    (b"POST /calls HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", b"5\r\n"),
    (b"POST /calls HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\n"),
    (
        b"POST /calls HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 40\r\n\r\n",
        b"{",
    ),
    (b"POST /calls HTTP/1.1\r\nHost: x\r\nContent-Length: 16385\r\n\r\n", b"{" * 100),
    (b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", b""),
]


def arrival() -> frontdoor.RequestArrival:
    return frontdoor.RequestArrival(max_body=16 * 1024, max_bytes=96 * 1024)


@pytest.mark.parametrize("request_bytes", WHOLE_WHEN_ALL_HERE)
def test_a_request_is_handed_to_a_thread_once_its_last_byte_is_here(request_bytes: bytes) -> None:
    for split in range(1, len(request_bytes)):
        arriving = arrival()
        assert not arriving.feed(request_bytes[:split]), request_bytes[:split]
        assert arriving.feed(request_bytes[split:]), split


# Requests gunicorn's parser answers before it reads on: llhttp cannot read them, or a line
# or the fields are over the limits.
ANSWERED_AT_ONCE = [
    b"G@T /livez HTTP/1.1\r\nX-Request-ID: r-1\r\n",
    b"hello\r\n",
    b"GET /livez HTTP/1.1\nHost: x\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 5555 80\r\n",
    b"GET /livez HTTP/1.1\r\nHost x\r\nOther: y\r\n",
    b"GET /" + b"a" * frontdoor.LIMIT_REQUEST_LINE,
    b"GET /livez HTTP/1.1\r\nX-Padding: " + b"a" * frontdoor.LIMIT_REQUEST_FIELD_SIZE,
    b"GET /livez HTTP/1.1\r\n" + b"X-Field: a\r\n" * (frontdoor.LIMIT_REQUEST_FIELDS + 2),
]


@pytest.mark.parametrize("first_bytes", ANSWERED_AT_ONCE)
def test_a_request_gunicorn_answers_early_is_handed_over_as_soon_as_it_can(
    first_bytes: bytes,
) -> None:
    assert arrival().feed(first_bytes)
    byte_by_byte = arrival()
    assert any(byte_by_byte.feed(first_bytes[at : at + 1]) for at in range(len(first_bytes)))


@pytest.mark.parametrize(("head", "body"), WHOLE_ONCE_THE_HEAD_IS_HERE)
def test_a_request_whose_head_is_enough_is_handed_over_with_its_head(
    head: bytes, body: bytes
) -> None:
    for split in range(1, len(head)):
        arriving = arrival()
        assert not arriving.feed(head[:split])
        assert arriving.feed(head[split:] + body[:1])


def test_a_chunked_body_over_the_limit_is_handed_over_once_it_is() -> None:
    arriving = arrival()
    assert not arriving.feed(
        b"POST /calls HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert not arriving.feed(b"4000\r\n" + b"a" * 0x4000 + b"\r\n")
    assert arriving.feed(b"1\r\na")


def test_a_request_is_handed_over_once_more_than_the_most_read_ahead_has_come() -> None:
    arriving = frontdoor.RequestArrival(max_body=16 * 1024, max_bytes=1024)
    assert not arriving.feed(b"GET /livez HTTP/1.1\r\nX-Padding: " + b"a" * 990)
    assert arriving.feed(b"a" * 10)


def test_pipelined_requests_behind_a_whole_one_are_not_read() -> None:
    """Each request's arrival reads only its own bytes: pipelined ones cost nothing twice."""
    fields: list[bytes] = []

    class Counting(frontdoor.RequestArrival):
        def on_header(self, name: bytes, value: bytes) -> None:
            fields.append(name)
            super().on_header(name, value)

    arriving = Counting(max_body=16 * 1024, max_bytes=96 * 1024)
    assert arriving.feed(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n" * 100 + b"GET /readyz HT")
    assert fields == [b"Host"]


def test_a_request_read_ahead_is_read_whole_by_the_parser_and_timed_from_its_first_byte() -> None:
    """The time it spent arriving counts toward its read deadline."""
    sock, peer = socket.socketpair()
    with sock, peer:
        parser = frontdoor.GatewayRequestParser(
            limited_config(), sock, ("127.0.0.1", 1), read_timeout_s=10.0
        )
        parser.unreader.spent_arriving = 4.0
        peer.sendall(WHOLE_WHEN_ALL_HERE[2])
        while parser.unreader.read_arrived(64 * 1024) is None:
            pass

        before = time.monotonic()
        request = next(parser)

        assert (request.method, request.path) == ("POST", "/calls")
        assert request.body.read() == ARRIVAL_BODY
        assert before - 4.0 <= request.unreader.started <= time.monotonic() - 4.0
        assert request.unreader.deadline == request.unreader.started + 10.0


@contextlib.contextmanager
def draining(body_sent: bytes) -> Iterator[frontdoor.GatewayRequestParser]:
    """A parser that read a POST of a 10-byte body, of which BODY_SENT came, left unread."""
    sock, peer = socket.socketpair()
    with sock, peer:
        parser = frontdoor.GatewayRequestParser(
            limited_config(), sock, ("127.0.0.1", 1), read_timeout_s=10.0
        )
        peer.sendall(b"POST /calls HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n" + body_sent)
        next(parser)
        parser.unreader.start_drain()
        yield parser


def test_a_body_left_unread_is_drained_only_as_far_as_it_has_arrived() -> None:
    """No thread waits for the rest of it: the connection closes instead."""
    with draining(b"12345") as parser, pytest.raises(errors.RequestTimeout):
        parser.finish_body(deadline=time.monotonic() + 10)


def test_a_body_left_unread_that_has_all_arrived_is_drained() -> None:
    with draining(b"1234567890") as parser:
        assert parser.finish_body(deadline=time.monotonic() + 10) is True


# The parser on a socket pair: what gunicorn would hand the worker


@pytest.fixture
def gunicorn_config() -> Any:
    return limited_config()


def limited_config() -> Any:
    """gunicorn's settings with the gateway's limits on what a request head may hold."""
    cfg = GunicornConfig()
    for name, value in server.gunicorn_options(
        Config(ews_url="http://exchange.invalid/EWS/Exchange.asmx", gateway_auth="none")
    ).items():
        if name.startswith("limit_request"):
            cfg.set(name, value)
    return cfg


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    with server, client:
        yield server, client


def parser(cfg: Any, sock: socket.socket, timeout_s: float = 5.0) -> Any:
    return frontdoor.GatewayRequestParser(cfg, sock, ("127.0.0.1", 1), read_timeout_s=timeout_s)


def test_a_well_formed_request_parses_as_gunicorn_would(gunicorn_config: Any, pair: Any) -> None:
    server, client = pair
    client.sendall(b"GET /calls/abc?x=1 HTTP/1.1\r\nHost: g\r\nX-Request-ID: r-1\r\n\r\n")

    request = next(parser(gunicorn_config, server))

    assert (request.method, request.path, request.query) == ("GET", "/calls/abc", "x=1")
    assert ("X-REQUEST-ID", "r-1") in request.headers


def test_a_refused_head_carries_its_facts_to_the_answer(
    gunicorn_config: Any, pair: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server, client = pair
    client.sendall(
        b"POST /calls HTTP/1.1\r\nOrigin: " + APP_ORIGIN.encode() + b"\r\n"
        b"X-Request-ID: r-2\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"
    )
    with pytest.raises(parse_errors.LimitRequestHeaders) as refused:
        next(parser(gunicorn_config, server))
    registry = CollectorRegistry()
    metrics = Metrics("test", registry)
    caplog.set_level(logging.INFO, logger="gateway.access")

    frontdoor.refuse(server, refused.value, None, cors_origins=(APP_ORIGIN,), metrics=metrics)

    status_line, headers, problem = parse_answer(client.recv(65536))
    assert status_line == "HTTP/1.1 431 Request Header Fields Too Large"
    assert headers["X-Request-ID"] == "r-2"
    assert headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert problem["requestId"] == "r-2"
    labels = {"method": "POST", "route": "<unmatched>", "status": "431"}
    assert registry.get_sample_value("ews_gateway_http_requests_total", labels) == 1.0
    [record] = [r for r in caplog.records if r.name == "gateway.access"]
    assert (record.__dict__["requestId"], record.__dict__["status"]) == ("r-2", 431)


def test_a_head_that_does_not_arrive_in_time_is_a_408(gunicorn_config: Any, pair: Any) -> None:
    server, client = pair
    client.sendall(b"GET /livez HTTP/1.1\r\nX-Request-ID: r-3\r\n")

    with pytest.raises(errors.RequestTimeout) as slow:
        next(parser(gunicorn_config, server, timeout_s=0.2))

    assert CallerFacts.of_failure(slow.value, None).request_id == "r-3"


def test_a_malformed_chunked_body_is_the_callers_400(gunicorn_config: Any, pair: Any) -> None:
    server, client = pair
    client.sendall(
        b"POST /calls HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n{}\r\n0\r\n\r\n"
    )
    request = next(parser(gunicorn_config, server))

    with pytest.raises(errors.MalformedRequest, match="chunked body is malformed"):
        request.body.read()
    assert request.body.failed is True


def test_a_failure_of_the_gateway_itself_is_a_500_logged_with_its_traceback(
    pair: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server, client = pair
    caplog.set_level(logging.INFO)

    frontdoor.refuse(
        server,
        RuntimeError("boom"),
        None,
        cors_origins=(),
        metrics=Metrics("t", CollectorRegistry()),
    )

    status_line, _, problem = parse_answer(client.recv(65536))
    assert status_line == "HTTP/1.1 500 Internal Server Error"
    assert problem["detail"] == "an unexpected error occurred"
    assert any(r.exc_info and r.levelno == logging.ERROR for r in caplog.records)


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate, chunked", "compress, chunked"])
def test_a_body_in_a_transfer_coding_the_gateway_does_not_decode_is_501(
    gunicorn_config: Any, pair: Any, coding: str
) -> None:
    server, client = pair
    client.sendall(
        b"POST /calls HTTP/1.1\r\nHost: g\r\nX-Request-ID: r-5\r\n"
        b"Transfer-Encoding: " + coding.encode() + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    )

    with pytest.raises(errors.TransferCodingNotImplemented) as refused:
        next(parser(gunicorn_config, server))

    assert refused.value.status == 501
    assert "Transfer-Encoding: chunked" in refused.value.detail
    assert CallerFacts.of_failure(refused.value, None).request_id == "r-5"


def test_a_chunked_body_is_read_as_sent(gunicorn_config: Any, pair: Any) -> None:
    server, client = pair
    client.sendall(
        b"POST /calls HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    )

    assert next(parser(gunicorn_config, server)).body.read() == b"{}"


# A plain head is read by llhttp, any other by gunicorn's parser: both must read alike.

_PLAIN_METHODS = ["GET", "DELETE", "POST", "OPTIONS", "HEAD", "PUT", "PATCH"]
_ODD_METHODS = ["get", "BREW", "CONNECT", "TRACE", "M", ""]
_PLAIN_TARGETS = ["/calls/abc", "/calls/a%2Fb?x=1&y=%20#frag", "//two//slashes", "/?", "/livez"]
_ODD_TARGETS = ["*", "http://host/x", "host:443", "/a b", "/caf\xe9", "", "/" + "a" * 8200]
_PLAIN_VERSIONS = ["HTTP/1.1", "HTTP/1.0"]
_ODD_VERSIONS = ["HTTP/2.0", "HTTP/1.10", "http/1.1", "HTTP/0.9", "HTTP/1"]
_PLAIN_NAMES = [
    "Host",
    "host",
    "Content-Length",
    "Expect",
    "X-Forwarded-Proto",
    "X-Forwarded-Ssl",
    "X_Forwarded_For",
    "Content-Type",
    "Origin",
    "X-Request-ID",
    "Connection",
    "Authorization",
]
_ODD_NAMES = ["Transfer-Encoding", "Upgrade", "Bad Name", "Name ", "", "X-\x7f", "X-\xe9"]
_PLAIN_VALUES = [
    "g",
    "5",
    "0",
    "100-continue",
    "something-else",
    "https",
    "http",
    "on",
    "close",
    "keep-alive",
    "  padded\t ",
    "\x80\xff",
]
_ODD_VALUES = ["chunked", "gzip, chunked", "a\x00b", "a\x7fb", "5, 5", "-1", "+5", "t" * 17000]
_BODIES = [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"GET /livez HTTP/1.1\r\nHost: g\r\n\r\n"]

_latin1 = st.text(st.characters(max_codepoint=255), max_size=12)


def _mostly(plain: list[str], odd: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """One of PLAIN 19 times in 20, else something from ODD."""
    return st.integers(0, 19).flatmap(lambda roll: odd if roll == 0 else st.sampled_from(plain))


def _odd(values: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(values), _latin1)


_field = st.tuples(
    _mostly(_PLAIN_NAMES, _odd(_ODD_NAMES)),
    _mostly([": ", ":"], st.sampled_from([" : ", ":\t", ""])),
    _mostly(_PLAIN_VALUES, _odd(_ODD_VALUES)),
    _mostly(["\r\n"], st.sampled_from(["\n", "\r\n continued\r\n", "\r\n\tmore\r\n", "\r"])),
)


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """A request head with a body or a next request after it, mostly plain, odd here and there."""
    line = "{}{}{}{}{}".format(
        draw(_mostly(_PLAIN_METHODS, _odd(_ODD_METHODS))),
        draw(_mostly([" "], st.sampled_from(["  ", "\t"]))),
        draw(_mostly(_PLAIN_TARGETS, st.one_of(st.sampled_from(_ODD_TARGETS), _latin1))),
        draw(_mostly([" "], st.just("  "))),
        draw(_mostly(_PLAIN_VERSIONS, st.sampled_from(_ODD_VERSIONS))),
    )
    fields = "".join("".join(field) for field in draw(st.lists(_field, max_size=6)))
    start = draw(_mostly([""], st.sampled_from(["\r\n", "\n"])))
    end = draw(_mostly(["\r\n"], st.sampled_from(["\n", ""])))
    head = f"{start}{line}\r\n{fields}{end}".encode("latin-1")
    return head + draw(st.sampled_from(_BODIES))


def reading(cfg: Any, raw: bytes, *, plain: bool) -> list[Any]:
    """What the parser makes of RAW, request by request: what it read, or how it refused."""
    read: list[Any] = []
    server, client = socket.socketpair()
    with server, client, contextlib.ExitStack() as stack:
        if not plain:
            stack.enter_context(
                mock.patch.object(frontdoor.GatewayRequest, "_parse_plain", return_value=None)
            )
        client.sendall(raw)
        client.shutdown(socket.SHUT_WR)
        requests = parser(cfg, server, timeout_s=1.0)
        try:
            for request in requests:
                read.append(
                    (
                        request.method,
                        request.uri,
                        (request.path, request.query, request.fragment),
                        request.version,
                        request.headers,
                        request.scheme,
                        request._expected_100_continue,
                        request.should_close(),
                        type(request.body.reader).__name__,
                        request.body.read(),
                    )
                )
        except Exception as error:
            read.append(("refused", type(error).__name__, str(error)))
    return read


@hypothesis.settings(max_examples=1000, deadline=None)
@hypothesis.given(raw=heads())
def test_a_head_is_read_alike_whether_llhttp_or_gunicorns_parser_reads_it(raw: bytes) -> None:
    cfg = limited_config()

    assert reading(cfg, raw, plain=True) == reading(cfg, raw, plain=False)


@pytest.mark.parametrize(
    "raw",
    [
        b"DELETE /calls/abc HTTP/1.1\r\nHost: g\r\n\r\n",
        b"GET /calls/abc?x=1 HTTP/1.0\r\nHost: g\r\nAccept: application/json\r\n"
        b"Authorization: Bearer " + b"t" * 6000 + b"\r\nOrigin: https://app.example.com\r\n\r\n",
        b"POST /calls HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nIdempotency-Key: k-1\r\n\r\n{}",
        b"OPTIONS /calls HTTP/1.1\r\nOrigin: https://app.example.com\r\n"
        b"Access-Control-Request-Method: POST\r\n\r\n",
    ],
)
def test_the_heads_browsers_and_clients_send_are_read_by_llhttp(
    gunicorn_config: Any, pair: Any, raw: bytes
) -> None:
    server, client = pair
    client.sendall(raw)
    with mock.patch.object(
        frontdoor.GatewayRequest, "_parse_python", side_effect=AssertionError("not plain")
    ):
        request = next(parser(gunicorn_config, server))

    assert request.method == raw.split(b" ", 1)[0].decode()
    assert ("HOST", "g") in request.headers or request.method == "OPTIONS"


@pytest.mark.parametrize(("peer", "scheme"), [("127.0.0.1", "https"), ("203.0.113.5", "http")])
def test_only_a_trusted_peer_sets_the_scheme_on_every_request_of_its_connection(
    gunicorn_config: Any, pair: Any, peer: str, scheme: str
) -> None:
    server, client = pair
    client.sendall(b"GET /livez HTTP/1.1\r\nHost: g\r\nX-Forwarded-Proto: https\r\n\r\n" * 3)
    requests = frontdoor.GatewayRequestParser(
        gunicorn_config, server, (peer, 1), read_timeout_s=1.0
    )

    assert [next(requests).scheme for _ in range(3)] == [scheme] * 3
