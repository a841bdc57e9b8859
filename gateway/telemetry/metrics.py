"""Prometheus metrics: the only module that knows prometheus-client.

Under gunicorn, `serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory
so every worker writes its samples there and any worker's /metrics sums them
all; without it (tests, a single process) the app's own registry is used.
When a worker exits, the arbiter folds its samples into one accumulated file
per kind, so a scrape reads a bounded number of files however many workers
have come and gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import operator
import os
import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.mmap_dict import MmapedDict

from gateway.errors import metric_code
from gateway.exchange.resilience import BreakerState

# What create_app takes to keep an app's samples apart (tests pass a fresh one per app).
Registry = CollectorRegistry

# Any other method is labelled OTHER_METHOD, so callers cannot mint new series.
STANDARD_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
OTHER_METHOD = "other"
LOG = logging.getLogger("gateway")
# prometheus-client names each worker's file KIND_PID.db; a dead worker's samples join
# the file KIND_folded.db by these rules. Histogram files hold raw (not cumulative)
# bucket counts, so they add up like counters. Live gauges are dropped instead
# (mark_process_dead), and `all` gauges keep a series per pid, so neither folds.
FOLDS: dict[str, Callable[[float, float], float]] = {
    "counter": operator.add,
    "histogram": operator.add,
    "summary": operator.add,
    "gauge_sum": operator.add,
    "gauge_max": max,
    "gauge_min": min,
}
FOLDED = "folded"
# Scrapes hold it shared while they read the files, folding holds it exclusive.
SCRAPE_LOCK = ".scrape.lock"
# A fold waits at most this long for scrapes to finish, then leaves the dead
# worker's file as it is (still counted, just not folded): the arbiter must not
# stall behind a stopped worker.
FOLD_LOCK_WAIT_S = 5.0
# The bounded label values of the refusal and Redis error counters.
REFUSAL_REASONS = (
    "dial_string",
    "rate_limit",
    "ownership",
    "idempotency_in_use",
    "idempotency_uncertain",
    "idempotency_mismatch",
    "caller_streams",
)
REDIS_FEATURES = ("rate_limit", "idempotency")
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# From a poll's answer to the event on a watcher's socket: milliseconds when all is well.
DELIVERY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# GATEWAY_MAX_CONNECTIONS per worker; GATEWAY_MAX_CONNECTIONS_PER_CLIENT per client address.
CONNECTION_LIMITS = ("worker_limit", "client_limit")


class Metrics:
    """The contract's metrics, registered on one registry."""

    def __init__(
        self,
        version: str,
        registry: CollectorRegistry | None = None,
        *,
        multiprocess_dir: str | None = None,
    ) -> None:
        # The *_created series double the output and no dashboard uses them.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        self._multiprocess_dir = multiprocess_dir
        # Labelled series by label values: labels() takes a lock and checks its arguments.
        self._http_series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._upstream_series: dict[
            tuple[str, str, str | None], tuple[Counter, Histogram, Counter | None]
        ] = {}
        self.http_requests = Counter(
            "ews_gateway_http_requests",
            "HTTP requests answered, by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "ews_gateway_http_request_duration_seconds",
            "Time to answer an HTTP request.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "ews_gateway_http_requests_in_progress",
            "HTTP requests being answered now.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.upstream_requests = Counter(
            "ews_gateway_upstream_requests",
            "Calls to Exchange, by operation and outcome.",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.upstream_duration = Histogram(
            "ews_gateway_upstream_request_duration_seconds",
            "Time Exchange took to answer.",
            ["operation"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.upstream_codes = Counter(
            "ews_gateway_upstream_response_codes",
            "EWS ResponseCodes received, by operation.",
            ["operation", "code"],
            registry=self.registry,
        )
        self.circuit_open = Gauge(
            "ews_gateway_upstream_circuit_open",
            "1 while the circuit breaker to Exchange is open (in any live worker).",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.circuit_open.set(0)
        self.refusals = Counter(
            "ews_gateway_refusals",
            "Requests refused by the gateway's own rules, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.idempotent_replays = Counter(
            "ews_gateway_idempotent_replays",
            "POST /calls answered from an earlier request with the same Idempotency-Key.",
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "ews_gateway_redis_errors",
            "Tries of Redis commands that failed or timed out (also those sent again on a "
            "fresh connection), by the feature that sent them.",
            ["feature"],
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "ews_gateway_connections_refused",
            "Client connections closed at once because a worker's limit was reached, by limit.",
            ["reason"],
            registry=self.registry,
        )
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)
        for reason in CONNECTION_LIMITS:
            self.connections_refused.labels(reason)
        for feature in REDIS_FEATURES:
            self.redis_errors.labels(feature)
        self.event_streams_open = Gauge(
            "ews_gateway_event_streams_open",
            "Event streams (GET /calls/{callId}/events) open now.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.event_calls_polled = Gauge(
            "ews_gateway_event_calls_polled",
            "Calls polled for their watchers now (one poller per call per worker).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.event_delivery = Histogram(
            "ews_gateway_event_delivery_seconds",
            "Time from the poll's answer to the event written to the watcher's connection.",
            buckets=DELIVERY_BUCKETS_S,
            registry=self.registry,
        )
        build_info = Gauge(
            "ews_gateway_build_info",
            "The running gateway's version.",
            ["version"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        build_info.labels(version=version).set(1)

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one answered HTTP request."""
        key = (method if method in STANDARD_METHODS else OTHER_METHOD, route, status)
        series = self._http_series.get(key)
        if series is None:
            series = self._http_series[key] = (
                self.http_requests.labels(key[0], route, str(status)),
                self.http_duration.labels(key[0], route),
            )
        series[0].inc()
        series[1].observe(seconds)

    def upstream_call(self, operation: str, outcome: str, code: str | None, seconds: float) -> None:
        """Record one call to Exchange."""
        key = (operation, outcome, None if code is None else metric_code(code))
        series = self._upstream_series.get(key)
        if series is None:
            series = self._upstream_series[key] = (
                self.upstream_requests.labels(operation, outcome),
                self.upstream_duration.labels(operation),
                None if key[2] is None else self.upstream_codes.labels(operation, key[2]),
            )
        series[0].inc()
        series[1].observe(seconds)
        if series[2] is not None:
            series[2].inc()

    def connection_refused(self, reason: str) -> None:
        """Count a connection closed at once for REASON (one of CONNECTION_LIMITS)."""
        self.connections_refused.labels(reason).inc()

    def refused(self, reason: str) -> None:
        """Count a request refused for REASON (one of REFUSAL_REASONS)."""
        self.refusals.labels(reason).inc()

    def replayed(self) -> None:
        """Count an idempotent replay."""
        self.idempotent_replays.inc()

    def redis_failed(self, feature: str) -> None:
        """Count a failed Redis command of FEATURE (one of REDIS_FEATURES)."""
        self.redis_errors.labels(feature).inc()

    def circuit_changed(self, state: BreakerState) -> None:
        """Show the circuit breaker's state (half-open counts as open)."""
        self.circuit_open.set(0 if state is BreakerState.CLOSED else 1)

    def stream_opened(self) -> None:
        """Count an event stream handed to the pump."""
        self.event_streams_open.inc()

    def stream_closed(self) -> None:
        """Count an event stream that ended."""
        self.event_streams_open.dec()

    def calls_polled(self, count: int) -> None:
        """Show how many calls this worker polls now."""
        self.event_calls_polled.set(count)

    def event_delivered(self, seconds: float) -> None:
        """Record how long an event took from Exchange's answer to its watcher's socket."""
        self.event_delivery.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """Render the text exposition (summed over workers in multiprocess mode)."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined, path=self._multiprocess_dir)
        # A fold moves samples between two files: read none while one runs.
        with _scrape_lock(self._multiprocess_dir, fcntl.LOCK_SH):
            payload = generate_latest(combined)
        return payload, CONTENT_TYPE_LATEST


def fold_dead_worker(directory: str, pid: int) -> bool:
    """Fold a dead worker's samples into DIRECTORY's accumulated files; drop its live gauges.

    Only the process that reaps the workers (gunicorn's arbiter, one exit at a time) may
    call this, after the worker is gone. Counts stay exact: under the exclusive scrape
    lock, a scrape sees each sample either in the worker's file or in the accumulated
    one, never in both or neither. Returns False, leaving the files as they were, when
    scrapes held the lock for FOLD_LOCK_WAIT_S.
    """
    with _scrape_lock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB) as locked:
        if not locked:
            LOG.warning("metrics of a dead worker left unfolded", extra={"pid": pid})
            return False
        multiprocess.mark_process_dead(pid, directory)
        for kind, combine in FOLDS.items():
            dead = os.path.join(directory, f"{kind}_{pid}.db")
            if os.path.exists(dead):
                _fold(dead, os.path.join(directory, f"{kind}_{FOLDED}.db"), combine)
                os.remove(dead)
        return True


def _fold(dead: str, accumulated: str, combine: Callable[[float, float], float]) -> None:
    """Replace ACCUMULATED with its samples combined with DEAD's, key by key."""
    totals = _samples(accumulated) if os.path.exists(accumulated) else {}
    for key, (value, timestamp) in _samples(dead).items():
        old_value, old_timestamp = totals.get(key, (None, 0.0))
        totals[key] = (
            value if old_value is None else combine(old_value, value),
            max(old_timestamp, timestamp),
        )
    # Not *.db, so no scrape reads it half-written; os.replace then swaps it in whole.
    staging = accumulated + ".staging"
    with contextlib.suppress(FileNotFoundError):
        os.remove(staging)
    store = MmapedDict(staging)
    try:
        for key, (value, timestamp) in totals.items():
            store.write_value(key, value, timestamp)
    finally:
        store.close()
    os.replace(staging, accumulated)


def _samples(path: str) -> dict[str, tuple[float, float]]:
    """Read one multiprocess file: {mmap key: (value, timestamp)}."""
    return {
        key: (value, timestamp)
        for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path)
    }


@contextlib.contextmanager
def _scrape_lock(directory: str, operation: int) -> Iterator[bool]:
    """Hold DIRECTORY's scrape lock; yield False if a non-blocking exclusive try timed out."""
    fd = os.open(os.path.join(directory, SCRAPE_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        yield _acquire(fd, operation)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _acquire(fd: int, operation: int) -> bool:
    if not operation & fcntl.LOCK_NB:
        fcntl.flock(fd, operation)
        return True
    give_up = time.monotonic() + FOLD_LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            if time.monotonic() > give_up:
                return False
            time.sleep(0.005)
        else:
            return True


def share_across_processes(directory: str) -> None:
    """Make every metric built from now on (in this process and its forks) write to DIRECTORY."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    # prometheus-client picks its value store when first imported; pick again now that
    # the directory is known (no metric exists yet: workers build theirs after forking).
    values.ValueClass = values.get_value_class()
