"""The audit trail: one JSON line per call-control action, no secret in any."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.parse import quote

import pytest

from gateway.guards.audit import mask_dial_string
from gateway.telemetry.logs import json_formatter
from tests.fake_ews import FakeExchange
from tests.guards import KEY_A, KEY_B, PLACE, app_with_keys, subject_of


class Lines(logging.Handler):
    """Collects the gateway.guards.audit records as the JSON lines operators ship."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(json_formatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def audit_lines() -> list[str]:
    handler = Lines()
    logger = logging.getLogger("gateway.audit")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_run_writes_exactly_one_line_per_action_and_no_secret(
    tmp_path: Path, audit_lines: list[str]
) -> None:
    app = app_with_keys(tmp_path, FakeExchange(), dial_allow=("+1555*",), rate_limit_calls="1/hour")
    client = app.test_client()
    a, b = {"X-API-Key": KEY_A}, {"X-API-Key": KEY_B}

    placed = client.post("/calls", json=PLACE, headers=a)  # 1 placed
    path = "/calls/" + quote(placed.get_json()["callId"], safe="")
    client.post("/calls", json={**PLACE, "dialString": "+900123456"}, headers=a)  # 2 dial policy
    client.post("/calls", json=PLACE, headers=a)  # 3 rate limit
    client.get(path, headers=a)  # a read of one's own call: no line
    client.get(path, headers=b)  # 4 ownership
    client.delete(path, headers=b)  # 5 ownership
    client.delete(path, headers=a)  # 6 hung up
    client.get("/metrics")  # no line

    entries = [json.loads(line) for line in audit_lines]
    assert [(e["action"], e["outcome"], e["status"]) for e in entries] == [
        ("place-call", "ok", 201),
        ("place-call", "refused-dial_string", 403),
        ("place-call", "refused-rate_limit", 429),
        ("read-call", "refused-ownership", 404),
        ("hang-up", "refused-ownership", 404),
        ("hang-up", "ok", 200),
    ]
    assert [e["subject"] for e in entries] == [subject_of(KEY_A)] * 3 + [subject_of(KEY_B)] * 2 + [
        subject_of(KEY_A)
    ]
    assert [e["dialString"] for e in entries[:3]] == ["********4567", "******3456", "********4567"]
    assert {e["callId"] for e in entries[3:]} == {placed.get_json()["callId"]}
    assert all(e["logger"] == "gateway.audit" and e["time"] and e["requestId"] for e in entries)
    assert all("mailbox" in e for e in entries)
    run = "\n".join(audit_lines)
    for secret in (KEY_A, KEY_B, "+15551234567", "+900123456"):
        assert secret not in run


@pytest.mark.parametrize(
    ("dial_string", "visible", "masked"),
    [
        ("+15551234567", 4, "********4567"),
        ("+15551234567", 32, "******234567"),  # never more than half
        ("4711", 4, "**11"),  # a short one is never whole either
        ("4711", 0, "****"),
        ("12", 4, "*2"),
        ("1", 4, "*"),
    ],
)
def test_a_dial_string_keeps_only_its_last_characters(
    dial_string: str, visible: int, masked: str
) -> None:
    assert mask_dial_string(dial_string, visible) == masked
