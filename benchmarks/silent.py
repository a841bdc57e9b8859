"""Probes while one client floods a gateway with connections that say nothing, or trickle.

    .venv/bin/python -m benchmarks.silent            # 100 connections a second for 20 s
    .venv/bin/python -m benchmarks.silent --rate 200 --seconds 10
    .venv/bin/python -m benchmarks.silent --trickle  # each sends a head, a byte a second

One `serve` (2 workers, the defaults otherwise) behind no balancer: an attacker on 127.0.0.1
opens RATE connections a second and sends nothing (each stays open until the gateway closes
it), or with --trickle the start of a request head and then one more byte of it every
second (a slowloris; each gets 408 after GATEWAY_READ_TIMEOUT_SECONDS), while a prober on
127.0.0.2 asks `/livez` and `/readyz` 20 times a second each, on a new connection every time.
Prints the probes' p50/p99/max and how many failed; the target (issue 25) is p99 under
100 ms. Only loopback addresses are used, and both loops stop by themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence

from benchmarks.bench import Bench
from benchmarks.load import generator_name
from benchmarks.scenarios import QUICK
from benchmarks.upstream import EWS_PATH, nginx_binary

ATTACKER = "127.0.0.1"
PROBER = "127.0.0.2"
PROBES_PER_SECOND = 20
PROBE_TIMEOUT_S = 5.0
# What a trickling connection sends at once, then a byte of its padding every TRICKLE_S.
TRICKLE_START = b"GET /livez HTTP/1.1\r\nHost: gw\r\nX-Padding: "
TRICKLE_S = 1.0


def flood(
    host: str, port: int, rate: int, seconds: float, *, held: list[socket.socket], first: bytes
) -> int:
    """Open RATE connections a second for SECONDS, each sending FIRST; keep them in HELD;
    return refusals."""
    refused = 0
    started = time.monotonic()
    for index in range(int(rate * seconds)):
        time.sleep(max(0.0, started + index / rate - time.monotonic()))
        try:
            sock = socket.create_connection((host, port), 1, source_address=(ATTACKER, 0))
            sock.sendall(first)
        except OSError:
            refused += 1
            continue
        held.append(sock)
    return refused


def trickle(held: list[socket.socket], stop: threading.Event) -> None:
    """Send each connection in HELD one more byte every TRICKLE_S until STOP is set."""
    while not stop.wait(TRICKLE_S):
        for sock in list(held):
            with contextlib.suppress(OSError):  # answered 408 and closed meanwhile
                sock.send(b"a", socket.MSG_DONTWAIT)


def probe(host: str, port: int, path: str) -> float | None:
    """Return the seconds one GET PATH took from a fresh connection, or None if it failed."""
    started = time.perf_counter()
    try:
        with socket.create_connection(
            (host, port), PROBE_TIMEOUT_S, source_address=(PROBER, 0)
        ) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
    except OSError:
        return None
    return time.perf_counter() - started if answer.startswith(b"HTTP/1.1 200") else None


def measure(
    host: str, port: int, rate: int, seconds: float, *, trickling: bool = False
) -> dict[str, object]:
    """Flood (silent or TRICKLING connections) and probe at once; return the probes'
    latencies in milliseconds."""
    held: list[socket.socket] = []
    refusals: list[int] = []
    first = TRICKLE_START if trickling else b""
    attacker = threading.Thread(
        target=lambda: refusals.append(flood(host, port, rate, seconds, held=held, first=first)),
        daemon=True,
    )
    attacker.start()
    stop = threading.Event()
    trickler = threading.Thread(target=trickle, args=(held, stop), daemon=True)
    if trickling:
        trickler.start()
    latencies: list[float] = []
    failed = 0
    started = time.monotonic()
    for index in range(int(PROBES_PER_SECOND * seconds)):
        time.sleep(max(0.0, started + index / PROBES_PER_SECOND - time.monotonic()))
        for path in ("/livez", "/readyz"):
            took = probe(host, port, path)
            if took is None:
                failed += 1
            else:
                latencies.append(took * 1000)
    attacker.join()
    stop.set()
    if trickling:
        trickler.join()
    for sock in held:
        sock.close()
    latencies.sort()
    return {
        "probes": len(latencies) + failed,
        "failed": failed,
        "p50_ms": statistics.median(latencies) if latencies else None,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] if latencies else None,
        "max_ms": latencies[-1] if latencies else None,
        "connections": len(held),
        "refused_connections": refusals[0] if refusals else 0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.silent", description=__doc__)
    parser.add_argument("--rate", type=int, default=100, help="silent connections a second")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the flood lasts")
    parser.add_argument(
        "--trickle", action="store_true", help="connections trickle a request head (slowloris)"
    )
    args = parser.parse_args(argv)
    upstream_kind = "nginx" if nginx_binary() else "simulator"
    bench = Bench(QUICK, generator_name("auto"), upstream_kind)
    try:
        gateway = bench.start_gateway(bench.start_upstream().url + EWS_PATH)
        host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
        result = measure(host, int(port), args.rate, args.seconds, trickling=args.trickle)
    finally:
        bench.close()
    kind = "trickling" if args.trickle else "silent"
    how = f" (a head byte every {TRICKLE_S:g} s)" if args.trickle else ""
    print(f"{args.rate} {kind} connections{how} a second for {args.seconds:g} s from {ATTACKER}; ")
    print(f"/livez and /readyz from {PROBER}, {PROBES_PER_SECOND} a second each:\n")
    print(f"| probes | failed | p50 ms | p99 ms | max ms | {kind} connections held |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {result['probes']} | {result['failed']} | {result['p50_ms']:.1f} "
        f"| {result['p99_ms']:.1f} | {result['max_ms']:.1f} | {result['connections']} |"
    )
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
