"""Watchers: many event streams on one instance (GET /calls/{callId}/events).

    .venv/bin/python -m benchmarks.watchers            # 1,000 watchers of 100 calls, ~1 minute
    .venv/bin/python -m benchmarks.watchers --quick    # 100 watchers of 10 calls, ~25 s

One `serve` with two workers and the EWS simulator (its state changes every
STEP_S, its journal timing every poll). All watchers are read by one selector
thread here while a prober asks /livez 20 times a second. Reported: /livez
p50/p99 while they watch, Exchange polls per call per interval per worker (from
the simulator's journal), worker RSS, and the delay from the poll's answer to
the event on the watcher's socket (ews_gateway_event_delivery_seconds).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import resource
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from benchmarks.processes import (
    BenchmarkError,
    Service,
    child_pids,
    free_port,
    python_command,
    rss_mb,
    send,
    start_service,
)

POLL_S = 1.0
CALL_ID_IN_BODY = re.compile(r'PhoneCallId Id="([^"]+)"')
STATES = ("Connecting", "Alerted", "Connected", "Disconnected")


@dataclass(frozen=True)
class Plan:
    calls: int
    watchers: int
    step_s: float  # the simulator's time between a call's states


FULL = Plan(calls=100, watchers=1000, step_s=10.0)
QUICK = Plan(calls=10, watchers=100, step_s=4.0)


@dataclass(eq=False)
class Watcher:
    """One stream read by the shared selector: raw bytes in, states out."""

    sock: socket.socket
    call_id: str
    raw: bytearray = field(default_factory=bytearray)
    head_done: bool = False
    body: bytearray = field(default_factory=bytearray)
    states: list[str] = field(default_factory=list)
    ended: bool = False

    def feed(self, data: bytes) -> None:
        self.raw += data
        if not self.head_done:
            head, found, rest = bytes(self.raw).partition(b"\r\n\r\n")
            if not found:
                return
            if not head.startswith(b"HTTP/1.1 200"):
                raise BenchmarkError(f"a watch was refused: {head[:200]!r}")
            self.head_done, self.raw = True, bytearray(rest)
        self._dechunk()
        while b"\n\n" in self.body:
            event, _, rest = bytes(self.body).partition(b"\n\n")
            self.body = bytearray(rest)
            for line in event.decode().splitlines():
                if line.startswith("data: ") and b"event: state" in event:
                    self.states.append(json.loads(line[6:])["state"])

    def _dechunk(self) -> None:
        while True:
            size_line, found, rest = bytes(self.raw).partition(b"\r\n")
            if not found:
                return
            size = int(size_line, 16)
            if len(rest) < size + 2:
                return
            if size == 0:
                self.ended = True
            self.body += rest[:size]
            self.raw = bytearray(rest[size + 2 :])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the watcher scenario and print its Markdown report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.watchers", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100 watchers of 10 calls")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    _raise_file_limit(plan.watchers * 2 + 256)
    workdir = Path(tempfile.mkdtemp(prefix="ews-gateway-watchers-"))
    services: list[Service] = []
    try:
        report = _run(plan, workdir, services)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    finally:
        for service in reversed(services):
            service.stop()
    print(report)
    return 0


def _run(plan: Plan, workdir: Path, services: list[Service]) -> str:
    sim_port, gw_port = free_port(), free_port()
    simulator = start_service(
        "simulator",
        python_command(
            "-m",
            "gateway",
            "simulator",
            "--bind",
            f"127.0.0.1:{sim_port}",
            "--step-seconds",
            str(plan.step_s),
        ),
        url=f"http://127.0.0.1:{sim_port}",
        ready_path="/simulator/health",
        log_path=workdir / "simulator.log",
    )
    services.append(simulator)
    env = {
        "PATH": "/usr/bin:/bin",
        "EWS_URL": f"{simulator.url}/EWS/Exchange.asmx",
        "GATEWAY_AUTH": "none",
        "GATEWAY_DIAL_ALLOW": "*",
        # One caller places every watched call: a quota well above the plan's calls.
        "GATEWAY_RATE_LIMIT_CALLS": "10000/minute",
        "GATEWAY_BIND": f"127.0.0.1:{gw_port}",
        "GATEWAY_WORKERS": "2",
        "GATEWAY_EVENTS_POLL_SECONDS": str(POLL_S),
        # GATEWAY_AUTH=none: every watcher is the same caller.
        "GATEWAY_EVENTS_MAX_STREAMS_PER_CALLER": str(plan.watchers),
    }
    gateway = start_service(
        "gateway",
        python_command("-m", "gateway", "serve"),
        url=f"http://127.0.0.1:{gw_port}",
        ready_path="/readyz",
        log_path=workdir / "gateway.log",
        env=env,
    )
    services.append(gateway)
    call_ids = [_place_call(gateway) for _ in range(plan.calls)]
    send("DELETE", f"{simulator.url}/simulator/requests")
    watchers = [_open_watcher(gw_port, call_ids[n % plan.calls]) for n in range(plan.watchers)]
    probes: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=_probe_livez, args=(gateway.url, probes, stop), daemon=True)
    prober.start()
    started = time.time()
    reader = threading.Thread(target=_read_all, args=(watchers,), daemon=True)
    reader.start()
    time.sleep(plan.step_s * 2.5)  # Connecting, Alerted, Connected
    rss = [rss_mb(pid) or 0.0 for pid in child_pids(gateway.process.pid)]
    for call_id in call_ids:
        send("DELETE", f"{gateway.url}/calls/{quote(call_id, safe='')}")
    reader.join(timeout=plan.step_s + 30)
    watched_s = time.time() - started
    stop.set()
    prober.join(timeout=5)
    return _report(plan, watchers, probes, rss, _polls(simulator), watched_s, _delivery(gateway))


def _place_call(gateway: Service) -> str:
    body = json.dumps({"itemId": "AAMkBench", "dialString": "+15551234567"}).encode()
    answer = send("POST", f"{gateway.url}/calls", body, "application/json")
    call_id: str = json.loads(answer)["callId"]
    return call_id


def _open_watcher(port: int, call_id: str) -> Watcher:
    sock = socket.create_connection(("127.0.0.1", port))
    path = f"/calls/{quote(call_id, safe='')}/events"
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    sock.setblocking(False)
    return Watcher(sock, call_id)


def _read_all(watchers: list[Watcher]) -> None:
    selector = selectors.DefaultSelector()
    for watcher in watchers:
        selector.register(watcher.sock, selectors.EVENT_READ, watcher)
    open_count = len(watchers)
    while open_count:
        for key, _ in selector.select(timeout=60):
            watcher: Watcher = key.data
            data = watcher.sock.recv(65536)
            if data:
                watcher.feed(data)
                continue
            selector.unregister(watcher.sock)
            watcher.sock.close()
            open_count -= 1


def _probe_livez(url: str, probes: list[float], stop: threading.Event) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        send("GET", f"{url}/livez")
        probes.append(time.perf_counter() - started)
        time.sleep(0.05)


def _polls(simulator: Service) -> dict[tuple[str, str], list[float]]:
    """Arrival times of GetPhoneCallInformation by (call id, poller's request id)."""
    polls: dict[tuple[str, str], list[float]] = defaultdict(list)
    for seen in json.loads(send("GET", f"{simulator.url}/simulator/requests")):
        if seen["operation"] == "GetPhoneCallInformation":
            match = CALL_ID_IN_BODY.search(seen["body"])
            if match is not None:
                polls[(match[1], seen["requestId"])].append(seen["receivedAt"])
    return polls


def _delivery(gateway: Service) -> dict[str, float]:
    """ews_gateway_event_delivery_seconds: cumulative counts by bucket bound, and the sum."""
    buckets: dict[str, float] = {}
    for line in send("GET", f"{gateway.url}/metrics").decode().splitlines():
        if line.startswith("ews_gateway_event_delivery_seconds_"):
            name, value = line.rsplit(" ", 1)
            buckets[name.removeprefix("ews_gateway_event_delivery_seconds_")] = float(value)
    return buckets


def _report(  # noqa: PLR0917 - one call site, each figure its own argument
    plan: Plan,
    watchers: list[Watcher],
    probes: list[float],
    rss: list[float],
    polls: dict[tuple[str, str], list[float]],
    watched_s: float,
    delivery: dict[str, float],
) -> str:
    complete = sum(1 for w in watchers if w.ended and w.states == list(STATES))
    per_interval = max((_most_in_one_interval(times) for times in polls.values()), default=0)
    gaps = [b - a for times in polls.values() for a, b in itertools.pairwise(sorted(times))]
    quantiles = statistics.quantiles(probes, n=100) if len(probes) > 1 else [0.0] * 99
    pollers_per_call = max(
        (sum(1 for (call, _) in polls if call == c) for c in {c for c, _ in polls}), default=0
    )
    lines = [
        f"## Watchers: {plan.watchers} streams over {plan.calls} calls, one instance, 2 workers",
        "",
        "| Figure | Value |",
        "|---|---|",
        f"| Watchers that saw every state in order, then a clean end | "
        f"{complete} / {len(watchers)} |",
        f"| /livez p50 / p99 while watching ({len(probes)} probes) | "
        f"{quantiles[49] * 1000:.1f} ms / {quantiles[98] * 1000:.1f} ms |",
        f"| Exchange polls per call per interval per worker (most in any {POLL_S:g} s) | "
        f"{per_interval} |",
        f"| Shortest gap between one poller's polls | {min(gaps, default=0):.3f} s |",
        f"| Pollers per call (one per worker at most) | {pollers_per_call} |",
        f"| Polls in all, over {watched_s:.0f} s | {sum(len(t) for t in polls.values())} |",
        f"| Worker RSS while watching | {', '.join(f'{mb:.0f} MiB' for mb in rss)} |",
        f"| Event delay after the poll that saw it (histogram) | {_delivery_text(delivery)} |",
    ]
    return "\n".join(lines)


def _most_in_one_interval(times: list[float]) -> int:
    ordered = sorted(times)
    return max(
        (sum(1 for t in ordered[i:] if t - first < POLL_S) for i, first in enumerate(ordered)),
        default=0,
    )


def _delivery_text(delivery: dict[str, float]) -> str:
    count = delivery.get("count", 0.0)
    if not count:
        return "no events"
    bounds = sorted(
        (float(name.split('"')[1]), value)
        for name, value in delivery.items()
        if name.startswith("bucket") and "+Inf" not in name
    )
    p99 = next((bound for bound, seen in bounds if seen >= 0.99 * count), float("inf"))
    mean_ms = delivery.get("sum", 0.0) / count * 1000
    return f"{count:.0f} events, mean {mean_ms:.2f} ms, p99 at most {p99 * 1000:g} ms"


def _raise_file_limit(needed: int) -> None:
    """Let this process (and the gateway it starts) hold every watcher's socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


if __name__ == "__main__":
    raise SystemExit(main())
