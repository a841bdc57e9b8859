"""The watcher benchmark's quick run works end to end and reports every figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_quick_watcher_run_reports_every_watcher_complete_and_one_poll_per_interval() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.watchers", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-4000:]
    report = done.stdout
    assert "| Watchers that saw every state in order, then a clean end | 100 / 100 |" in report
    assert "| Exchange polls per call per interval per worker (most in any 1 s) | 1 |" in report
    for figure in ("/livez p50 / p99", "Worker RSS while watching", "Event delay after the poll"):
        assert figure in report
