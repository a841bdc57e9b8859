"""Connections to Exchange as real networks treat them: idle limits, dead addresses, slow
resolvers, stale pooled connections, compressed and malformed answers, TLS reasons.

Each test is one failure seen against real deployments (issue 13), with the right value.
"""

from __future__ import annotations

import gzip
import logging
import socket
import ssl
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ExchangeBadAnswer, ExchangeTimeout, ExchangeUnreachable
from gateway.exchange import connector, http1
from gateway.exchange.client import EwsClient
from gateway.exchange.resilience import BreakerState, CircuitBreaker, ExchangePolicy
from gateway.exchange.transport import MAX_REPLY_BYTES, Connection, ExchangeTransport
from tests.addresses import SilentAddress, resolving_to, silent_addresses
from tests.certificates import Certificate, exchange_certificate, misnamed_certificate
from tests.loopback_exchange import (
    ANSWER,
    ENVELOPE,
    EWS_PATH,
    REQUEST_HEADERS,
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
    "silent_addresses",
    "tls_exchanges",
    "transports",
]


def answer_with(head: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


# 1. Compression: never asked for; decoded within the cap when sent anyway


@pytest.mark.network
def test_the_gateway_asks_exchange_not_to_compress(
    exchange: FakeExchange, transports: Transports
) -> None:
    transports(exchange.url).post(ENVELOPE, REQUEST_HEADERS)
    assert exchange.received[0].headers["Accept-Encoding"] == "identity"


@pytest.mark.network
@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),
    ],
    ids=["gzip", "deflate", "raw deflate"],
)
def test_a_compressed_answer_sent_unasked_is_decoded(
    coding: str,
    compress: Callable[[bytes], bytes],
    raw_servers: RawServers,
    transports: Transports,
) -> None:
    def answer_compressed(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(
            answer_with(b"Content-Encoding: %s\r\n" % coding.encode(), compress(ANSWER))
        )

    server = raw_servers(answer_compressed)
    assert transports(server.url).post(ENVELOPE, REQUEST_HEADERS).body == ANSWER


@pytest.mark.network
def test_a_decompression_bomb_is_refused_at_the_size_cap(
    raw_servers: RawServers, transports: Transports
) -> None:
    bomb = gzip.compress(b"\0" * (MAX_REPLY_BYTES * 8))  # about 8 KiB on the wire

    def answer_bomb(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(answer_with(b"Content-Encoding: gzip\r\n", bomb))

    server = raw_servers(answer_bomb)
    with pytest.raises(ExchangeBadAnswer) as raised:
        transports(server.url).post(ENVELOPE, REQUEST_HEADERS)
    assert raised.value.outcome == "invalid_response"
    assert (
        raised.value.detail
        == f"Exchange's answer exceeded {MAX_REPLY_BYTES} bytes once decompressed"
    )


@pytest.mark.network
@pytest.mark.parametrize(
    ("head", "body"),
    [(b"Content-Encoding: br\r\n", b"\x8b\x02\x80"), (b"Content-Encoding: gzip\r\n", b"not gzip")],
    ids=["unknown coding", "corrupt gzip"],
)
def test_an_answer_in_a_coding_that_cannot_be_read_is_a_bad_response(
    head: bytes, body: bytes, raw_servers: RawServers, transports: Transports
) -> None:
    def answer(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(answer_with(head, body))

    server = raw_servers(answer)
    with pytest.raises(ExchangeBadAnswer) as raised:
        transports(server.url).post(ENVELOPE, REQUEST_HEADERS)
    assert (raised.value.status, raised.value.outcome) == (502, "invalid_response")


# 4. Idle connections: closed after EWS_CONNECTION_IDLE_SECONDS, never reused


@pytest.mark.network
def test_a_connection_idle_longer_than_the_limit_is_closed_and_not_reused(
    raw_servers: RawServers, transports: Transports
) -> None:
    closed_by_gateway = threading.Event()

    def answer_and_watch(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(http_answer())
        if len(server.connections) == 1:
            threading.Thread(target=wait_for_close, args=(connection,), daemon=True).start()

    def wait_for_close(connection: socket.socket) -> None:
        connection.settimeout(5)
        if connection.recv(1) == b"":
            closed_by_gateway.set()

    server = raw_servers(answer_and_watch)
    transport = transports(server.url, idle_s=0.2)
    transport.post(ENVELOPE, REQUEST_HEADERS)
    time.sleep(0.3)
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert len(server.connections) == 2
    assert closed_by_gateway.wait(5)


@pytest.mark.network
def test_a_connection_used_within_the_idle_limit_is_reused(
    exchange: FakeExchange, transports: Transports
) -> None:
    transport = transports(exchange.url, idle_s=30)
    transport.post(ENVELOPE, REQUEST_HEADERS)
    transport.post(ENVELOPE, REQUEST_HEADERS)
    assert exchange.received[0].peer == exchange.received[1].peer


@pytest.mark.network
def test_pooled_connections_probe_a_vanished_peer_with_tcp_keepalive(
    exchange: FakeExchange, transports: Transports
) -> None:
    transport = transports(exchange.url)
    transport.post(ENVELOPE, REQUEST_HEADERS)
    [connection] = transport._idle
    assert connection.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert connection.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == (
        connector.KEEPALIVE_IDLE_S
    )


def close_after_reading_the_second_request(
    connection: socket.socket, requests: list[bytes]
) -> None:
    """Answer once, then read the next request and close without a byte (Exchange's idle close)."""
    requests.append(read_request(connection))
    connection.sendall(http_answer())
    requests.append(read_request(connection))
    connection.close()


@pytest.mark.network
def test_an_idempotent_call_on_a_reused_connection_closed_unanswered_is_sent_again_once(
    raw_servers: RawServers, transports: Transports
) -> None:
    requests: list[bytes] = []

    def serve(connection: socket.socket) -> None:
        if not server.connections[1:]:
            close_after_reading_the_second_request(connection, requests)
        else:
            requests.append(read_request(connection))
            connection.sendall(http_answer())

    server = raw_servers(serve)
    transport = transports(server.url)
    transport.post(ENVELOPE, REQUEST_HEADERS, idempotent=True)
    assert transport.post(ENVELOPE, REQUEST_HEADERS, idempotent=True).body == ANSWER
    assert (len(requests), len(server.connections)) == (3, 2)


@pytest.mark.network
def test_play_on_phone_on_a_reused_connection_closed_unanswered_is_never_sent_twice(
    raw_servers: RawServers, transports: Transports
) -> None:
    requests: list[bytes] = []
    server = raw_servers(
        lambda connection: close_after_reading_the_second_request(connection, requests)
    )
    transport = transports(server.url)
    transport.post(ENVELOPE, REQUEST_HEADERS)
    with pytest.raises(ExchangeUnreachable) as raised:
        transport.post(ENVELOPE, REQUEST_HEADERS, idempotent=False)
    assert raised.value.detail == "Exchange closed the connection before answering"
    assert (len(requests), len(server.connections)) == (2, 1)


@pytest.mark.network
def test_an_idempotent_call_on_a_new_connection_closed_unanswered_is_not_sent_again(
    raw_servers: RawServers, transports: Transports
) -> None:
    requests: list[bytes] = []

    def hang_up(connection: socket.socket) -> None:
        requests.append(read_request(connection))
        connection.close()

    server = raw_servers(hang_up)
    with pytest.raises(ExchangeUnreachable):
        transports(server.url).post(ENVELOPE, REQUEST_HEADERS, idempotent=True)
    assert len(requests) == 1


# 5. One deadline: resolution and every address


@pytest.mark.network
def test_a_silent_first_address_does_not_starve_the_healthy_next_one(
    exchange: FakeExchange,
    transports: Transports,
    silent_addresses: Callable[[str, int], SilentAddress],
) -> None:
    port = exchange.server_port
    silent_addresses("127.0.0.2", port)
    url = f"http://exchange.example.test:{port}{EWS_PATH}"
    transport = transports(url, timeout_s=1.0, resolver=resolving_to("127.0.0.2", "127.0.0.1"))
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert exchange.received[0].peer[0] == "127.0.0.1"


@pytest.mark.network
def test_a_refusing_first_address_moves_on_to_the_next_at_once(
    exchange: FakeExchange, transports: Transports
) -> None:
    # Nothing listens on 127.0.0.3 at this port: refused, and the next is tried.
    url = f"http://exchange.example.test:{exchange.server_port}{EWS_PATH}"
    transport = transports(url, resolver=resolving_to("127.0.0.3", "127.0.0.1"))
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER


@pytest.mark.network
def test_every_address_silent_is_a_timeout_within_the_one_deadline(
    transports: Transports, silent_addresses: Callable[[str, int], SilentAddress]
) -> None:
    first = silent_addresses("127.0.0.2", 0)
    port = first._listener.getsockname()[1]
    silent_addresses("127.0.0.3", port)
    url = f"http://exchange.example.test:{port}{EWS_PATH}"
    transport = transports(url, timeout_s=1.0, resolver=resolving_to("127.0.0.2", "127.0.0.3"))
    started = time.monotonic()
    with pytest.raises(ExchangeTimeout) as raised:
        transport.post(ENVELOPE, REQUEST_HEADERS)
    # The contract: a 504 no later than about a second after the timeout (was 2.0 s here).
    assert time.monotonic() - started < 2.0
    assert raised.value.outcome == "timeout"


def test_a_resolver_that_hangs_is_a_timeout_within_the_one_deadline(
    transports: Transports,
) -> None:
    released = threading.Event()

    def hang(_host: str, _port: int) -> list[connector.Address]:
        released.wait(10)
        return []

    transport = transports(f"http://exchange.example.test{EWS_PATH}", timeout_s=0.5, resolver=hang)
    started = time.monotonic()
    try:
        with pytest.raises(ExchangeTimeout):
            transport.post(ENVELOPE, REQUEST_HEADERS)
        assert time.monotonic() - started < 1.5
    finally:
        released.set()


def test_a_name_that_does_not_resolve_is_unreachable_not_a_timeout(transports: Transports) -> None:
    def no_such_name(_host: str, _port: int) -> list[connector.Address]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    transport = transports(f"http://exchange.example.test{EWS_PATH}", resolver=no_such_name)
    with pytest.raises(ExchangeUnreachable) as raised:
        transport.post(ENVELOPE, REQUEST_HEADERS)
    assert raised.value.detail == "Exchange could not be reached (gaierror)"


def test_addresses_of_two_families_are_tried_alternately() -> None:
    v6 = [(socket.AF_INET6, (f"2001:db8::{n}", 443, 0, 0)) for n in (1, 2)]
    v4 = [(socket.AF_INET, (f"192.0.2.{n}", 443)) for n in (1, 2)]
    ordered = connector.interleave_families([*v6, *v4])
    assert ordered == [v6[0], v4[0], v6[1], v4[1]]


# 6. Bare LF line ends fail at once


@pytest.mark.network
def test_an_answer_with_bare_lf_line_ends_is_a_bad_response_at_once_not_a_timeout(
    raw_servers: RawServers, transports: Transports
) -> None:
    def answer_with_lf(connection: socket.socket) -> None:
        read_request(connection)
        # The connection stays open: a reader waiting for CRLF would wait for the deadline.
        connection.sendall(b"HTTP/1.1 200 OK\nContent-Type: text/xml\nContent-Length: 2\n\nok")

    server = raw_servers(answer_with_lf)
    with pytest.raises(ExchangeBadAnswer) as raised:
        transports(server.url, timeout_s=5.0).post(ENVELOPE, REQUEST_HEADERS)
    assert (raised.value.status, raised.value.outcome) == (502, "invalid_response")


# 7. TLS failures, logged with their reason


def tls_failure(transport: ExchangeTransport, caplog: pytest.LogCaptureFixture) -> tuple[str, str]:
    """The caller's detail and the logged reason of a failed handshake."""
    with (
        caplog.at_level(logging.WARNING, logger="gateway.transport"),
        pytest.raises(ExchangeUnreachable) as raised,
    ):
        transport.post(ENVELOPE, REQUEST_HEADERS)
    [record] = [r for r in caplog.records if r.getMessage() == "TLS handshake with Exchange failed"]
    reason: Any = record.__dict__["tlsReason"]
    return raised.value.detail, reason


@pytest.mark.network
def test_a_certificate_from_an_unknown_ca_is_logged_as_such(
    exchange_certificate: Certificate,
    tls_exchanges: Callable[[Certificate], TlsExchange],
    transports: Transports,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = tls_exchanges(exchange_certificate)
    detail, reason = tls_failure(transports(server.url), caplog)
    assert reason == "certificate verify failed: self-signed certificate"
    assert detail == f"The TLS connection to Exchange failed: {reason}"


@pytest.mark.network
def test_a_certificate_for_another_host_name_is_logged_as_such(
    misnamed_certificate: Certificate,
    tls_exchanges: Callable[[Certificate], TlsExchange],
    transports: Transports,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = tls_exchanges(misnamed_certificate)
    transport = transports(server.url, ca_bundle=str(misnamed_certificate.cert_path))
    _detail, reason = tls_failure(transport, caplog)
    mismatch = "IP address mismatch, certificate is not valid for '127.0.0.1'."
    assert reason == f"certificate verify failed: {mismatch}"


@pytest.mark.network
def test_an_exchange_offering_only_an_old_protocol_version_is_logged_as_such(
    exchange_certificate: Certificate,
    transports: Transports,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with warnings.catch_warnings():
        # Python deprecates TLS 1.1, which is the point: Exchange 2010 without updates offers it.
        warnings.simplefilter("ignore", DeprecationWarning)
        server = TlsExchange(exchange_certificate, maximum_version=ssl.TLSVersion.TLSv1_1)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        transport = transports(server.url, ca_bundle=str(exchange_certificate.cert_path))
        _detail, reason = tls_failure(transport, caplog)
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    # The server answers the gateway's TLS 1.2+ hello with a protocol_version alert.
    assert reason == "tlsv1 alert protocol version"


@pytest.mark.network
def test_a_stale_pooled_connection_never_counts_toward_the_circuit_breaker(
    raw_servers: RawServers, transports: Transports
) -> None:
    """Exchange closing an idle connection as it is reused is not Exchange failing."""
    success = (Path(__file__).parent / "fixtures" / "disconnect_success.xml").read_bytes()
    requests: list[bytes] = []

    def close_the_first_connection_when_reused(connection: socket.socket) -> None:
        requests.append(read_request(connection))
        connection.sendall(http_answer(success))
        if len(server.connections) == 1:
            requests.append(read_request(connection))
            connection.close()
        else:
            requests.append(read_request(connection))
            connection.sendall(http_answer(success))

    server = raw_servers(close_the_first_connection_when_reused)
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(1, 30, on_change=changes.append)  # one counted failure opens it
    client = EwsClient(
        transports(server.url),
        server_version="Exchange2013",
        policy=ExchangePolicy(timeout_s=5, breaker=breaker),
    )
    for call_id in ("call-1", "call-2", "call-3"):
        assert client.disconnect_call(call_id, request_id="req").ews_code == "NoError"
    assert changes == []
    assert len(server.connections) == 2


# The seam authentication plugs into


class ChallengeOnce:
    """An authenticator answering one 401 challenge on the connection that received it."""

    def __init__(self) -> None:
        self.connected_with: list[bytes | None] = []
        self.answered_with: list[int] = []

    def connected(self, connection: Connection, deadline: float) -> None:
        self.connected_with.append(connection.peer_certificate)
        connection.auth_state = "fresh"

    def authorization(self, connection: Connection) -> str | None:
        return "Test initial" if connection.auth_state == "fresh" else None

    def challenged(self, connection: Connection, answer: http1.HttpAnswer) -> str | None:
        connection.auth_state = "authenticated"
        return "Test answer-to-" + (answer.header("WWW-Authenticate") or "").removeprefix("Test ")

    def answered(self, connection: Connection, answer: http1.HttpAnswer) -> None:
        self.answered_with.append(answer.status)


@pytest.mark.network
def test_an_authenticator_answers_a_401_on_the_same_connection_then_needs_no_header(
    raw_servers: RawServers, transports: Transports
) -> None:
    seen: list[str] = []

    def challenge_then_accept(connection: socket.socket) -> None:
        for _ in range(3):
            request = read_request(connection).decode("latin-1")
            authorization = next(
                (line for line in request.split("\r\n") if line.startswith("Authorization:")), ""
            )
            seen.append(authorization)
            if authorization == "Authorization: Test initial":
                connection.sendall(
                    b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Test nonce-7\r\n"
                    b"Content-Length: 0\r\n\r\n"
                )
            else:
                connection.sendall(http_answer())

    server = raw_servers(challenge_then_accept)
    authenticator = ChallengeOnce()
    transport = transports(server.url, authenticator=authenticator)
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert seen == ["Authorization: Test initial", "Authorization: Test answer-to-nonce-7", ""]
    # Each request's final answer, never a 401 leg.
    assert authenticator.answered_with == [200, 200]
    assert len(server.connections) == 1
    assert authenticator.connected_with == [None]  # plain http: no certificate to bind to


@pytest.mark.network
def test_an_authenticator_sees_exchanges_certificate_for_channel_binding(
    exchange_certificate: Certificate,
    tls_exchanges: Callable[[Certificate], TlsExchange],
    transports: Transports,
) -> None:
    server = tls_exchanges(exchange_certificate)
    authenticator = ChallengeOnce()
    transport = transports(
        server.url, ca_bundle=str(exchange_certificate.cert_path), authenticator=authenticator
    )
    transport.post(ENVELOPE, REQUEST_HEADERS)
    der = ssl.PEM_cert_to_DER_cert(exchange_certificate.cert_path.read_text())
    assert authenticator.connected_with == [der]


# 8. IDNA 2008 host names


@pytest.mark.network
def test_an_idna_2008_host_is_resolved_and_named_as_its_a_labels(
    exchange: FakeExchange, transports: Transports
) -> None:
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[connector.Address]:
        asked.append(host)
        return [(socket.AF_INET, ("127.0.0.1", port))]

    url = f"http://straße.example:{exchange.server_port}{EWS_PATH}"
    transports(url, resolver=resolve).post(ENVELOPE, REQUEST_HEADERS)
    assert asked == ["xn--strae-oqa.example"]  # IDNA 2003 would ask for strasse.example
    assert exchange.received[0].headers["Host"] == f"xn--strae-oqa.example:{exchange.server_port}"


@pytest.mark.network
def test_an_idempotent_call_on_a_reused_tls_connection_closed_unanswered_is_sent_again(
    exchange_certificate: Certificate, raw_servers: RawServers, transports: Transports
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(exchange_certificate.cert_path, exchange_certificate.key_path)
    requests: list[bytes] = []
    wrapped: list[ssl.SSLSocket] = []  # they own the accepted sockets now

    def serve_tls(connection: socket.socket) -> None:
        tls = context.wrap_socket(connection, server_side=True)
        wrapped.append(tls)
        requests.append(read_request(tls))
        tls.sendall(http_answer())
        if len(server.connections) == 1:
            requests.append(read_request(tls))
            # No close_notify (Python sends one only on unwrap): the TCP connection just
            # ends, as a balancer's idle close does.
            tls.close()

    server = raw_servers(serve_tls)
    url = server.url.replace("http://", "https://")
    transport = transports(url, ca_bundle=str(exchange_certificate.cert_path))
    try:
        transport.post(ENVELOPE, REQUEST_HEADERS, idempotent=True)
        assert transport.post(ENVELOPE, REQUEST_HEADERS, idempotent=True).body == ANSWER
        assert (len(requests), len(server.connections)) == (3, 2)
    finally:
        transport.close()
        for tls in wrapped:
            tls.close()
