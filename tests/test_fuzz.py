"""Spec-driven fuzzing: schemathesis cases from openapi.yaml against the app on the simulator.

Every operation gets valid (positive) and, where it has inputs, invalid (negative) cases.
Whatever a case holds, the answer is documented for its operation, has the documented
content type and body shape, and is never a 5xx other than the contract's upstream
statuses (502, 503, 504).
"""

from __future__ import annotations

import hashlib
import json
import random
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given
from prometheus_client import CollectorRegistry
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.app import create_app
from gateway.config import Config
from gateway.simulator import SimulatorServer, start_in_thread
from tests.identity import PROBLEM_JSON, close_upstream

SPEC = Path(__file__).resolve().parents[1] / "openapi.yaml"
SCHEMA = schemathesis.openapi.from_path(SPEC)
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}
UPSTREAM_STATUSES = {502, 503, 504}
EXAMPLES_PER_OPERATION = 50
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]
# schemathesis parses an application/yaml body into a mapping and then checks it against
# the spec's `type: string`, which describes the document's text: a tooling artefact.
SPEC_DOCUMENT = "GET /openapi.yaml"
CALL_OPERATIONS = {"POST /calls", "GET /calls/{callId}", "DELETE /calls/{callId}"}

# Exchange misbehaving in every way the contract maps (hangs excluded: they only cost time).
UNRELIABLE_EXCHANGE = [
    {"kind": "busy", "rate": 0.1},
    {"kind": "ews-error", "code": "ErrorAccessDenied", "rate": 0.1},
    {"kind": "ews-error", "code": "ErrorNonExistentMailbox", "rate": 0.1},
    {"kind": "ews-error", "code": "ErrorUserNotUnifiedMessagingEnabled", "rate": 0.1},
    {"kind": "fault", "code": "ErrorSomethingNew", "rate": 0.1},
    {"kind": "warning", "message": "Almost fine.", "rate": 0.1},
    {"kind": "http-401", "rate": 0.1},
    {"kind": "http-503", "retryAfter": 1, "rate": 0.1},
    {"kind": "html-500", "rate": 0.1},
    {"kind": "redirect", "rate": 0.1},
    {"kind": "malformed", "rate": 0.1},
    {"kind": "not-soap", "rate": 0.1},
    {"kind": "billion-laughs", "rate": 0.1},
]


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorServer]:
    # Hypothesis reseeds the global `random` for every example, which would make a fault
    # rule fire for every case or for none; the simulator draws from its own generator.
    chance = random.Random(0x5EED).random
    with start_in_thread("127.0.0.1", 0, step_seconds=0.05, chance=chance) as server:
        yield server


@pytest.fixture(scope="module")
def app(simulator: SimulatorServer) -> Iterator[Flask]:
    """The gateway with its real EWS client, pointed at the simulator."""
    environ = {
        "EWS_URL": simulator.ews_url,
        "GATEWAY_AUTH": "none",
        "EWS_TIMEOUT_SECONDS": "5",
        # Retries only repeat the same answer here; back-off sleeps would just slow the run.
        "EWS_RETRY_MAX_BACKOFF_SECONDS": "0",
        "EWS_BREAKER_FAILURES": "256",
        # Hundreds of generated calls from one caller: the quota would answer most of them.
        "GATEWAY_RATE_LIMIT_CALLS": "off",
    }
    app = create_app(Config.from_env(environ), registry=CollectorRegistry())
    yield app
    close_upstream(app)


@pytest.fixture(params=["reliable", "unreliable"])
def exchange(request: pytest.FixtureRequest, simulator: SimulatorServer) -> Iterator[str]:
    """Exchange answering as it should, or misbehaving on a random share of calls."""
    set_faults(simulator, UNRELIABLE_EXCHANGE if request.param == "unreliable" else [])
    yield request.param
    set_faults(simulator, [])


def set_faults(simulator: SimulatorServer, rules: list[dict[str, Any]]) -> None:
    """Replace the simulator's fault rules through its control API."""
    request = urllib.request.Request(
        simulator.url + "/simulator/faults",
        data=json.dumps({"faults": rules}).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def has_inputs(label: str) -> bool:
    operation = OPERATIONS[label]
    return bool(len(operation.path_parameters) or len(operation.headers) or operation.body)


CASES = [
    pytest.param(label, mode, id=f"{label}-{mode.value}")
    for label in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or has_inputs(label)
]


def checks_for(label: str) -> list[Any]:
    if label == SPEC_DOCUMENT:
        return [check for check in CHECKS if check is not response_schema_conformance]
    return CHECKS


def fuzz(label: str, mode: GenerationMode, app: Flask, examples: int) -> list[int]:
    """Run generated cases for one operation through the app; return the statuses seen."""
    statuses: list[int] = []

    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=OPERATIONS[label].as_strategy(generation_mode=mode))
    def answer_as_documented(case: schemathesis.Case) -> None:
        response = case.call(app=app)
        status = response.status_code
        statuses.append(status)
        body = (response.content or b"")[:300]
        assert status < 500 or status in UPSTREAM_STATUSES, f"{status}: {body!r}"
        if status >= 400:
            assert response.headers["content-type"][0].startswith(PROBLEM_JSON), body
        case.validate_response(response, checks=checks_for(label))

    answer_as_documented()
    return statuses


@pytest.mark.network
@pytest.mark.parametrize(("label", "mode"), CASES)
def test_every_answer_is_documented_and_never_an_unexpected_server_error(
    label: str, mode: GenerationMode, app: Flask, exchange: str
) -> None:
    statuses = fuzz(label, mode, app, EXAMPLES_PER_OPERATION)

    if exchange == "unreliable" and mode is GenerationMode.POSITIVE and label in CALL_OPERATIONS:
        # Guards the set-up: the misbehaving Exchange was really asked.
        assert UPSTREAM_STATUSES & set(statuses)


@pytest.fixture(scope="module")
def locked_app(simulator: SimulatorServer, tmp_path_factory: pytest.TempPathFactory) -> Flask:
    """The gateway requiring an API key that the generated cases do not have."""
    keys = tmp_path_factory.mktemp("fuzz") / "api-keys"
    keys.write_text(hashlib.sha256(b"not-sent").hexdigest() + "\n", encoding="utf-8")
    environ = {
        "EWS_URL": simulator.ews_url,
        "GATEWAY_AUTH": "apikey",
        "GATEWAY_API_KEYS_FILE": str(keys),
    }
    return create_app(Config.from_env(environ), registry=CollectorRegistry())


@pytest.mark.network
@pytest.mark.parametrize("label", sorted(CALL_OPERATIONS))
def test_answers_to_callers_without_credentials_are_documented(
    label: str, locked_app: Flask
) -> None:
    statuses = fuzz(label, GenerationMode.POSITIVE, locked_app, examples=10)

    assert set(statuses) == {401}
