"""/metrics after thousands of worker restarts: a month of recycling in minutes.

    .venv/bin/python -m benchmarks.restarts --restarts 4000

Starts `serve` with GATEWAY_MAX_REQUESTS=1 (each worker exits after about one
request), drives /livez until that many workers have been replaced, and times
rendering /metrics over the shared directory (the work of a scrape, without
HTTP) fresh and after the restarts. For comparison it also times the same
directory as it would be without folding: one set of files per dead worker.
It checks that the request count is exact. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.telemetry.metrics import Metrics
from tests.integration.processes import free_port

WORKERS = 16
CLIENTS = 32
ROUND = 200
SCRAPES = 30
LIVEZ = 'ews_gateway_http_requests_total{method="GET",route="/livez",status="200"} '


def scrape_ms(directory: Path) -> float:
    """Median milliseconds to render /metrics over DIRECTORY."""
    metrics = Metrics("bench", multiprocess_dir=str(directory))
    times = []
    for _ in range(SCRAPES):
        started = time.perf_counter()
        metrics.exposition()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def get(url: str) -> bytes:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as answer:  # noqa: S310 - http only
                body: bytes = answer.read()
                return body
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.01)  # every worker may be restarting at once


def unfolded_copy(directory: Path, dead_workers: int, into: Path) -> None:
    """Lay out DIRECTORY as it would be without folding: each dead worker's own files."""
    for folded in directory.glob("*_folded.db"):
        kind = folded.name.removesuffix("_folded.db")
        for pid in range(1_000_000, 1_000_000 + dead_workers):
            shutil.copyfile(folded, into / f"{kind}_{pid}.db")
    for live in directory.glob("*.db"):
        if not live.name.endswith("_folded.db"):
            shutil.copyfile(live, into / live.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=4000)
    parser.add_argument("--max-minutes", type=float, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ews-restarts-"))
    metrics_dir, log_path = work / "metrics", work / "serve.log"
    port = free_port()
    env = {
        **os.environ,
        "EWS_URL": "http://127.0.0.1:9/EWS/Exchange.asmx",
        "GATEWAY_AUTH": "none",
        "GATEWAY_DIAL_ALLOW": "*",
        "GATEWAY_BIND": f"127.0.0.1:{port}",
        "GATEWAY_WORKERS": str(WORKERS),
        "GATEWAY_THREADS": "4",
        "GATEWAY_MAX_REQUESTS": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    url = f"http://127.0.0.1:{port}/livez"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"], env=env, stdout=log, stderr=log
        )
    try:
        answered = 1
        get(url)
        time.sleep(2)  # every first worker booted
        fresh_ms, fresh_files = scrape_ms(metrics_dir), len(list(metrics_dir.glob("*.db")))
        started = time.monotonic()
        give_up = started + args.max_minutes * 60
        restarts = 0
        with ThreadPoolExecutor(CLIENTS) as clients:
            while restarts < args.restarts and time.monotonic() < give_up:
                list(clients.map(lambda _: get(url), range(ROUND)))
                answered += ROUND
                restarts = log_path.read_text().count("Booting worker") - WORKERS
                print(f"{restarts} restarts", file=sys.stderr)
        elapsed_s = time.monotonic() - started
        time.sleep(2)  # the last exits are folded
        after_ms, after_files = scrape_ms(metrics_dir), len(list(metrics_dir.glob("*.db")))
        exposition = Metrics("bench", multiprocess_dir=str(metrics_dir)).exposition()[0]
        counted = next(
            float(line.rsplit(" ", 1)[1])
            for line in exposition.decode().splitlines()
            if line.startswith(LIVEZ)
        )
        unfolded = work / "unfolded"
        unfolded.mkdir()
        unfolded_copy(metrics_dir, restarts, unfolded)
        unfolded_ms, unfolded_files = scrape_ms(unfolded), len(list(unfolded.glob("*.db")))
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"{restarts} worker restarts in {elapsed_s:.0f} s ({WORKERS} workers, ", end="")
    print(f"GATEWAY_MAX_REQUESTS=1); /livez answered {answered}, counted {counted:.0f}\n")
    print("| metrics directory | files | render /metrics (median of 30) |")
    print("|---|---|---|")
    print(f"| fresh start | {fresh_files} | {fresh_ms:.2f} ms |")
    print(f"| after {restarts} restarts, folded | {after_files} | {after_ms:.2f} ms |")
    print(f"| the same without folding | {unfolded_files} | {unfolded_ms:.1f} ms |")
    shutil.rmtree(work, ignore_errors=True)
    if counted != answered:
        sys.exit(f"counted {counted:.0f} requests, answered {answered}")


if __name__ == "__main__":
    main()
