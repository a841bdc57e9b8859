"""Folding dead workers' metric files: scrapes stay bounded, counts stay exact."""

from __future__ import annotations

import fcntl
import multiprocessing
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry import metrics
from gateway.telemetry.metrics import Metrics

REQUESTS = (
    "ews_gateway_http_requests_total",
    {"method": "GET", "route": "/livez", "status": "200"},
)
LATENCY_COUNT = (
    "ews_gateway_http_request_duration_seconds_count",
    {"method": "GET", "route": "/livez"},
)
SLOW_BUCKET = (
    "ews_gateway_http_request_duration_seconds_bucket",
    {"method": "GET", "route": "/livez", "le": "0.005"},
)
UPSTREAM = (
    "ews_gateway_upstream_requests_total",
    {"operation": "PlayOnPhone", "outcome": "success"},
)
CODES = (
    "ews_gateway_upstream_response_codes_total",
    {"operation": "PlayOnPhone", "code": "NoError"},
)
BUILD_INFO = ("ews_gateway_build_info", {"version": "1.0"})

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def work_in_a_worker(directory: str, requests: int, upstream_calls: int) -> None:
    """Be a gunicorn worker: record samples in DIRECTORY, then exit (in a forked process)."""
    metrics.share_across_processes(directory)
    recorder = Metrics("1.0", multiprocess_dir=directory)
    recorder.in_progress.inc()
    for _ in range(requests):
        recorder.http_request("GET", "/livez", 200, 0.003)
    for _ in range(upstream_calls):
        recorder.upstream_call("PlayOnPhone", "success", "NoError", 0.05)


def run_worker(directory: Path, requests: int = 3, upstream_calls: int = 2) -> int:
    worker = multiprocessing.get_context("fork").Process(
        target=work_in_a_worker, args=(str(directory), requests, upstream_calls)
    )
    worker.start()
    worker.join()
    assert worker.exitcode == 0
    assert worker.pid is not None
    return worker.pid


def scrape(directory: Path) -> Samples:
    """Read /metrics as a scraper would: {(sample name, labels): value}."""
    payload, _ = Metrics("1.0", multiprocess_dir=str(directory)).exposition()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(payload.decode())
        for sample in family.samples
    }


def value(samples: Samples, series: tuple[str, dict[str, str]]) -> float:
    name, labels = series
    return samples[(name, tuple(sorted(labels.items())))]


def test_a_hundred_dead_workers_leave_one_file_per_kind_and_every_count_exact(
    tmp_path: Path,
) -> None:
    for _ in range(100):
        assert metrics.fold_dead_worker(str(tmp_path), run_worker(tmp_path))
    assert sorted(path.name for path in tmp_path.glob("*.db")) == [
        "counter_folded.db",
        "gauge_max_folded.db",
        "histogram_folded.db",
    ]
    samples = scrape(tmp_path)
    assert value(samples, REQUESTS) == 300
    assert value(samples, LATENCY_COUNT) == 300
    assert value(samples, SLOW_BUCKET) == 300
    assert value(samples, UPSTREAM) == 200
    assert value(samples, CODES) == 200
    assert value(samples, BUILD_INFO) == 1
    # The dead workers' requests in progress went with them.
    assert ("ews_gateway_http_requests_in_progress", ()) not in samples


def test_a_live_worker_and_the_folded_dead_ones_add_up(tmp_path: Path) -> None:
    for _ in range(3):
        metrics.fold_dead_worker(str(tmp_path), run_worker(tmp_path, requests=5))
    run_worker(tmp_path, requests=7)  # exited, but not reaped yet: its file is still its own
    samples = scrape(tmp_path)
    assert value(samples, REQUESTS) == 22
    assert value(samples, LATENCY_COUNT) == 22


def test_a_scrape_during_folds_never_sees_a_sample_twice_or_not_at_all(tmp_path: Path) -> None:
    pids = [run_worker(tmp_path, requests=1, upstream_calls=0) for _ in range(60)]
    seen: list[float] = []
    done = threading.Event()

    def keep_scraping() -> None:
        while not done.is_set():
            seen.append(value(scrape(tmp_path), REQUESTS))

    scraper = threading.Thread(target=keep_scraping)
    scraper.start()
    try:
        for pid in pids:
            assert metrics.fold_dead_worker(str(tmp_path), pid)
    finally:
        done.set()
        scraper.join()
    assert seen
    assert set(seen) == {60.0}
    assert len(list(tmp_path.glob("*.db"))) == 3


def test_a_fold_behind_a_stuck_scrape_gives_up_and_the_counts_stay_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = run_worker(tmp_path)
    monkeypatch.setattr(metrics, "FOLD_LOCK_WAIT_S", 0.05)
    with (tmp_path / metrics.SCRAPE_LOCK).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # a scrape that does not finish
        assert not metrics.fold_dead_worker(str(tmp_path), pid)
    assert value(scrape(tmp_path), REQUESTS) == 3
    assert metrics.fold_dead_worker(str(tmp_path), pid)
    assert value(scrape(tmp_path), REQUESTS) == 3
