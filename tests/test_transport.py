"""The HTTP transport to Exchange, against real servers on loopback."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from gateway import __version__
from gateway.errors import ExchangeBadAnswer, ExchangeTimeout, ExchangeUnreachable
from gateway.exchange.auth import Credentials, SecurityContextAuth
from gateway.exchange.client import Transport
from gateway.exchange.transport import MAX_REPLY_BYTES, ExchangeReply, ExchangeTransport
from tests.certificates import Certificate, exchange_certificate, misnamed_certificate
from tests.loopback_exchange import (
    ANSWER,
    ENVELOPE,
    EWS_PATH,
    REQUEST_HEADERS,
    SOAP_XML,
    Answer,
    FakeExchange,
    RawServers,
    TlsExchange,
    Transports,
    exchange,
    http_answer,
    raw_servers,
    read_request,
    tls_exchanges,
    transports,
)

__all__ = [  # fixtures, imported to be found by pytest
    "exchange",
    "exchange_certificate",
    "misnamed_certificate",
    "raw_servers",
    "tls_exchanges",
    "transports",
]


def hold_open(connection: socket.socket) -> None:
    """Read the request and never answer (the connection is closed at teardown)."""
    read_request(connection)


def hang_up(connection: socket.socket) -> None:
    """Read the request and close the connection without a word."""
    read_request(connection)
    connection.close()


# The transport with a per-request scheme and with a per-connection one (EWS_AUTH=ntlm),
# for what both must do alike.
AnyTransports = Callable[..., Transport]


@pytest.fixture(params=["pooled", "ntlm"])
def any_transports(request: pytest.FixtureRequest) -> Iterator[AnyTransports]:
    """Build transports of one kind, closed before the servers they talk to."""
    opened: list[ExchangeTransport] = []

    def open_transport(url: str, **options: Any) -> Transport:
        options = {"timeout_s": 5.0, **options}
        if request.param == "ntlm":
            # A server that ignores the handshake's first token answers the request itself.
            credentials = Credentials("CORP\\svc", "pw")
            options["authenticator"] = SecurityContextAuth("ntlm", credentials, "127.0.0.1", "HTTP")
        opened.append(ExchangeTransport(url, **options))
        return opened[-1]

    yield open_transport
    for transport in opened:
        transport.close()


@pytest.mark.network
def test_a_normal_answer_is_returned_whole(
    exchange: FakeExchange, any_transports: AnyTransports
) -> None:
    reply = any_transports(exchange.url).post(ENVELOPE, REQUEST_HEADERS)
    assert reply == ExchangeReply(
        status=200, content_type=SOAP_XML, retry_after=None, location=None, body=ANSWER
    )


@pytest.mark.network
def test_the_envelope_and_headers_reach_exchange_as_given(
    exchange: FakeExchange, transports: Transports
) -> None:
    transports(exchange.url).post(ENVELOPE, REQUEST_HEADERS)
    [request] = exchange.received
    assert (request.method, request.path, request.body) == ("POST", EWS_PATH, ENVELOPE)
    assert {name: request.headers[name] for name in REQUEST_HEADERS} == REQUEST_HEADERS
    assert "Authorization" not in request.headers


@pytest.mark.network
def test_the_configured_authorization_header_is_sent(
    exchange: FakeExchange, transports: Transports
) -> None:
    transport = transports(exchange.url, authorization="Basic c3ZjLWdhdGV3YXk6c2VjcmV0")
    transport.post(ENVELOPE, REQUEST_HEADERS)
    [request] = exchange.received
    assert request.headers["Authorization"] == "Basic c3ZjLWdhdGV3YXk6c2VjcmV0"


@pytest.mark.network
def test_an_error_status_is_returned_with_its_retry_after(
    exchange: FakeExchange, any_transports: AnyTransports
) -> None:
    exchange.answer = Answer(503, {"Content-Type": "text/html", "Retry-After": "120"}, b"busy")
    reply = any_transports(exchange.url).post(ENVELOPE, REQUEST_HEADERS)
    assert (reply.status, reply.content_type, reply.retry_after, reply.body) == (
        503,
        "text/html",
        "120",
        b"busy",
    )


@pytest.mark.network
def test_a_redirect_is_returned_not_followed(
    exchange: FakeExchange, any_transports: AnyTransports
) -> None:
    location = f"http://127.0.0.1:{exchange.server_port}/owa/auth/errorfe.aspx?httpCode=500"
    exchange.answer = Answer(302, {"Content-Type": "text/html", "Location": location}, b"moved")
    reply = any_transports(exchange.url).post(ENVELOPE, REQUEST_HEADERS)
    assert (reply.status, reply.location) == (302, location)
    assert [request.path for request in exchange.received] == [EWS_PATH]


@pytest.mark.network
def test_two_sequential_posts_reuse_one_connection(
    exchange: FakeExchange, transports: Transports
) -> None:
    transport = transports(exchange.url)
    first = transport.post(ENVELOPE, REQUEST_HEADERS)
    second = transport.post(ENVELOPE, REQUEST_HEADERS)
    assert first.body == second.body == ANSWER
    assert len(exchange.received) == 2
    assert exchange.received[0].peer == exchange.received[1].peer


@pytest.mark.network
def test_a_connection_reused_after_a_nearly_spent_deadline_gets_the_next_calls_full_time(
    raw_servers: RawServers,
    transports: Transports,
) -> None:
    def answer_at_once_then_slowly(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(http_answer())
        read_request(connection)
        time.sleep(0.5)
        connection.sendall(http_answer())

    server = raw_servers(answer_at_once_then_slowly)
    transport = transports(server.url, timeout_s=5.0)
    transport.post(ENVELOPE, REQUEST_HEADERS, deadline=time.monotonic() + 0.2)

    reply = transport.post(ENVELOPE, REQUEST_HEADERS)

    assert reply.body == ANSWER
    assert len(server.connections) == 1


@pytest.mark.network
def test_after_an_answer_that_closes_its_connection_the_next_post_opens_a_new_one(
    exchange: FakeExchange, transports: Transports
) -> None:
    exchange.answer = Answer(headers={"Content-Type": SOAP_XML, "Connection": "close"})
    transport = transports(exchange.url)
    first = transport.post(ENVELOPE, REQUEST_HEADERS)
    second = transport.post(ENVELOPE, REQUEST_HEADERS)
    assert first.body == second.body == ANSWER
    assert exchange.received[0].peer != exchange.received[1].peer


@pytest.mark.network
def test_an_answer_of_exactly_the_size_limit_is_accepted(
    exchange: FakeExchange, any_transports: AnyTransports
) -> None:
    exchange.answer = Answer(body=b"x" * MAX_REPLY_BYTES)
    reply = any_transports(exchange.url).post(ENVELOPE, REQUEST_HEADERS)
    assert len(reply.body) == MAX_REPLY_BYTES


@pytest.mark.network
def test_an_answer_larger_than_the_limit_is_refused(
    exchange: FakeExchange, any_transports: AnyTransports
) -> None:
    exchange.answer = Answer(body=b"x" * (MAX_REPLY_BYTES + 1))
    with pytest.raises(ExchangeBadAnswer) as raised:
        any_transports(exchange.url).post(ENVELOPE, REQUEST_HEADERS)
    assert (raised.value.status, raised.value.outcome) == (502, "invalid_response")


@pytest.mark.network
def test_after_an_oversized_answer_the_next_post_still_works(
    exchange: FakeExchange, transports: Transports
) -> None:
    transport = transports(exchange.url)
    exchange.answer = Answer(body=b"x" * (MAX_REPLY_BYTES + 1))
    with pytest.raises(ExchangeBadAnswer):
        transport.post(ENVELOPE, REQUEST_HEADERS)
    exchange.answer = Answer()
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER


@pytest.mark.network
def test_a_refused_connection_is_unreachable_not_a_timeout(
    any_transports: AnyTransports,
) -> None:
    # A bound socket that does not listen: the kernel refuses connections to it.
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed_port.getsockname()[1]}{EWS_PATH}"
        with pytest.raises(ExchangeUnreachable) as raised:
            any_transports(url).post(ENVELOPE, REQUEST_HEADERS)
    assert (raised.value.status, raised.value.outcome) == (502, "connection_error")
    assert raised.value.before_sending  # so a PlayOnPhone that failed so dialled nothing


def test_a_name_that_does_not_resolve_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, transports: Transports
) -> None:
    def no_such_name(*_args: Any, **_kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    with pytest.raises(ExchangeUnreachable) as raised:
        transports(f"http://exchange.example.invalid{EWS_PATH}").post(ENVELOPE, REQUEST_HEADERS)
    assert (raised.value.status, raised.value.outcome) == (502, "connection_error")
    assert raised.value.before_sending


@pytest.mark.network
def test_a_server_that_never_answers_times_out(
    raw_servers: RawServers,
    any_transports: AnyTransports,
) -> None:
    server = raw_servers(hold_open)
    with pytest.raises(ExchangeTimeout) as raised:
        any_transports(server.url, timeout_s=0.3).post(ENVELOPE, REQUEST_HEADERS)
    assert (raised.value.status, raised.value.outcome) == (504, "timeout")
    assert not raised.value.before_sending  # Exchange may be dialling as it keeps silent


@pytest.mark.network
def test_a_connection_closed_without_an_answer_is_unreachable(
    raw_servers: RawServers,
    any_transports: AnyTransports,
) -> None:
    server = raw_servers(hang_up)
    with pytest.raises(ExchangeUnreachable) as raised:
        any_transports(server.url).post(ENVELOPE, REQUEST_HEADERS)
    assert (raised.value.status, raised.value.outcome) == (502, "connection_error")
    assert not raised.value.before_sending  # the request was read: it may have been acted on


# Keep-alive connections: stale ones, the close race, retries


@pytest.mark.network
def test_an_idle_connection_the_server_closed_is_replaced_by_a_new_one(
    raw_servers: RawServers,
    transports: Transports,
) -> None:
    closed = threading.Event()

    def answer_then_close(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(http_answer())
        connection.close()
        closed.set()

    server = raw_servers(answer_then_close)
    transport = transports(server.url)
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert closed.wait(5)
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert len(server.connections) == 2


@pytest.mark.network
def test_an_idle_connection_holding_unasked_bytes_is_not_reused(
    raw_servers: RawServers,
    transports: Transports,
) -> None:
    first_answer_read, sent_unasked = threading.Event(), threading.Event()

    def answer_then_time_out_while_idle(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(http_answer())
        if not sent_unasked.is_set() and first_answer_read.wait(5):
            # Taken for the next request's answer, this would turn it into a 408.
            connection.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
            sent_unasked.set()

    server = raw_servers(answer_then_time_out_while_idle)
    transport = transports(server.url)
    transport.post(ENVELOPE, REQUEST_HEADERS)
    first_answer_read.set()
    assert sent_unasked.wait(5)
    reply = transport.post(ENVELOPE, REQUEST_HEADERS)
    assert (reply.status, reply.body) == (200, ANSWER)
    assert len(server.connections) == 2


@pytest.mark.network
def test_a_reused_connection_reset_before_the_request_went_out_is_retried_on_a_new_one(
    raw_servers: RawServers,
    transports: Transports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    requests: list[bytes] = []
    reset = threading.Event()

    def answer_then_reset_the_first(connection: socket.socket) -> None:
        requests.append(read_request(connection))
        connection.sendall(http_answer())
        if len(requests) == 1:
            # An abortive close: the client's next write fails with a reset.
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()
            reset.set()

    server = raw_servers(answer_then_reset_the_first)
    transport = transports(server.url)
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert reset.wait(5)
    # The reset lands between the check before reuse and the write.
    monkeypatch.setattr("gateway.exchange.transport._is_dropped", lambda _connection: False)
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert (len(requests), len(server.connections)) == (2, 2)


@pytest.mark.network
def test_a_reused_connection_dropped_after_the_request_went_out_is_not_retried(
    raw_servers: RawServers,
    transports: Transports,
) -> None:
    requests: list[bytes] = []

    def answer_then_drop_the_second(connection: socket.socket) -> None:
        requests.append(read_request(connection))
        connection.sendall(http_answer())
        # Exchange may have acted on this one (and dialled) before the connection dropped.
        requests.append(read_request(connection))
        connection.close()

    server = raw_servers(answer_then_drop_the_second)
    transport = transports(server.url)
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    with pytest.raises(ExchangeUnreachable) as raised:
        transport.post(ENVELOPE, REQUEST_HEADERS)
    assert raised.value.outcome == "connection_error"
    assert (len(requests), len(server.connections)) == (2, 1)


@pytest.mark.network
def test_a_new_connection_dropped_before_any_answer_is_not_retried(
    raw_servers: RawServers,
    transports: Transports,
) -> None:
    server = raw_servers(hang_up)
    with pytest.raises(ExchangeUnreachable) as raised:
        transports(server.url).post(ENVELOPE, REQUEST_HEADERS)
    assert raised.value.outcome == "connection_error"
    assert len(server.connections) == 1


@pytest.mark.network
def test_a_reused_connection_dropped_mid_answer_is_not_retried(
    raw_servers: RawServers,
    transports: Transports,
) -> None:
    def answer_then_break_off(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(http_answer())
        read_request(connection)
        connection.sendall(http_answer()[:-10])
        connection.close()

    server = raw_servers(answer_then_break_off)
    transport = transports(server.url)
    transport.post(ENVELOPE, REQUEST_HEADERS)
    with pytest.raises(ExchangeUnreachable) as raised:
        transport.post(ENVELOPE, REQUEST_HEADERS)
    assert raised.value.outcome == "connection_error"
    assert len(server.connections) == 1


@pytest.mark.network
def test_an_answer_cut_short_of_its_content_length_is_unreachable_not_short(
    raw_servers: RawServers,
    transports: Transports,
) -> None:
    def break_off(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(http_answer()[:-10])
        connection.close()

    server = raw_servers(break_off)
    with pytest.raises(ExchangeUnreachable) as raised:
        transports(server.url).post(ENVELOPE, REQUEST_HEADERS)
    assert raised.value.outcome == "connection_error"


# The deadline


@pytest.mark.network
def test_a_body_trickling_in_slower_than_the_deadline_times_out_at_the_deadline(
    raw_servers: RawServers,
    any_transports: AnyTransports,
) -> None:
    body_bytes = 200

    def drip(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % body_bytes)
        for _ in range(body_bytes):
            # Each byte comes well within any per-read timeout; the whole never does.
            time.sleep(0.05)
            try:
                connection.sendall(b" ")
            except OSError:
                return  # the transport gave up and closed

    server = raw_servers(drip)
    transport = any_transports(server.url, timeout_s=5.0)
    started = time.monotonic()
    with pytest.raises(ExchangeTimeout) as raised:
        transport.post(ENVELOPE, REQUEST_HEADERS, deadline=started + 0.5)
    assert raised.value.outcome == "timeout"
    assert time.monotonic() - started < 2.0


# Many threads at once


@pytest.mark.network
def test_concurrent_posts_all_succeed_and_at_most_pool_size_connections_stay_open(
    exchange: FakeExchange, transports: Transports
) -> None:
    pool_size, threads, posts_each = 4, 24, 10
    transport = transports(exchange.url, pool_size=pool_size)

    def post_several(_: int) -> list[bytes]:
        return [transport.post(ENVELOPE, REQUEST_HEADERS).body for _ in range(posts_each)]

    with ThreadPoolExecutor(threads) as pool:
        bodies = [body for batch in pool.map(post_several, range(threads)) for body in batch]
    assert bodies == [ANSWER] * threads * posts_each
    # Connections beyond the idle limit are closed by the transport; the server sees them go.
    give_up = time.monotonic() + 5
    while exchange.open_connections > pool_size and time.monotonic() < give_up:
        time.sleep(0.01)
    assert 1 <= exchange.open_connections <= pool_size


# TLS


@pytest.mark.network
def test_a_certificate_no_trusted_ca_signed_is_rejected(
    exchange_certificate: Certificate,
    tls_exchanges: Callable[[Certificate], TlsExchange],
    any_transports: AnyTransports,
) -> None:
    server = tls_exchanges(exchange_certificate)
    with pytest.raises(ExchangeUnreachable) as raised:
        any_transports(server.url).post(ENVELOPE, REQUEST_HEADERS)
    # The pooled transport adds the reason (tests/test_connections.py holds it to each).
    assert raised.value.detail.startswith("The TLS connection to Exchange failed")
    assert raised.value.outcome == "connection_error"
    assert server.received == []


@pytest.mark.network
def test_a_certificate_from_the_configured_ca_bundle_is_accepted_and_reused(
    exchange_certificate: Certificate,
    tls_exchanges: Callable[[Certificate], TlsExchange],
    any_transports: AnyTransports,
) -> None:
    server = tls_exchanges(exchange_certificate)
    transport = any_transports(server.url, ca_bundle=str(exchange_certificate.cert_path))
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert server.received[0].peer == server.received[1].peer


@pytest.mark.network
def test_a_trusted_certificate_for_another_name_is_rejected(
    misnamed_certificate: Certificate,
    tls_exchanges: Callable[[Certificate], TlsExchange],
    any_transports: AnyTransports,
) -> None:
    server = tls_exchanges(misnamed_certificate)
    transport = any_transports(server.url, ca_bundle=str(misnamed_certificate.cert_path))
    with pytest.raises(ExchangeUnreachable) as raised:
        transport.post(ENVELOPE, REQUEST_HEADERS)
    assert raised.value.detail.startswith("The TLS connection to Exchange failed")
    assert raised.value.before_sending


@pytest.mark.network
def test_with_verification_off_any_certificate_is_accepted(
    misnamed_certificate: Certificate,
    tls_exchanges: Callable[[Certificate], TlsExchange],
    any_transports: AnyTransports,
) -> None:
    server = tls_exchanges(misnamed_certificate)
    transport = any_transports(server.url, verify_tls=False)
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER


# Exchange's HTTP, read strictly


@pytest.mark.network
def test_the_request_names_the_host_and_length_and_leaves_in_one_write(
    exchange: FakeExchange,
    transports: Transports,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes: list[bytes] = []
    send_all = socket.socket.sendall

    def record(sock: socket.socket, data: bytes, *args: Any) -> None:
        if sock.getpeername()[1] == exchange.server_port:  # the server's writes aside
            writes.append(bytes(data))
        send_all(sock, data, *args)

    monkeypatch.setattr(socket.socket, "sendall", record)
    transports(exchange.url).post(ENVELOPE, REQUEST_HEADERS)
    [request] = exchange.received
    assert request.headers["Host"] == f"127.0.0.1:{exchange.server_port}"
    assert request.headers["Content-Length"] == str(len(ENVELOPE))
    assert request.headers["User-Agent"] == f"ews-call-gateway/{__version__}"
    assert len(writes) == 1
    assert writes[0].endswith(b"\r\n\r\n" + ENVELOPE)


def test_a_header_that_could_split_the_request_is_refused_before_connecting(
    transports: Transports,
) -> None:
    # Sockets are blocked here: reaching for one would fail with another error.
    transport = transports(f"http://127.0.0.1:9{EWS_PATH}")
    with pytest.raises(ValueError, match="X-Request-ID"):
        transport.post(ENVELOPE, {**REQUEST_HEADERS, "X-Request-ID": "req-7\r\nX-Injected: 1"})


def test_an_authorization_that_cannot_be_sent_is_refused_when_the_transport_is_built() -> None:
    with pytest.raises(ValueError, match="Authorization"):
        ExchangeTransport(f"http://127.0.0.1:9{EWS_PATH}", timeout_s=1, authorization="Basic a\nb")


@pytest.mark.network
def test_a_chunked_answer_is_read_whole_and_its_connection_reused(
    raw_servers: RawServers,
    transports: Transports,
) -> None:
    def answer_chunked_twice(connection: socket.socket) -> None:
        for _ in range(2):
            read_request(connection)
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/xml; charset=utf-8\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                b"%x\r\n%s\r\n%x;part=2\r\n%s\r\n0\r\n\r\n"
                % (10, ANSWER[:10], len(ANSWER) - 10, ANSWER[10:])
            )

    server = raw_servers(answer_chunked_twice)
    transport = transports(server.url)
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert len(server.connections) == 1


@pytest.mark.network
def test_an_answer_followed_by_unasked_bytes_is_returned_but_its_connection_not_reused(
    raw_servers: RawServers,
    transports: Transports,
) -> None:
    def answer_with_more(connection: socket.socket) -> None:
        read_request(connection)
        # Taken for the next request's answer, the 408 would turn it into an error.
        unasked = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n"
        connection.sendall(http_answer() + unasked)

    server = raw_servers(answer_with_more)
    transport = transports(server.url)
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    reply = transport.post(ENVELOPE, REQUEST_HEADERS)
    assert (reply.status, reply.body) == (200, ANSWER)
    assert len(server.connections) == 2


@pytest.mark.network
def test_an_answer_without_a_length_is_read_until_the_close_and_not_reused(
    raw_servers: RawServers,
    transports: Transports,
) -> None:
    def answer_until_close(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/xml\r\n\r\n" + ANSWER)
        connection.close()

    server = raw_servers(answer_until_close)
    transport = transports(server.url)
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert len(server.connections) == 2


@pytest.mark.network
def test_an_interim_continue_is_skipped_for_the_answer(
    raw_servers: RawServers,
    transports: Transports,
) -> None:
    def continue_then_answer(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        time.sleep(0.05)
        connection.sendall(http_answer())

    server = raw_servers(continue_then_answer)
    reply = transports(server.url).post(ENVELOPE, REQUEST_HEADERS)
    assert (reply.status, reply.body) == (200, ANSWER)


INVALID_ANSWERS = {
    "both lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "folded header": b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "no status line": b"<html><body>Internal Server Error</body></html>",
}


@pytest.mark.network
@pytest.mark.parametrize("invalid", INVALID_ANSWERS.values(), ids=INVALID_ANSWERS.keys())
def test_an_invalid_answer_is_a_bad_response_and_its_connection_is_not_reused(
    invalid: bytes,
    raw_servers: RawServers,
    transports: Transports,
) -> None:
    def invalid_first(connection: socket.socket) -> None:
        read_request(connection)
        # The connection stays open: the transport must not wait on it, nor reuse it.
        connection.sendall(http_answer() if server.connections[1:] else invalid)

    server = raw_servers(invalid_first)
    transport = transports(server.url)
    with pytest.raises(ExchangeBadAnswer) as raised:
        transport.post(ENVELOPE, REQUEST_HEADERS)
    assert (raised.value.status, raised.value.outcome) == (502, "invalid_response")
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert len(server.connections) == 2
