"""Exchange, proxies and resolvers behaving badly, with real sockets on loopback.

Each test is a way a hostile or merely broken peer has made the transport
misbehave, with the right value.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway import connector
from gateway.errors import UpstreamTimeout
from tests.test_transport import ENVELOPE, EWS_PATH, REQUEST_HEADERS, Transports, transports

__all__ = ["transports"]  # fixtures, imported to be found by pytest


def resolver_threads() -> int:
    return sum(thread.name == "ews-resolver" for thread in threading.enumerate())


def test_calls_waiting_on_a_hung_resolver_share_one_lookup_thread(transports: Transports) -> None:
    # getaddrinfo cannot be interrupted: each call that gave up on a hung resolver used to
    # leave its own thread behind, piling up for as long as the resolver hung.
    released = threading.Event()
    asked: list[str] = []

    def hang(host: str, _port: int) -> list[connector.Address]:
        asked.append(host)
        released.wait(30)
        return []

    transport = transports(f"http://exchange.example.test{EWS_PATH}", timeout_s=0.2, resolver=hang)
    before = resolver_threads()

    def call() -> str:
        try:
            transport.post(ENVELOPE, REQUEST_HEADERS)
        except UpstreamTimeout as timeout:
            return timeout.outcome
        return "answered"

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            outcomes = list(pool.map(lambda _: call(), range(16)))
        outcomes += [call() for _ in range(4)]  # and one after another
        assert outcomes == ["timeout"] * 20
        assert asked == ["exchange.example.test"]
        assert resolver_threads() - before == 1
    finally:
        released.set()
    deadline = time.monotonic() + 5
    while resolver_threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert resolver_threads() == before


def test_a_name_is_resolved_afresh_once_the_lookup_under_way_has_ended(
    transports: Transports,
) -> None:
    # Sharing a lookup under way must not turn into caching its answer.
    asked: list[str] = []

    def nothing(host: str, _port: int) -> list[connector.Address]:
        asked.append(host)
        return []

    for _ in range(3):
        with pytest.raises(OSError):
            connector.resolve("exchange.example.test", 443, time.monotonic() + 1, nothing)
    assert asked == ["exchange.example.test"] * 3
