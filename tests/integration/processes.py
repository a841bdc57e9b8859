"""Real processes on loopback: `python -m gateway` (serve, simulator) started, asked and stopped.

The integration fixtures (conftest.py), the soak and the benchmarks start theirs with these.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
START_TIMEOUT_S = 20.0
WAIT_S = 20.0


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


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


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
    wrapper: Sequence[str] = (),
) -> Server:
    """Start `python -m gateway ARGS` and wait until BASE_URL + HEALTH_PATH answers 200.

    Both streams go to LOG_PATH, unless STDOUT_PATH takes stdout apart. WRAPPER, if given,
    is a command that runs the gateway's (as `unshare ... sh -c 'exec "$@"'` does).
    """
    health_url = base_url + health_path
    with log_path.open("wb") as log, ExitStack() as streams:
        if stdout_path is None:
            stdout, stderr = log, subprocess.STDOUT
        else:
            stdout, stderr = streams.enter_context(stdout_path.open("wb")), log
        process = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "gateway", *args],
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


def run_serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `serve` with only ENV (and PATH) set, expecting it to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def set_faults(simulator: Server, *rules: dict[str, Any]) -> None:
    answer = http("PUT", f"{simulator.url}/simulator/faults", {"faults": list(rules)})
    assert answer.status == 200, answer.body


def simulator_requests(simulator: Server) -> list[dict[str, Any]]:
    requests: list[dict[str, Any]] = http("GET", f"{simulator.url}/simulator/requests").json()
    return requests


def sample(exposition: str, series: str) -> float:
    """Return the value of SERIES in a /metrics exposition; fail if it is absent."""
    for line in exposition.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in /metrics")


def wait_until(condition: Callable[[], T], what: str, timeout_s: float = WAIT_S) -> T:
    """Poll CONDITION until it returns something true; fail naming WHAT after TIMEOUT_S."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)
