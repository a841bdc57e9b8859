"""HTTP to Exchange: the only module that opens connections upstream.

ExchangeTransport speaks HTTP/1.1 itself (gateway.http1) over a small pool of
keep-alive sockets shared by all threads. Its one use, POST an envelope and
read one answer, is small, and general clients cost far more CPU on it than
the exchange on the socket does. Measured single-threaded against a local
nginx, one call took about 140 microseconds of CPU through http.client (the
email package parsing headers, two writes per request), about 150 through h11
and about 220 through urllib3's pool, against about 40 for the bare write and
read; this transport takes about 70.

It stays safe by being strict rather than general. An answer must be framed
as RFC 9112 says, without ambiguity; the head, every line and the body are
capped, a declared size before the body is read. A connection carries another
request only after a complete HTTP/1.1 answer framed by its length or chunks,
without Connection: close and with nothing sent after it; anything irregular
closes it.

Redirects are never followed (Exchange redirects to an HTML error page). One
deadline bounds connecting, the TLS handshake, sending, waiting for the answer
and reading its body, however slowly it trickles in. The one retry is a fresh
connection when a reused one turns out closed before the request could be
written.

Every EWS_AUTH mode runs over these connections (gateway.upstream_auth): NTLM,
Kerberos and Negotiate authenticate a new connection with the request itself
before it joins the pool, so the one deadline and the caps bound the handshake too.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway import http1
from gateway.errors import GatewayError, UpstreamTimeout, UpstreamUnreachable
from gateway.upstream_auth import NoAuth, UpstreamAuth

# EWS answers for the phone-call operations are a few kilobytes; anything far
# larger is not a real answer.
MAX_REPLY_BYTES = 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024
# How far a step may outlast the deadline rather than re-arm the socket's timeout.
TIMEOUT_SLACK_S = 0.005

# How writing to a reused connection fails when Exchange closed it as idle just
# before the request went out.
_STALE_CONNECTION_ERRORS = (ConnectionResetError, BrokenPipeError)


@dataclass(frozen=True)
class UpstreamReply:
    """An HTTP answer from Exchange, fully read."""

    status: int
    content_type: str
    retry_after: str | None
    location: str | None
    body: bytes


class ExchangeTransport:
    """POST SOAP envelopes to one Exchange endpoint over pooled keep-alive connections.

    At most pool_size connections are kept idle; a burst beyond that opens extra
    connections and closes them after use instead of making threads queue.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        verify_tls: bool = True,
        ca_bundle: str | None = None,
        authorization: str | None = None,
        auth: UpstreamAuth | None = None,
        pool_size: int = 16,
    ) -> None:
        parts = urlsplit(url)
        default_port = 443 if parts.scheme == "https" else 80
        self._host = parts.hostname or ""
        self._port = parts.port or default_port
        self._host_field = http1.host_field(self._host, self._port, default_port)
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout_s = timeout_s
        self._tls = _tls_context(verify_tls, ca_bundle) if parts.scheme == "https" else None
        self._own_headers = {"User-Agent": "ews-call-gateway"}
        self._auth = auth or NoAuth(authorization)
        # A URL or credential that cannot be sent fails here, at start-up.
        http1.format_request(
            self._target, self._host_field, {**self._own_headers, **self._auth.headers()}, b""
        )
        self._pool_size = pool_size
        self._idle: list[socket.socket] = []
        self._idle_lock = threading.Lock()
        self._closed = False

    def post(
        self, body: bytes, headers: Mapping[str, str], *, deadline: float | None = None
    ) -> UpstreamReply:
        """Send one request and return the whole answer by the deadline, or raise a GatewayError."""
        deadline = time.monotonic() + seconds_left(deadline, self._timeout_s)
        try:
            reply, reused = self._exchange(body, headers, deadline, reuse=True)
            if reply.status == 401 and self._auth.renew(reused=reused):
                # A 401 was not acted on: once more with renewed credentials is safe.
                reply, _ = self._exchange(body, headers, deadline, reuse=False)
        except OSError as exc:
            raise translate_os_error(exc) from None
        return reply

    def _exchange(
        self, body: bytes, headers: Mapping[str, str], deadline: float, *, reuse: bool
    ) -> tuple[UpstreamReply, bool]:
        """Send the request on a kept connection, else on a new one (authenticated first).

        Returns Exchange's answer and whether it came on a kept connection.
        """
        request = self._request(body, {**headers, **self._auth.headers()})
        sock = self._send_on_idle(request, deadline) if reuse else None
        if sock is not None:
            return self._finish(sock, self._read(sock, deadline)), True
        sock = self._connect(deadline)
        if self._auth.per_connection:
            return self._authenticate(sock, body, headers, deadline), False
        _send(sock, request, deadline)
        return self._finish(sock, self._read(sock, deadline)), False

    def _authenticate(
        self, sock: socket.socket, body: bytes, headers: Mapping[str, str], deadline: float
    ) -> UpstreamReply:
        """Run the handshake on a new connection, the request carried by each leg."""

        def send_leg(authorization: str) -> http1.Answer:
            _send(sock, self._request(body, {**headers, "Authorization": authorization}), deadline)
            return self._read(sock, deadline)

        certificate = (
            sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        )
        try:
            answer = self._auth.handshake(send_leg, certificate)
        except BaseException:
            sock.close()
            raise
        return self._finish(sock, answer)

    def _request(self, body: bytes, headers: Mapping[str, str]) -> bytes:
        return http1.format_request(
            self._target, self._host_field, {**headers, **self._own_headers}, body
        )

    def close(self) -> None:
        """Close every idle connection; connections in use are closed when their call ends."""
        with self._idle_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def _take_idle(self) -> socket.socket | None:
        """Return the most recently used idle connection that is still sound, if any."""
        while True:
            # Last in, first out: the newest connection is the furthest from Exchange's
            # idle timeout, and the oldest ones age out unused.
            with self._idle_lock:
                if not self._idle:
                    return None
                sock = self._idle.pop()
            if not _is_dropped(sock):
                return sock
            sock.close()

    def _keep_idle(self, sock: socket.socket) -> None:
        with self._idle_lock:
            if not self._closed and len(self._idle) < self._pool_size:
                self._idle.append(sock)
                return
        sock.close()

    def _connect(self, deadline: float) -> socket.socket:
        """Open a new connection, TLS handshake included, in the time left."""
        sock = socket.create_connection((self._host, self._port), timeout=_time_left(deadline))
        try:
            # The request goes out in one write; waiting to coalesce it only adds delay.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                arm_timeout(sock, _time_left(deadline))
                sock = self._tls.wrap_socket(sock, server_hostname=self._host)
        except BaseException:
            sock.close()
            raise
        return sock

    def _send_on_idle(self, request: bytes, deadline: float) -> socket.socket | None:
        """Send on a reused connection; None if Exchange closed it before the request went out."""
        sock = self._take_idle()
        if sock is None:
            return None
        try:
            _send(sock, request, deadline)
        except _STALE_CONNECTION_ERRORS:
            # Nothing reached Exchange, so sending again on a new connection is safe, even
            # for PlayOnPhone. A connection dropped after the request went out is not
            # retried: Exchange may have acted on the request (and dialled).
            return None
        return sock

    def _read(self, sock: socket.socket, deadline: float) -> http1.Answer:
        """Read the whole answer by the deadline; any failure closes the connection."""

        def receive() -> bytes:
            # Re-armed before every read: a body trickling in must still end by the deadline.
            arm_timeout(sock, _time_left(deadline))
            return sock.recv(READ_CHUNK_BYTES)

        try:
            return http1.read_answer(receive, MAX_REPLY_BYTES)
        except BaseException:
            sock.close()
            raise

    def _finish(self, sock: socket.socket, answer: http1.Answer) -> UpstreamReply:
        """Keep the connection for the next request if the answer allows it."""
        if answer.reusable:
            self._keep_idle(sock)
        else:
            sock.close()
        return UpstreamReply(
            status=answer.status,
            content_type=answer.header("Content-Type") or "",
            retry_after=answer.header("Retry-After"),
            location=answer.header("Location"),
            body=answer.body,
        )


def _send(sock: socket.socket, request: bytes, deadline: float) -> None:
    """Write the request in the time left; a failure closes the connection."""
    try:
        arm_timeout(sock, _time_left(deadline))
        sock.sendall(request)
    except BaseException:
        sock.close()
        raise


def seconds_left(deadline: float | None, timeout_s: float) -> float:
    """Seconds left for this call: the request's deadline, never more than the timeout."""
    if deadline is None:
        return timeout_s
    remaining_s = min(timeout_s, deadline - time.monotonic())
    if remaining_s <= 0:
        raise UpstreamTimeout("no time was left to ask Exchange", outcome="timeout")
    return remaining_s


def _time_left(deadline: float) -> float:
    """Seconds until the deadline, to bound the next blocking step."""
    remaining_s = deadline - time.monotonic()
    if remaining_s <= 0:
        raise timed_out()
    return remaining_s


def arm_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound the next blocking step on sock to about this many seconds."""
    # Setting a timeout is a system call that lets other threads take the GIL; most
    # steps of a call start within microseconds of the last, so the timeout set
    # then still holds to within TIMEOUT_SLACK_S.
    armed = sock.gettimeout()
    if armed is None or abs(armed - seconds) > TIMEOUT_SLACK_S:
        sock.settimeout(seconds)


def _tls_context(verify_tls: bool, ca_bundle: str | None) -> ssl.SSLContext:
    """Build the TLS settings: Exchange's certificate and name checked, or nothing checked."""
    if verify_tls:
        return ssl.create_default_context(cafile=ca_bundle)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _is_dropped(sock: socket.socket) -> bool:
    """Tell whether Exchange closed an idle connection or sent on it unasked."""
    # Answers followed by unasked bytes are never kept, so only the socket can hold any.
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    # An idle connection has nothing to read: readable means closed, reset or garbage.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def translate_os_error(exc: OSError) -> GatewayError:
    """Turn a socket or TLS failure into the gateway error for it."""
    if isinstance(exc, TimeoutError):
        return timed_out()
    if isinstance(exc, ssl.SSLError):
        return tls_failed()
    return unreachable(exc)


def timed_out() -> UpstreamTimeout:
    return UpstreamTimeout("Exchange did not answer in time", outcome="timeout")


def tls_failed() -> UpstreamUnreachable:
    return UpstreamUnreachable("The TLS connection to Exchange failed", outcome="connection_error")


def unreachable(exc: BaseException) -> UpstreamUnreachable:
    """Say Exchange could not be reached, naming only the failure's class."""
    # Messages can quote the request, headers included.
    return UpstreamUnreachable(
        f"Exchange could not be reached ({type(exc).__name__})", outcome="connection_error"
    )
