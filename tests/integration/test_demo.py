"""`ews-gateway demo` and `serve` as a new user meets them: options, banner, README, busy ports."""

from __future__ import annotations

import json
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

from tests.integration.conftest import Server, free_port, http, start

README = Path(__file__).parents[2] / "README.md"
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


def test_simulator_help_names_its_endpoints_and_every_option_the_readme_gives() -> None:
    result = run_gateway("simulator", "--help")

    assert result.returncode == 0
    assert "/EWS/Exchange.asmx" in result.stdout
    assert "/simulator/faults" in result.stdout
    assert "(default 127.0.0.1:8081)" in result.stdout
    readme = README.read_text(encoding="utf-8")
    about = readme[readme.index("Run the simulator alone") : readme.index("## Frontends")]
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


def readme_fault_examples() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("Against `make demo`:") :]
    return section[section.index("```sh\n") + 6 : section.index("```\n", 10)]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (the README's examples)")
def test_the_readmes_fault_examples_work_as_written_against_the_demo(
    demo: tuple[Server, str],
) -> None:
    server, simulator_bind = demo
    gateway_port = server.url.rsplit(":", 1)[1]
    simulator_port = simulator_bind.rsplit(":", 1)[1]
    script = (
        readme_fault_examples()
        .replace("localhost:8081", f"127.0.0.1:{simulator_port}")
        .replace("localhost:8080", f"127.0.0.1:{gateway_port}")
    )

    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "HTTP/1.1 503" in result.stdout
    assert "Retry-After: 3" in result.stdout
    assert '"kind": "latency"' in result.stdout
    assert result.stdout.rstrip().endswith('"faults": []\n}'.rstrip())


def readme_session_blocks() -> list[str]:
    """The `$ command` / output blocks of the README's "Trying it" section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Trying it") : text.index("The simulator's conventions")]
    return [block for block in section.split("```sh\n")[1:] if block.startswith("$ ")]


def readme_session(block: str) -> list[tuple[str, str]]:
    """Split a block into (command, output it shows) pairs; continued lines joined."""
    pairs: list[tuple[str, str]] = []
    for part in block[: block.index("```")].split("\n$ ")[0:]:
        lines = part.removeprefix("$ ").split("\n")
        command = lines.pop(0)
        while command.endswith("\\"):
            command = command[:-1] + lines.pop(0)
        pairs.append((command, "\n".join(lines).strip()))
    return pairs


def matches(shown: object, real: object) -> bool:
    """Whether REAL is what SHOWN shows: equal, with "..." standing for the rest of a string."""
    if isinstance(shown, str) and shown.endswith("..."):
        return isinstance(real, str) and real.startswith(shown.removesuffix("..."))
    if isinstance(shown, dict) and isinstance(real, dict):
        return shown.keys() == real.keys() and all(matches(shown[k], real[k]) for k in shown)
    return shown == real


def check_answer(command: str, shown: str, real: str, call_id: str) -> None:
    """The status, headers and JSON body the README shows are what curl printed."""
    shown_head, _, shown_body = shown.partition("\n\n")
    if shown.startswith("HTTP/"):
        # text mode has turned CRLF into LF
        real_head, _, real_body = real.partition("\n\n")
        shown_lines = shown_head.splitlines()
        assert real_head.splitlines()[0] == shown_lines[0], command
        real_headers = dict(line.split(": ", 1) for line in real_head.splitlines()[1:])
        for line in shown_lines[1:]:
            name, value = line.split(": ", 1)
            assert name in real_headers, f"{command}: no {name}"
            if name == "Content-Type":
                assert real_headers[name] == value, command
            if name == "Location":
                assert real_headers[name] == f"/calls/{call_id}", command
    else:
        shown_body, real_body = shown_head, real
    if shown_body:
        expected = json.loads(shown_body.replace("\n", ""))
        if "callId" in expected:
            expected["callId"] = "..."
        assert matches(expected, json.loads(real_body)), f"{command}:\n{real_body}"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (the README's examples)")
def test_the_readmes_call_examples_answer_as_shown_against_the_demo(
    demo: tuple[Server, str],
) -> None:
    server, _ = demo
    port = server.url.rsplit(":", 1)[1]
    call_id = ""
    for block in readme_session_blocks():
        for command, shown in readme_session(block):
            if command.startswith("CALL="):
                continue
            if "seconds later" in command:
                time.sleep(2.5)  # the simulator's call: Connecting, Alerted, then Connected
            script = command.replace("localhost:8080", f"127.0.0.1:{port}")
            result = subprocess.run(
                ["bash", "-c", script],
                env={**os.environ, "CALL": call_id},
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            if "-X POST" in command:
                call_id = json.loads(result.stdout.split("\n\n", 1)[1])["callId"]
            check_answer(command, shown, result.stdout, call_id)
    assert call_id, "the README places a call"


def readme_event_stream_examples() -> list[tuple[str, str]]:
    """The README's `curl -N` examples of the event stream, with the output each shows."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Frontends") :]
    block = section[section.index("```sh\n$ curl -N") + 6 :]
    return readme_session(block)


def sse_events(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append(fields)
    return events


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (the README's examples)")
def test_the_readmes_event_stream_examples_stream_as_shown_against_the_demo(
    demo: tuple[Server, str],
) -> None:
    server, _ = demo
    port = server.url.rsplit(":", 1)[1]
    placed = http(
        "POST",
        f"{server.url}/calls",
        body={"itemId": "AAMkADemoVoiceMail", "dialString": "+15551234567"},
    )
    call_id = placed.json()["callId"]
    examples = readme_event_stream_examples()
    assert [command for command, _ in examples] == [
        "curl -N localhost:8080/calls/$CALL/events",
        "curl -si -H 'Last-Event-ID: 4.98b0913fd6cf' localhost:8080/calls/$CALL/events",
        "curl -si localhost:8080/calls/no-such-call/events",
    ]
    stream, *answers = examples
    check_stream(*stream, port, server, call_id)
    for command, shown in answers:  # after the end, and an unknown call: no stream
        script = command.replace("localhost:8080", f"127.0.0.1:{port}")
        result = subprocess.run(
            ["bash", "-c", script],
            env={**os.environ, "CALL": call_id},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        check_answer(command, shown, result.stdout, call_id)


def check_stream(command: str, shown: str, port: str, server: Server, call_id: str) -> None:
    """The README's watcher sees the call answered, then hung up, as the README shows it."""
    script = command.replace("localhost:8080", f"127.0.0.1:{port}")
    script = script.replace("curl -N", "curl -N --max-time 30")  # a stream that never ends
    with subprocess.Popen(
        ["bash", "-c", script],
        env={**os.environ, "CALL": call_id},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as watcher:
        assert watcher.stdout is not None
        real = ""
        while '"state":"Connected"' not in real:
            line = watcher.stdout.readline()
            assert line, f"the stream ended before Connected:\n{real}"
            real += line
        assert http("DELETE", f"{server.url}/calls/{call_id}").status == 200
        real += watcher.stdout.read()  # to the end of the stream
    assert watcher.returncode == 0, real
    expected, received = sse_events(shown), sse_events(real)
    assert [e.keys() for e in received] == [e.keys() for e in expected], real
    for want, got in zip(expected, received, strict=True):
        assert got["id"] == want["id"], real  # the id names the state itself
        assert got["event"] == want["event"], real
        assert matches(json.loads(want["data"]), json.loads(got["data"])), real
