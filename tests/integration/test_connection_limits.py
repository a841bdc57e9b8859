"""Client connections against real gunicorn: silent ones hold no thread, and limits refuse.

A client that connects and sends nothing must not take a worker's threads (a probe from
elsewhere is still answered); one that stays silent is closed after
GATEWAY_READ_TIMEOUT_SECONDS; past GATEWAY_MAX_CONNECTIONS_PER_CLIENT from one address, or
GATEWAY_MAX_CONNECTIONS in all, new connections are closed at once and counted.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.processes import Server, free_port, gateway_env, start

# Loopback addresses other than 127.0.0.1 stand for other clients (the kernel routes all
# of 127.0.0.0/8 to loopback).
ATTACKER = "127.0.0.1"
PROBE = "127.0.0.2"


def connect(server: Server, source: str) -> socket.socket:
    """Open a connection to SERVER from the loopback address SOURCE and send nothing."""
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0))


def get(server: Server, path: str, source: str, timeout_s: float) -> bytes:
    """Send GET PATH from SOURCE and return the whole answer (the connection is closed)."""
    with connect(server, source) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """Tell whether the peer closes (or resets) SOCK within WITHIN_S, having sent nothing."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def closed_at_once(server: Server, source: str) -> bool:
    """Connect from SOURCE and tell whether the gateway closes the connection at once (its
    reset may even arrive before connect() returns)."""
    try:
        sock = connect(server, source)
    except ConnectionResetError:
        return True
    with sock:
        return closed_by_peer(sock, within_s=2)


def refused_count(server: Server, reason: str) -> float:
    answer = get(server, "/metrics", PROBE, 5).decode()
    series = f'ews_gateway_connections_refused_total{{reason="{reason}"}}'
    for line in answer.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not exposed")


@pytest.fixture
def serve(simulator: Server, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def run(**extra: str) -> Server:
        port = free_port()
        env = gateway_env(
            simulator, port, GATEWAY_WORKERS="1", GATEWAY_THREADS="5", EWS_MAX_IN_FLIGHT="1"
        )
        env.update(extra)
        server = start(
            ["serve"], env, f"http://127.0.0.1:{port}", "/readyz", tmp_path / f"gw{port}.log"
        )
        started.append(server)
        return server

    yield run
    for server in started:
        server.stop()


def test_silent_connections_hold_no_thread_so_probes_are_answered(
    serve: Callable[..., Server],
) -> None:
    """Forty silent connections against a worker of five threads: probes still answer at once
    (gunicorn alone gives each new connection a thread for up to 5 s until its first byte)."""
    gateway = serve()
    with contextlib.ExitStack() as silent:
        for _ in range(40):
            silent.enter_context(connect(gateway, ATTACKER))
        time.sleep(0.2)  # every connection accepted and waiting
        for path in ("/livez", "/readyz", "/livez"):
            answer = get(gateway, path, PROBE, timeout_s=3)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_a_connection_that_stays_silent_is_closed_after_the_read_timeout(
    serve: Callable[..., Server],
) -> None:
    gateway = serve(GATEWAY_READ_TIMEOUT_SECONDS="1")
    with connect(gateway, ATTACKER) as sock:
        # The worker looks at waiting connections once a second: at most two seconds more.
        assert closed_by_peer(sock, within_s=4)
    # A client that speaks is served as before.
    assert get(gateway, "/livez", ATTACKER, timeout_s=3).startswith(b"HTTP/1.1 200")


def test_connections_past_the_per_client_limit_are_closed_at_once_and_counted(
    serve: Callable[..., Server],
) -> None:
    gateway = serve(GATEWAY_MAX_CONNECTIONS_PER_CLIENT="5")
    before = refused_count(gateway, "client_limit")
    with contextlib.ExitStack() as held:
        for _ in range(5):
            held.enter_context(connect(gateway, ATTACKER))
        time.sleep(0.2)
        assert closed_at_once(gateway, ATTACKER)
        # Another client is not affected by the first one's connections.
        assert get(gateway, "/livez", PROBE, timeout_s=3).startswith(b"HTTP/1.1 200")
        assert refused_count(gateway, "client_limit") == before + 1
    time.sleep(0.2)  # the five closed: the client's count is back to zero
    assert get(gateway, "/livez", ATTACKER, timeout_s=3).startswith(b"HTTP/1.1 200")


def test_connections_past_the_worker_limit_are_closed_at_once_and_counted(
    serve: Callable[..., Server],
) -> None:
    gateway = serve(GATEWAY_MAX_CONNECTIONS="4")
    before = refused_count(gateway, "worker_limit")
    time.sleep(0.2)  # the worker's main thread has counted the scrape's connection closed
    with contextlib.ExitStack() as held:
        for index in range(4):
            held.enter_context(connect(gateway, f"127.0.0.{10 + index}"))
        time.sleep(0.2)
        assert closed_at_once(gateway, "127.0.0.20")
    time.sleep(0.2)
    assert refused_count(gateway, "worker_limit") == before + 1
