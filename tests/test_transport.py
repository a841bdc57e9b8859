"""The HTTP transport to Exchange, against real servers on loopback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gateway.errors import UpstreamBadResponse, UpstreamTimeout, UpstreamUnreachable
from gateway.transport import MAX_REPLY_BYTES, ExchangeTransport, UpstreamReply

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

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ExchangeHandler)
        self.answer = Answer()
        self.received: list[ReceivedRequest] = []

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


def hold_open(connection: socket.socket) -> None:
    """Read the request and never answer (the connection is closed at teardown)."""
    read_request(connection)


def hang_up(connection: socket.socket) -> None:
    """Read the request and close the connection without a word."""
    read_request(connection)
    connection.close()


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
def raw_servers() -> Iterator[Callable[[Callable[[socket.socket], None]], RawServer]]:
    servers: list[RawServer] = []

    def start(on_connection: Callable[[socket.socket], None]) -> RawServer:
        servers.append(RawServer(on_connection))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def transports() -> Iterator[Callable[..., ExchangeTransport]]:
    """Build transports that are closed before the servers they talk to."""
    opened: list[ExchangeTransport] = []

    def open_transport(url: str, **options: Any) -> ExchangeTransport:
        opened.append(ExchangeTransport(url, **{"timeout_s": 5.0, **options}))
        return opened[-1]

    yield open_transport
    for transport in opened:
        transport.close()


@pytest.mark.network
def test_a_normal_answer_is_returned_whole(
    exchange: FakeExchange, transports: Callable[..., ExchangeTransport]
) -> None:
    reply = transports(exchange.url).post(ENVELOPE, REQUEST_HEADERS)
    assert reply == UpstreamReply(
        status=200, content_type=SOAP_XML, retry_after=None, location=None, body=ANSWER
    )


@pytest.mark.network
def test_the_envelope_and_headers_reach_exchange_as_given(
    exchange: FakeExchange, transports: Callable[..., ExchangeTransport]
) -> None:
    transports(exchange.url).post(ENVELOPE, REQUEST_HEADERS)
    [request] = exchange.received
    assert (request.method, request.path, request.body) == ("POST", EWS_PATH, ENVELOPE)
    assert {name: request.headers[name] for name in REQUEST_HEADERS} == REQUEST_HEADERS
    assert "Authorization" not in request.headers


@pytest.mark.network
def test_the_configured_authorization_header_is_sent(
    exchange: FakeExchange, transports: Callable[..., ExchangeTransport]
) -> None:
    transport = transports(exchange.url, authorization="Basic c3ZjLWdhdGV3YXk6c2VjcmV0")
    transport.post(ENVELOPE, REQUEST_HEADERS)
    [request] = exchange.received
    assert request.headers["Authorization"] == "Basic c3ZjLWdhdGV3YXk6c2VjcmV0"


@pytest.mark.network
def test_an_error_status_is_returned_with_its_retry_after(
    exchange: FakeExchange, transports: Callable[..., ExchangeTransport]
) -> None:
    exchange.answer = Answer(503, {"Content-Type": "text/html", "Retry-After": "120"}, b"busy")
    reply = transports(exchange.url).post(ENVELOPE, REQUEST_HEADERS)
    assert (reply.status, reply.content_type, reply.retry_after, reply.body) == (
        503,
        "text/html",
        "120",
        b"busy",
    )


@pytest.mark.network
def test_a_redirect_is_returned_not_followed(
    exchange: FakeExchange, transports: Callable[..., ExchangeTransport]
) -> None:
    location = f"http://127.0.0.1:{exchange.server_port}/owa/auth/errorfe.aspx?httpCode=500"
    exchange.answer = Answer(302, {"Content-Type": "text/html", "Location": location}, b"moved")
    reply = transports(exchange.url).post(ENVELOPE, REQUEST_HEADERS)
    assert (reply.status, reply.location) == (302, location)
    assert [request.path for request in exchange.received] == [EWS_PATH]


@pytest.mark.network
def test_two_sequential_posts_reuse_one_connection(
    exchange: FakeExchange, transports: Callable[..., ExchangeTransport]
) -> None:
    transport = transports(exchange.url)
    first = transport.post(ENVELOPE, REQUEST_HEADERS)
    second = transport.post(ENVELOPE, REQUEST_HEADERS)
    assert first.body == second.body == ANSWER
    assert len(exchange.received) == 2
    assert exchange.received[0].peer == exchange.received[1].peer


@pytest.mark.network
def test_an_answer_of_exactly_the_size_limit_is_accepted(
    exchange: FakeExchange, transports: Callable[..., ExchangeTransport]
) -> None:
    exchange.answer = Answer(body=b"x" * MAX_REPLY_BYTES)
    reply = transports(exchange.url).post(ENVELOPE, REQUEST_HEADERS)
    assert len(reply.body) == MAX_REPLY_BYTES


@pytest.mark.network
def test_an_answer_larger_than_the_limit_is_refused(
    exchange: FakeExchange, transports: Callable[..., ExchangeTransport]
) -> None:
    exchange.answer = Answer(body=b"x" * (MAX_REPLY_BYTES + 1))
    with pytest.raises(UpstreamBadResponse) as raised:
        transports(exchange.url).post(ENVELOPE, REQUEST_HEADERS)
    assert (raised.value.status, raised.value.outcome) == (502, "invalid_response")


@pytest.mark.network
def test_after_an_oversized_answer_the_next_post_still_works(
    exchange: FakeExchange, transports: Callable[..., ExchangeTransport]
) -> None:
    transport = transports(exchange.url)
    exchange.answer = Answer(body=b"x" * (MAX_REPLY_BYTES + 1))
    with pytest.raises(UpstreamBadResponse):
        transport.post(ENVELOPE, REQUEST_HEADERS)
    exchange.answer = Answer()
    assert transport.post(ENVELOPE, REQUEST_HEADERS).body == ANSWER


@pytest.mark.network
def test_a_refused_connection_is_unreachable_not_a_timeout(
    transports: Callable[..., ExchangeTransport],
) -> None:
    # A bound socket that does not listen: the kernel refuses connections to it.
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed_port.getsockname()[1]}{EWS_PATH}"
        with pytest.raises(UpstreamUnreachable) as raised:
            transports(url).post(ENVELOPE, REQUEST_HEADERS)
    assert (raised.value.status, raised.value.outcome) == (502, "connection_error")


def test_a_name_that_does_not_resolve_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, transports: Callable[..., ExchangeTransport]
) -> None:
    def no_such_name(*_args: Any, **_kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    with pytest.raises(UpstreamUnreachable) as raised:
        transports(f"http://exchange.example.invalid{EWS_PATH}").post(ENVELOPE, REQUEST_HEADERS)
    assert (raised.value.status, raised.value.outcome) == (502, "connection_error")


@pytest.mark.network
def test_a_server_that_never_answers_times_out(
    raw_servers: Callable[[Callable[[socket.socket], None]], RawServer],
    transports: Callable[..., ExchangeTransport],
) -> None:
    server = raw_servers(hold_open)
    with pytest.raises(UpstreamTimeout) as raised:
        transports(server.url, timeout_s=0.3).post(ENVELOPE, REQUEST_HEADERS)
    assert (raised.value.status, raised.value.outcome) == (504, "timeout")


@pytest.mark.network
def test_a_connection_closed_without_an_answer_is_unreachable(
    raw_servers: Callable[[Callable[[socket.socket], None]], RawServer],
    transports: Callable[..., ExchangeTransport],
) -> None:
    server = raw_servers(hang_up)
    with pytest.raises(UpstreamUnreachable) as raised:
        transports(server.url).post(ENVELOPE, REQUEST_HEADERS)
    assert (raised.value.status, raised.value.outcome) == (502, "connection_error")
