"""Start and stop the simulator: in a background thread for tests, in the foreground for the CLI."""

from __future__ import annotations

import random
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

from gateway import wire
from gateway.simulator.acceptor import Acceptor, channel_binding_of
from gateway.simulator.calls import CallBook
from gateway.simulator.control import CONTROL_PREFIX
from gateway.simulator.deployment import Deployment
from gateway.simulator.documents import EwsDocuments
from gateway.simulator.exchange import FakeExchange
from gateway.simulator.faults import FaultBook
from gateway.simulator.handler import HttpServer
from gateway.simulator.idle import IdlePolicy
from gateway.simulator.journal import RequestJournal
from gateway.simulator.schema import EwsSchema

DEFAULT_BIND = "127.0.0.1:8081"
# Short enough that stop() returns promptly, long enough not to spin.
POLL_INTERVAL_S = 0.05
_BIND_EXAMPLE = "use HOST:PORT, e.g. 127.0.0.1:8081 or [::1]:8081"


@dataclass(frozen=True)
class TlsIdentity:
    """The simulator's certificate and key (PEM files), to serve https."""

    cert_path: str
    key_path: str

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


class SimulatorServer:
    """A fake Exchange EWS endpoint bound to a socket; stop() it when done."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency_ms: int = 0,
        step_seconds: float = 1.0,
        schema_dir: str | Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        chance: Callable[[], float] = random.random,
        mailbox_servers: int = 1,
        idle: IdlePolicy | None = None,
        acceptor: Acceptor | None = None,
        tls: TlsIdentity | None = None,
    ) -> None:
        def new_book() -> CallBook:
            return CallBook(step_seconds=step_seconds, clock=clock)

        deployment = Deployment(mailbox_servers, new_book) if mailbox_servers > 1 else None
        self.exchange = FakeExchange(
            calls=new_book(),
            faults=FaultBook(chance=chance),
            journal=RequestJournal(),
            schema=None if schema_dir is None else EwsSchema.load(schema_dir),
            latency_ms=latency_ms,
            deployment=deployment,
        )
        self.exchange.idle_policy = idle
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._scheme = "http" if tls is None else "https"
        self._httpd = HttpServer(
            (host, port),
            family,
            self.exchange,
            documents=EwsDocuments.load(schema_dir),
            acceptor=acceptor,
            tls=None if tls is None else tls.context(),
            channel_binding=None if tls is None else channel_binding_of(tls.cert_path),
        )
        self._lock = threading.Lock()
        self._looping = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Return the base URL, e.g. http://127.0.0.1:8081 (no path)."""
        host, port = str(self._httpd.server_address[0]), self._httpd.server_address[1]
        name = f"[{host}]" if ":" in host else host
        return f"{self._scheme}://{name}:{port}"

    @property
    def ews_url(self) -> str:
        """Return the EWS endpoint URL a client is configured with."""
        return self.url + wire.EWS_PATH

    def banner(self) -> str:
        """Return the loud start-up notice saying this is not a real Exchange server."""
        rule = "=" * 72
        return "\n".join(
            [
                rule,
                "  EWS SIMULATOR -- THIS IS NOT A REAL EXCHANGE SERVER",
                f"  Fake EWS endpoint: {self.ews_url}",
                f"  Control API:       {self.url}{CONTROL_PREFIX}",
                "  Calls live in memory only; nobody's phone will ring.",
                rule,
            ]
        )

    def start(self) -> SimulatorServer:
        """Serve in a background daemon thread and return self."""
        with self._lock:
            if self._stopped or self._looping:
                raise RuntimeError("the simulator is stopped or already serving")
            self._looping = True
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                args=(POLL_INTERVAL_S,),
                name=f"ews-simulator {self.url}",
                daemon=True,
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until stop() or an exception such as KeyboardInterrupt."""
        with self._lock:
            if self._stopped or self._looping:
                raise RuntimeError("the simulator is stopped or already serving")
            self._looping = True
        try:
            self._httpd.serve_forever(POLL_INTERVAL_S)
        finally:
            with self._lock:
                self._looping = False

    def stop(self) -> None:
        """Stop serving, release hanging answers and close the socket; safe to call twice."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            looping, thread = self._looping, self._thread
        self.exchange.faults.release_hangs()
        self._httpd.closing.set()
        if looping:
            self._httpd.shutdown()
        self._httpd.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> SimulatorServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_in_thread(
    host: str = "127.0.0.1",
    port: int = 0,
    latency_ms: int = 0,
    step_seconds: float = 1.0,
    schema_dir: str | Path | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    chance: Callable[[], float] = random.random,
    mailbox_servers: int = 1,
    idle: IdlePolicy | None = None,
) -> SimulatorServer:
    """Bind the simulator and serve it in a daemon thread; port 0 picks a free port."""
    server = SimulatorServer(
        host,
        port,
        latency_ms=latency_ms,
        step_seconds=step_seconds,
        schema_dir=schema_dir,
        clock=clock,
        chance=chance,
        mailbox_servers=mailbox_servers,
        idle=idle,
    )
    return server.start()


def serve_forever(
    bind: str = DEFAULT_BIND,
    latency_ms: int = 0,
    step_seconds: float = 1.0,
    schema_dir: str | Path | None = None,
    *,
    mailbox_servers: int = 1,
    idle: IdlePolicy | None = None,
    acceptor: Acceptor | None = None,
    tls: TlsIdentity | None = None,
) -> None:
    """Serve the simulator in the foreground until Ctrl-C or SIGTERM, after a loud banner."""
    host, port = parse_bind(bind)
    server = SimulatorServer(
        host,
        port,
        latency_ms=latency_ms,
        step_seconds=step_seconds,
        schema_dir=schema_dir,
        mailbox_servers=mailbox_servers,
        idle=idle,
        acceptor=acceptor,
        tls=tls,
    )
    print(server.banner(), file=sys.stderr, flush=True)
    restore_sigterm = _stop_on_sigterm()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("EWS simulator stopped.", file=sys.stderr, flush=True)
    finally:
        server.stop()
        restore_sigterm()


def parse_bind(bind: str) -> tuple[str, int]:
    """Split "HOST:PORT" or "[IPv6]:PORT"; raise ValueError naming the problem."""
    host, separator, port_text = bind.strip().rpartition(":")
    if not separator or not host:
        raise ValueError(f"bad bind address {bind!r}: {_BIND_EXAMPLE}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"bad bind address {bind!r}: put IPv6 hosts in brackets, {_BIND_EXAMPLE}")
    if not host:
        raise ValueError(f"bad bind address {bind!r}: the host is empty, {_BIND_EXAMPLE}")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"bad bind address {bind!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def _stop_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM stop the server like Ctrl-C; return how to undo that."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # Only the main thread may install signal handlers.

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore
