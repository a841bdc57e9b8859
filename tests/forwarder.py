"""A loopback TCP forwarder for tests (not a test module): an address that can be repointed,
as a Kubernetes Service or a DNS name moves to a promoted replica, and that can forget idle
flows, as a NAT or load balancer does.

Repointing sends new connections to the new target only; open ones stay on the old node, as
established TCP flows do. A forgotten flow either goes silent (its bytes are dropped, nothing
is closed, so the peer waits out its own timeout) or is reset when its next byte arrives.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

Address = tuple[str, int]
POLL_S = 0.05


@dataclass
class _Flow:
    client: socket.socket
    server: socket.socket
    last_active: float = field(default_factory=time.monotonic)
    silent: bool = False

    def peer(self, sock: socket.socket) -> socket.socket:
        return self.server if sock is self.client else self.client


class Forwarder:
    """Forward 127.0.0.1:<port> to a target address on loopback, in one selector thread."""

    def __init__(self, target: Address) -> None:
        self.target = target
        self.forwarded_flows = 0
        self.forgotten_flows = 0
        self._forget_after_s: float | None = None
        self._reset = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._flows: dict[socket.socket, _Flow] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forwarder", daemon=True)
        self._thread.start()

    def forget_idle_flows(self, after_s: float, *, reset: bool = False) -> None:
        """Forget a flow once it has been idle AFTER_S: silently, or resetting it (RESET)."""
        self._forget_after_s = after_s
        self._reset = reset

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        for sock in list(self._flows):
            sock.close()
        self._listener.close()
        self._selector.close()

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stopped.is_set():
            for key, _ in self._selector.select(POLL_S):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                elif sock in self._flows:
                    self._relay(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self.target, timeout=1)
        except OSError:
            _reset(client)
            return
        flow = _Flow(client, server)
        for sock in (client, server):
            sock.setblocking(True)
            self._flows[sock] = flow
            self._selector.register(sock, selectors.EVENT_READ)
        self.forwarded_flows += 1

    def _relay(self, sock: socket.socket) -> None:
        flow = self._flows[sock]
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._end(flow, reset=False)
            return
        now = time.monotonic()
        idle_s = now - flow.last_active
        if not flow.silent and self._forget_after_s is not None and idle_s > self._forget_after_s:
            self.forgotten_flows += 1
            if self._reset:
                self._end(flow, reset=True)
                return
            flow.silent = True
        if flow.silent:
            return  # dropped on the floor: no answer, no close
        try:
            flow.peer(sock).sendall(data)
        except OSError:
            self._end(flow, reset=False)
            return
        flow.last_active = now

    def _end(self, flow: _Flow, *, reset: bool) -> None:
        for sock in (flow.client, flow.server):
            if self._flows.pop(sock, None) is not None:
                self._selector.unregister(sock)
            if reset:
                _reset(sock)
            else:
                sock.close()


def _reset(sock: socket.socket) -> None:
    """Close SOCK with a TCP reset (SO_LINGER on, zero seconds) rather than a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
