"""Event streams through a frontend's compressing dev proxy arrive as they happen.

Express's `compression` (in webpack-dev-server and create-react-app's proxy) compresses
every text/* answer for a client that accepts gzip, and a compressor holds what it is
given until it has enough: a stream's events would wait until the call ended. It leaves
alone an answer marked `Cache-Control: no-transform` (RFC 9111 5.2.2.6), as the gateway
marks its streams. The proxy is installed from npm into a scratch folder.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.npm import npm_scratch
from tests.integration.processes import Server, free_port, gateway_env, http, start, wait_until
from tests.integration.streams import (
    Watcher,
    hang_up,
    place_call,
    start_watchers,
    stepping_simulator,
)

SCRIPT = Path(__file__).parent / "js" / "dev_proxy.js"
# As webpack-dev-server 5 depends on them.
PACKAGES = ("express@4.21.2", "compression@1.8.1", "http-proxy-middleware@3.0.5")
STEP_S = 1.5
# What a browser accepts: the proxy compresses for it whatever it may.
BROWSER_ENCODINGS = {"Accept-Encoding": "gzip, deflate, br"}


@pytest.fixture(scope="module")
def dev_server_packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder with Express, compression and http-proxy-middleware from npm."""
    return npm_scratch(tmp_path_factory, "dev-proxy", PACKAGES, [SCRIPT])


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Server]:
    simulator = stepping_simulator(STEP_S, tmp_path / "sim.log")
    port = free_port()
    env = gateway_env(simulator, port, GATEWAY_EVENTS_POLL_SECONDS="0.25")
    server = start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", tmp_path / "gw.log")
    yield server
    server.stop()
    simulator.stop()


@pytest.fixture
def dev_proxy(dev_server_packages: Path, gateway: Server) -> Iterator[str]:
    """The dev server's proxy in front of the gateway; its base URL."""
    process = subprocess.Popen(
        ["node", SCRIPT.name, gateway.url],
        cwd=dev_server_packages,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    listening = json.loads(process.stdout.readline())
    yield f"http://127.0.0.1:{listening['port']}"
    process.terminate()
    process.wait(timeout=10)
    process.stdout.close()


def test_each_event_arrives_through_a_compressing_dev_proxy_as_it_happens(
    dev_proxy: str, gateway: Server
) -> None:
    compressed = http("GET", f"{dev_proxy}/metrics", headers=BROWSER_ENCODINGS)
    assert compressed.headers["Content-Encoding"] in ("br", "gzip"), "it compresses what it may"
    call_id = place_call(gateway)  # answered after two steps; it ends when hung up
    watcher = Watcher(
        f"{dev_proxy}/calls/{call_id}/events", "through-the-proxy", headers=BROWSER_ENCODINGS
    )
    thread = start_watchers([watcher])[0]

    # Each state arrives while the call goes on: nothing is held back until it ends.
    wait_until(lambda: watcher.states() == ["Connecting"], "Connecting", timeout_s=STEP_S * 2)
    wait_until(lambda: "Alerted" in watcher.states(), "Alerted", timeout_s=STEP_S * 3)
    wait_until(lambda: "Connected" in watcher.states(), "Connected", timeout_s=STEP_S * 3)
    hang_up(gateway, call_id)
    thread.join(timeout=30)

    assert watcher.status == 200
    assert "Content-Encoding" not in watcher.response_headers
    assert watcher.response_headers["Cache-Control"] == "no-store, no-transform"
    assert watcher.states() == ["Connecting", "Alerted", "Connected", "Disconnected"]
    assert watcher.ended_cleanly
