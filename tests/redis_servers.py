"""Throwaway redis-server processes on loopback for tests (not a test module): a primary, a
replica of it, a Sentinel watching them."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from tests.certificates import Certificate

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT_S = 10.0


def redis_installed() -> bool:
    return Path(REDIS_SERVER).exists()


@dataclass
class RedisServer:
    """A redis-server on a free loopback port; stop() and start() it at will."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    password: str | None = None
    certificate: Certificate | None = None
    # More redis-server options, e.g. ["--replicaof", "127.0.0.1", "6380"].
    options: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        scheme = "redis" if self.certificate is None else "rediss"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> None:
        args = ["--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", ""]
        args += ["--appendonly", "no"]
        if self.certificate is None:
            args += ["--port", str(self.port)]
        else:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(self.certificate.cert_path)]
            args += ["--tls-key-file", str(self.certificate.key_path)]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.process = _launch([REDIS_SERVER, *args, *self.options], self.workdir / "redis.log")
        _wait_for_ping(self.client(), self.stop, "redis-server")

    def client(self) -> redis.Redis:
        tls: dict[str, Any] = {}
        if self.certificate is not None:
            tls = {"ssl": True, "ssl_ca_certs": str(self.certificate.cert_path)}
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=1,
            socket_connect_timeout=1,
            **tls,
        )

    def wait_in_sync(self, replica: RedisServer, timeout_s: float = 10.0) -> None:
        """Wait until REPLICA has every write this primary took (and is connected to it)."""
        deadline = time.monotonic() + timeout_s
        client = self.client()
        while time.monotonic() < deadline:
            if client.execute_command("WAIT", 1, 100) >= 1:
                state = replica.client().info("replication")
                if state.get("master_link_status") == "up":
                    return
            time.sleep(0.05)
        raise AssertionError(f"replica on {replica.port} did not catch up")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@dataclass
class RedisSentinel:
    """A redis-server in Sentinel mode watching one primary as SERVICE, quorum 1."""

    port: int
    workdir: Path
    primary: RedisServer
    service: str = "gateway"
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = self.workdir / "sentinel.conf"  # Sentinel rewrites it: a file of its own
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 1000\n"
            f"sentinel failover-timeout {self.service} 5000\n",
            encoding="ascii",
        )
        command = [REDIS_SERVER, str(config), "--sentinel"]
        self.process = _launch(command, self.workdir / "sentinel.log")
        _wait_for_ping(self.client(), self.stop, "redis-sentinel")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)

    def primary_port(self) -> int:
        _host, port = self.client().sentinel_get_master_addr_by_name(self.service)
        return int(port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


def _launch(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def _wait_for_ping(client: redis.Redis, stop: Any, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if client.ping():
                client.close()
                return
        except redis.RedisError:
            time.sleep(0.05)
    stop()
    raise AssertionError(f"{what} did not start")
