"""Start, probe and stop the processes a benchmark runs: servers, and what /proc says of them."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_POLL_S = 0.01
PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 30.0


class BenchmarkError(RuntimeError):
    """A server did not start, or a load run went wrong; the message says which."""


@dataclass
class Service:
    """A server process started by the benchmark, stopped by it."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    ready_s: float = 0.0

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Ask the process to stop (SIGTERM), then kill it if it lingers."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _die_with_parent() -> None:
    """Have Linux send SIGTERM to this child when the benchmark dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def installed(name: str, fallback: str) -> str | None:
    """Return the path of command NAME, or FALLBACK where it exists off PATH (/usr/sbin)."""
    found = shutil.which(name)
    if found is None and Path(fallback).is_file():
        found = fallback
    return found


def free_port() -> int:
    """Return a loopback port that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def python_command(*args: str) -> list[str]:
    """Return the command line that runs ARGS with this interpreter."""
    return [sys.executable, *args]


def start_service(
    name: str,
    command: Sequence[str],
    *,
    url: str,
    ready_path: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> Service:
    """Start COMMAND and wait until URL + READY_PATH answers 200; ready_s is how long that took."""
    started = time.perf_counter()
    service = start_process(name, command, url, log_path, env)
    process = service.process
    deadline = started + timeout_s
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(f"{name} exited at start-up:\n{service.log_tail()}")
        if status_of(url + ready_path) == 200:
            service.ready_s = time.perf_counter() - started
            return service
        time.sleep(READY_POLL_S)
    service.stop()
    raise BenchmarkError(f"{name} was not ready within {timeout_s:g} s:\n{service.log_tail()}")


def start_process(
    name: str,
    command: Sequence[str],
    url: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
) -> Service:
    """Start COMMAND in the repository, its output to LOG_PATH; it dies with the benchmark."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command),
            cwd=REPO_ROOT,
            env=dict(env if env is not None else os.environ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded here
        )
    return Service(name, process, url, log_path)


def status_of(url: str) -> int | None:
    """Return the HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:  # noqa: S310 - loopback URL
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


def send(method: str, url: str, body: bytes | None = None, content_type: str = "") -> bytes:
    """Send one request and return the body of a 2xx answer; raise BenchmarkError otherwise."""
    request = urllib.request.Request(url, data=body, method=method)  # noqa: S310 - loopback URL
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback URL
            return bytes(answer.read())
    except urllib.error.HTTPError as error:
        raise BenchmarkError(f"{method} {url} answered {error.code}: {error.read()!r}") from None


def child_pids(parent: int) -> list[int]:
    """Return the pids whose parent is PARENT (gunicorn's workers, for its master)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # The process ended while we looked.
        # The command name may hold spaces and parentheses: fields follow the last ")".
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == parent:
            children.append(int(entry.name))
    return sorted(children)


def cpu_seconds(master: int) -> float:
    """Return the CPU time (user + system) a process tree has used: master, reaped and live workers.

    Recycled workers count too: their time moves into the master's cutime/cstime when reaped.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = sum(_stat_fields(master)[11:15])  # utime, stime, cutime, cstime
    for child in child_pids(master):
        total += sum(_stat_fields(child)[11:13])
    return total / ticks


def _stat_fields(pid: int) -> list[int]:
    """Return the numeric fields of /proc/PID/stat after the command name (0 for a gone pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return [0] * 20
    # Field 3 (state) is a letter: keep positions by mapping it to 0.
    fields = stat.rpartition(")")[2].split()
    return [int(field) if field.lstrip("-").isdigit() else 0 for field in fields]


def rss_mb(pid: int) -> float | None:
    """Return VmRSS of a process in MiB, or None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None
