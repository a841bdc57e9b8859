"""New connections to Exchange: name resolution, racing its addresses, the proxy tunnel.

Everything here runs inside the caller's one deadline. The resolver runs in
a daemon thread and is waited for only as long as the deadline allows, since
getaddrinfo itself cannot be interrupted; calls waiting for the same name share
one such thread, so a resolver that hangs holds one thread, not one per call.
Addresses are tried as RFC 8305 (Happy Eyeballs v2) says: families
interleaved, the next attempt started 250 ms after the last one if none has
connected yet (or at once when one fails), the first to connect wins and the
rest are closed. So an address that drops SYNs costs the next one 250 ms, not
the whole deadline; under a deadline too short for that, the time left is shared.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable

from gateway.errors import ExchangeBadAnswer
from gateway.exchange import http1

# RFC 8305 section 5: the recommended Connection Attempt Delay.
ATTEMPT_DELAY_S = 0.25
# RFC 8305 section 5: the delay must not be less than 10 ms, to avoid congestion collapse.
MIN_ATTEMPT_DELAY_S = 0.01
# A proxy's answer to CONNECT is a status line and a few fields.
MAX_CONNECT_ANSWER_BYTES = 8 * 1024
# How every HTTP answer starts (RFC 9112 section 4).
_HTTP_VERSION = b"HTTP/"
# Keepalive probes on an idle or waiting connection: a peer that vanished
# (a balancer or NAT dropping the flow) is found within about 25 s, not 2 hours.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 3

Address = tuple[int, tuple[object, ...]]  # (family, sockaddr)
Resolver = Callable[[str, int], list[Address]]


def system_resolver(host: str, port: int) -> list[Address]:
    """Resolve with the system's resolver (getaddrinfo), TCP addresses only."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _type, _proto, _name, sockaddr in found]


def resolve(
    host: str, port: int, deadline: float, resolver: Resolver = system_resolver
) -> list[Address]:
    """Return host's addresses by the deadline, RFC 8305 ordered; raise TimeoutError or OSError."""
    literal = _literal(host, port)
    if literal is not None:
        return [literal]
    lookup = _lookup(host, port, resolver)
    if not lookup.done.wait(max(0.0, deadline - time.monotonic())):
        raise TimeoutError("name resolution did not finish in time")
    result = lookup.outcome
    if isinstance(result, BaseException):
        raise result
    if not result:
        raise socket.gaierror(socket.EAI_NONAME, "no addresses")
    return interleave_families(result)


class _Lookup:
    """One name resolution under way, shared by every call waiting for the same name."""

    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: list[Address] | BaseException = []


# Resolutions under way, by (resolver, host, port). getaddrinfo cannot be interrupted,
# so a thread asking a resolver that hangs outlives the calls that gave up on it: without
# sharing, every call to a name whose resolver hangs would leave one more thread behind.
_LOOKUPS: dict[tuple[Resolver, str, int], _Lookup] = {}
_LOOKUPS_LOCK = threading.Lock()


def _lookup(host: str, port: int, resolver: Resolver) -> _Lookup:
    """Return the resolution of host under way, starting one (in a daemon thread) if none is."""
    key = (resolver, host, port)
    with _LOOKUPS_LOCK:
        lookup = _LOOKUPS.get(key)
        if lookup is not None:
            return lookup
        lookup = _LOOKUPS[key] = _Lookup()

    def run() -> None:
        try:
            lookup.outcome = resolver(host, port)
        except BaseException as error:  # handed to the waiting threads
            lookup.outcome = error
        finally:
            with _LOOKUPS_LOCK:
                del _LOOKUPS[key]
            lookup.done.set()

    threading.Thread(target=run, name="ews-resolver", daemon=True).start()
    return lookup


def interleave_families(addresses: list[Address]) -> list[Address]:
    """Alternate address families, the resolver's first family first (RFC 8305 section 4)."""
    first_family = addresses[0][0]
    first = [address for address in addresses if address[0] == first_family]
    other = [address for address in addresses if address[0] != first_family]
    merged: list[Address] = []
    for index in range(max(len(first), len(other))):
        merged.extend(group[index] for group in (first, other) if index < len(group))
    return merged


def connect_first(addresses: list[Address], deadline: float) -> socket.socket:
    """Connect to whichever address answers first, starting attempts 250 ms apart."""
    selector = selectors.DefaultSelector()
    pending: dict[socket.socket, Address] = {}
    failures: list[OSError] = []
    next_index, next_start = 0, time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if next_index < len(addresses) and (now >= next_start or not pending):
                attempt = _start_attempt(addresses[next_index], failures)
                next_index += 1
                delay_s = attempt_delay(deadline - now, len(addresses) - next_index)
                next_start = now + delay_s if attempt is not None else now
                if attempt is not None:
                    selector.register(attempt, selectors.EVENT_WRITE, attempt)
                    pending[attempt] = addresses[next_index - 1]
                continue
            if not pending:
                raise failures[-1]
            wait_s = deadline - now
            if wait_s <= 0:
                raise TimeoutError("no address of Exchange accepted a connection in time")
            if next_index < len(addresses):
                wait_s = min(wait_s, next_start - now)
            for key, _events in selector.select(wait_s):
                ready: socket.socket = key.data
                selector.unregister(ready)
                del pending[ready]
                error = ready.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error == 0:
                    ready.setblocking(True)
                    return ready
                ready.close()
                failures.append(OSError(error, os.strerror(error)))
                next_start = time.monotonic()  # a failure starts the next attempt at once
    finally:
        for attempt in pending:
            attempt.close()
        selector.close()


def attempt_delay(time_left_s: float, addresses_left: int) -> float:
    """Seconds to give an attempt before starting the next: RFC 8305's 250 ms, or less.

    Under a deadline too short for 250 ms per address, the time left is shared with
    the addresses still untried (never below RFC 8305's floor of 10 ms), so a silent
    first address cannot leave a healthy one untried.
    """
    shared_s = time_left_s / (addresses_left + 1)
    return max(MIN_ATTEMPT_DELAY_S, min(ATTEMPT_DELAY_S, shared_s))


def tune(sock: socket.socket) -> None:
    """Send each request at once, and notice a peer that vanished while waiting or idle."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; other systems keep their defaults
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


def open_tunnel(
    sock: socket.socket, authority: str, proxy_authorization: str | None, deadline: float
) -> int:
    """Ask a proxy to CONNECT to authority (host:port); return the proxy's status.

    Reads exactly the proxy's answer head, so nothing of what Exchange sends
    through the tunnel is taken for it. Raises ProxyNotHttp for an answer that is not HTTP.
    """
    fields = {"Host": authority}
    if proxy_authorization:
        fields["Proxy-Authorization"] = proxy_authorization
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    sock.sendall(http1.format_connect(authority, fields))
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        if len(head) >= MAX_CONNECT_ANSWER_BYTES:
            break
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        # One byte at a time: the answer is short, and the tunnel's bytes follow it at once.
        byte = sock.recv(1)
        if not byte:
            raise ConnectionResetError(errno.ECONNRESET, "the proxy closed the connection")
        head += byte
        if len(head) <= len(_HTTP_VERSION) and not _HTTP_VERSION.startswith(head):
            # A TLS or SOCKS port, or an HTML page: refused now, as its end may never come.
            raise ProxyNotHttp
    try:
        return http1.read_connect_answer(bytes(head))
    except ExchangeBadAnswer:
        raise ProxyNotHttp from None


class ProxyNotHttp(Exception):
    """The proxy's answer to CONNECT is not an HTTP answer (or not one within its cap)."""


def _start_attempt(address: Address, failures: list[OSError]) -> socket.socket | None:
    """Start a non-blocking connection attempt; None (failure noted) if it failed at once."""
    family, sockaddr = address
    try:
        attempt = socket.socket(family, socket.SOCK_STREAM)
    except OSError as refused:
        # A family this host cannot open (IPv6 on a host booted without it): the next one.
        failures.append(refused)
        return None
    try:
        attempt.setblocking(False)
        error = attempt.connect_ex(sockaddr)
    except BaseException:
        attempt.close()
        raise
    if error in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
        return attempt
    attempt.close()
    failures.append(OSError(error, os.strerror(error)))
    return None


def _literal(host: str, port: int) -> Address | None:
    """Return the address of an IP literal without asking the resolver."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 6:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)
