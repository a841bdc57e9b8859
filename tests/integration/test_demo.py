"""`ews-gateway demo` and `serve` as a new user meets them: options, banner, busy ports.

The README's and docs/' examples run in test_doc_examples.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.processes import Server, free_port, http, start

README = Path(__file__).parents[2] / "README.md"
SIMULATOR_PAGE = Path(__file__).parents[2] / "docs" / "simulator.md"
RAM_DISK = Path("/dev/shm")


def run_gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another process listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def metric_dirs_of(pid: int) -> list[Path]:
    return list(RAM_DISK.glob(f"ews-gateway-metrics-{pid}-*")) if RAM_DISK.is_dir() else []


def test_demo_help_describes_both_listen_addresses() -> None:
    result = run_gateway("demo", "--help")

    assert result.returncode == 0
    assert "--bind HOST:PORT" in result.stdout
    assert "--simulator-bind HOST:PORT" in result.stdout
    assert "/simulator/faults" in result.stdout


def test_simulator_help_names_its_endpoints_and_every_option_its_page_gives() -> None:
    result = run_gateway("simulator", "--help")

    assert result.returncode == 0
    assert "/EWS/Exchange.asmx" in result.stdout
    assert "/simulator/faults" in result.stdout
    assert "(default 127.0.0.1:8081)" in result.stdout
    assert "docs/simulator.md" in result.stdout
    page = SIMULATOR_PAGE.read_text(encoding="utf-8")
    about = page[page.index("## Running it") : page.index("## Failing like Exchange")]
    options = set(re.findall(r"(?<![-\w])--[a-z][a-z-]+", about)) - {"--simulator-bind"}
    assert {"--latency-ms", "--step-seconds", "--tls-key"} <= options
    for option in options:
        assert option in result.stdout, option


@pytest.mark.parametrize("option", ["--bind", "--simulator-bind"])
def test_demo_on_a_busy_port_fails_in_one_line_before_any_banner_leaving_nothing(
    busy_port: int, option: str
) -> None:
    other = f"127.0.0.1:{free_port()}"
    given = {"--bind": other, "--simulator-bind": other, option: f"127.0.0.1:{busy_port}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", *(f"{k}={v}" for k, v in given.items())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 2
    assert stdout == ""
    assert stderr == (
        f"ews-gateway: configuration error: {option}: cannot listen on 127.0.0.1:{busy_port}: "
        "Address already in use\n"
    )
    assert metric_dirs_of(process.pid) == []


def test_serve_on_a_busy_port_fails_in_one_line_leaving_no_metric_folder(busy_port: int) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "EWS_URL": "http://127.0.0.1:9/EWS/Exchange.asmx",
        "GATEWAY_AUTH": "none",
        "GATEWAY_DIAL_ALLOW": "*",
        "GATEWAY_BIND": f"127.0.0.1:{busy_port}",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 2
    assert stderr.count("\n") == 1
    assert f"GATEWAY_BIND: cannot listen on 127.0.0.1:{busy_port}" in stderr
    assert metric_dirs_of(process.pid) == []


@pytest.mark.parametrize(
    ("bind", "says"),
    [
        ("8082", "must be HOST:PORT"),
        ("localhost", "must be HOST:PORT"),
        ("127.0.0.1:99999", "the port must be a number from 1 to 65535"),
    ],
)
def test_serve_refuses_a_listen_address_without_host_and_port_in_one_line(
    bind: str, says: str
) -> None:
    env = {"EWS_URL": "http://127.0.0.1:9/", "GATEWAY_AUTH": "none", "GATEWAY_BIND": bind}

    result = run_gateway("serve", env={"PATH": "/usr/bin:/bin", **env})

    assert result.returncode == 2
    assert result.stderr.startswith("ews-gateway: configuration error: GATEWAY_BIND")
    assert says in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make (the README's command)")
def test_make_demo_listens_where_the_readme_says_to_move_it_when_8080_is_taken(
    tmp_path: Path,
) -> None:
    gateway_bind = f"127.0.0.1:{free_port()}"
    simulator_bind = f"127.0.0.1:{free_port()}"
    # The environment this test runs in stands for the one `make` builds.
    here = f"BIN={Path(sys.executable).parent}"
    command = ["make", "--no-print-directory", "-C", str(README.parent), "demo", "STAMP=", here]
    command += [f"DEMO_BIND={gateway_bind}", f"SIMULATOR_BIND={simulator_bind}"]
    log = (tmp_path / "make-demo.log").open("wb")
    make = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and make.poll() is None:
            try:
                if http("GET", f"http://{gateway_bind}/readyz", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        assert http("GET", f"http://{gateway_bind}/readyz").status == 200
        assert http("GET", f"http://{simulator_bind}/simulator/health").status == 200
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(30)
        log.close()
    assert "make demo DEMO_BIND=127.0.0.1:9080 SIMULATOR_BIND=127.0.0.1:9081" in README.read_text()


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    """`ews-gateway demo` on two free ports; yields it and its banner."""
    gateway_bind = f"127.0.0.1:{free_port()}"
    simulator_bind = f"127.0.0.1:{free_port()}"
    log = tmp_path / "demo.log"
    server = start(
        ["demo", "--bind", gateway_bind, "--simulator-bind", simulator_bind],
        {},
        f"http://{gateway_bind}",
        "/readyz",
        log,
    )
    yield server, simulator_bind
    server.stop()


def test_the_demo_banner_prints_the_simulators_working_control_url(
    demo: tuple[Server, str],
) -> None:
    server, simulator_bind = demo

    control_urls = set(re.findall(r"http://[^\s']+/simulator/[a-z]*", server.log()))

    assert f"http://{simulator_bind}/simulator/faults" in control_urls
    assert f"http://{simulator_bind}/simulator/" in control_urls  # the simulator's own banner
    for url in control_urls:
        assert http("GET", url).status == 200, url
