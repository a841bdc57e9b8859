"""Exchange, proxies and resolvers behaving badly, with real sockets on loopback.

Each test is a way a hostile or merely broken peer has made the transport
misbehave, with the right value.
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import Config
from gateway.errors import ExchangeAuthFailed, ExchangeTimeout, ExchangeUnreachable
from gateway.exchange import connector
from gateway.exchange.auth import BasicRefusalHold, Credentials, SecurityContextAuth
from gateway.exchange.proxy import Proxy
from tests.addresses import SilentAddress, resolving_to, silent_addresses
from tests.certificates import Certificate, self_signed_certificate
from tests.loopback_exchange import (
    ANSWER,
    ENVELOPE,
    EWS_PATH,
    REQUEST_HEADERS,
    Answer,
    FakeExchange,
    RawServers,
    Transports,
    exchange,
    raw_servers,
    read_request,
    transports,
)

__all__ = [
    "exchange",
    "raw_servers",
    "silent_addresses",
    "transports",
]  # fixtures, imported to be found by pytest


CALL = {"itemId": "AAMkVoiceMail", "dialString": "+15551234567"}


def resolver_threads() -> int:
    return sum(thread.name == "ews-resolver" for thread in threading.enumerate())


def test_calls_waiting_on_a_hung_resolver_share_one_lookup_thread(transports: Transports) -> None:
    # getaddrinfo cannot be interrupted: each call that gave up on a hung resolver used to
    # leave its own thread behind, piling up for as long as the resolver hung.
    released = threading.Event()
    asked: list[str] = []

    def hang(host: str, _port: int) -> list[connector.Address]:
        asked.append(host)
        released.wait(30)
        return []

    transport = transports(f"http://exchange.example.test{EWS_PATH}", timeout_s=0.2, resolver=hang)
    before = resolver_threads()

    def call() -> str:
        try:
            transport.post(ENVELOPE, REQUEST_HEADERS)
        except ExchangeTimeout as timeout:
            return timeout.outcome
        return "answered"

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            outcomes = list(pool.map(lambda _: call(), range(16)))
        outcomes += [call() for _ in range(4)]  # and one after another
        assert outcomes == ["timeout"] * 20
        assert asked == ["exchange.example.test"]
        assert resolver_threads() - before == 1
    finally:
        released.set()
    deadline = time.monotonic() + 5
    while resolver_threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert resolver_threads() == before


def test_a_name_is_resolved_afresh_once_the_lookup_under_way_has_ended(
    transports: Transports,
) -> None:
    # Sharing a lookup under way must not turn into caching its answer.
    asked: list[str] = []

    def nothing(host: str, _port: int) -> list[connector.Address]:
        asked.append(host)
        return []

    for _ in range(3):
        with pytest.raises(OSError):
            connector.resolve("exchange.example.test", 443, time.monotonic() + 1, nothing)
    assert asked == ["exchange.example.test"] * 3


def answer_connect_with(reply: bytes) -> Callable[[socket.socket], None]:
    """A proxy that reads the CONNECT head, sends reply and keeps the connection open."""

    def on_connection(connection: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += connection.recv(4096)
        connection.sendall(reply)

    return on_connection


@pytest.mark.network
@pytest.mark.parametrize(
    "reply",
    [
        b"<html><body>Access denied by policy</body></html>\r\n\r\n",
        b"<html><body>Access denied by policy</body></html>",  # no blank line, kept open
        b"\x15\x03\x03\x00\x02\x02\x46",  # a TLS alert: HTTPS_PROXY named a TLS port
        b"\x05\xff",  # a SOCKS5 server refusing
    ],
    ids=["html", "html-without-end", "tls-alert", "socks"],
)
def test_a_proxy_that_does_not_answer_connect_in_http_is_a_connection_error_naming_it(
    raw_servers: RawServers, transports: Transports, reply: bytes
) -> None:
    proxy_server = raw_servers(answer_connect_with(reply))
    port = int(proxy_server.url.split(":")[2].split("/")[0])
    proxy = Proxy("127.0.0.1", port, "Basic dXNlcjpwcjB4eS1zM2NyM3Q=")
    transport = transports(f"https://exchange.example.test{EWS_PATH}", proxy=proxy, timeout_s=2)
    with pytest.raises(ExchangeUnreachable) as raised:
        transport.post(ENVELOPE, REQUEST_HEADERS)
    assert str(raised.value) == (
        f"The proxy 127.0.0.1:{port} did not answer CONNECT in HTTP; is it an HTTP proxy?"
    )
    assert raised.value.outcome == "connection_error"


def answer_with_empty_body(status: bytes, coding: bytes) -> Callable[[socket.socket], None]:
    def on_connection(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(
            b"HTTP/1.1 "
            + status
            + b"\r\nRetry-After: 9\r\nContent-Encoding: "
            + coding
            + b"\r\nContent-Length: 0\r\n\r\n"
        )

    return on_connection


@pytest.mark.network
@pytest.mark.parametrize("coding", [b"gzip", b"deflate"])
@pytest.mark.parametrize("status", [b"503 Service Unavailable", b"401 Unauthorized"])
def test_an_empty_answer_labelled_compressed_keeps_its_status(
    raw_servers: RawServers, transports: Transports, status: bytes, coding: bytes
) -> None:
    # A server or balancer compressing by route labels empty answers too: there is nothing
    # to decode, and the status (503 with Retry-After, 401) is the answer, not a 502.
    server = raw_servers(answer_with_empty_body(status, coding))
    reply = transports(server.url).post(ENVELOPE, REQUEST_HEADERS)
    assert (reply.status, reply.retry_after, reply.body) == (int(status[:3]), "9", b"")


ECDSA_WITH_SHA256 = bytes.fromhex("06082a8648ce3d040302")
UNKNOWN_SIGNATURE = bytes.fromhex("06082a8648ce3d04037f")  # 1.2.840.10045.4.3.127


@pytest.fixture
def unknown_signature_certificate(tmp_path: Path) -> Certificate:
    """A certificate signed with an algorithm the cryptography package does not know.

    OpenSSL serves it (its signature is never checked with verification off); what
    RFC 5929's tls-server-end-point hash is for it cannot be told.
    """
    certificate = self_signed_certificate(tmp_path, [x509.DNSName("localhost")])
    der = x509.load_pem_x509_certificate(certificate.cert_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert der.count(ECDSA_WITH_SHA256) == 2  # in the signed part and beside the signature
    patched = der.replace(ECDSA_WITH_SHA256, UNKNOWN_SIGNATURE)
    pem = b"-----BEGIN CERTIFICATE-----\n%s-----END CERTIFICATE-----\n" % base64.encodebytes(
        patched
    )
    certificate.cert_path.write_bytes(pem)
    return certificate


class LaxTlsExchange(FakeExchange):
    """FakeExchange behind TLS that serves a certificate OpenSSL's security level refuses."""

    def __init__(self, certificate: Certificate) -> None:
        super().__init__()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # an unknown signature digest is "too weak"
        context.load_cert_chain(certificate.cert_path, certificate.key_path)
        self.socket = context.wrap_socket(self.socket, server_side=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_port}{EWS_PATH}"


@pytest.mark.network
@pytest.mark.parametrize("mode", ["ntlm", "negotiate"])
def test_a_certificate_whose_binding_cannot_be_computed_is_upstream_authentication_failed(
    transports: Transports, unknown_signature_certificate: Certificate, mode: str
) -> None:
    # Was an UnsupportedAlgorithm out of the transport: a 500 with a traceback.
    exchange = LaxTlsExchange(unknown_signature_certificate)
    thread = threading.Thread(target=exchange.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    authenticator = SecurityContextAuth(mode, Credentials("CORP\\svc", "pw"), "localhost", "HTTP")
    transport = transports(exchange.url, verify_tls=False, authenticator=authenticator)
    try:
        with pytest.raises(ExchangeAuthFailed) as raised:
            transport.post(ENVELOPE, REQUEST_HEADERS)
        assert str(raised.value) == (
            "Upstream authentication failed: Exchange's certificate is signed with an algorithm "
            "the gateway cannot hash for channel binding (RFC 5929)"
        )
        assert raised.value.outcome == "http_error"
        assert exchange.received == []
    finally:
        transport.close()
        exchange.shutdown()
        exchange.server_close()
        thread.join()


@pytest.mark.network
def test_an_address_of_a_family_this_host_cannot_open_moves_on_to_the_next(
    exchange: FakeExchange, transports: Transports
) -> None:
    # On a host booted without IPv6, socket(AF_INET6) fails with EAFNOSUPPORT while the
    # resolver still lists AAAA addresses first. AF_APPLETALK fails the same way here.
    port = exchange.server_port

    def unopenable_first(_host: str, _port: int) -> list[connector.Address]:
        return [(socket.AF_APPLETALK, ("unopenable", port)), (socket.AF_INET, ("127.0.0.1", port))]

    url = f"http://exchange.example.test:{port}{EWS_PATH}"
    transport = transports(url, resolver=unopenable_first)
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER


@pytest.mark.network
@pytest.mark.parametrize("timeout_s", [0.15, 0.3])
def test_a_silent_first_address_does_not_starve_the_next_under_a_deadline_shorter_than_250_ms(
    exchange: FakeExchange,
    transports: Transports,
    silent_addresses: Callable[[str, int], SilentAddress],
    timeout_s: float,
) -> None:
    # EWS_TIMEOUT_SECONDS may be 0.1: RFC 8305's 250 ms between attempts then left the
    # healthy second address untried and every new connection timed out.
    port = exchange.server_port
    silent_addresses("127.0.0.2", port)
    url = f"http://exchange.example.test:{port}{EWS_PATH}"
    resolver = resolving_to("127.0.0.2", "127.0.0.1")
    transport = transports(url, timeout_s=timeout_s, resolver=resolver)
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER
    assert exchange.received[0].peer[0] == "127.0.0.1"


@pytest.mark.network
def test_a_proxy_refusing_a_plain_http_request_with_407_is_named_not_blamed_on_exchange(
    raw_servers: RawServers, transports: Transports
) -> None:
    # Plain http goes to the proxy in absolute form: a 407 is the proxy's, never Exchange's.
    def refuse(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Basic realm="corp"\r\nContent-Length: 0\r\n\r\n'
        )

    proxy_server = raw_servers(refuse)
    port = int(proxy_server.url.split(":")[2].split("/")[0])
    proxy = Proxy("127.0.0.1", port, "Basic dXNlcjp3cm9uZw==")
    transport = transports(f"http://exchange.example.test{EWS_PATH}", proxy=proxy)
    with pytest.raises(ExchangeUnreachable) as raised:
        transport.post(ENVELOPE, REQUEST_HEADERS)
    assert str(raised.value) == (
        f"The proxy 127.0.0.1:{port} refused the request to Exchange (HTTP 407)"
    )
    assert raised.value.outcome == "connection_error"


@pytest.mark.network
def test_basic_credentials_exchange_refused_are_not_sent_again_for_a_while(
    exchange: FakeExchange,
) -> None:
    # Each refused Basic logon counts toward the account's lockout in Active Directory,
    # as a refused NTLM or Kerberos one does: every call used to send them again.
    exchange.answer = Answer(401, {"WWW-Authenticate": 'Basic realm="mail.example.com"'}, b"")
    config = Config.from_env(
        {
            "EWS_URL": exchange.url,
            "GATEWAY_AUTH": "none",
            "EWS_AUTH": "basic",
            "EWS_USERNAME": "svc-gateway",
            "EWS_PASSWORD": "wrong-password",
        }
    )
    app = create_app(config, registry=CollectorRegistry())
    try:
        answers = [app.test_client().post("/calls", json=CALL) for _ in range(3)]
    finally:
        app.extensions["gateway"].ews._transport.close()
    assert [answer.status_code for answer in answers] == [502, 502, 502]
    problems = [answer.json for answer in answers]
    assert {problem["type"] for problem in problems} == {
        "urn:ews-gateway:problem:upstream-authentication-failed"
    }
    assert problems[1]["detail"] == (
        "Upstream authentication failed: Exchange refused the gateway's credentials less "
        "than 30 s ago; they are not sent again before then"
    )
    assert "wrong-password" not in str(problems)
    assert len(exchange.received) == 1


@pytest.mark.network
def test_basic_credentials_refused_on_a_closing_connection_are_held_back_too(
    raw_servers: RawServers, transports: Transports
) -> None:
    # A balancer in front of IIS closes the connection with its 401: a refusal all the same.
    asked: list[bytes] = []

    def refuse_and_close(connection: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = connection.recv(65536)
            if not data:  # a connection opened and closed without a request
                return
            head += data
        asked.append(head)
        connection.sendall(
            b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="mail"\r\n'
            b"Connection: close\r\nContent-Length: 0\r\n\r\n"
        )
        connection.close()

    server = raw_servers(refuse_and_close)
    transport = transports(
        server.url, authorization="Basic c3ZjOndyb25n", authenticator=BasicRefusalHold()
    )
    assert transport.post(ENVELOPE, REQUEST_HEADERS).status == 401
    with pytest.raises(ExchangeAuthFailed):
        transport.post(ENVELOPE, REQUEST_HEADERS)
    assert len(asked) == 1
