"""Third-party EWS clients for Node against `ews-gateway simulator`, as they meet a real Exchange.

ews-javascript-api (with @ewsjs/xhr's NTLM, which opens with a GET to
Exchange.asmx) and node-ews (which builds its SOAP client from the server's
Services.wsdl, messages.xsd and types.xsd) are installed from npm into a scratch
folder and run the scripts in tests/integration/js against the simulator, which
validates every request against the real EWS schema where it is at hand.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ews_schema import SCHEMA_DIR, requires_schema, schema_available
from tests.integration.npm import npm_scratch
from tests.integration.processes import Server, free_port, http, simulator_requests, start

SCRIPTS = Path(__file__).parent / "js"
# node-ews 3.5.0 requires a package it does not declare (ntlm-client); 3.4.2 installs whole.
PACKAGES = ("ews-javascript-api@0.15.3", "node-ews@3.4.2")
CLIENT_TIMEOUT_S = 60
USER, PASSWORD = "svc-um", "Um-Password-1"
DOMAIN = "CONTOSO"
DIAL_STRING = "+15551234567"


@pytest.fixture(scope="module")
def node_clients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder with both clients installed from npm and the test scripts beside them."""
    return npm_scratch(tmp_path_factory, "ews-clients", PACKAGES, SCRIPTS.glob("*.js"))


def simulator_with(auth_args: list[str], env: dict[str, str], tmp_path: Path) -> Server:
    port = free_port()
    # Calls stay Connecting for the whole test: no assertion races the timeline.
    args = ["simulator", "--bind", f"127.0.0.1:{port}", "--step-seconds", "60", *auth_args]
    if schema_available():
        args += ["--schema-dir", str(SCHEMA_DIR)]
    url = f"http://127.0.0.1:{port}"
    return start(args, env, url, "/simulator/health", tmp_path / "sim.log")


@pytest.fixture
def basic_simulator(tmp_path: Path) -> Iterator[Server]:
    accounts = tmp_path / "accounts"
    accounts.write_text(f"{USER}:{PASSWORD}\n", encoding="utf-8")
    server = simulator_with(["--auth", "basic", "--accounts", str(accounts)], {}, tmp_path)
    yield server
    server.stop()


@pytest.fixture
def ntlm_simulator(tmp_path: Path) -> Iterator[Server]:
    users = tmp_path / "ntlm-users"
    users.write_text(f"{DOMAIN}:{USER}:{PASSWORD}\n", encoding="utf-8")
    server = simulator_with(["--auth", "ntlm"], {"NTLM_USER_FILE": str(users)}, tmp_path)
    yield server
    server.stop()


def run_node(folder: Path, script: str, *args: str) -> dict[str, Any]:
    """Run one of the scripts in the scratch folder; return the JSON line it prints."""
    finished = subprocess.run(
        ["node", script, *args],
        cwd=folder,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    result: dict[str, Any] = json.loads(finished.stdout.strip().splitlines()[-1])
    return result


def assert_call_placed_hung_up_and_logged(
    simulator: Server, result: dict[str, Any], scheme: str
) -> None:
    assert result["state"] == "Connecting"
    assert result["connectionFailureCause"] == "None"
    calls = http("GET", simulator.url + "/simulator/calls").json()
    assert [call["id"] for call in calls] == [result["phoneCallId"]]
    assert calls[0]["state"] == "Disconnected"
    recorded = simulator_requests(simulator)
    assert [request["operation"] for request in recorded] == [
        "PlayOnPhone",
        "GetPhoneCallInformation",
        "DisconnectPhoneCall",
    ]
    assert recorded[0]["authorization"].startswith(scheme + " ")


def test_ews_javascript_api_places_a_call_with_basic_authentication(
    node_clients: Path, basic_simulator: Server
) -> None:
    result = run_node(
        node_clients,
        "ews_javascript_api_call.js",
        basic_simulator.url + "/EWS/Exchange.asmx",
        "basic",
        USER,
        PASSWORD,
        DIAL_STRING,
    )

    assert_call_placed_hung_up_and_logged(basic_simulator, result, "Basic")


def test_ews_javascript_api_places_a_call_with_ntlm_begun_by_a_get(
    node_clients: Path, ntlm_simulator: Server
) -> None:
    """@ewsjs/xhr sends NTLM's first message on a GET: the challenge must come before any 405."""
    result = run_node(
        node_clients,
        "ews_javascript_api_call.js",
        ntlm_simulator.url + "/EWS/Exchange.asmx",
        "ntlm",
        f"{DOMAIN}\\{USER}",
        PASSWORD,
        DIAL_STRING,
    )

    assert_call_placed_hung_up_and_logged(ntlm_simulator, result, "NTLM")


@requires_schema
def test_node_ews_builds_its_client_from_the_simulators_wsdl_and_schema(
    node_clients: Path, basic_simulator: Server, tmp_path: Path
) -> None:
    """node-ews fetches Services.wsdl and both xsds (Basic), then calls the operations it found.

    Only Basic: node-ews's NTLM (httpntlm) needs DES, which Node's OpenSSL 3 no longer offers.
    """
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    result = run_node(
        node_clients,
        "node_ews_call.js",
        basic_simulator.url,
        "basic",
        USER,
        PASSWORD,
        DIAL_STRING,
        str(downloads),
    )

    assert result["state"] == "Connecting"
    assert result["connectionFailureCause"] == "None"
    for name in ("messages.xsd", "types.xsd"):
        assert (downloads / name).read_bytes() == (SCHEMA_DIR / name).read_bytes()
    wsdl = (downloads / "services.wsdl").read_text(encoding="utf-8")
    # Served without a service element, as Exchange does: node-ews adds its own.
    assert wsdl.count("<wsdl:service ") == 1
    assert f'location="{basic_simulator.url}/EWS/Exchange.asmx"' in wsdl
    recorded = simulator_requests(basic_simulator)
    assert [request["operation"] for request in recorded] == [
        "PlayOnPhone",
        "GetPhoneCallInformation",
    ]
