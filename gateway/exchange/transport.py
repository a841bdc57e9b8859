"""HTTP to Exchange: the only module that opens connections upstream.

ExchangeTransport speaks HTTP/1.1 itself (gateway.exchange.http1: llhttp reads the
answers) over a small pool of keep-alive connections shared by all threads.
Its one use, POST an envelope and read one answer, is small, and general
clients cost far more CPU on it than the exchange on the socket does: the
cheapest, http.client, about twice this transport's (benchmarks/RESULTS.md).

A connection carries another request only after a complete HTTP/1.1 answer
framed by its length or chunks, without Connection: close and with nothing
sent after it; anything irregular closes it. A connection idle longer than
idle_s (EWS_CONNECTION_IDLE_SECONDS) is closed, never reused: balancers and
NATs drop idle flows silently after a few minutes. TCP keepalive is on.

Redirects are never followed (Exchange redirects to an HTML error page). One
deadline bounds resolving the name, reaching any of its addresses (or the
proxy), the tunnel, the TLS handshake, sending, waiting for the answer and
reading its body, however slowly it trickles in. A request is sent again on a
new connection only when a reused one turns out closed: before the request
was written (always safe), or, for an idempotent operation, before any byte
of an answer came back. PlayOnPhone is never sent twice.

Authentication plugs in per connection (ExchangeAuthenticator): it sees each new
connection after TLS (its peer certificate, for channel binding), gives the
Authorization for each request and may answer a 401 on the same connection.

A ConnectTrace, when given, hears how each step of opening a connection ended
(name resolution, TCP, the proxy's tunnel, TLS) with the step's own result or
error, before the transport translates it: `ews-gateway check` names the step
that failed and why.
"""

from __future__ import annotations

import logging
import select
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, Protocol, TypeVar
from urllib.parse import urlsplit

from gateway import __version__
from gateway.errors import ExchangeOutcome, ExchangeTimeout, ExchangeUnreachable, GatewayError
from gateway.exchange import connector, http1
from gateway.exchange.proxy import Proxy

LOG = logging.getLogger("gateway.transport")
# EWS answers for the phone-call operations are a few kilobytes; anything far
# larger is not a real answer. Also the cap on a decompressed body.
MAX_REPLY_BYTES = 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024
StepT = TypeVar("StepT")
# How far a step may outlast the deadline rather than re-arm the socket's timeout.
TIMEOUT_SLACK_S = 0.005
# 401s an authenticator may answer on one connection: NTLM needs two round trips.
MAX_AUTH_ROUNDS = 3
USER_AGENT = f"ews-call-gateway/{__version__}"
# Exchange's diagnostic fields, logged with the request (Microsoft's EWS client guidance).
DIAGNOSTIC_FIELDS = ("request-id", "x-feserver", "x-beserver", "x-calculatedbetarget", "x-diaginfo")

# How a reused connection fails when Exchange (or a balancer) closed it as idle just
# as the request went out: on TLS, a close without close_notify is an EOF error.
_STALE_CONNECTION_ERRORS = (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError)


@dataclass(frozen=True)
class ExchangeReply:
    """An HTTP answer from Exchange, fully read (and decompressed)."""

    status: int
    content_type: str
    retry_after: str | None
    location: str | None
    body: bytes
    # Exchange's diagnostic fields that were present, by lower-case name.
    diagnostics: Mapping[str, str] = field(default_factory=dict)
    # The challenges of a 401 (the schemes Exchange offers), as Exchange sent them.
    www_authenticate: str | None = None


class ConnectStep(StrEnum):
    """The steps of opening a connection to Exchange, in their order."""

    RESOLVE = "resolve"
    CONNECT = "connect"
    TUNNEL = "proxy"
    TLS = "tls"


class ConnectTrace(Protocol):
    """Hears how each step of opening a connection ended (`ews-gateway check` reports them)."""

    def passed(self, step: ConnectStep, result: object) -> None:
        """The step succeeded with this result: the addresses, the socket, the TLS socket."""

    def failed(self, step: ConnectStep, error: BaseException) -> None:
        """The step raised this error, as raised (an OSError, an ssl.SSLError, a GatewayError)."""


class Connection:
    """One connection to Exchange, kept alive between requests."""

    __slots__ = ("auth_state", "deadline", "idle_since", "peer_certificate", "reused", "sock")

    def __init__(self, sock: Any, peer_certificate: bytes | None) -> None:
        self.sock = sock
        # Exchange's certificate (DER) on https: what tls-server-end-point binds to.
        self.peer_certificate = peer_certificate
        # Whatever the authenticator keeps for this connection (an NTLM context, say).
        self.auth_state: Any = None
        self.idle_since = time.monotonic()
        self.reused = False
        # The deadline (time.monotonic()) of the request the connection now carries: what an
        # authenticator asking a third party (the KDC) for it must keep to.
        self.deadline = 0.0

    def round_trip(self, request: bytes, deadline: float) -> http1.HttpAnswer:
        """Send one request and read its whole answer by the deadline.

        Raises _Stale when the connection turns out closed before any byte of an answer.
        """
        arm_timeout(self.sock, _time_left(deadline))
        try:
            self.sock.sendall(request)
        except _STALE_CONNECTION_ERRORS as error:
            raise _Stale(sent=False) from error
        received = False

        def receive() -> bytes:
            nonlocal received
            # Re-armed before every read: a body trickling in must still end by the deadline.
            arm_timeout(self.sock, _time_left(deadline))
            try:
                data: bytes = self.sock.recv(READ_CHUNK_BYTES)
            except _STALE_CONNECTION_ERRORS as error:
                if not received:
                    raise _Stale(sent=True) from error
                raise
            if not data and not received:
                raise _Stale(sent=True)
            received = True
            return data

        return http1.read_http_answer(receive, MAX_REPLY_BYTES)

    def close(self) -> None:
        self.sock.close()


class ExchangeAuthenticator(Protocol):
    """How the gateway proves itself to Exchange, per connection and per request."""

    def connected(self, connection: Connection, deadline: float) -> None:
        """Prepare a new connection (TLS done) before its first request."""

    def authorization(self, connection: Connection) -> str | None:
        """Return the Authorization value for the next request on this connection, if any."""

    def challenged(self, connection: Connection, answer: http1.HttpAnswer) -> str | None:
        """Answer a 401 on this connection with the Authorization to send the request again
        with, or None to give up (the 401 is then Exchange's answer)."""

    def answered(self, connection: Connection, answer: http1.HttpAnswer) -> None:
        """See the answer (not a 401) that ends the request; raise a GatewayError to refuse it."""


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
        authenticator: ExchangeAuthenticator | None = None,
        pool_size: int = 16,
        idle_s: float = 30.0,
        proxy: Proxy | None = None,
        resolver: connector.Resolver = connector.system_resolver,
        trace: ConnectTrace | None = None,
    ) -> None:
        parts = urlsplit(url)
        default_port = 443 if parts.scheme == "https" else 80
        host = parts.hostname or ""
        self._host = host if host.isascii() else http1.ascii_host(host)
        self._port = parts.port or default_port
        self._host_field = http1.host_field(self._host, self._port, default_port)
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout_s = timeout_s
        self._tls = _tls_context(verify_tls, ca_bundle) if parts.scheme == "https" else None
        self._proxy = proxy
        self._resolver = resolver
        self._trace = trace
        # return-client-request-id: Exchange echoes the client-request-id, for its logs and ours.
        own_headers = {
            "User-Agent": USER_AGENT,
            "Accept-Encoding": "identity",
            "return-client-request-id": "true",
        }
        if proxy is not None and self._tls is None:
            # Plain http through a proxy: the absolute URL, credentials on each request.
            self._target = f"http://{self._host_field}{self._target}"
            if proxy.authorization:
                own_headers["Proxy-Authorization"] = proxy.authorization
        if authorization:
            # The same on every request (basic, bearer): formatted with the other fields.
            own_headers["Authorization"] = authorization
        self._authenticator = authenticator
        # Checked and formatted once; a URL or credential that cannot be sent fails here.
        self._own_fields = http1.format_fields(own_headers)
        http1.format_request(self._target, self._host_field, {}, b"", checked=self._own_fields)
        self._pool_size = pool_size
        self._idle_s = idle_s
        self._idle: list[Connection] = []
        self._idle_lock = threading.Lock()
        self._closed = False

    def post(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        deadline: float | None = None,
        idempotent: bool = False,
    ) -> ExchangeReply:
        """Send one request and return the whole answer by the deadline, or raise a GatewayError.

        idempotent: the request may go again when a reused connection closes before
        any byte of its answer (GetPhoneCallInformation, DisconnectPhoneCall).
        """
        deadline = time.monotonic() + _before_sending(seconds_left, deadline, self._timeout_s)
        # Formatted before connecting: a header that cannot be sent never costs a connection.
        formatted = http1.format_request(
            self._target, self._host_field, headers, body, checked=self._own_fields
        )
        request = _Request(formatted, headers, body)
        try:
            answer = self._exchange(request, deadline, idempotent)
        except OSError as exc:
            raise translate_os_error(exc) from None
        if answer.status == 407 and self._proxy is not None and self._tls is None:
            # In absolute form a 407 is the proxy's (through a CONNECT tunnel, only Exchange
            # answers; the tunnel's own refusal is handled where it is asked for).
            raise ExchangeUnreachable(
                f"The proxy {self._proxy.address} refused the request to Exchange (HTTP 407)",
                outcome=ExchangeOutcome.CONNECTION_ERROR,
            )
        return _reply(answer)

    def close(self) -> None:
        """Close every idle connection; connections in use are closed when their call ends."""
        with self._idle_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _exchange(self, request: _Request, deadline: float, idempotent: bool) -> http1.HttpAnswer:
        """Ask on an idle connection, or a new one; again on a new one if the idle one was stale."""
        connection = self._take_idle()
        if connection is not None:
            try:
                return self._ask(connection, request, deadline)
            except _Stale as stale:
                # Exchange closed the idle connection as the request went out. Only a request
                # never written, or an idempotent one, may go again: Exchange may have acted
                # on the request (and dialled) before the connection dropped.
                if stale.sent and not idempotent:
                    raise _unanswered() from None
                LOG.debug("a reused connection to Exchange had closed; asking on a new one")
        connection = _before_sending(self._connect, deadline)
        try:
            return self._ask(connection, request, deadline)
        except _Stale:
            raise _unanswered() from None

    def _ask(self, connection: Connection, request: _Request, deadline: float) -> http1.HttpAnswer:
        """Send the request on this connection, answering authentication challenges on it."""
        try:
            authenticator = self._authenticator
            if authenticator is None:
                answer = connection.round_trip(request.formatted, deadline)
            else:
                answer = self._ask_authenticated(connection, request, authenticator, deadline)
        except BaseException:
            connection.close()
            raise
        if answer.reusable:
            self._keep_idle(connection)
        else:
            connection.close()
        return answer

    def _ask_authenticated(
        self,
        connection: Connection,
        request: _Request,
        authenticator: ExchangeAuthenticator,
        deadline: float,
    ) -> http1.HttpAnswer:
        """Send with the authenticator's Authorization; answer its 401s on the same connection."""
        connection.deadline = deadline
        authorization = authenticator.authorization(connection)
        for _ in range(MAX_AUTH_ROUNDS):
            answer = connection.round_trip(self._with(request, authorization), deadline)
            if answer.status != 401:
                # May end a handshake, or refuse it (an unreadable answer, a 400 to its token).
                authenticator.answered(connection, answer)
                return answer
            # Seen even on a closing connection: a refusal counts however the 401 came.
            try:
                authorization = authenticator.challenged(connection, answer)
            except GatewayError as error:
                # Exchange's answer was a 401, so EWS never acted on the request.
                error.upstream_status = answer.status
                raise
            if authorization is None or not answer.reusable:
                return answer
        return answer

    def _with(self, request: _Request, authorization: str | None) -> bytes:
        """Return the request's bytes carrying this Authorization."""
        if authorization is None:
            return request.formatted
        fields = {**request.fields, "Authorization": authorization}
        return http1.format_request(
            self._target, self._host_field, fields, request.body, checked=self._own_fields
        )

    def _take_idle(self) -> Connection | None:
        """Return the most recently used idle connection that is still sound, if any."""
        while True:
            # Last in, first out: the newest connection is the furthest from Exchange's
            # idle timeout, and the oldest ones age out unused.
            with self._idle_lock:
                expired = self._expire_idle()
                connection = self._idle.pop() if self._idle else None
            for old in expired:
                old.close()
            if connection is None:
                return None
            if not _is_dropped(connection.sock):
                connection.reused = True
                return connection
            connection.close()

    def _expire_idle(self) -> list[Connection]:
        """Take out the connections idle longer than idle_s, oldest first; lock held."""
        idle = self._idle
        oldest_allowed = time.monotonic() - self._idle_s
        if not idle or idle[0].idle_since >= oldest_allowed:
            return []  # the usual case: even the oldest is young enough
        count = 1
        while count < len(idle) and idle[count].idle_since < oldest_allowed:
            count += 1
        expired = idle[:count]
        del idle[:count]
        return expired

    def _keep_idle(self, connection: Connection) -> None:
        connection.idle_since = time.monotonic()
        with self._idle_lock:
            expired = self._expire_idle()
            keep = not self._closed and len(self._idle) < self._pool_size
            if keep:
                self._idle.append(connection)
        for old in expired:
            old.close()
        if not keep:
            connection.close()

    def _connect(self, deadline: float) -> Connection:
        """Open a new connection (proxy tunnel and TLS handshake included) in the time left."""
        proxy = self._proxy
        host, port = (proxy.host, proxy.port) if proxy else (self._host, self._port)
        addresses = self._step(
            ConnectStep.RESOLVE, lambda: connector.resolve(host, port, deadline, self._resolver)
        )
        sock: Any = self._step(
            ConnectStep.CONNECT, lambda: connector.connect_first(addresses, deadline)
        )
        try:
            connector.tune(sock)
            if proxy is not None and self._tls is not None:
                self._step(ConnectStep.TUNNEL, lambda: self._tunnel(sock, proxy, deadline))
            certificate = None
            if self._tls is not None:
                arm_timeout(sock, _time_left(deadline))
                sock = self._handshake(sock)
                certificate = sock.getpeercert(binary_form=True)
            connection = Connection(sock, certificate)
            connection.deadline = deadline
            if self._authenticator is not None:
                self._authenticator.connected(connection, deadline)
        except BaseException:
            sock.close()
            raise
        return connection

    def _step(self, step: ConnectStep, run: Callable[[], StepT]) -> StepT:
        """Run one step of opening a connection, telling the trace how it ended."""
        trace = self._trace
        if trace is None:
            return run()
        try:
            result = run()
        except BaseException as error:
            trace.failed(step, error)
            raise
        trace.passed(step, result)
        return result

    def _tunnel(self, sock: Any, proxy: Proxy, deadline: float) -> None:
        """Ask the proxy for a tunnel to Exchange; a refusal is a connection error."""
        name = f"[{self._host}]" if ":" in self._host else self._host
        try:
            status = connector.open_tunnel(
                sock, f"{name}:{self._port}", proxy.authorization, deadline
            )
        except connector.ProxyNotHttp:
            raise ExchangeUnreachable(
                f"The proxy {proxy.address} did not answer CONNECT in HTTP; is it an HTTP proxy?",
                outcome=ExchangeOutcome.CONNECTION_ERROR,
            ) from None
        if not 200 <= status < 300:
            # The proxy's address is safe to name; its credentials never are.
            raise ExchangeUnreachable(
                f"The proxy {proxy.address} refused the tunnel to Exchange (HTTP {status})",
                outcome=ExchangeOutcome.CONNECTION_ERROR,
            )

    def _handshake(self, sock: Any) -> ssl.SSLSocket:
        """Run the TLS handshake; a failure is logged with its reason."""
        tls = self._tls
        assert tls is not None
        try:
            return self._step(
                ConnectStep.TLS, lambda: tls.wrap_socket(sock, server_hostname=self._host)
            )
        except ssl.SSLError as error:
            reason = tls_reason(error)
            LOG.warning(
                "TLS handshake with Exchange failed",
                extra={"tlsReason": reason, "exchangeHost": self._host},
            )
            raise ExchangeUnreachable(
                f"The TLS connection to Exchange failed: {reason}",
                outcome=ExchangeOutcome.CONNECTION_ERROR,
            ) from None


class _Request(NamedTuple):
    """One request: its bytes (without an authenticator's Authorization), and their parts."""

    formatted: bytes
    fields: Mapping[str, str]
    body: bytes


class _Stale(Exception):
    """The connection closed before any byte of an answer; sent: whether the request went out."""

    def __init__(self, *, sent: bool) -> None:
        super().__init__("the connection closed before any answer")
        self.sent = sent


def _unanswered() -> ExchangeUnreachable:
    return ExchangeUnreachable(
        "Exchange closed the connection before answering", outcome=ExchangeOutcome.CONNECTION_ERROR
    )


def _reply(answer: http1.HttpAnswer) -> ExchangeReply:
    headers = answer.headers
    return ExchangeReply(
        status=answer.status,
        content_type=headers.get("content-type") or "",
        retry_after=headers.get("retry-after"),
        location=headers.get("location"),
        body=http1.decode_content(answer.body, headers.get("content-encoding"), MAX_REPLY_BYTES),
        diagnostics={name: headers[name] for name in DIAGNOSTIC_FIELDS if name in headers},
        www_authenticate=headers.get("www-authenticate") if answer.status == 401 else None,
    )


def seconds_left(deadline: float | None, timeout_s: float) -> float:
    """Seconds left for this call: the request's deadline, never more than the timeout."""
    if deadline is None:
        return timeout_s
    remaining_s = min(timeout_s, deadline - time.monotonic())
    if remaining_s <= 0:
        raise ExchangeTimeout("no time was left to ask Exchange", outcome=ExchangeOutcome.TIMEOUT)
    return remaining_s


def _time_left(deadline: float) -> float:
    """Seconds until the deadline, to bound the next blocking step."""
    remaining_s = deadline - time.monotonic()
    if remaining_s <= 0:
        raise timed_out()
    return remaining_s


def arm_timeout(sock: Any, seconds: float) -> None:
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


def _is_dropped(sock: Any) -> bool:
    """Tell whether Exchange closed an idle connection or sent on it unasked."""
    # Answers followed by unasked bytes are never kept, so only the socket can hold any.
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    # An idle connection has nothing to read: readable means closed, reset or garbage.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _before_sending(step: Callable[..., StepT], *args: Any) -> StepT:
    """Run a step that comes before any byte of the request is sent, and mark its failure so
    (GatewayError.before_sending): what failed there cannot have reached Exchange."""
    try:
        return step(*args)
    except OSError as exc:
        error = translate_os_error(exc)
    except GatewayError as failure:
        error = failure
    error.before_sending = True
    raise error


def tls_reason(error: ssl.SSLError) -> str:
    """Say why a TLS handshake failed: the certificate check's message, else OpenSSL's reason."""
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return f"certificate verify failed: {error.verify_message}"
    reason = error.reason or type(error).__name__
    return str(reason).replace("_", " ").lower()


def translate_os_error(exc: OSError) -> GatewayError:
    """Turn a socket or TLS failure into the gateway error for it."""
    if isinstance(exc, TimeoutError):
        return timed_out()
    if isinstance(exc, ssl.SSLError):
        return tls_failed()
    return unreachable(exc)


def timed_out() -> ExchangeTimeout:
    return ExchangeTimeout("Exchange did not answer in time", outcome=ExchangeOutcome.TIMEOUT)


def tls_failed() -> ExchangeUnreachable:
    return ExchangeUnreachable(
        "The TLS connection to Exchange failed", outcome=ExchangeOutcome.CONNECTION_ERROR
    )


def unreachable(exc: BaseException) -> ExchangeUnreachable:
    """Say Exchange could not be reached, naming only the failure's class."""
    # Messages can quote the request, headers included.
    return ExchangeUnreachable(
        f"Exchange could not be reached ({type(exc).__name__})",
        outcome=ExchangeOutcome.CONNECTION_ERROR,
    )
