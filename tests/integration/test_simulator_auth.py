"""`ews-gateway simulator --auth`: the simulator process asking for the gateway's credentials."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.in_process_gateway import Gateway
from tests.integration.processes import Server, free_port, http, start

CALL = {"itemId": "AAMkVoiceMail", "dialString": "+15551234567"}


@pytest.fixture
def basic_simulator(tmp_path: Path) -> Iterator[Server]:
    accounts = tmp_path / "accounts"
    accounts.write_text("svc-gateway:Basic-Password-1\n", encoding="utf-8")
    port = free_port()
    args = ["simulator", "--bind", f"127.0.0.1:{port}", "--auth", "basic"]
    server = start(
        [*args, "--accounts", str(accounts)],
        {},
        f"http://127.0.0.1:{port}",
        "/simulator/health",
        tmp_path / "sim.log",
    )
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _close_gateways() -> Iterator[None]:
    yield
    while Gateway.opened:
        Gateway.opened.pop().close()


@pytest.mark.parametrize(
    ("password", "status"),
    [("Basic-Password-1", 201), ("wrong", 502)],
    ids=["right password", "wrong password"],
)
def test_the_simulator_asks_for_basic_credentials(
    basic_simulator: Server, password: str, status: int
) -> None:
    gateway = Gateway(
        {
            "EWS_URL": basic_simulator.url + "/EWS/Exchange.asmx",
            "EWS_AUTH": "basic",
            "EWS_USERNAME": "svc-gateway",
            "EWS_PASSWORD": password,
        }
    )

    answer = gateway.place_call()

    assert answer.status_code == status
    placed = http("GET", basic_simulator.url + "/simulator/calls").json()
    assert len(placed) == (1 if status == 201 else 0)


def test_a_kerberos_simulator_without_a_keytab_says_what_it_needs(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(AssertionError, match="--auth kerberos needs --keytab FILE"):
        start(
            ["simulator", "--bind", f"127.0.0.1:{port}", "--auth", "kerberos"],
            {},
            f"http://127.0.0.1:{port}",
            "/simulator/health",
            tmp_path / "sim.log",
        )
