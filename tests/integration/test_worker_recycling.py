"""Real gunicorn workers recycled after every request: /metrics reads a bounded set of files
and its counts stay exact (benchmarks/restarts.py records the timings of 4,000 restarts)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.processes import Server, free_port, http, sample, start, worker_pids

RESTARTS = 200
WORKERS = 8
CLIENTS = 16
# A worker may take a few queued requests before it exits, so requests go in rounds.
ROUND = 50
RESTARTS_WITHIN_S = 240
# prometheus-client's file kinds this gateway writes: counter, histogram and three gauges.
KINDS_PER_WORKER = 5
LIVEZ = 'ews_gateway_http_requests_total{method="GET",route="/livez",status="200"}'
LIVEZ_LATENCY = 'ews_gateway_http_request_duration_seconds_count{method="GET",route="/livez"}'
WORKER_FILE = re.compile(r"(?P<kind>[a-z_]+)_(?P<pid>\d+)\.db")


@pytest.fixture
def recycling_gateway(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    """`serve` whose workers exit after each request; nothing upstream is called."""
    port, metrics_dir = free_port(), tmp_path / "metrics"
    env = {
        "EWS_URL": "http://127.0.0.1:9/EWS/Exchange.asmx",
        "GATEWAY_AUTH": "none",
        "GATEWAY_DIAL_ALLOW": "*",
        "GATEWAY_BIND": f"127.0.0.1:{port}",
        "GATEWAY_WORKERS": str(WORKERS),
        "GATEWAY_THREADS": "4",
        "GATEWAY_MAX_REQUESTS": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    server = start(["serve"], env, f"http://127.0.0.1:{port}", "/livez", tmp_path / "gw.log")
    yield server, metrics_dir
    server.stop()


def get_until_answered(url: str) -> bytes:
    """GET URL, retrying refusals: for a moment every worker may be recycling at once."""
    deadline = time.monotonic() + 30
    while True:
        try:
            answer = http("GET", url, timeout=10)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
            continue
        assert answer.status == 200
        return answer.body


def restarts(gateway: Server) -> int:
    """Workers booted after the first ones."""
    return gateway.log().count("Booting worker") - WORKERS


def stray_files(metrics_dir: Path, master_pid: int) -> list[str]:
    """Per-worker files whose worker is gone (they should have been folded)."""
    live = set(worker_pids(master_pid))
    strays = []
    for path in metrics_dir.glob("*.db"):
        match = WORKER_FILE.fullmatch(path.name)
        if match and int(match["pid"]) not in live:
            strays.append(path.name)
    return strays


def log_lines_naming(gateway: Server, files: list[str]) -> str:
    """The gateway's log lines that name the pids of FILES: what became of those processes."""
    pids = {match["pid"] for match in map(WORKER_FILE.fullmatch, files) if match}
    return "\n".join(line for line in gateway.log().splitlines() if any(p in line for p in pids))


def test_after_hundreds_of_worker_restarts_files_stay_bounded_and_counts_exact(
    recycling_gateway: tuple[Server, Path],
) -> None:
    gateway, metrics_dir = recycling_gateway
    # start() asked /livez until it answered 200 once: that request counts too.
    answered = 1
    give_up = time.monotonic() + RESTARTS_WITHIN_S
    with ThreadPoolExecutor(CLIENTS) as clients:
        while restarts(gateway) < RESTARTS and time.monotonic() < give_up:
            list(clients.map(lambda _: get_until_answered(f"{gateway.url}/livez"), range(ROUND)))
            answered += ROUND
    assert restarts(gateway) >= RESTARTS
    # The last workers to exit are reaped (and folded) within a moment.
    deadline = time.monotonic() + 10
    while stray_files(metrics_dir, gateway.process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    strays = stray_files(metrics_dir, gateway.process.pid)
    assert strays == [], log_lines_naming(gateway, strays)
    assert len(list(metrics_dir.glob("*.db"))) <= (WORKERS + 1) * KINDS_PER_WORKER
    text = get_until_answered(f"{gateway.url}/metrics").decode()
    assert sample(text, LIVEZ) == answered
    assert sample(text, LIVEZ_LATENCY) == answered
