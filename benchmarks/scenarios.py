"""The four measurements: zero-latency throughput, a slow Exchange, low load, memory and start-up.

Every load is bounded in time (and the memory run also in count); the gateway
and the baseline are measured in the same run, in alternating rounds, so that
noise from other work on the machine falls on both.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from urllib.parse import quote
from xml.sax.saxutils import escape

from benchmarks import upstream
from benchmarks.bench import (
    BASELINE,
    GATEWAY,
    GATEWAY_EMBEDDED,
    WORKERS,
    Bench,
    Plan,
    settled_rss,
    wait_for_workers,
    worker_rss,
)
from benchmarks.load import Load, LoadResult
from benchmarks.processes import Service, child_pids, send

UPSTREAM = "upstream direct"
# Shaped like an Exchange phone-call id; the static upstream accepts any id.
STATIC_CALL_ID = "AAMkADBlbmNoLWNhbGwtMDAwMDAwMDAwMDAwMDAwMDAwMDAx"
PLACE_CALL = b'{"itemId": "AAMkADemoVoiceMail", "dialString": "+15551234567"}'
# The memory run stops here even if it has not reached its count.
MEMORY_TIME_CAP_S = 300

FULL = Plan(warmup_s=3, round_s=10, rounds=5, slow_s=10, low_load_s=5, memory_requests=100_000)
QUICK = Plan(warmup_s=1, round_s=2, rounds=1, slow_s=2, low_load_s=1, memory_requests=2_000)


@dataclass
class Memory:
    """Worker RSS (MiB) of the gateway at start and after the memory run."""

    requests: int
    at_start_mb: list[float]
    after_mb: list[float]
    recycled_workers: int
    errors: int = 0
    baseline_mb: list[float] = field(default_factory=list)


@dataclass
class Results:
    """Everything one run measured."""

    plan: Plan
    upstream: str
    generator: str
    throughput: dict[str, list[LoadResult]] = field(default_factory=dict)
    slow: dict[str, list[LoadResult]] = field(default_factory=dict)
    low_load: dict[str, list[LoadResult]] = field(default_factory=dict)
    memory: Memory | None = None
    gateway_ready_s: list[float] = field(default_factory=list)
    baseline_ready_s: list[float] = field(default_factory=list)
    # Redis commands per request the gateway answered in scenario 1's rounds (None: no Redis).
    redis_commands_per_request: float | None = None


def measure(bench: Bench) -> Results:
    """Run the four measurements and return what they found."""
    plan = bench.plan
    results = Results(plan=plan, upstream=bench.upstream_kind, generator=bench.generator)
    fast_upstream = bench.start_upstream()
    ews_url = fast_upstream.url + upstream.EWS_PATH
    gateway, baseline = bench.start_gateway(ews_url), bench.start_baseline(ews_url)
    targets = {GATEWAY: gateway, BASELINE: baseline}
    if bench.shared_state:
        targets[GATEWAY_EMBEDDED] = bench.start_gateway(ews_url, quotas_in_redis=False)
    results.gateway_ready_s += [targets[n].ready_s for n in targets if n != BASELINE]
    results.baseline_ready_s.append(baseline.ready_s)
    call_id = STATIC_CALL_ID if bench.upstream_kind == "nginx" else place_call(gateway)
    bench.say("1. zero-latency throughput")
    results.throughput = zero_latency(bench, targets, call_id, results)
    bench.say("3. low load")
    results.low_load = low_load(bench, targets, fast_upstream, call_id)
    baseline_mb = worker_rss(baseline)
    for service in targets.values():
        bench.stop(service)
    bench.say("2. slow Exchange")
    results.slow = slow_exchange(bench, results)
    bench.say("4. memory and start-up")
    results.memory = memory(bench, ews_url, call_id, results)
    results.memory.baseline_mb = baseline_mb
    return results


def zero_latency(
    bench: Bench, targets: dict[str, Service], call_id: str, results: Results
) -> dict[str, list[LoadResult]]:
    """Throughput and latency at `connections` against an upstream that answers at once.

    Also counts the Redis commands the rounds cost per request the gateway answered (only the
    gateway with quotas in Redis talks to it).
    """
    plan = bench.plan
    loads = {
        name: Load(service.url, "DELETE", _path(name, call_id), plan.connections, plan.round_s)
        for name, service in targets.items()
    }
    warm: list[int] = []
    measured = _alternating_rounds(
        bench, targets, loads, lambda: warm.append(bench.redis_commands())
    )
    if bench.shared_state:
        answered = sum(run.requests for run in measured[GATEWAY])
        commands = bench.redis_commands() - warm[0]
        results.redis_commands_per_request = commands / answered if answered else None
    return measured


def low_load(
    bench: Bench, targets: dict[str, Service], fast_upstream: Service, call_id: str
) -> dict[str, list[LoadResult]]:
    """Latency on one connection: through the gateway, the baseline, and to the upstream."""
    plan = bench.plan
    body = _disconnect_envelope(exchange_id(call_id))
    loads = {
        UPSTREAM: Load(fast_upstream.url, "POST", upstream.EWS_PATH, 1, plan.low_load_s, body),
        **{
            name: Load(service.url, "DELETE", _path(name, call_id), 1, plan.low_load_s)
            for name, service in targets.items()
        },
    }
    servers = {UPSTREAM: fast_upstream, **targets}
    measured: dict[str, list[LoadResult]] = {name: [] for name in loads}
    for _ in range(plan.rounds):
        for name, load in loads.items():
            measured[name].append(bench.load(load, servers[name]))
    return measured


def slow_exchange(bench: Bench, results: Results) -> dict[str, list[LoadResult]]:
    """Throughput at `slow_connections` against the simulator answering after `slow_latency_ms`."""
    simulator = bench.start_upstream(bench.plan.slow_latency_ms)
    ews_url = simulator.url + upstream.EWS_PATH
    gateway, baseline = bench.start_gateway(ews_url), bench.start_baseline(ews_url)
    results.gateway_ready_s.append(gateway.ready_s)
    results.baseline_ready_s.append(baseline.ready_s)
    # Hanging up twice succeeds twice in the simulator: one call serves every request.
    call_id = place_call(gateway)
    plan = bench.plan
    targets = {GATEWAY: gateway, BASELINE: baseline, UPSTREAM: simulator}
    loads = {
        name: Load(service.url, "DELETE", _path(name, call_id), plan.slow_connections, plan.slow_s)
        for name, service in targets.items()
        if name != UPSTREAM
    }
    # The simulator asked directly: the ceiling its own latency and CPU leave.
    loads[UPSTREAM] = Load(
        simulator.url,
        "POST",
        upstream.EWS_PATH,
        plan.slow_connections,
        plan.slow_s,
        _disconnect_envelope(exchange_id(call_id)),
    )
    measured = _alternating_rounds(bench, targets, loads)
    bench.stop(gateway)
    bench.stop(baseline)
    bench.stop(simulator)
    return measured


def _alternating_rounds(
    bench: Bench,
    targets: dict[str, Service],
    loads: dict[str, Load],
    warmed_up: Callable[[], object] = lambda: None,
) -> dict[str, list[LoadResult]]:
    """Warm every target up, call WARMED_UP, then measure `rounds` rounds of each in ABBA order."""
    plan = bench.plan
    for load in loads.values():
        bench.load(replace(load, duration_s=plan.warmup_s))
    warmed_up()
    measured: dict[str, list[LoadResult]] = {name: [] for name in loads}
    for round_number in range(plan.rounds):
        # ABBA order, so that a trend in background load does not favour either side.
        order = list(loads) if round_number % 2 == 0 else list(reversed(loads))
        for name in order:
            measured[name].append(bench.load(loads[name], targets[name]))
    return measured


def memory(bench: Bench, ews_url: str, call_id: str, results: Results) -> Memory:
    """Worker RSS of a fresh gateway at start and after `memory_requests` answers."""
    plan = bench.plan
    gateway = bench.start_gateway(ews_url)
    results.gateway_ready_s.append(gateway.ready_s)
    workers_at_start = wait_for_workers(gateway, WORKERS)
    at_start = settled_rss(gateway)
    chunk = Load(gateway.url, "DELETE", call_path(call_id), plan.connections, plan.round_s)
    # Bounded twice: by count (the point of the run) and by time (a stall must not hang it).
    deadline = time.monotonic() + MEMORY_TIME_CAP_S
    answered = errors = 0
    while answered < plan.memory_requests and time.monotonic() < deadline:
        result = bench.load(chunk)
        answered += result.requests
        errors += result.errors
    memory = Memory(
        requests=answered,
        errors=errors,
        at_start_mb=at_start,
        after_mb=worker_rss(gateway),
        recycled_workers=len(set(child_pids(gateway.process.pid)) - set(workers_at_start)),
    )
    bench.stop(gateway)
    return memory


def place_call(gateway: Service) -> str:
    """Place a call through the gateway (PlayOnPhone) and return its id."""
    answer = send("POST", gateway.url + "/calls", PLACE_CALL, "application/json")
    call_id: str = json.loads(answer)["callId"]
    return call_id


def median(values: list[float]) -> float:
    """Return the median, 0 for no values."""
    return statistics.median(values) if values else 0.0


def _disconnect_envelope(call_id: str) -> bytes:
    """The DisconnectPhoneCall envelope for a call, as a client of Exchange would send it."""
    return upstream.DISCONNECT_REQUEST.format(call_id=escape(call_id, {'"': "&quot;"})).encode()


def call_path(call_id: str) -> str:
    return "/calls/" + quote(call_id, safe="")


def exchange_id(call_id: str) -> str:
    """Return Exchange's id inside a call id the gateway signed (gw1.<owner>.<mac>.<EWS id>)."""
    return call_id.split(".", 3)[3] if call_id.startswith("gw1.") else call_id


def _path(target: str, call_id: str) -> str:
    """The gateway takes the id it issued; the baseline knows only Exchange's id."""
    return call_path(call_id if target == GATEWAY else exchange_id(call_id))
