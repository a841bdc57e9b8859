"""Secrets never leak: not into answers, not into /metrics, not into the log, not on a bad start."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.integration.processes import (
    Response,
    Server,
    free_port,
    gateway_env,
    http,
    set_faults,
    simulator_requests,
    start,
)

# Distinctive and fresh per run, so a hit can only be a leak.
PASSWORD = "pw-" + secrets.token_urlsafe(24)
BEARER_TOKEN = "upstream-tok-" + secrets.token_urlsafe(32)
API_KEY = "key-" + secrets.token_urlsafe(24)
SERVICE_USER = "svc"
BASIC_CREDENTIALS = base64.b64encode(f"{SERVICE_USER}:{PASSWORD}".encode()).decode("ascii")
SECRETS = {
    "EWS_PASSWORD": PASSWORD,
    "the Basic credentials": BASIC_CREDENTIALS,
    "EWS_BEARER_TOKEN": BEARER_TOKEN,
    "the API key": API_KEY,
}
UPSTREAM_AUTH = {
    "basic": {"EWS_AUTH": "basic", "EWS_USERNAME": SERVICE_USER, "EWS_PASSWORD": PASSWORD},
    "bearer": {"EWS_AUTH": "bearer", "EWS_BEARER_TOKEN": BEARER_TOKEN},
}
CONFIG_ERROR_EXIT = 2


def keys_file(directory: Path, *keys: str) -> Path:
    path = directory / "api-keys"
    path.write_text("".join(hashlib.sha256(k.encode()).hexdigest() + "\n" for k in keys))
    return path


def assert_no_secret_in(text: str, where: str) -> None:
    for name, secret in SECRETS.items():
        assert secret not in text, f"{name} leaked into {where}"


@dataclass
class Transcript:
    """Everything the gateway said to its callers during a test."""

    answers: list[tuple[str, Response]] = field(default_factory=list)

    def record(self, label: str, answer: Response) -> Response:
        self.answers.append((label, answer))
        return answer

    def texts(self) -> Iterator[tuple[str, str]]:
        for label, answer in self.answers:
            headers = "\n".join(f"{name}: {value}" for name, value in answer.headers.items())
            yield label, headers + "\n\n" + answer.body.decode("utf-8", "replace")

    def answer(self, label: str) -> Response:
        return next(answer for seen, answer in self.answers if seen == label)


@pytest.fixture(params=sorted(UPSTREAM_AUTH))
def secured_gateway(
    request: pytest.FixtureRequest, simulator: Server, tmp_path: Path
) -> Iterator[Server]:
    """`serve` with service credentials for Exchange and API keys for callers, logging debug."""
    port = free_port()
    env = gateway_env(
        simulator,
        port,
        GATEWAY_AUTH="apikey",
        GATEWAY_API_KEYS_FILE=str(keys_file(tmp_path, API_KEY)),
        GATEWAY_LOG_LEVEL="debug",
        **UPSTREAM_AUTH[request.param],
    )
    server = start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", tmp_path / "gw.log")
    yield server
    server.stop()


def exercise(gateway: Server, simulator: Server) -> Transcript:
    """Drive success, caller 401s, upstream 401 and other failures; read /metrics between."""
    seen = Transcript()
    key = {"X-API-Key": API_KEY}
    url = gateway.url
    placed = seen.record(
        "place",
        http("POST", f"{url}/calls", {"itemId": "AAMkVoice", "dialString": "+15551234567"}, key),
    )
    assert placed.status == 201, placed.body
    call = f"{url}/calls/{quote(placed.json()['callId'], safe='')}"
    assert seen.record("read", http("GET", call, headers=key)).status == 200
    assert seen.record("hang up", http("DELETE", call, headers=key)).status == 200
    assert seen.record("no key", http("DELETE", call)).status == 401
    wrong_key = {"X-API-Key": API_KEY[:-1]}
    assert seen.record("wrong key", http("DELETE", call, headers=wrong_key)).status == 401
    seen.record("metrics after callers", http("GET", f"{url}/metrics"))
    # The 401 last: credentials Exchange refused are not sent again for 30 s.
    for fault, status in [
        ({"kind": "fault", "code": "ErrorAccessDenied"}, 403),
        ({"kind": "html-500"}, 503),
        ({"kind": "reset"}, 502),
        ({"kind": "http-401"}, 502),
    ]:
        set_faults(simulator, fault)
        # The caller's own call: any other id stops at the gateway (calls belong to their caller).
        answer = seen.record(fault["kind"], http("DELETE", call, headers=key))
        assert answer.status == status, answer.body
    set_faults(simulator)
    seen.record("metrics after upstream failures", http("GET", f"{url}/metrics"))
    seen.record("readyz", http("GET", f"{url}/readyz"))
    return seen


def test_no_secret_reaches_an_answer_the_metrics_or_the_log(
    secured_gateway: Server, simulator: Server
) -> None:
    transcript = exercise(secured_gateway, simulator)
    secured_gateway.stop()

    for label, text in transcript.texts():
        assert_no_secret_in(text, f"the answer to {label}")
    assert_no_secret_in(secured_gateway.log(), "the log")
    assert "authentication failed" in transcript.answer("http-401").json()["detail"]


def test_the_simulator_received_the_service_credentials(
    secured_gateway: Server, simulator: Server
) -> None:
    place = {"itemId": "AAMkVoice", "dialString": "+15551234567"}
    http("POST", f"{secured_gateway.url}/calls", place, headers={"X-API-Key": API_KEY})
    recorded = simulator_requests(simulator)
    authorization = recorded[-1]["authorization"]
    assert authorization in (f"Basic {BASIC_CREDENTIALS}", f"Bearer {BEARER_TOKEN}")


# A configuration error stops start-up with one line that names the variable, never the secret.


def run_serve(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `serve` expecting it to refuse to start; return its exit status and output."""
    base = {
        "EWS_URL": "http://127.0.0.1:9/EWS/Exchange.asmx",
        "GATEWAY_AUTH": "none",
        "GATEWAY_DIAL_ALLOW": "*",
        "GATEWAY_BIND": f"127.0.0.1:{free_port()}",
        "GATEWAY_WORKERS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env={**os.environ, **base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"EWS_URL": f"https://{SERVICE_USER}:{PASSWORD}@mail.example.com/EWS"}, "EWS_URL"),
        ({"EWS_AUTH": "basic", "EWS_PASSWORD": PASSWORD}, "EWS_USERNAME"),
        ({"EWS_AUTH": "bogus", "EWS_PASSWORD": PASSWORD}, "EWS_AUTH"),
        (
            {"EWS_AUTH": "bearer", "EWS_BEARER_TOKEN": BEARER_TOKEN, "EWS_BEARER_TOKEN_FILE": "x"},
            "EWS_BEARER_TOKEN",
        ),
    ],
    ids=["password-in-url", "basic-without-user", "bad-auth-mode", "token-twice"],
)
def test_a_config_error_names_the_variable_in_one_line_without_the_secret(
    env: dict[str, str], variable: str
) -> None:
    result = run_serve(env)

    output = result.stdout + result.stderr
    assert result.returncode == CONFIG_ERROR_EXIT, output
    assert len(output.strip().splitlines()) == 1, output
    assert variable in output
    assert_no_secret_in(output, "the start-up error")


def test_a_keys_file_holding_plain_keys_never_prints_them(tmp_path: Path) -> None:
    plain = tmp_path / "api-keys"
    plain.write_text(API_KEY + "\n", encoding="utf-8")

    result = run_serve({"GATEWAY_AUTH": "apikey", "GATEWAY_API_KEYS_FILE": str(plain)})

    assert result.returncode != 0
    assert_no_secret_in(result.stdout + result.stderr, "the start-up error")


def test_a_keys_file_holding_plain_keys_stops_start_up_with_one_line_naming_it(
    tmp_path: Path,
) -> None:
    plain = tmp_path / "api-keys"
    plain.write_text(API_KEY + "\n", encoding="utf-8")

    result = run_serve({"GATEWAY_AUTH": "apikey", "GATEWAY_API_KEYS_FILE": str(plain)})

    output = result.stdout + result.stderr
    assert result.returncode == CONFIG_ERROR_EXIT, output
    assert len(output.strip().splitlines()) == 1, output
    assert "GATEWAY_API_KEYS_FILE" in output
