"""Debian's tinyproxy as a real forward proxy, started per test on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.processes import free_port

TINYPROXY = shutil.which("tinyproxy")
requires_tinyproxy = pytest.mark.skipif(
    TINYPROXY is None, reason="tinyproxy not installed (.ci/run installs it)"
)
PROXY_USER, PROXY_SECRET = "svc-gateway", "pr0xy-S3cret"


@dataclass
class Tinyproxy:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@pytest.fixture
def tinyproxies(tmp_path: Path) -> Iterator[Callable[..., Tinyproxy]]:
    """Start tinyproxy on a free loopback port, with Basic credentials when asked."""
    started: list[Tinyproxy] = []

    def start(*, credentials: bool = False) -> Tinyproxy:
        port = free_port()
        directory = tmp_path / f"tinyproxy-{port}"
        directory.mkdir()
        log_path = directory / "tinyproxy.log"
        conf = [
            f"Port {port}",
            "Listen 127.0.0.1",
            "Allow 127.0.0.1",
            "Timeout 30",
            "MaxClients 20",
            "LogLevel Info",
            f'LogFile "{log_path}"',
            f'PidFile "{directory / "tinyproxy.pid"}"',
        ]
        if credentials:
            conf.append(f"BasicAuth {PROXY_USER} {PROXY_SECRET}")
        (directory / "tinyproxy.conf").write_text("\n".join(conf) + "\n")
        assert TINYPROXY is not None
        process = subprocess.Popen(
            [TINYPROXY, "-d", "-c", str(directory / "tinyproxy.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        proxy = Tinyproxy(process, port, log_path)
        started.append(proxy)
        wait_for_port(port, process)
        return proxy

    yield start
    for proxy in started:
        proxy.process.terminate()
        proxy.process.wait(10)


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert process.poll() is None, "tinyproxy exited at start-up"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("tinyproxy did not start listening")
