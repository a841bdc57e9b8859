"""Production serving: gunicorn, configured by the gateway itself.

`ews-gateway serve` runs this; each setting carries the reason for its value.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import secrets
import select
import selectors
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger
from gunicorn.http.errors import NoMoreData
from gunicorn.workers.gthread import TConn, ThreadWorker

from gateway.api.services import EXTENSION, ServiceState
from gateway.app import MAX_BODY_BYTES, build_check, caller_authenticator, create_app
from gateway.config import Config
from gateway.errors import ConfigError, GatewayError
from gateway.exchange.check import StepResult
from gateway.guards.dialing import DialPolicy
from gateway.guards.embeddedstore import EmbeddedStore
from gateway.serving import frontdoor
from gateway.telemetry import metrics, tracing
from gateway.telemetry.logs import LogLevels, configure_logging, logging_config

LOG = logging.getLogger("gateway")
RAM_DISK = Path("/dev/shm")  # noqa: S108 - only for heartbeat and metric files
# Seconds between EWS_TIMEOUT_SECONDS and gunicorn's worker timeout: an upstream
# timeout is always answered (504) before gunicorn would kill the worker.
WORKER_TIMEOUT_MARGIN_S = 20
# Seconds a stopping worker adds to EWS_TIMEOUT_SECONDS for its last answers to be written.
GRACEFUL_MARGIN_S = 5
# Above the idle timeouts of common load balancers (nginx 60 s, AWS ALB 60 s), so
# the balancer, not the gateway, closes idle connections and never races a reuse.
KEEPALIVE_S = 75
# Recycle a worker after about this many requests to bound slow leaks; the jitter
# keeps the workers of an instance from restarting all at once. A busy worker
# answers some 1,000 requests a second and a restart costs about half a second
# of CPU, so the bound is high; a worker's memory is flat over 100,000 requests
# (benchmarks/RESULTS.md).
# GATEWAY_MAX_REQUESTS overrides it; the jitter is always a tenth of the bound.
MAX_REQUESTS = 250_000
MAX_REQUESTS_JITTER_SHARE = 0.1
# Clients and balancers send the next request on a kept-alive connection within
# microseconds of an answer. The thread that answered waits this long for it,
# which spares two hand-offs through the worker's main thread (about a tenth of
# a request's CPU); then the connection goes back to the main thread's poller.
# A pipelined request already read is served at once, without waiting: that halves the
# worker's CPU per pipelined request (benchmarks/RESULTS.md).
NEXT_REQUEST_WAIT_S = 0.002
# What the main thread reads of one arriving request before a thread takes it over, whole or
# not (frontdoor.RequestArrival): a head of up to 64 KiB, far above real ones (a 12 KB bearer
# token included), and the largest body the app reads, twice over for chunked framing.
ARRIVAL_MAX_BYTES = 64 * 1024 + 2 * MAX_BODY_BYTES
# The most one read in the main thread takes off a connection at a time.
ARRIVAL_READ_BYTES = 64 * 1024
# How long, and for how many bytes, a closing connection reads what its client still sends.
CLOSE_LINGER_S = 1.0
CLOSE_LINGER_MAX_BYTES = 64 * 1024
# Seconds a stopping worker waits for its event streams to send their reconnect hint.
STREAMS_CLOSE_WAIT_S = 2.0
# What handle() returns for a connection the event stream pump took over.
HANDED_OFF = object()
# What handle() returns for a connection closing after its answer whose client may still be
# sending: the main thread reads and drops what comes (GatewayThreadWorker._linger).
CLOSING = object()


def default_workers() -> int:
    """One worker per usable core (at least two, so one crash never stops service)."""
    # The affinity mask, not os.cpu_count(), is what a CPU-pinned container may use.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(2, cores or 1)


def gunicorn_options(config: Config) -> dict[str, Any]:
    """Return gunicorn settings derived from the gateway's configuration."""
    max_requests = MAX_REQUESTS if config.max_requests is None else config.max_requests
    options: dict[str, Any] = {
        "bind": [config.bind],
        # gthread: a thread per in-flight request, so waiting on Exchange does not block others.
        "worker_class": GatewayThreadWorker,
        # Processes for the CPU work (XML, JSON); a crashed one is replaced, the others serve on.
        "workers": config.workers or default_workers(),
        # Requests mostly wait on Exchange, so a worker holds many at once.
        "threads": config.threads_per_worker,
        # Above the upstream deadline: a slow Exchange gets a 504, never a killed worker.
        "timeout": int(config.ews_timeout_s) + WORKER_TIMEOUT_MARGIN_S,
        # On SIGTERM, calls already waiting on Exchange get their whole deadline to finish.
        "graceful_timeout": int(config.ews_timeout_s) + GRACEFUL_MARGIN_S,
        # Longer than the balancer's idle timeout, so the balancer closes idle connections first.
        "keepalive": KEEPALIVE_S,
        # The worker refuses connections over GATEWAY_MAX_CONNECTIONS itself (closing them at
        # once); gunicorn's own bound, one above, would instead stop accepting, leaving every
        # new connection, probes included, queued in the kernel.
        "worker_connections": config.max_connections + 1,
        # What one request head may hold (frontdoor: fits large bearer tokens, bounds memory).
        "limit_request_line": frontdoor.LIMIT_REQUEST_LINE,
        "limit_request_fields": frontdoor.LIMIT_REQUEST_FIELDS,
        "limit_request_field_size": frontdoor.LIMIT_REQUEST_FIELD_SIZE,
        # The gateway is never mounted under a prefix: no peer, not even a proxy on the same
        # host (which gunicorn trusts), may move the path it routes on with SCRIPT_NAME or
        # PATH_INFO headers (such headers are dropped, as any with an underscore).
        "forwarder_headers": "",
        # Bound slow leaks; the jitter staggers the restarts.
        "max_requests": max_requests,
        "max_requests_jitter": int(max_requests * MAX_REQUESTS_JITTER_SHARE),
        # The app writes its own JSON access line with the request id; gunicorn's would repeat it.
        "accesslog": None,
        "errorlog": "-",
        "logger_class": GatewayLogger,
        # The gateway's levels and filters: no library's debug lines, credentials scrubbed.
        "loglevel": logging.getLevelName(_log_levels(config).server).lower(),
        "logconfig_dict": logging_config(_log_levels(config)),
        "proc_name": "ews-gateway",
        "child_exit": _worker_exited(config.metrics_dir),
        **_tracing_hooks(config),
    }
    if RAM_DISK.is_dir():
        # Heartbeat files on disk can stall a worker when the disk is slow.
        options["worker_tmp_dir"] = str(RAM_DISK)
    return options


class GatewayThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gthread worker that reads requests the gateway's way, drains before it stops and serves
    busy connections in one thread.

    Reading: each connection gets the gateway's parser (gateway.serving.frontdoor), which bounds a
    request's reading by one deadline, and a request refused before the app (limits, malformed
    HTTP, too slow) is answered as the gateway answers everything: problem+json, X-Request-ID,
    CORS, a metric and a log line.

    Draining: gunicorn's own gthread worker stops accepting at once but keeps its listening
    sockets open until its last request ends, so a client that connects meanwhile completes the
    handshake, sends its request and is then reset: a load balancer cannot tell whether a reset
    POST ran. This worker first accepts what the kernel already queued, then closes its
    listeners, so once every process of the instance has done so new connections are refused,
    which a balancer retries elsewhere, whatever the method.

    Busy connections: gthread passes a kept-alive connection from the thread that answered to
    the main thread's poller and back to a thread for each request. This worker lets the thread
    that answered serve the next request itself when it arrives within NEXT_REQUEST_WAIT_S,
    unless other connections are waiting for a thread or the worker is stopping; a pipelined
    request already read is served at once.

    Closing: after the last answer on a connection, the thread that answered sends FIN and
    drops what the client already sent; if the client has not closed its end yet, the main
    thread's poller reads and drops what it still sends for up to CLOSE_LINGER_S, then closes
    (RFC 9112 section 9.6), so neither a thread nor the main thread waits on a slow client.

    Accepting: a new connection waits in the main thread's poller until its first byte
    arrives (or GATEWAY_READ_TIMEOUT_SECONDS pass, and it is closed), as a kept-alive one does
    between requests, so a client that connects and says nothing holds no thread.

    Arriving: the main thread reads a request's bytes as they come, until the request is whole
    (frontdoor.RequestArrival), and only then hands it to a thread, so a client that trickles
    its head or body holds no thread either. One whose request is not whole
    GATEWAY_READ_TIMEOUT_SECONDS after its first byte goes to a thread then, which answers 408.
    Past
    GATEWAY_MAX_CONNECTIONS open connections in the worker, or
    GATEWAY_MAX_CONNECTIONS_PER_CLIENT from one address, a new connection is closed at once
    and counted (ews_gateway_connections_refused_total).
    """

    wsgi: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Connections handed to the thread pool that no thread has taken up yet.
        self._waiting_for_thread = 0
        self._waiting_lock = threading.Lock()
        # Open connections by client address; touched by the main thread only.
        self._by_client: Counter[str] = Counter()
        # Connections whose request is arriving, oldest first; touched by the main thread only.
        self._arriving: deque[Any] = deque()
        # Connections closing after their answer, oldest first; the main thread's too.
        self._closing: deque[Any] = deque()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self._flask = self.wsgi
        self.wsgi = self._closing_when_needed(self.wsgi)
        # What the app built at start (the EWS schema, routes, the clients) lives as long as the
        # worker: out of the collector's sight, a full collection no longer walks it on the
        # request path (25 ms of CPU each, every few thousand requests; benchmarks/RESULTS.md).
        gc.collect()
        gc.freeze()

    def _closing_when_needed(self, app: Any) -> Callable[[Any, Any], Any]:
        """Wrap APP so an answer says Connection: close when the connection cannot be reused.

        gunicorn decides keep-alive before the app runs, and drops a Connection header the app
        sets: a worker told to stop meanwhile, or a body that could not be read to its end,
        must still say close (RFC 9112 section 9.6). So must the answer to a body declared
        over the limit (413), and to one the app left unread that has not all arrived (a
        client told `100 Continue` sends it a round trip later): no thread waits for the rest
        of a body, which the closing connection's linger drops instead (RFC 9110 sections
        10.1.1 and 15.5.14 let the server close).
        """

        def serve(environ: Any, start_response: Any) -> Any:
            body = app(environ, start_response)
            response = start_response.__self__
            if (
                not self.alive
                or environ["wsgi.input"].failed
                or _declares_too_long_a_body(environ)
                or not _rest_of_body_here(response.req)
            ):
                response.force_close()
            return body

        return serve

    def accept(self, listener: Any) -> None:
        """Accept one connection and let it wait for its first byte in the poller."""
        self._end_late_lingers()  # they count against the limits until they end
        try:
            sock, client = listener.accept()
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        address = client[0] if isinstance(client, tuple) else str(client)
        config = self.app.config
        if self.nr_conns >= config.max_connections:
            self._refuse_connection(sock, "worker_limit")
            return
        if self._by_client[address] >= config.max_connections_per_client:
            self._refuse_connection(sock, "client_limit")
            return
        self.nr_conns += 1
        self._by_client[address] += 1
        conn = _Connection(
            self.cfg, sock, client, listener.getsockname(), counts=self._by_client, address=address
        )
        conn.timeout = time.monotonic() + config.read_timeout_s
        self.pending_conns.append(conn)
        self.poller.register(
            sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn)
        )

    def _refuse_connection(self, sock: socket.socket, reason: str) -> None:
        """Close a connection over a limit at once (a reset, so it holds no kernel state)."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        sock.close()
        self._flask.extensions[EXTENSION].metrics.connection_refused(reason)

    def murder_pending(self) -> None:
        waiting = list(self.pending_conns)
        super().murder_pending()
        self._forget_closed(waiting)
        self._hand_over_late_arrivals()
        self._end_late_lingers()

    def on_pending_socket_readable(self, conn: Any, client: Any) -> None:
        """A new connection's first bytes came: read them, and what follows, in this thread."""
        self._read_arriving(conn, self.pending_conns)

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        """A kept-alive connection's next request began: read it in this thread."""
        self._read_arriving(conn, self.keepalived_conns)

    def _read_arriving(self, conn: Any, waiting: deque[Any]) -> None:
        """Read what came of CONN's request (WAITING held CONN until its first bytes); hand
        the request to a thread once it is whole."""
        if conn.arrival is None:
            waiting.remove(conn)
            if conn.parser is None:
                conn.parser = self._parser_for(conn)
            _begin_arrival(conn)
            self._arriving.append(conn)
        if self._take_arrived(conn):
            self.poller.unregister(conn.sock)
            self._arriving.remove(conn)
            conn.data_ready = True
            self.enqueue_req(conn)

    def _parser_for(self, conn: Any) -> frontdoor.GatewayRequestParser:
        return frontdoor.GatewayRequestParser(
            self.cfg, conn.sock, conn.client, read_timeout_s=self.app.config.read_timeout_s
        )

    @staticmethod
    def _take_arrived(conn: Any) -> bool:
        """Buffer what came of CONN's request; return whether a thread should take it now (also
        when the connection ended or failed, which that thread then meets)."""
        try:
            data = conn.parser.unreader.read_arrived(ARRIVAL_READ_BYTES)
        except OSError:
            data = b""
        if data is None or (data and not conn.arrival.feed(data)):
            return False
        conn.arrival.hand_over()
        return True

    def _hand_over_late_arrivals(self) -> None:
        """Give each request still arriving past its deadline to a thread, which answers 408."""
        deadline = time.monotonic() - self.app.config.read_timeout_s
        while self._arriving and self._arriving[0].arrival.started <= deadline:
            conn = self._arriving.popleft()
            self.poller.unregister(conn.sock)
            conn.arrival.hand_over()  # all its time spent: the thread answers 408 at once
            conn.data_ready = True
            self.enqueue_req(conn)

    def _linger(self, conn: Any) -> None:
        """Read and drop what the client of a closing connection still sends, for a while."""
        conn.linger_until = time.monotonic() + CLOSE_LINGER_S
        conn.sock.setblocking(False)  # a timeout left on it would make a read here wait
        self._closing.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_closing, conn))

    def _on_closing(self, conn: Any, _sock: Any) -> None:
        done, dropped = _drop_what_came(conn.sock, conn.linger_left)
        conn.linger_left -= dropped
        if done:
            self._end_linger(conn)

    def _end_linger(self, conn: Any) -> None:
        self.poller.unregister(conn.sock)
        self._closing.remove(conn)
        conn.sock.close()
        self.nr_conns -= 1
        _forget(conn)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        # Wake when the next arriving request's deadline passes or a linger ends (murder_pending
        # then acts), not up to a second later.
        due = []
        if self._arriving:
            due.append(self._arriving[0].arrival.started + self.app.config.read_timeout_s)
        if self._closing:
            due.append(self._closing[0].linger_until)
        if due:
            timeout = max(0.0, min(timeout, min(due) - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)

    def _end_late_lingers(self) -> None:
        now = time.monotonic()
        while self._closing and self._closing[0].linger_until <= now:
            self._end_linger(self._closing[0])

    def _wait_for_rest(self, conn: Any) -> None:
        """Let the rest of a request that began to arrive in a thread arrive in the poller."""
        conn.sock.setblocking(False)
        self._arriving.append(conn)
        self.poller.register(
            conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn)
        )

    def murder_keepalived(self, force: bool = False) -> None:
        waiting = list(self.keepalived_conns)
        super().murder_keepalived(force)
        self._forget_closed(waiting)

    @staticmethod
    def _forget_closed(conns: list[Any]) -> None:
        for conn in conns:
            if conn.sock.fileno() == -1:
                _forget(conn)

    def enqueue_req(self, conn: Any) -> None:
        if conn.parser is None:
            conn.parser = self._parser_for(conn)
        with self._waiting_lock:
            self._waiting_for_thread += 1
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        with self._waiting_lock:
            self._waiting_for_thread -= 1
        keep_alive = self._serve_one(conn)
        # `True` only: gunicorn also returns False (close) and a marker (wait in the poller).
        while keep_alive is True and self._next_request_is_here(conn):
            keep_alive = self._serve_one(conn)
        streams = self.app.state.streams
        if keep_alive is False and streams is not None and streams.handed_off(conn.sock):
            return HANDED_OFF
        if keep_alive is False:
            dropped = _begin_close(conn.sock)
            if dropped is not None:
                conn.linger_left = CLOSE_LINGER_MAX_BYTES - dropped
                return CLOSING
        return keep_alive

    def _serve_one(self, conn: Any) -> Any:
        """Serve the request that arrived on CONN; its read deadline counts its arrival."""
        if conn.arrival is not None:
            conn.parser.unreader.spent_arriving = conn.arrival.spent
            conn.arrival = None
        return super().handle(conn)

    def finish_request(self, conn: Any, fs: Any) -> None:
        result = _result(fs)
        if result is HANDED_OFF:
            # An event stream: the pump writes, watches and closes it from now on.
            self.nr_conns -= 1
            _forget(conn)
            return
        if result is CLOSING:
            self._linger(conn)
            return
        if conn.sock.fileno() == -1:  # closed by the thread that answered: _begin_close
            self.nr_conns -= 1
            _forget(conn)
            return
        if self.alive and _partly_arrived(conn) and result is True:
            # Part of the next request came while the thread waited for it: the rest arrives
            # in the poller. (gunicorn would hand a connection with bytes read back at once.)
            self._wait_for_rest(conn)
            return
        conn.arrival = None
        super().finish_request(conn, fs)
        if conn.sock.fileno() == -1:  # gunicorn closed it
            _forget(conn)

    def run(self) -> None:
        super().run()
        streams = self.app.state.streams
        if streams is not None:
            # SIGTERM drained them already; a recycled worker (max_requests) does it here.
            streams.drain()
            streams.wait_closed(STREAMS_CLOSE_WAIT_S)

    def _next_request_is_here(self, conn: Any) -> bool:
        """Whether the next request on CONN is here whole, for this thread to serve it."""
        arrival = _begin_arrival(conn)
        pipelined = conn.parser.unreader.buf.getvalue()  # read along with the last request
        if pipelined and arrival.feed(pipelined):
            arrival.hand_over()
        if not self.alive or self._waiting_for_thread:
            return False
        if arrival.ready:
            return True
        return _readable_within(conn.sock, NEXT_REQUEST_WAIT_S) and self._take_arrived(conn)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        frontdoor.refuse(
            client,
            exc,
            req,
            cors_origins=self.app.config.cors_origins,
            metrics=self._flask.extensions[EXTENSION].metrics,
        )

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        # What the app left of a body was dropped before the answer went out, as far as it
        # had arrived (_rest_of_body_here); gunicorn's drain then only meets its end, and
        # never waits on a slow client.
        conn.parser.unreader.start_drain()
        try:
            return bool(super()._keepalive_after(conn, keepalive))
        except GatewayError:
            # Draining a body the app left unread failed (malformed, too slow) after the
            # answer went out: close the connection, never write a second answer.
            return False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # /readyz answers 503 from now on, also on connections that are already open;
        # event streams end with a hint to reconnect (to another instance).
        self.app.state.begin_draining()
        super().handle_exit(sig, frame)
        LOG.info(
            "draining: /readyz answers 503 and open requests finish before this worker exits",
            extra={"signal": signal.Signals(sig).name},
        )

    def set_accept_enabled(self, enabled: bool) -> None:
        if enabled or self.alive:
            super().set_accept_enabled(enabled)
            return
        # The main loop has ended (SIGTERM, max_requests, lost master): drain, then stop listening.
        super().set_accept_enabled(False)
        for listener in self.sockets:
            while _readable_within(listener, 0):
                self.accept(listener)
            listener.close()


class _Connection(TConn):  # type: ignore[misc]
    """A client connection counted among its client address's open ones until it ends."""

    def __init__(
        self, cfg: Any, sock: Any, client: Any, server: Any, *, counts: Counter[str], address: str
    ) -> None:
        super().__init__(cfg, sock, client, server)
        self._counts = counts
        self._address: str | None = address
        # The request arriving on this connection, while it does (GatewayThreadWorker).
        self.arrival: frontdoor.RequestArrival | None = None
        # Once it closes: until when, and how much more, what the client sends is dropped.
        self.linger_until = 0.0
        self.linger_left = CLOSE_LINGER_MAX_BYTES

    def forget(self) -> None:
        """Take the connection off its client's count (once; it ended or left for the pump)."""
        if self._address is None:
            return
        self._counts[self._address] -= 1
        if self._counts[self._address] <= 0:
            del self._counts[self._address]
        self._address = None


def _begin_arrival(conn: Any) -> frontdoor.RequestArrival:
    """Follow the next request on CONN, whose parser exists, from now on."""
    arrival = conn.arrival = frontdoor.RequestArrival(
        max_body=MAX_BODY_BYTES, max_bytes=ARRIVAL_MAX_BYTES
    )
    return arrival


def _declares_too_long_a_body(environ: dict[str, Any]) -> bool:
    """Whether the request's Content-Length (digits: gunicorn checked) is over the limit."""
    length: str = environ.get("CONTENT_LENGTH") or ""
    return len(length) > 18 or (length.isdigit() and int(length) > MAX_BODY_BYTES)


def _rest_of_body_here(request: Any) -> bool:
    """Drop what the app left unread of REQUEST's body, as far as it has arrived (64 KiB at
    most); return whether that was all of it, so that the connection may serve another."""
    request.unreader.start_drain()
    dropped = 0
    try:
        while dropped <= CLOSE_LINGER_MAX_BYTES:
            data = request.body.read(8192)
            if not data:
                return True
            dropped += len(data)
    except (GatewayError, NoMoreData, OSError):
        pass
    return False


def _result(fs: Any) -> Any:
    """What handle() returned for a connection; None if it raised or was cancelled."""
    return None if fs.cancelled() or fs.exception() is not None else fs.result()


def _partly_arrived(conn: Any) -> bool:
    """Whether some, not all, of the next request on CONN has been read ahead."""
    arrival = conn.arrival
    return arrival is not None and arrival.size > 0 and not arrival.ready


def _forget(conn: Any) -> None:
    """Take a connection that ended off its client's count (only ours are counted)."""
    if isinstance(conn, _Connection):
        conn.forget()


# SO_LINGER on with a zero timeout: close() sends a reset and frees the socket at once.
_RESET = struct.pack("ii", 1, 0)


class GatewayLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger without its access log: the gateway writes one line per request."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        """Skip gunicorn's access line (it would be built on every request, then dropped)."""


class GatewayServer(BaseApplication):  # type: ignore[misc]
    """gunicorn application that builds the gateway in each worker."""

    def __init__(self, config: Config, *, scratch_dirs: tuple[str, ...] = ()) -> None:
        self.config = config
        self._scratch_dirs = scratch_dirs
        self.state = ServiceState()
        super().__init__()

    def load_config(self) -> None:
        for key, value in gunicorn_options(self.config).items():
            self.cfg.set(key, value)
        if "control_socket_disable" in self.cfg.settings:
            # One shared control socket path would collide between instances on a host.
            self.cfg.set("control_socket_disable", True)
        if self._scratch_dirs:
            # Only the master runs on_exit: a worker exiting must not remove what its siblings
            # share (metric samples, the embedded store).
            self.cfg.set("on_exit", _remover(self._scratch_dirs))

    def load(self) -> Any:
        return create_app(self.config, state=self.state)


def serve(config: Config) -> int:
    """Run the gateway under gunicorn until it is told to stop; return the exit status.

    With GATEWAY_CHECK_AT_START, `ews-gateway check` runs first, and a failed check ends
    serve (status 1) before gunicorn starts: the instance never answers /readyz.
    """
    if config.dial_allow is None:
        raise ConfigError(
            "GATEWAY_DIAL_ALLOW is required: comma-separated patterns of the numbers callers "
            "may dial, e.g. +1555*,4??? (* alone allows every number)"
        )
    configure_logging(_log_levels(config))
    # Fail here, with one line and nothing left behind, rather than after five retries
    # to bind or in every worker after the port is bound.
    ensure_can_listen(config.bind, "GATEWAY_BIND")
    caller_authenticator(config)
    # Only after every refusal above: a configuration error stays the one line it says.
    LOG.info("ews-gateway starting", extra=config.summary())
    for warning in config.warnings:
        LOG.warning(warning)
    if config.gateway_auth == "none":
        LOG.warning(
            "GATEWAY_AUTH=none: any caller that reaches this port can place and hang up calls"
        )
    config = _check_guards(config)
    if config.ews_url.lower().startswith("https:") and not config.ews_verify_tls:
        LOG.warning(
            "EWS_VERIFY_TLS=false: Exchange's certificate is not checked, so anyone on the "
            "path can read the service credentials"
        )
    if config.check_at_start and not build_check(config).run(_log_check_step):
        LOG.error("GATEWAY_CHECK_AT_START: the check of Exchange failed; not starting")
        return 1
    metrics_dir = _fresh_metrics_dir(config.metrics_dir)
    # What serve made itself is removed at exit; a configured metrics dir is left for inspection.
    scratch_dirs = [metrics_dir] if config.metrics_dir is None else []
    master = os.getpid()
    try:
        metrics.share_across_processes(metrics_dir)
        # Without Redis, the instance's workers share one embedded store, made before they fork.
        state_dir = None if config.redis_url else _fresh_state_dir(config.state_root)
        scratch_dirs += [state_dir] if state_dir else []
        config = replace(config, metrics_dir=metrics_dir, state_dir=state_dir)
        GatewayServer(config, scratch_dirs=tuple(scratch_dirs)).run()
    finally:
        # gunicorn runs on_exit only after a clean start; a start that failed (the port
        # taken meanwhile) leaves here too. Workers, forked from this frame, leave it as well.
        if os.getpid() == master:
            for directory in scratch_dirs:
                shutil.rmtree(directory, ignore_errors=True)
    return 0


def _log_check_step(result: StepResult) -> None:
    """Log one step of the check at start: what passed, or what to change."""
    if result.passed:
        LOG.info("check: %s", result.sentence, extra={"checkStep": result.step})
    else:
        LOG.error("check failed: %s", result.sentence, extra={"checkStep": result.step})


def ensure_can_listen(bind: str, setting: str) -> None:
    """Raise ConfigError naming SETTING unless BIND (HOST:PORT, checked) can be listened on now."""
    host, _, port = bind.rpartition(":")
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise ConfigError(f"{setting}: cannot resolve {host!r} ({error.strerror})") from None
    with socket.socket(family, kind, protocol) as probe:
        # As gunicorn binds: a port in TIME_WAIT is free, one with a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise ConfigError(f"{setting}: cannot listen on {bind}: {error.strerror}") from None


def _check_guards(config: Config) -> Config:
    """Warn about settings that weaken the guards.

    Returns the config with a call id key every worker shares when none was configured.
    """
    if DialPolicy(config.dial_allow or ("*",)).allows_everything:
        LOG.warning("GATEWAY_DIAL_ALLOW allows every dial string (*): toll fraud is not limited")
    if config.redis_url is None:
        LOG.warning(
            "GATEWAY_REDIS_URL is not set: rate limits and idempotency keys are shared by this "
            "instance's workers (the embedded store), not across replicas"
        )
    if config.call_id_key:
        return config
    LOG.warning(
        "GATEWAY_CALL_ID_KEY is not set: call ids hold for this instance until it restarts; "
        "set the same key on every replica"
    )
    return replace(config, call_id_key=secrets.token_bytes(32))


def _fresh_metrics_dir(configured: str | None) -> str:
    """Return an empty directory for multiprocess metrics, wiping any old samples."""
    if configured is None:
        parent = RAM_DISK if RAM_DISK.is_dir() else None
        # The pid tells which process a directory belongs to (and which may be removed).
        return tempfile.mkdtemp(prefix=f"ews-gateway-metrics-{os.getpid()}-", dir=parent)
    path = Path(configured)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return str(path)


def _fresh_state_dir(parent: str | None) -> str:
    """Return a new private directory holding a new embedded store for this instance."""
    try:
        # The pid tells which process a directory belongs to; mkdtemp makes it private (0700).
        directory = tempfile.mkdtemp(prefix=f"ews-gateway-state-{os.getpid()}-", dir=parent)
    except OSError as error:
        where = parent or tempfile.gettempdir()
        raise ConfigError(
            f"GATEWAY_STATE_DIR: cannot create a directory in {where}: {error.strerror}"
        ) from None
    try:
        EmbeddedStore.create(directory)
    except ConfigError as error:
        shutil.rmtree(directory, ignore_errors=True)
        raise ConfigError(f"GATEWAY_STATE_DIR: {error}") from None
    return directory


def _worker_exited(metrics_dir: str | None) -> Callable[[Any, Any], None]:
    """Return the arbiter's child_exit hook: fold the dead worker's metric samples."""

    def fold(_server: Any, worker: Any) -> None:
        if metrics_dir is not None:
            metrics.fold_dead_worker(metrics_dir, worker.pid)

    return fold


def _tracing_hooks(config: Config) -> dict[str, Callable[..., None]]:
    """Start tracing in each worker after the fork; flush its spans when it exits."""
    if not config.tracing:
        return {}

    def start(_server: Any, _worker: Any) -> None:
        tracing.start_worker(config.trace_service_name)

    def stop(_server: Any, _worker: Any) -> None:
        tracing.stop_worker()

    return {"post_fork": start, "worker_exit": stop}


def _remover(directories: tuple[str, ...]) -> Callable[[Any], None]:
    def remove(_server: Any) -> None:
        for directory in directories:
            shutil.rmtree(directory, ignore_errors=True)

    return remove


def _begin_close(sock: socket.socket) -> int | None:
    """Send FIN after the answer and drop what the client already sent; close the connection
    if the client is done too. Return None if it is closed, else how many bytes were dropped,
    for the main thread to read what the client still sends.

    As RFC 9112 section 9.6 asks: unread bytes must not turn the close into a reset that can
    destroy the answer. gunicorn waits for them in the worker's main thread for up to 2 s,
    where a slow client would stall every other connection; here nothing waits.
    """
    with contextlib.suppress(OSError):  # the client is gone: nothing to send it
        sock.shutdown(socket.SHUT_WR)
    done, dropped = _drop_what_came(sock, CLOSE_LINGER_MAX_BYTES)
    if done:
        sock.close()
        return None
    return dropped


def _drop_what_came(sock: socket.socket, limit: int) -> tuple[bool, int]:
    """Read and drop, without waiting, what the client sent, up to LIMIT bytes.

    Returns whether the connection is done with (the client closed its end, the connection
    failed, or LIMIT bytes came) and how many bytes were dropped.
    """
    dropped = 0
    try:
        while dropped < limit:
            data = sock.recv(8192, socket.MSG_DONTWAIT)
            if not data:
                return True, dropped
            dropped += len(data)
    except BlockingIOError:
        return False, dropped
    except OSError:
        return True, dropped
    return True, dropped


def _readable_within(sock: Any, seconds: float) -> bool:
    """Whether SOCK has something to read (a request, or a connection to accept) in time."""
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(seconds * 1000))


def _log_levels(config: Config) -> LogLevels:
    return LogLevels.named(config.log_level, config.library_log_level)
