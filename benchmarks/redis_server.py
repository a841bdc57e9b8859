"""A throwaway redis-server on loopback: the shared state the gateway's replicas would use."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from benchmarks.processes import BenchmarkError, Service, free_port, installed, start_process

START_TIMEOUT_S = 10.0


def redis_binary() -> str | None:
    """Return redis-server's path, also where /usr/bin is not on PATH."""
    return installed("redis-server", "/usr/bin/redis-server")


def start_redis(workdir: Path) -> Service:
    """Start redis-server on a free loopback port, without persistence; url is its redis:// URL."""
    binary = redis_binary()
    if binary is None:
        raise FileNotFoundError("redis-server is not installed")
    port = free_port()
    directory = workdir / "redis"
    directory.mkdir(exist_ok=True)
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    command += ["--save", "", "--appendonly", "no"]
    service = start_process("redis", command, f"redis://127.0.0.1:{port}/0", directory / "log")
    client = redis.Redis.from_url(service.url, socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            client.ping()
        except redis.RedisError:
            time.sleep(0.05)
            continue
        client.close()
        return service
    service.stop()
    raise BenchmarkError(f"redis-server did not answer within {START_TIMEOUT_S:g} s")


def commands_served(service: Service) -> int:
    """Return how many commands this Redis has run since it started (INFO commandstats)."""
    client = redis.Redis.from_url(service.url, socket_timeout=1, socket_connect_timeout=1)
    try:
        stats: dict[str, dict[str, int]] = client.info("commandstats")  # type: ignore[assignment]
    finally:
        client.close()
    # The INFO asking is itself counted; the caller's before/after difference cancels it.
    return sum(int(entry["calls"]) for entry in stats.values())


def version() -> str:
    """Return `redis-server --version`'s version, or "unknown"."""
    binary = redis_binary()
    if binary is None:
        return "not installed"
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    words = done.stdout.split()
    found = [word.removeprefix("v=") for word in words if word.startswith("v=")]
    return found[0] if found else "unknown"
