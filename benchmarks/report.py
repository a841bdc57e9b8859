"""Describe the machine and render a run's results as Markdown tables, targets included."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from importlib import metadata

from benchmarks import redis_server
from benchmarks.bench import BASELINE, GATEWAY, GATEWAY_EMBEDDED
from benchmarks.load import LoadResult
from benchmarks.processes import REPO_ROOT
from benchmarks.scenarios import UPSTREAM, Results, median
from benchmarks.upstream import nginx_binary

PACKAGES = (
    "flask",
    "werkzeug",
    "zeep",
    "lxml",
    "urllib3",
    "requests",
    "gunicorn",
    "prometheus-client",
    "python-json-logger",
)
# The targets, each a ratio or a bound from one run.
TARGET_THROUGHPUT_RATIO = 1.8
TARGET_CPU_RATIO = 0.45
TARGET_SLOW_FRACTION = 0.97
TARGET_OVERHEAD_MS = 0.6
TARGET_RSS_MB = 80.0
TARGET_READY_S = 2.0


def describe_machine(generator: str, upstream_kind: str) -> dict[str, str]:
    """Return what a reader needs to compare this run with another."""
    packages = ", ".join(f"{name} {_version(name)}" for name in PACKAGES)
    return {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} cores",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "Packages": packages,
        "Load generator": _first_line(["wrk", "-v"]) if generator == "wrk" else "benchmarks.pyload",
        "Zero-latency upstream": _nginx_version() if upstream_kind == "nginx" else "simulator",
        "Gateway tree": _git_describe(),
        "Shared state": (
            f"redis-server {redis_server.version()} on loopback (GATEWAY_REDIS_URL): every "
            "gateway counts its quotas there, except the one named embedded store"
            if redis_server.redis_binary()
            else "none: redis-server is not installed, quotas are counted in the embedded store"
        ),
        "Load average (1, 5, 15 min) at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def render(results: Results, machine: dict[str, str]) -> str:
    """Return the whole report as Markdown."""
    plan = results.plan
    machine = machine | {
        "Load average (1, 5, 15 min) at end": " ".join(f"{x:.2f}" for x in os.getloadavg())
    }
    parts = [
        "## Machine",
        _table(["", ""], [[key, value] for key, value in machine.items()]),
        f"## 1. Zero-latency upstream ({results.upstream}), {plan.connections} connections, "
        f"{plan.rounds} alternating rounds of {plan.round_s} s after {plan.warmup_s} s warm-up",
        _throughput_table(results),
        f"## 2. Simulator at {plan.slow_latency_ms} ms, {plan.slow_connections} connections "
        f"(Little's law bound {_slow_bound(results):.0f}/s), {plan.rounds} alternating rounds "
        f"of {plan.slow_s} s after {plan.warmup_s} s warm-up",
        _slow_table(results),
        f"## 3. Low load: 1 connection, {plan.rounds} rounds of {plan.low_load_s} s",
        _low_load_table(results),
        "## 4. Memory and start-up",
        _memory_table(results),
        *(
            ["## Cost of quotas in Redis", _redis_cost_table(results)]
            if GATEWAY_EMBEDDED in results.throughput
            else []
        ),
        "## Targets",
        _targets_table(results),
    ]
    return "\n\n".join(parts) + "\n"


def _throughput_table(results: Results) -> str:
    base = _summary(results.throughput[BASELINE])
    rows = []
    for name in (BASELINE, GATEWAY, GATEWAY_EMBEDDED):
        runs = results.throughput.get(name)
        if not runs:
            continue
        summary = _summary(runs)
        rows.append(
            [
                name,
                f"{summary['rate']:.0f}",
                " / ".join(f"{run.rate:.0f}" for run in runs),
                f"{summary['p50']:.2f}",
                f"{summary['p99']:.2f}",
                f"{summary['cpu']:.3f}",
                _errors(runs),
                f"{summary['rate'] / base['rate']:.2f}",
                f"{summary['p99'] / base['p99']:.2f}",
                f"{summary['cpu'] / base['cpu']:.2f}" if base["cpu"] else "",
            ]
        )
    headers = ["system", "req/s (median)", "req/s per round", "p50 ms", "p99 ms"]
    headers += ["server CPU ms/req", "errors", "req/s ÷ baseline", "p99 ÷ baseline"]
    return _table([*headers, "CPU/req ÷ baseline"], rows)


def _slow_table(results: Results) -> str:
    bound = _slow_bound(results)
    rows = []
    for name in (GATEWAY, BASELINE, UPSTREAM):
        runs = results.slow.get(name, [])
        if not runs:
            continue
        summary = _summary(runs, rate=_ok_rate)
        rows.append(
            [
                name,
                f"{summary['rate']:.0f}",
                " / ".join(f"{run.ok_rate:.0f}" for run in runs),
                f"{100 * summary['rate'] / bound:.1f} %",
                f"{summary['p50']:.1f}",
                f"{summary['p99']:.1f}",
                f"{summary['cpu']:.3f}",
                _errors(runs),
            ]
        )
    headers = ["system", "2xx/s (median)", "2xx/s per round", "of bound", "p50 ms", "p99 ms"]
    return _table([*headers, "server CPU ms/req", "errors"], rows)


def _low_load_table(results: Results) -> str:
    direct = _summary(results.low_load[UPSTREAM])
    rows = []
    for name, runs in results.low_load.items():
        summary = _summary(runs)
        overhead = "" if name == UPSTREAM else f"{summary['p50'] - direct['p50']:.3f}"
        row = [name, f"{summary['p50']:.3f}", f"{summary['p99']:.3f}", overhead]
        rows.append([*row, f"{summary['cpu']:.3f}", _errors(runs)])
    headers = ["target", "p50 ms", "p99 ms", "p50 overhead ms", "server CPU ms/req", "errors"]
    return _table(headers, rows)


def _memory_table(results: Results) -> str:
    memory = results.memory
    assert memory is not None
    rows = [
        ["gateway worker RSS at ready (MiB)", _sizes(memory.at_start_mb)],
        [f"gateway worker RSS after {memory.requests} requests (MiB)", _sizes(memory.after_mb)],
        ["gateway workers recycled during that run (max_requests)", str(memory.recycled_workers)],
        ["errors during that run", str(memory.errors)],
        ["baseline worker RSS after its rounds (MiB)", _sizes(memory.baseline_mb)],
        ["gateway `serve` start to first 200 on /readyz (s)", _seconds(results.gateway_ready_s)],
        ["baseline start to first 200 on /healthz (s)", _seconds(results.baseline_ready_s)],
    ]
    return _table(["measure", "value"], rows)


def _redis_cost_table(results: Results) -> str:
    """The gateway counting quotas in Redis against itself counting them in its embedded store."""
    shared, local = (_summary(results.throughput[n]) for n in (GATEWAY, GATEWAY_EMBEDDED))
    low = {n: median([r.p50_ms for r in results.low_load[n]]) for n in (GATEWAY, GATEWAY_EMBEDDED)}
    rows = [
        ["zero-latency req/s (median)", f"{shared['rate']:.0f}", f"{local['rate']:.0f}"],
        ["zero-latency p99 ms", f"{shared['p99']:.2f}", f"{local['p99']:.2f}"],
        ["zero-latency server CPU ms/req", f"{shared['cpu']:.3f}", f"{local['cpu']:.3f}"],
        ["low-load p50 ms", f"{low[GATEWAY]:.3f}", f"{low[GATEWAY_EMBEDDED]:.3f}"],
    ]
    differences = [
        f"{shared['rate'] / local['rate']:.2f}x",
        f"{shared['p99'] / local['p99']:.2f}x",
        f"{shared['cpu'] - local['cpu']:+.3f} ms",
        f"{low[GATEWAY] - low[GATEWAY_EMBEDDED]:+.3f} ms",
    ]
    rows = [[*row, difference] for row, difference in zip(rows, differences, strict=True)]
    per_request = results.redis_commands_per_request
    commands = "" if per_request is None else f"{per_request:.3f}"
    rows.append(["Redis commands per request (scenario 1's rounds)", commands, "0", ""])
    return _table(
        ["measure", "quotas in Redis", "in the embedded store", "Redis against embedded"], rows
    )


def _targets_table(results: Results) -> str:
    base = _summary(results.throughput[BASELINE])
    gateway = _summary(results.throughput[GATEWAY])
    slow_runs = results.slow[GATEWAY]
    slow_rate = _summary(slow_runs, rate=_ok_rate)["rate"]
    slow_errors = sum(run.errors for run in slow_runs)
    overhead = median([r.p50_ms for r in results.low_load[GATEWAY]]) - median(
        [r.p50_ms for r in results.low_load[UPSTREAM]]
    )
    memory = results.memory
    assert memory is not None
    rss = max(memory.after_mb, default=0.0)
    ready = max(results.gateway_ready_s, default=0.0)
    checks = [
        (
            f"zero-latency req/s ≥ {TARGET_THROUGHPUT_RATIO}x baseline",
            f"{gateway['rate'] / base['rate']:.2f}x",
            gateway["rate"] >= TARGET_THROUGHPUT_RATIO * base["rate"],
        ),
        (
            f"server CPU per request ≤ {TARGET_CPU_RATIO}x baseline",
            f"{gateway['cpu'] / base['cpu']:.2f}x" if base["cpu"] else "not measured",
            bool(base["cpu"]) and gateway["cpu"] <= TARGET_CPU_RATIO * base["cpu"],
        ),
        (
            "zero-latency p99 no worse than baseline",
            f"{gateway['p99']:.2f} vs {base['p99']:.2f} ms",
            gateway["p99"] <= base["p99"],
        ),
        (
            f"slow Exchange ≥ {TARGET_SLOW_FRACTION:.0%} of bound, no errors",
            f"{slow_rate / _slow_bound(results):.1%}, {slow_errors} errors",
            slow_rate >= TARGET_SLOW_FRACTION * _slow_bound(results) and slow_errors == 0,
        ),
        (
            f"low-load p50 overhead ≤ {TARGET_OVERHEAD_MS:g} ms",
            f"{overhead:.3f} ms",
            overhead <= TARGET_OVERHEAD_MS,
        ),
        (f"worker RSS < {TARGET_RSS_MB:g} MiB", f"{rss:.1f} MiB", rss < TARGET_RSS_MB),
        (
            f"ready within {TARGET_READY_S:g} s",
            f"{ready:.2f} s (slowest start)",
            ready < TARGET_READY_S,
        ),
    ]
    rows = [[name, value, "met" if met else "NOT met"] for name, value, met in checks]
    return _table(["target", "this run", "verdict"], rows)


def _summary(
    runs: Sequence[LoadResult], rate: Callable[[LoadResult], float] | None = None
) -> dict[str, float]:
    """Median of each measure over the rounds."""
    return {
        "rate": median([rate(run) if rate else run.rate for run in runs]),
        "p50": median([run.p50_ms for run in runs]),
        "p99": median([run.p99_ms for run in runs]),
        "cpu": median([run.cpu_ms_per_request or 0.0 for run in runs]),
    }


def _ok_rate(run: LoadResult) -> float:
    return run.ok_rate


def _errors(runs: Sequence[LoadResult]) -> str:
    non2xx = sum(run.non2xx for run in runs)
    sockets = sum(run.socket_errors for run in runs)
    return f"{non2xx} non-2xx, {sockets} socket" if non2xx or sockets else "0"


def _slow_bound(results: Results) -> float:
    return results.plan.slow_connections / (results.plan.slow_latency_ms / 1000)


def _sizes(values: Sequence[float]) -> str:
    return ", ".join(f"{value:.1f}" for value in values) or "none"


def _seconds(values: Sequence[float]) -> str:
    if not values:
        return "none"
    listed = ", ".join(f"{value:.2f}" for value in values)
    return f"median {median(list(values)):.2f}, max {max(values):.2f} ({listed})"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _nginx_version() -> str:
    binary = nginx_binary()
    return _first_line([binary, "-v"]) if binary else "nginx"


def _git_describe() -> str:
    """Name the commit measured (with -dirty for uncommitted changes), or say it is unknown."""
    command = ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown (no git)"
    return done.stdout.strip() if done.returncode == 0 else "unknown (not a git checkout)"


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"
