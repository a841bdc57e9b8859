"""Drive HTTP load at a server: wrk with `load.lua` where installed, else `benchmarks.pyload`."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchmarks.processes import REPO_ROOT, BenchmarkError, python_command

LUA_SCRIPT = Path(__file__).with_name("load.lua")
RESULT_MARK = "LOAD_RESULT "
# A load run that overruns its duration by this much has hung: stop waiting for it.
OVERRUN_S = 60


@dataclass(frozen=True)
class Load:
    """One load run: the same request over and over on keep-alive connections."""

    base_url: str
    method: str
    path: str
    connections: int
    duration_s: int
    body: bytes | None = None
    content_type: str = "text/xml; charset=utf-8"


@dataclass(frozen=True)
class LoadResult:
    """What a load run measured; latencies in milliseconds."""

    requests: int
    seconds: float
    non2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    # CPU seconds the server's processes used during the run, where measured.
    server_cpu_s: float | None = None

    @property
    def cpu_ms_per_request(self) -> float | None:
        """Server CPU time per answer: steadier than req/s when other work shares the machine."""
        if self.server_cpu_s is None or not self.requests:
            return None
        return 1000 * self.server_cpu_s / self.requests

    @property
    def rate(self) -> float:
        """Answers per second."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def ok_rate(self) -> float:
        """2xx answers per second: what counts when some answers are quick refusals."""
        return (self.requests - self.non2xx) / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        """Answers that were not 2xx, plus connections that failed."""
        return self.non2xx + self.socket_errors


def generator_name(preferred: str = "auto") -> str:
    """Return "wrk" or "python": the load generator a run uses."""
    if preferred == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    return preferred


def run_load(load: Load, workdir: Path, generator: str) -> LoadResult:
    """Run LOAD to completion with the named generator and return what it measured."""
    body_file = "-"
    if load.body is not None:
        path = workdir / f"body-{abs(hash(load.body))}.bin"
        path.write_bytes(load.body)
        body_file = str(path)
    command = (
        _wrk_command(load, body_file) if generator == "wrk" else _python_command(load, body_file)
    )
    try:
        finished = subprocess.run(
            command,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=load.duration_s + OVERRUN_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"the load generator overran: {' '.join(command)}") from None
    for line in finished.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return _result(json.loads(line.removeprefix(RESULT_MARK)))
    raise BenchmarkError(
        f"{generator} printed no result (exit {finished.returncode}):\n"
        f"{finished.stdout[-2000:]}\n{finished.stderr[-2000:]}"
    )


def _wrk_command(load: Load, body_file: str) -> list[str]:
    return [
        "wrk",
        f"--threads={min(2, load.connections)}",
        f"--connections={load.connections}",
        f"--duration={load.duration_s}s",
        "--timeout=10s",
        f"--script={LUA_SCRIPT}",
        load.base_url,
        "--",
        load.method,
        load.path,
        body_file,
        load.content_type,
    ]


def _python_command(load: Load, body_file: str) -> list[str]:
    return python_command(
        "-m",
        "benchmarks.pyload",
        load.base_url,
        load.method,
        load.path,
        f"--connections={load.connections}",
        f"--duration={load.duration_s}",
        f"--body-file={body_file}",
        f"--content-type={load.content_type}",
    )


def _result(raw: dict[str, int]) -> LoadResult:
    socket_errors = sum(
        raw[key] for key in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    return LoadResult(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        non2xx=raw["non2xx"],
        socket_errors=socket_errors,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
    )
