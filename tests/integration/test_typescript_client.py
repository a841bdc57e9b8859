"""The TypeScript client in clients/typescript: current with openapi.yaml, and working.

Node's test runner runs its tests (clients/typescript/test) against a real
`ews-gateway demo` started here, and the example in the client's README runs,
as written, in a scratch project that installed the client from `npm pack`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.processes import Server, free_port, start

CLIENT = Path(__file__).parents[2] / "clients" / "typescript"
NPM_TIMEOUT_S = 300
EXAMPLE_TIMEOUT_S = 60
# The first JavaScript block after the README's "## Usage" heading.
USAGE_EXAMPLE = re.compile(r"^## Usage\n.*?^```js\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def npm(
    *args: str, env: dict[str, str] | None = None, cwd: Path = CLIENT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["npm", *args],
        cwd=cwd,
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


def test_the_packed_client_installs_into_another_project_and_runs_the_readme_example(
    built_client: Path, demo: Server, tmp_path: Path
) -> None:
    packed = npm("pack", "--json", "--pack-destination", str(tmp_path))
    assert packed.returncode == 0, packed.stdout + packed.stderr
    [tarball] = json.loads(packed.stdout)
    assert {"package.json", "README.md", "dist/src/index.js", "dist/src/index.d.ts"} <= {
        file["path"] for file in tarball["files"]
    }
    project = tmp_path / "project"
    project.mkdir()
    (project / "package.json").write_text('{"name": "example", "private": true, "type": "module"}')
    installed = npm(
        "install",
        "--no-audit",
        "--no-fund",
        "--prefer-offline",
        "../" + tarball["filename"],
        cwd=project,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    example = USAGE_EXAMPLE.search((CLIENT / "README.md").read_text())
    assert example, "clients/typescript/README.md has no ```js block under ## Usage"
    (project / "example.js").write_text(example[1])

    result = subprocess.run(
        ["node", "example.js"],
        cwd=project,
        env={**os.environ, "GATEWAY_URL": demo.url},
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("placed gw1.")
    assert lines[1] in {"read Connecting", "read Alerted", "read Connected"}
    assert lines[-2:] == ["hung up disconnected", "state Disconnected None"]
