"""Loopback addresses that never answer a connection, and a resolver that names them.

Test modules import the `silent_addresses` fixture from here.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest

from gateway.exchange import connector


class SilentAddress:
    """A loopback address whose SYNs go unanswered: a listener with a full accept queue."""

    def __init__(self, host: str, port: int) -> None:
        self._listener = socket.socket()
        self._listener.bind((host, port))
        self._listener.listen(0)
        self._fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex((host, port))
            self._fillers.append(filler)
        time.sleep(0.05)

    def close(self) -> None:
        for filler in self._fillers:
            filler.close()
        self._listener.close()


@pytest.fixture
def silent_addresses() -> Iterator[Callable[[str, int], SilentAddress]]:
    opened: list[SilentAddress] = []

    def open_silent(host: str, port: int) -> SilentAddress:
        opened.append(SilentAddress(host, port))
        return opened[-1]

    yield open_silent
    for silent in opened:
        silent.close()


def resolving_to(*hosts: str) -> connector.Resolver:
    """A resolver answering these loopback addresses, in order, for any name."""

    def resolve(_host: str, port: int) -> list[connector.Address]:
        return [(socket.AF_INET, (host, port)) for host in hosts]

    return resolve
