"""Real processes on loopback: `ews-gateway serve` (gunicorn) and the EWS simulator."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ews_schema import SCHEMA_DIR, schema_available

START_TIMEOUT_S = 20.0
HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every integration test uses real sockets."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.network)


def worker_pids(master_pid: int) -> list[int]:
    """Return the pids whose parent is MASTER_PID: a gunicorn master's workers."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name is in parentheses and may hold spaces: fields follow the last ")".
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the process ended while we looked
        if int(fields[1]) == master_pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def worker_holding(client: socket.socket, workers: set[int]) -> int:
    """Return the worker that holds the server end of CLIENT's TCP connection (IPv4)."""
    client_port, server_port = client.getsockname()[1], client.getpeername()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, remote_port = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
        if (local_port, remote_port) == (server_port, client_port):
            inodes.add(f"socket:[{fields[9]}]")
    for pid in workers:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no worker of {sorted(workers)} holds the connection from {client_port}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> Response:
    """Send one request and return the answer, whatever its status."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return Response(answer.status, answer.headers, answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return Response(error.code, error.headers, error.read())


@dataclass
class Server:
    """A process started for a test, stopped after it."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(
    args: list[str],
    env: Mapping[str, str],
    base_url: str,
    health_path: str,
    log_path: Path,
    *,
    stdout_path: Path | None = None,
) -> Server:
    """Start `python -m gateway ARGS` and wait until BASE_URL + HEALTH_PATH answers 200.

    Both streams go to LOG_PATH, unless STDOUT_PATH takes stdout apart.
    """
    health_url = base_url + health_path
    with log_path.open("wb") as log, ExitStack() as streams:
        if stdout_path is None:
            stdout, stderr = log, subprocess.STDOUT
        else:
            stdout, stderr = streams.enter_context(stdout_path.open("wb")), log
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            env={**os.environ, **env},
            stdout=stdout,
            stderr=stderr,
        )
    server = Server(process, base_url, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{args[0]} exited at start-up:\n{server.log()}")
        try:
            if http("GET", health_url, timeout=1).status == 200:
                return server
        except OSError:
            pass
        time.sleep(0.05)
    server.stop()
    raise AssertionError(f"{args[0]} did not become healthy:\n{server.log()}")


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Server]:
    """The EWS simulator; with the real schema at hand it validates every request."""
    port = free_port()
    args = ["simulator", "--bind", f"127.0.0.1:{port}", "--step-seconds", "0.2"]
    if schema_available():
        args += ["--schema-dir", str(SCHEMA_DIR)]
    base_url = f"http://127.0.0.1:{port}"
    server = start(args, {}, base_url, "/simulator/health", tmp_path / "sim.log")
    yield server
    server.stop()


def gateway_env(simulator: Server, port: int, **extra: str) -> dict[str, str]:
    return {
        "EWS_URL": f"{simulator.url}/EWS/Exchange.asmx",
        "GATEWAY_AUTH": "none",
        "GATEWAY_DIAL_ALLOW": "*",
        # Tests place calls faster than any sane per-caller quota; quota tests set their own.
        "GATEWAY_RATE_LIMIT_CALLS": "off",
        # Every instance a test starts shares it, as every replica of a deployment must.
        "GATEWAY_CALL_ID_KEY": "integration-tests-shared-call-id-key-0123456789",
        "GATEWAY_BIND": f"127.0.0.1:{port}",
        "GATEWAY_WORKERS": "2",
        "GATEWAY_THREADS": "8",
        "EWS_TIMEOUT_SECONDS": "2",
        **extra,
    }


@pytest.fixture
def gateway(simulator: Server, tmp_path: Path) -> Iterator[Server]:
    """`ews-gateway serve` (gunicorn, two workers) wired to the simulator."""
    port = free_port()
    env = gateway_env(simulator, port)
    base_url = f"http://127.0.0.1:{port}"
    server = start(["serve"], env, base_url, "/readyz", tmp_path / "gateway.log")
    yield server
    server.stop()


def set_faults(simulator: Server, *rules: dict[str, Any]) -> None:
    answer = http("PUT", f"{simulator.url}/simulator/faults", {"faults": list(rules)})
    assert answer.status == 200, answer.body


def simulator_requests(simulator: Server) -> list[dict[str, Any]]:
    requests: list[dict[str, Any]] = http("GET", f"{simulator.url}/simulator/requests").json()
    return requests
