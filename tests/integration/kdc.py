"""A KDC's listening sockets, for tests that play a KDC on loopback."""

from __future__ import annotations

import socket


def kdc_sockets() -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on one free loopback port, as a KDC listens."""
    for _ in range(20):
        stream = socket.create_server(("127.0.0.1", 0), backlog=64)
        datagrams = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            datagrams.bind(stream.getsockname())
        except OSError:
            datagrams.close()
            stream.close()
            continue
        return datagrams, stream
    raise RuntimeError("no loopback port free for both UDP and TCP")
