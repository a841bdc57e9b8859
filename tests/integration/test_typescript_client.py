"""The TypeScript client in clients/typescript: current with openapi.yaml, and working.

Node's test runner runs its tests (clients/typescript/test) against a real
`ews-gateway demo` started here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Server, free_port, start

CLIENT = Path(__file__).parents[2] / "clients" / "typescript"
NPM_TIMEOUT_S = 300


def npm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["npm", *args],
        cwd=CLIENT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def built_client() -> Path:
    """The client's dependencies installed from package-lock.json, and the client built."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: nodejs, npm)")
    lock = CLIENT / "package-lock.json"
    installed = CLIENT / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        result = npm("ci", "--no-audit", "--no-fund")
        assert result.returncode == 0, result.stdout + result.stderr
    result = npm("run", "build")
    assert result.returncode == 0, result.stdout + result.stderr
    return CLIENT


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    env = {"GATEWAY_BIND": f"127.0.0.1:{port}", "GATEWAY_EVENTS_POLL_SECONDS": "0.25"}
    server = start(["demo"], env, f"http://127.0.0.1:{port}", "/readyz", tmp_path / "demo.log")
    yield server
    server.stop()


def test_the_committed_client_is_generated_from_the_current_openapi_yaml(
    built_client: Path,
) -> None:
    result = npm("run", "check-generated")

    assert result.returncode == 0, "run `make client`:\n" + result.stdout + result.stderr


def test_the_client_places_watches_and_hangs_up_calls_on_a_real_demo(
    built_client: Path, demo: Server
) -> None:
    result = npm("test", env={"GATEWAY_URL": demo.url})

    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout
    assert "# pass 10" in result.stdout
