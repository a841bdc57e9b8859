"""The benchmark harness: a quick run measures the gateway and the baseline and reports both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import profiling
from benchmarks.redis_server import redis_binary

ROOT = Path(__file__).resolve().parent.parent
QUICK_RUN_TIMEOUT_S = 600


def quick_run(tmp_path: Path, *options: str) -> tuple[str, dict[str, Any]]:
    """Run `python -m benchmarks.run --quick`; return its report and its raw results."""
    raw_path = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--json", str(raw_path), *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=QUICK_RUN_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout, json.loads(raw_path.read_text())


def fast_upstream_loads(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Every load run against the zero-latency upstream (scenarios 1 and 3)."""
    loads: list[dict[str, Any]] = []
    for runs in [*raw["throughput"].values(), *raw["low_load"].values()]:
        loads += runs
    return loads


@pytest.mark.network
@pytest.mark.parametrize(
    "options",
    [
        pytest.param((), id="wrk-and-nginx-where-installed"),
        pytest.param(("--generator=python", "--upstream=simulator"), id="python-only"),
    ],
)
def test_a_quick_run_reports_both_systems_in_every_scenario_without_errors(
    tmp_path: Path, options: tuple[str, ...]
) -> None:
    """Against the fast upstream every request succeeds; against the slow one, every one is
    answered (how many are 2xx there is a measurement the report shows, like the timings)."""
    report, raw = quick_run(tmp_path, *options)

    for heading in ("## Machine", "## 1.", "## 2.", "## 3.", "## 4.", "## Targets"):
        assert heading in report
    assert report.count("| gateway |") == 3  # throughput, slow Exchange, low load
    assert report.count("| baseline |") == 3
    assert "| upstream direct |" in report
    # With redis-server, the gateways count quotas in Redis, and one in its embedded store
    # shows the cost.
    embedded = {"gateway, embedded store"} if redis_binary() else set()
    assert set(raw["throughput"]) == {"gateway", "baseline"} | embedded
    assert set(raw["low_load"]) == {"gateway", "baseline", "upstream direct"} | embedded
    assert ("## Cost of quotas in Redis" in report) == bool(embedded)
    if embedded:
        # Leases: far fewer Redis commands than requests (one per request without them).
        assert 0 < raw["redis_commands_per_request"] < 0.5
    assert set(raw["slow"]) == {"gateway", "baseline", "upstream direct"}
    loads = fast_upstream_loads(raw)
    assert all(load["requests"] > 0 for load in loads)
    assert [load for load in loads if load["non2xx"] or load["socket_errors"]] == []
    slow = [load for rounds in raw["slow"].values() for load in rounds]
    assert all(load["requests"] > 0 and load["socket_errors"] == 0 for load in slow)
    assert raw["memory"]["requests"] >= raw["plan"]["memory_requests"]
    assert raw["memory"]["errors"] == 0
    assert len(raw["memory"]["after_mb"]) == 2


def test_a_profile_sample_counts_for_the_innermost_frame_of_a_known_part(tmp_path: Path) -> None:
    """json.dumps under the log formatter is logging; under nothing known it is other."""
    raw = tmp_path / "worker.txt"
    raw.write_text(
        "handle (gunicorn/workers/gthread.py:553);finish_request (gateway/api/routes.py:349);"
        "Logger.info (logging/__init__.py:1489);dumps (json/__init__.py:238) 7\n"
        "handle (gunicorn/workers/gthread.py:553);post (gateway/exchange/transport.py:220) 2\n"
        "_bootstrap (threading.py:1002);run (threading.py:982) 1\n"
    )
    shares = profiling.read_raw(raw)
    assert shares == {"logging": 7, "the call to Exchange": 2, "other": 1}
    assert "| logging | 70.0 % |" in profiling.render(shares)
