"""Where one gateway worker spends its CPU: a sampling profile under the benchmark's load.

    .venv/bin/python -m benchmarks.profiling              # 15 s of scenario 1's load
    .venv/bin/python -m benchmarks.profiling --seconds 30 --out profile/

`DELETE /calls/{callId}` at 16 keep-alive connections against the zero-latency upstream,
with the settings `benchmarks.run` uses (ownership, a dial policy, both quotas, in Redis
where redis-server is installed). py-spy samples one worker, counting only the thread that
holds the GIL, so the shares add up to the worker's own CPU; each sample is charged to the
innermost frame that belongs to one of CATEGORIES (a `json.dumps` called by the log
formatter counts as logging). Prints a Markdown table; `--out` keeps the raw stacks.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from benchmarks.bench import Bench, wait_for_workers
from benchmarks.load import Load, generator_name
from benchmarks.processes import BenchmarkError
from benchmarks.scenarios import FULL, STATIC_CALL_ID, call_path, place_call
from benchmarks.upstream import EWS_PATH, nginx_binary

# (category, path fragments of its frames), matched from the innermost frame outwards. py-spy
# names a frame `function (path/file.py:line)`, the path from the package's top directory.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "logging",
        ("(logging/", "(pythonjsonlogger/", "gateway/telemetry/logs.py", "gateway/guards/audit.py"),
    ),
    ("metrics", ("(prometheus_client/", "gateway/telemetry/metrics.py")),
    ("tracing", ("(opentelemetry/", "gateway/telemetry/tracing.py")),
    ("quotas", ("gateway/guards/quotas.py", "(limits/", "(redis/")),
    (
        "the call to Exchange",
        ("gateway/exchange/", "(httptools/", "(lxml/", "gateway/telemetry/exchange_calls.py"),
    ),
    ("Flask", ("(flask/", "(werkzeug/", "(flask_cors/", "gateway/api/", "gateway/guards/")),
    ("gunicorn", ("(gunicorn/", "gateway/serving/")),
)
OTHER = "other"


def categorize(stack: Sequence[str]) -> str:
    """Return the category of one sample, whose frames run from the outermost inwards."""
    for frame in reversed(stack):
        for name, fragments in CATEGORIES:
            if any(fragment in frame for fragment in fragments):
                return name
    return OTHER


def read_raw(path: Path) -> Counter[str]:
    """Read py-spy's raw (collapsed) output: `frame;frame;... count` per line."""
    shares: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            shares[categorize(stack.split(";"))] += int(count)
    return shares


def render(shares: Counter[str]) -> str:
    """Return a Markdown table of each category's share of the samples."""
    total = sum(shares.values()) or 1
    rows = ["| Where | Share of the worker's CPU |", "|---|---|"]
    for name, count in shares.most_common():
        rows.append(f"| {name} | {100 * count / total:.1f} % |")
    rows.append(f"| (samples) | {total} |")
    return "\n".join(rows)


def record(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    """Start py-spy sampling PID for SECONDS into OUT (raw format); return the process."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            "250",
            "--gil",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def profile(bench: Bench, seconds: int, out: Path) -> Counter[str]:
    """Load a fresh gateway as scenario 1 does and sample one of its workers."""
    fast_upstream = bench.start_upstream()
    gateway = bench.start_gateway(fast_upstream.url + EWS_PATH)
    call_id = STATIC_CALL_ID if bench.upstream_kind == "nginx" else place_call(gateway)
    load = Load(gateway.url, "DELETE", call_path(call_id), bench.plan.connections, seconds)
    bench.load(Load(load.base_url, load.method, load.path, load.connections, 3))  # warm-up
    worker = wait_for_workers(gateway, 2)[0]
    sampler = record(worker, seconds, out)
    bench.load(load, gateway)
    _, errors = sampler.communicate(timeout=seconds + 30)
    if sampler.returncode != 0:
        raise BenchmarkError(f"py-spy failed: {errors.decode(errors='replace')[-2000:]}")
    return read_raw(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiling", description=__doc__)
    parser.add_argument("--seconds", type=int, default=15, help="how long to sample")
    parser.add_argument("--out", type=Path, help="keep the raw stacks in this directory")
    args = parser.parse_args(argv)
    upstream_kind = "nginx" if nginx_binary() else "simulator"
    bench = Bench(FULL, generator_name("auto"), upstream_kind)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="gateway-profile-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        shares = profile(bench, args.seconds, out_dir / "worker.txt")
    except BenchmarkError as error:
        print(f"profile failed: {error}", file=sys.stderr)
        return 1
    finally:
        bench.close()
    print(render(shares))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
