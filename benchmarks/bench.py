"""The servers of a benchmark run (upstream, gateway, baseline) and the load driven at them."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks import redis_server, upstream
from benchmarks.load import Load, LoadResult, run_load
from benchmarks.processes import (
    Service,
    child_pids,
    cpu_seconds,
    free_port,
    python_command,
    rss_mb,
    start_service,
)
from gateway.config import DEFAULT_THREADS

GATEWAY, BASELINE = "gateway", "baseline"
# The same gateway counting its quotas in its own memory: what Redis costs, in the same run.
GATEWAY_EMBEDDED = "gateway, embedded store"
WORKERS = 2
RAM_DISK = Path("/dev/shm")  # noqa: S108 - where `serve` puts metric files by default


@dataclass(frozen=True)
class Plan:
    """How long and how hard each measurement runs."""

    warmup_s: int
    round_s: int
    rounds: int
    slow_s: int
    low_load_s: int
    memory_requests: int
    threads: int = DEFAULT_THREADS  # what `serve` uses unless told otherwise
    connections: int = 16
    slow_connections: int = 64
    slow_latency_ms: int = 100


class Bench:
    """Starts the servers of a run, drives load at them, and stops them all at the end."""

    def __init__(
        self,
        plan: Plan,
        generator: str,
        upstream_kind: str,
        *,
        gateway_env: dict[str, str] | None = None,
    ) -> None:
        self.plan = plan
        self.generator = generator
        self.upstream_kind = upstream_kind
        # Extra settings for every gateway started, e.g. GATEWAY_THREADS, to compare configurations.
        self.gateway_env = gateway_env or {}
        # The baseline gets the gateway's thread count, whatever it is set to.
        self.threads = int(self.gateway_env.get("GATEWAY_THREADS", plan.threads))
        self._started = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix="ews-bench-"))
        metrics_parent = RAM_DISK if RAM_DISK.is_dir() else None
        self.metrics_root = Path(tempfile.mkdtemp(prefix="ews-bench-metrics-", dir=metrics_parent))
        self._services: list[Service] = []
        # Every gateway counts its quotas in one loopback Redis, as replicas share one.
        self.shared_state = redis_server.redis_binary() is not None
        self._redis: Service | None = None

    def close(self, keep_logs: bool = False) -> None:
        """Stop every service this bench started, newest first, and remove its files."""
        for service in reversed(self._services):
            service.stop()
        shutil.rmtree(self.metrics_root, ignore_errors=True)
        if not keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stop(self, service: Service) -> None:
        """Stop one service early."""
        service.stop()
        self._services.remove(service)

    def start_upstream(self, latency_ms: int = 0) -> Service:
        """Start the zero-latency upstream this run uses, or the simulator with LATENCY_MS."""
        if latency_ms == 0 and self.upstream_kind == "nginx":
            return self._keep(upstream.start_nginx(self.workdir))
        return self._keep(upstream.start_simulator(self.workdir, latency_ms))

    def start_gateway(self, ews_url: str, *, quotas_in_redis: bool = True) -> Service:
        """Run `python -m gateway serve` as an operator would, with two workers.

        With redis-server installed its quotas are counted in Redis unless QUOTAS_IN_REDIS is
        false; otherwise in the instance's embedded store, as `serve` does without Redis.
        """
        port = free_port()
        shared = {}
        if quotas_in_redis and self.shared_state:
            shared["GATEWAY_REDIS_URL"] = self.redis().url
        metrics_dir = self.metrics_root / f"gateway-{port}"
        env = (
            _clean_environment()
            | {
                "EWS_URL": ews_url,
                "GATEWAY_AUTH": "none",
                "GATEWAY_DIAL_ALLOW": "*",
                # Limits counted on every request, high enough never to refuse the load.
                "GATEWAY_RATE_LIMIT_CALLS": "10000000/minute",
                "GATEWAY_RATE_LIMIT_REQUESTS": "10000000/minute",
                # Every gateway the benchmark starts accepts the call ids the others issued.
                "GATEWAY_CALL_ID_KEY": "benchmark-call-id-key-shared-by-every-gateway",
                "GATEWAY_BIND": f"127.0.0.1:{port}",
                "GATEWAY_WORKERS": str(WORKERS),
                "GATEWAY_THREADS": str(self.threads),
                "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            }
            | shared
            | self.gateway_env
        )
        return self._keep(
            start_service(
                GATEWAY,
                python_command("-m", "gateway", "serve"),
                url=f"http://127.0.0.1:{port}",
                ready_path="/readyz",
                log_path=self.workdir / f"gateway-{port}.log",
                env=env,
            )
        )

    def redis(self) -> Service:
        """The run's redis-server, started on first use."""
        if self._redis is None:
            self._redis = self._keep(redis_server.start_redis(self.workdir))
        return self._redis

    def redis_commands(self) -> int:
        """Commands the run's Redis has served so far (0 without one)."""
        return redis_server.commands_served(self._redis) if self._redis else 0

    def start_baseline(self, ews_url: str) -> Service:
        """Serve benchmarks.baseline with the gateway's gunicorn settings that matter for speed."""
        port = free_port()
        command = python_command(
            "-m",
            "gunicorn",
            "--worker-class=gthread",
            f"--workers={WORKERS}",
            f"--threads={self.threads}",
            "--keep-alive=75",
            "--timeout=30",
            "--no-control-socket",
            f"--bind=127.0.0.1:{port}",
            *([f"--worker-tmp-dir={RAM_DISK}"] if RAM_DISK.is_dir() else []),
            "benchmarks.baseline:create_app()",
        )
        env = _clean_environment() | {
            "BASELINE_EWS_URL": ews_url,
            "BASELINE_POOL_SIZE": str(self.threads),
        }
        return self._keep(
            start_service(
                BASELINE,
                command,
                url=f"http://127.0.0.1:{port}",
                ready_path="/healthz",
                log_path=self.workdir / f"baseline-{port}.log",
                env=env,
            )
        )

    def load(self, load: Load, server: Service | None = None) -> LoadResult:
        """Run one load with this bench's generator; with SERVER, also measure its CPU time."""
        cpu_before = cpu_seconds(server.process.pid) if server else 0.0
        result = run_load(load, self.workdir, self.generator)
        if server is not None:
            result = replace(result, server_cpu_s=cpu_seconds(server.process.pid) - cpu_before)
        self.say(
            f"{load.method} {load.base_url}{load.path[:24]} x{load.connections} "
            f"{load.duration_s} s: {result.rate:.0f}/s, p50 {result.p50_ms:.2f} ms, "
            f"p99 {result.p99_ms:.2f} ms, {result.errors} errors"
            + (f", {result.cpu_ms_per_request:.3f} CPU ms/req" if result.cpu_ms_per_request else "")
        )
        return result

    def say(self, message: str) -> None:
        """Report progress on stderr (the report itself goes to stdout)."""
        print(f"[{time.monotonic() - self._started:6.1f} s] {message}", file=sys.stderr, flush=True)

    def _keep(self, service: Service) -> Service:
        self._services.append(service)
        return service


def wait_for_workers(service: Service, count: int) -> list[int]:
    """Return the worker pids once COUNT workers run (gunicorn boots them one by one)."""
    deadline = time.monotonic() + 10
    while len(workers := child_pids(service.process.pid)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return workers


def settled_rss(service: Service) -> list[float]:
    """Return the workers' RSS once it stops growing: a worker still booting is not ready yet."""
    deadline = time.monotonic() + 10
    sizes = worker_rss(service)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        sizes, before = worker_rss(service), sizes
        if sizes == before:
            break
    return sizes


def worker_rss(service: Service) -> list[float]:
    """Return the VmRSS (MiB) of each gunicorn worker of a service."""
    sizes = (rss_mb(pid) for pid in child_pids(service.process.pid))
    return [size for size in sizes if size is not None]


def _clean_environment() -> dict[str, str]:
    """This process's environment without settings of the gateway or the baseline."""
    prefixes = ("EWS_", "GATEWAY_", "BASELINE_", "PROMETHEUS_")
    return {name: value for name, value in os.environ.items() if not name.startswith(prefixes)}
