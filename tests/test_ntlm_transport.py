"""EWS_AUTH=ntlm: the handshake runs per connection and threads never share one."""

from __future__ import annotations

import base64
import gzip
import http.server
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import spnego

from gateway.errors import ExchangeAuthFailed
from gateway.exchange.auth import Credentials, SecurityContextAuth
from gateway.exchange.transport import ExchangeReply, ExchangeTransport

pytestmark = pytest.mark.network

DOMAIN, USER, PASSWORD = "CORP", "svc-gateway", "correct horse battery staple"


class NtlmExchange(http.server.ThreadingHTTPServer):
    """A loopback endpoint that, like IIS, authenticates each connection with NTLM."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), NtlmHandler)
        self.handshakes = 0
        self.acted_on = 0
        # Compress answers with this content coding, as a misconfigured IIS does unasked.
        self.compression: str | None = None
        self.users: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/EWS/Exchange.asmx"


class NtlmHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: NtlmExchange

    def setup(self) -> None:
        super().setup()
        self.context: spnego.ContextProxy | None = None
        self.authenticated_as: str | None = None

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme == "NTLM" and token:
            self._handshake(base64.b64decode(token))
        elif self.authenticated_as is not None:
            self._act()
        else:
            self._answer(401, b"", challenge="NTLM")

    def _handshake(self, token: bytes) -> None:
        if self.context is None:
            self.context = spnego.server(protocol="ntlm")
        try:
            reply = self.context.step(token)
        except spnego.exceptions.SpnegoError:
            self.context = None
            self._answer(401, b"", challenge="NTLM")
            return
        if reply:
            self._answer(401, b"", challenge="NTLM " + base64.b64encode(reply).decode())
            return
        self.authenticated_as = self.context.client_principal
        with self.server.lock:
            self.server.handshakes += 1
            self.server.users.append(str(self.authenticated_as))
        self._act()

    def _act(self) -> None:
        """Carry out the request (place the call, say): once per request that gets here."""
        with self.server.lock:
            self.server.acted_on += 1
        self._answer(200, b"<ok/>")

    def _answer(self, status: int, body: bytes, challenge: str | None = None) -> None:
        self.send_response(status)
        if challenge:
            self.send_header("WWW-Authenticate", challenge)
        if self.server.compression == "gzip":
            body = gzip.compress(body)
            self.send_header("Content-Encoding", "gzip")
        elif self.server.compression == "deflate":
            body = zlib.compress(body)
            self.send_header("Content-Encoding", "deflate")
        self.send_header("Content-Type", "text/xml; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NtlmExchange]:
    users = tmp_path / "ntlm-users"
    users.write_text(f"{DOMAIN}:{USER}:{PASSWORD}\n", encoding="utf-8")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))
    server = NtlmExchange()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def transport_for(exchange: NtlmExchange, password: str = PASSWORD) -> ExchangeTransport:
    credentials = Credentials(f"{DOMAIN}\\{USER}", password)
    auth = SecurityContextAuth("ntlm", credentials, "127.0.0.1", "HTTP")
    return ExchangeTransport(exchange.url, timeout_s=5, authenticator=auth)


def post(transport: ExchangeTransport) -> ExchangeReply:
    return transport.post(b"<envelope/>", {"Content-Type": "text/xml; charset=utf-8"})


def test_the_right_credentials_complete_the_handshake(exchange: NtlmExchange) -> None:
    transport = transport_for(exchange)
    try:
        reply = post(transport)
    finally:
        transport.close()
    assert reply.status == 200
    assert exchange.users == [f"{DOMAIN}\\{USER}"]


def test_wrong_credentials_end_as_http_401(exchange: NtlmExchange) -> None:
    transport = transport_for(exchange, password="wrong")
    try:
        reply = post(transport)
    finally:
        transport.close()
    assert reply.status == 401
    assert exchange.handshakes == 0


def test_concurrent_threads_each_authenticate_their_own_connection(exchange: NtlmExchange) -> None:
    transport = transport_for(exchange)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            replies = list(pool.map(lambda _: post(transport), range(64)))
    finally:
        transport.close()
    assert [reply.status for reply in replies] == [200] * 64
    # At most one handshake per thread's connection: later requests reuse it.
    assert 1 <= exchange.handshakes <= 8


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_answers_compressed_or_not_are_read_and_the_request_acted_on_once(
    exchange: NtlmExchange, compression: str | None
) -> None:
    exchange.compression = compression
    transport = transport_for(exchange)
    try:
        reply = post(transport)
    finally:
        transport.close()
    assert (reply.status, reply.body) == (200, b"<ok/>")
    assert (exchange.handshakes, exchange.acted_on) == (1, 1)


def test_a_scheme_exchange_does_not_offer_is_named_not_taken_for_refused_credentials(
    exchange: NtlmExchange,
) -> None:
    # This IIS offers NTLM only. Was "refused the gateway's credentials", then 30 s of
    # "not sent again": a password hunt for what is a choice of EWS_AUTH.
    credentials = Credentials(f"{DOMAIN}\\{USER}", PASSWORD)
    auth = SecurityContextAuth("negotiate", credentials, "127.0.0.1", "HTTP")
    transport = ExchangeTransport(exchange.url, timeout_s=5, authenticator=auth)
    expected = (
        "Upstream authentication failed: Exchange offers NTLM, and EWS_AUTH=negotiate speaks "
        "Negotiate; set EWS_AUTH=ntlm"
    )
    try:
        for _ in range(2):
            with pytest.raises(ExchangeAuthFailed) as raised:
                post(transport)
            assert (str(raised.value), raised.value.outcome) == (expected, "http_error")
    finally:
        transport.close()
    assert exchange.acted_on == 0
