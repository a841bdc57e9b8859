"""`ews-gateway serve` under real gunicorn against the real simulator."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.ews_schema import SKIP_REASON, assert_envelope_valid, schema_available
from tests.integration.processes import (
    Server,
    free_port,
    gateway_env,
    http,
    run_serve,
    sample,
    set_faults,
    simulator_requests,
    start,
)

PROBLEM_JSON = "application/problem+json"


def place_call(gateway: Server, dial_string: str = "+15551234567") -> str:
    answer = http(
        "POST", f"{gateway.url}/calls", {"itemId": "AAMkVoiceMail", "dialString": dial_string}
    )
    assert answer.status == 201, answer.body
    call_id: str = answer.json()["callId"]
    assert answer.headers["Location"] == f"/calls/{call_id}"
    return call_id


def wait_for_state(gateway: Server, call_id: str, state: str, timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        answer = http("GET", f"{gateway.url}/calls/{quote(call_id, safe='')}")
        assert answer.status == 200, answer.body
        seen = answer.json()
        if seen["state"] == state:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"call never reached {state}; last seen {seen}")


def test_hanging_up_a_call_the_simulator_placed_answers_the_contract_json(gateway: Server) -> None:
    call_id = place_call(gateway)
    answer = http("DELETE", f"{gateway.url}/calls/{quote(call_id, safe='')}")
    assert answer.status == 200
    assert answer.json() == {
        "callId": call_id,
        "status": "disconnected",
        "ewsResponseCode": "NoError",
    }


def test_hanging_up_an_unknown_call_is_404_problem_json(gateway: Server) -> None:
    answer = http("DELETE", f"{gateway.url}/calls/no-such-call")
    assert answer.status == 404
    assert answer.headers["Content-Type"] == PROBLEM_JSON
    problem = answer.json()
    assert problem["ewsResponseCode"] == "ErrorInvalidPhoneCallId"
    assert problem["requestId"] == answer.headers["X-Request-ID"]


def test_a_call_goes_from_placed_to_connected_to_disconnected(gateway: Server) -> None:
    call_id = place_call(gateway)
    wait_for_state(gateway, call_id, "Connected")
    assert http("DELETE", f"{gateway.url}/calls/{quote(call_id, safe='')}").status == 200
    final = wait_for_state(gateway, call_id, "Disconnected")
    assert final["connectionFailureCause"] == "None"


def test_a_busy_line_ends_disconnected_with_user_busy_and_no_sip_fields(gateway: Server) -> None:
    """MS-OXWUMS leaves the SIP fields out of a successful answer: the cause tells it all."""
    call_id = place_call(gateway, dial_string="+15550000486")
    final = wait_for_state(gateway, call_id, "Disconnected")
    assert final["connectionFailureCause"] == "UserBusy"
    assert "sipResponseCode" not in final
    assert "sipResponseText" not in final


def test_sip_fields_exchange_sends_reach_the_caller(gateway: Server, simulator: Server) -> None:
    set_faults(simulator, {"kind": "sip", "code": 486, "text": "Busy Here"})
    call_id = place_call(gateway, dial_string="+15550000486")
    final = wait_for_state(gateway, call_id, "Disconnected")
    assert final["connectionFailureCause"] == "UserBusy"
    assert final["sipResponseCode"] == 486
    assert final["sipResponseText"] == "Busy Here"


def test_the_request_id_reaches_exchange_and_comes_back(gateway: Server, simulator: Server) -> None:
    answer = http("DELETE", f"{gateway.url}/calls/abc", headers={"X-Request-ID": "trace-42"})
    assert answer.headers["X-Request-ID"] == "trace-42"
    assert simulator_requests(simulator)[-1]["requestId"] == "trace-42"


@pytest.mark.skipif(not schema_available(), reason=SKIP_REASON)
def test_every_envelope_that_reached_the_simulator_is_schema_valid(
    gateway: Server, simulator: Server
) -> None:
    call_id = place_call(gateway)
    http("GET", f"{gateway.url}/calls/{quote(call_id, safe='')}")
    http("DELETE", f"{gateway.url}/calls/{quote(call_id, safe='')}")
    hostile_id = quote("a\"<&>'b", safe="")
    http("DELETE", f"{gateway.url}/calls/{hostile_id}")
    sent = simulator_requests(simulator)
    assert {request["operation"] for request in sent} == {
        "PlayOnPhone",
        "GetPhoneCallInformation",
        "DisconnectPhoneCall",
    }
    for request in sent:
        assert_envelope_valid(request["body"].encode())


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        ({"kind": "busy", "backOffMs": 2500}, 503),
        ({"kind": "ews-error", "code": "ErrorAccessDenied"}, 403),
        ({"kind": "fault", "code": "ErrorInternalServerTransientError"}, 503),
        ({"kind": "fault", "code": "ErrorSomethingNew"}, 502),
        ({"kind": "http-401"}, 502),
        ({"kind": "http-503"}, 503),
        ({"kind": "html-500"}, 503),
        ({"kind": "redirect"}, 502),
        ({"kind": "malformed"}, 502),
        ({"kind": "not-soap"}, 502),
        ({"kind": "reset"}, 502),
        ({"kind": "billion-laughs"}, 502),
        ({"kind": "hang", "ms": 10000}, 504),
    ],
    ids=lambda value: (
        "-".join(str(part) for part in value.values()) if isinstance(value, dict) else str(value)
    ),
)
def test_exchange_failures_reach_the_caller_as_the_contract_says(
    gateway: Server, simulator: Server, fault: dict, status: int
) -> None:
    set_faults(simulator, {**fault, "count": 1})
    answer = http("DELETE", f"{gateway.url}/calls/some-call")
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"] == PROBLEM_JSON
    body = answer.body.decode()
    assert "Traceback" not in body
    assert "<html" not in body.lower()
    if fault["kind"] == "busy":
        assert answer.headers["Retry-After"] == "3"
    if fault["kind"] == "http-401":
        assert "authentication failed" in answer.json()["detail"]
    # The worker that took the failure keeps serving.
    assert http("GET", f"{gateway.url}/livez").status == 200


def test_metrics_count_every_request_exactly_across_workers(gateway: Server) -> None:
    for _ in range(40):
        http("DELETE", f"{gateway.url}/calls/unknown")
    text = http("GET", f"{gateway.url}/metrics").body.decode()
    requests = (
        'ews_gateway_http_requests_total{method="DELETE",route="/calls/<call_id>",status="404"}'
    )
    upstream = (
        'ews_gateway_upstream_requests_total{operation="DisconnectPhoneCall",outcome="ews_error"}'
    )
    assert sample(text, requests) == 40
    assert sample(text, upstream) == 40
    assert "unknown" not in text


def test_serve_warns_at_start_when_callers_or_exchange_go_unchecked(
    simulator: Server, tmp_path: Path
) -> None:
    port = free_port()
    env = gateway_env(simulator, port, EWS_VERIFY_TLS="false")
    env["EWS_URL"] = "https://exchange.invalid/EWS/Exchange.asmx"
    server = start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", tmp_path / "gw.log")
    server.stop()

    warnings = [
        entry["message"]
        for entry in map(json.loads, server.log().splitlines())
        if entry.get("level") == "WARNING"
    ]
    assert any(message.startswith("GATEWAY_AUTH=none") for message in warnings)
    assert any(message.startswith("EWS_VERIFY_TLS=false") for message in warnings)
    assert any(message.startswith("GATEWAY_DIAL_ALLOW allows every") for message in warnings)


def test_serve_without_ews_url_fails_at_once_naming_it() -> None:
    result = run_serve({"GATEWAY_AUTH": "none"})
    assert result.returncode == 2
    assert "EWS_URL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_refuses_to_start_until_gateway_auth_is_chosen() -> None:
    result = run_serve({"EWS_URL": "https://mail.example.com/EWS/Exchange.asmx"})
    assert result.returncode == 2
    assert "GATEWAY_AUTH" in result.stderr
