"""Measure the gateway against the hand-written baseline and print a Markdown report.

    .venv/bin/python -m benchmarks.run            # about 4 minutes
    .venv/bin/python -m benchmarks.run --quick    # a smoke run of about half a minute

Uses wrk and nginx where installed (`apt-get install wrk nginx`), else a Python
load generator and the EWS simulator. Only loopback ports are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from benchmarks.bench import Bench
from benchmarks.load import generator_name
from benchmarks.processes import BenchmarkError
from benchmarks.report import describe_machine, render
from benchmarks.scenarios import FULL, QUICK, Results, measure
from benchmarks.upstream import nginx_binary


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = _parser().parse_args(argv)
    generator = generator_name(args.generator)
    upstream_kind = args.upstream
    if upstream_kind == "auto":
        upstream_kind = "nginx" if nginx_binary() else "simulator"
    machine = describe_machine(generator, upstream_kind)
    gateway_env = dict(setting.split("=", 1) for setting in args.gateway_env)
    plan = QUICK if args.quick else FULL
    if gateway_env:
        machine["Extra gateway settings"] = " ".join(args.gateway_env)
    bench = Bench(plan, generator, upstream_kind, gateway_env=gateway_env)
    # SIGTERM (a CI timeout, `kill`) stops the servers too, like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = measure(bench)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmark interrupted", file=sys.stderr)
        return 130
    finally:
        bench.close(keep_logs=args.keep_logs)
        if args.keep_logs:
            print(f"logs kept in {bench.workdir}", file=sys.stderr)
    print(render(results, machine))
    if args.json:
        Path(args.json).write_text(
            json.dumps(_as_json(results, machine, gateway_env), indent=2) + "\n"
        )
    return 0


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark the EWS call gateway against a hand-written Flask + requests one.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 25 s")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--upstream", choices=("auto", "nginx", "simulator"), default="auto")
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra setting for the gateway, e.g. GATEWAY_THREADS=64 (repeatable)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    return parser


def _as_json(
    results: Results, machine: dict[str, str], gateway_env: dict[str, str]
) -> dict[str, object]:
    raw = dataclasses.asdict(results)
    raw["machine"] = machine
    raw["gateway_env"] = gateway_env
    return raw


if __name__ == "__main__":
    raise SystemExit(main())
