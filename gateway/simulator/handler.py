"""The simulator's HTTP layer: Exchange's /EWS/ virtual directory plus the /simulator/ control API.

As on IIS, everything under /EWS/ is authenticated first: a request without
credentials gets the 401 challenge whatever its method or path, and only an
authenticated one learns that its path is missing (404) or its method wrong
(405).
"""

from __future__ import annotations

import gzip
import select
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import urlsplit

from gateway import wire
from gateway.simulator.acceptor import Acceptor, Headers, Session
from gateway.simulator.control import CONTROL_PREFIX, handle_control, json_reply, not_found
from gateway.simulator.documents import EwsDocuments, in_ews_directory, verb_not_allowed
from gateway.simulator.exchange import FakeExchange
from gateway.simulator.outcomes import ConnectionReset, Outcome, Reply, Silence, StreamedReply

SERVER_HEADER = "EwsCallGatewaySimulator/0.1"
IDLE_CONNECTION_TIMEOUT_S = 120.0
# How long a connection the idle policy "dropped" is held unanswered (or until the server stops).
DROPPED_CONNECTION_HOLD_S = 300.0
MAX_REQUEST_BYTES = 1024 * 1024
MAX_DISCARDED_BYTES = 16 * MAX_REQUEST_BYTES


class _UnreadableBody(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HttpServer(ThreadingHTTPServer):
    """A threading HTTP server that hands every request to one FakeExchange."""

    daemon_threads = True
    # The default backlog of 5 drops connections when a benchmark opens many at once.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        family: int,
        exchange: FakeExchange,
        *,
        documents: EwsDocuments | None = None,
        acceptor: Acceptor | None = None,
        tls: ssl.SSLContext | None = None,
        channel_binding: bytes | None = None,
    ) -> None:
        self.address_family = family
        self.exchange = exchange
        self.documents = documents if documents is not None else EwsDocuments.load()
        self.acceptor = acceptor
        self.tls = tls
        self.channel_binding = channel_binding
        # Set when the simulator stops: connections held by the idle policy let go.
        self.closing = threading.Event()
        super().__init__(address, EwsRequestHandler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self.tls is None:
            return sock, address
        # The handshake runs in the connection's own thread, not in the accepting one.
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for our own name, which can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that hang up mid-answer are routine here (timeouts, hang and huge rules).
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError | ssl.SSLError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class EwsRequestHandler(BaseHTTPRequestHandler):
    """Serve one keep-alive connection: EWS under /EWS/, JSON under /simulator/."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_CONNECTION_TIMEOUT_S
    # Headers and body go out in separate writes; Nagle would hold the body back ~40 ms.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        """Finish the TLS handshake, if any, and start the connection's authentication."""
        server = cast(HttpServer, self.server)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()
        self._session: Session | None = None
        if server.acceptor is not None:
            self._session = server.acceptor.session(server.channel_binding)

    def handle(self) -> None:
        """Serve requests on the connection, ending it when idle as the idle policy says."""
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection and self._wait_for_next_request():
            self.handle_one_request()

    def _wait_for_next_request(self) -> bool:
        """Wait for the next request; False once the idle policy ended the connection."""
        policy = self._exchange.idle_policy
        if policy is None:
            return True  # the handler's own timeout bounds the wait
        readable, _, _ = select.select([self.connection], [], [], policy.after_s)
        if readable:
            return True
        if policy.action == "reset":
            self._reset_connection()
        elif policy.action == "drop":
            self._hold_unanswered()
        return False

    def _hold_unanswered(self) -> None:
        """Take what arrives and never answer, as a path that forgot the flow."""
        closing = cast(HttpServer, self.server).closing
        deadline = time.monotonic() + DROPPED_CONNECTION_HOLD_S
        while not closing.is_set() and time.monotonic() < deadline:
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            if readable and not self.connection.recv(65536):
                return

    def parse_request(self) -> bool:
        """Note when the request arrived (its first line is in), then read its head."""
        self._received_at = time.monotonic()
        return super().parse_request()

    def version_string(self) -> str:
        """Name the simulator in the Server header, so no one mistakes it for IIS."""
        return SERVER_HEADER

    def do_GET(self) -> None:
        """Route a GET."""
        self._route("GET")

    def do_HEAD(self) -> None:
        """Route a HEAD: answered as a GET would be, without the body."""
        self._route("HEAD")

    def do_POST(self) -> None:
        """Route a POST."""
        self._route("POST")

    def do_PUT(self) -> None:
        """Route a PUT."""
        self._route("PUT")

    def do_DELETE(self) -> None:
        """Route a DELETE."""
        self._route("DELETE")

    def do_PATCH(self) -> None:
        """Route a PATCH (always the wrong method, but answered as such)."""
        self._route("PATCH")

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet: a line per request would drown the CLI's banner and test output."""

    @property
    def _exchange(self) -> FakeExchange:
        return cast(HttpServer, self.server).exchange

    def _route(self, method: str) -> None:
        self._gzip = False
        path = urlsplit(self.path).path
        try:
            body = self._read_body()
        except _UnreadableBody as error:
            self.close_connection = True
            self._send(json_reply(error.status, {"error": str(error)}))
            return
        if in_ews_directory(path):
            self._answer_ews_directory(method, path, body)
        elif path.startswith(CONTROL_PREFIX):
            self._send(handle_control(self._exchange, method, path, body))
        else:
            self._send(not_found(path))

    def _answer_ews_directory(self, method: str, path: str, body: bytes) -> None:
        """Authenticate the sender, then answer; a 401 acts on nothing and reveals nothing."""
        authorization = self.headers.get("Authorization")
        self._gzip = _accepts_gzip(self.headers.get("Accept-Encoding"))
        admission = self._session.admit(authorization) if self._session is not None else ()
        if isinstance(admission, Reply):
            self._send(admission)
            return
        if path.casefold() != wire.EWS_PATH.casefold():
            self._send(_with_headers(self._documents.answer(method, path), admission))
        elif method != "POST":
            self._send(_with_headers(verb_not_allowed(("POST",)), admission))
        else:
            self._answer_ews(body, authorization, admission)

    def _answer_ews(self, body: bytes, authorization: str | None, admission: Headers) -> None:
        """Hand an authenticated SOAP request to the fake Exchange and carry out its answer."""
        outcome = self._exchange.answer(
            body,
            self.headers.get("SOAPAction"),
            self.headers.get("X-Request-ID"),
            authorization,
            self._received_at,
            anchor_mailbox=self.headers.get("X-AnchorMailbox"),
        )
        if isinstance(outcome, Reply):
            outcome = _with_headers(outcome, admission)
        self._carry_out(outcome)

    @property
    def _documents(self) -> EwsDocuments:
        return cast(HttpServer, self.server).documents

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").strip().lower() == "chunked":
            return self._read_chunked_body()
        length_text = self.headers.get("Content-Length", "0").strip()
        if not (length_text.isascii() and length_text.isdigit()):
            raise _UnreadableBody(400, f"bad Content-Length {length_text!r}")
        length = int(length_text)
        if length > MAX_REQUEST_BYTES:
            self._discard(length)
        return self.rfile.read(_within_limit(length, 0))

    def _discard(self, length: int) -> None:
        # Reading what the client sends lets it receive the 413 instead of a reset.
        remaining = length if length <= MAX_DISCARDED_BYTES else 0
        while remaining > 0 and (piece := self.rfile.read(min(remaining, 64 * 1024))):
            remaining -= len(piece)

    def _read_chunked_body(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size_line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise _UnreadableBody(400, "bad chunk size in a chunked body") from None
            if size == 0:
                while self.rfile.readline(1024).strip():
                    pass  # Trailer fields carry nothing the simulator needs.
                return b"".join(chunks)
            chunks.append(self.rfile.read(_within_limit(size, sum(map(len, chunks)))))
            self.rfile.readline(1024)

    def _carry_out(self, outcome: Outcome) -> None:
        match outcome:
            case Reply():
                self._send(outcome)
            case StreamedReply():
                self._stream(outcome)
            case Silence():
                outcome.released.wait(outcome.wait_seconds)
                self.close_connection = True
            case ConnectionReset():
                self._reset_connection()

    def _send(self, reply: Reply) -> None:
        body, headers = reply.body, reply.headers
        if getattr(self, "_gzip", False) and body:
            # As IIS with dynamic compression: only for a client that asked for gzip.
            body, headers = gzip.compress(body), (*headers, ("Content-Encoding", "gzip"))
        self._send_head(reply.status, reply.content_type, len(body), headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _stream(self, reply: StreamedReply) -> None:
        self._send_head(reply.status, reply.content_type, reply.length)
        for chunk in reply.chunks():
            self.wfile.write(chunk)

    def _send_head(
        self,
        status: int,
        content_type: str | None,
        length: int,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.send_response(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _reset_connection(self) -> None:
        # Linger 0 turns close() into a RST instead of an orderly FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True


def _with_headers(reply: Reply, headers: Headers) -> Reply:
    """Add what authentication adds to an answer (the final token of mutual authentication)."""
    return replace(reply, headers=reply.headers + headers) if headers else reply


def _accepts_gzip(accept_encoding: str | None) -> bool:
    """Tell whether an Accept-Encoding field allows gzip (RFC 9110 section 12.5.3)."""
    for element in (accept_encoding or "").split(","):
        coding, _, parameters = element.partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip", "*"):
            continue
        weight = parameters.strip().lower().removeprefix("q=").strip() or "1"
        try:
            return float(weight) > 0
        except ValueError:
            return False
    return False


def _within_limit(size: int, already_read: int) -> int:
    if already_read + size > MAX_REQUEST_BYTES:
        raise _UnreadableBody(413, f"request bodies are limited to {MAX_REQUEST_BYTES} bytes")
    return size
