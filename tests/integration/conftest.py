"""Fixtures for the integration tests: the EWS simulator and `ews-gateway serve`, as real
processes on loopback (tests/integration/processes.py starts them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ews_schema import SCHEMA_DIR, schema_available
from tests.integration.processes import Server, free_port, gateway_env, start

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every integration test uses real sockets."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.network)


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


@pytest.fixture
def gateway(simulator: Server, tmp_path: Path) -> Iterator[Server]:
    """`ews-gateway serve` (gunicorn, two workers) wired to the simulator."""
    port = free_port()
    env = gateway_env(simulator, port)
    base_url = f"http://127.0.0.1:{port}"
    server = start(["serve"], env, base_url, "/readyz", tmp_path / "gateway.log")
    yield server
    server.stop()
