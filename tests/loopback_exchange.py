"""Exchange on loopback: servers that record each request and answer as told, and transports
to them that are closed before the servers are.

Test modules import the fixtures they use (`exchange`, `tls_exchanges`, `raw_servers`,
`transports`) from here.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gateway.exchange.transport import ExchangeTransport
from tests.certificates import Certificate

EWS_PATH = "/EWS/Exchange.asmx"
SOAP_XML = "text/xml; charset=utf-8"
ENVELOPE = b"<?xml version='1.0' encoding='utf-8'?><soap-env:Envelope/>"
REQUEST_HEADERS = {
    "Content-Type": SOAP_XML,
    "SOAPAction": '"http://schemas.microsoft.com/exchange/services/2006/messages/DisconnectPhoneCall"',
    "X-Request-ID": "req-7",
}
ANSWER = b'<?xml version="1.0" encoding="utf-8"?><s:Envelope>answer</s:Envelope>'


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int]


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": SOAP_XML})
    body: bytes = ANSWER


class _ExchangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as IIS does
    server: FakeExchange

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.open_connections += 1

    def finish(self) -> None:
        with self.server.lock:
            self.server.open_connections -= 1
        super().finish()

    def _record_and_answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.received.append(
            ReceivedRequest(self.command, self.path, dict(self.headers), body, self.client_address)
        )
        answer = self.server.answer
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    do_POST = do_GET = _record_and_answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class FakeExchange(ThreadingHTTPServer):
    """An HTTP server on loopback that records each request and gives one canned answer."""

    request_queue_size = 64  # a burst of concurrent connections must not overflow the backlog

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ExchangeHandler)
        self.answer = Answer()
        self.received: list[ReceivedRequest] = []
        self.lock = threading.Lock()
        self.open_connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}{EWS_PATH}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The transport hangs up mid-answer in some tests; that is the point, not an error.
        pass


class RawServer:
    """A loopback TCP server that hands every accepted connection to `on_connection`."""

    def __init__(self, on_connection: Callable[[socket.socket], None]) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._on_connection = on_connection
        self._stop = threading.Event()
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}{EWS_PATH}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections.append(connection)
            self._on_connection(connection)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()
        for connection in self.connections:
            connection.close()


class TlsExchange(FakeExchange):
    """FakeExchange behind TLS, presenting the given certificate."""

    def __init__(
        self, certificate: Certificate, maximum_version: ssl.TLSVersion | None = None
    ) -> None:
        super().__init__()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate.cert_path, certificate.key_path)
        if maximum_version is not None:
            # An old server: its protocol versions, and the ciphers they need.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = maximum_version
        # The handshake runs on accept; a client that rejects it is dropped there.
        self.socket = context.wrap_socket(self.socket, server_side=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_port}{EWS_PATH}"


def http_answer(body: bytes = ANSWER) -> bytes:
    """A 200 answer carrying the body on a connection kept alive."""
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/xml; charset=utf-8\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def read_request(connection: socket.socket) -> bytes:
    """Read one HTTP request (headers and Content-Length body) from a raw connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += connection.recv(65536)
    return data


@pytest.fixture
def exchange() -> Iterator[FakeExchange]:
    server = FakeExchange()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    thread.join()
    server.server_close()


@pytest.fixture
def tls_exchanges() -> Iterator[Callable[[Certificate], TlsExchange]]:
    started: list[tuple[TlsExchange, threading.Thread]] = []

    def start(certificate: Certificate) -> TlsExchange:
        server = TlsExchange(certificate)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        thread.join()
        server.server_close()


# Start a raw TCP server that runs a function on each connection; build transports.
RawServers = Callable[[Callable[[socket.socket], None]], RawServer]
Transports = Callable[..., ExchangeTransport]


@pytest.fixture
def raw_servers() -> Iterator[RawServers]:
    servers: list[RawServer] = []

    def start(on_connection: Callable[[socket.socket], None]) -> RawServer:
        servers.append(RawServer(on_connection))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def transports() -> Iterator[Transports]:
    """Build transports that are closed before the servers they talk to."""
    opened: list[ExchangeTransport] = []

    def open_transport(url: str, **options: Any) -> ExchangeTransport:
        opened.append(ExchangeTransport(url, **{"timeout_s": 5.0, **options}))
        return opened[-1]

    yield open_transport
    for transport in opened:
        transport.close()
