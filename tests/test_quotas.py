"""Per-caller rate limits: 429 with Retry-After and the httpapi RateLimit fields."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from limits.errors import StorageError
from limits.storage import MemoryStorage

from gateway.quotas import CALLS, Quotas
from tests.guards import KEY_A, KEY_B, PLACE, app_with_keys, sample
from tests.test_api import FakeExchange


def test_calls_over_the_quota_are_429_with_retry_after_and_exchange_is_not_asked(
    tmp_path: Path,
) -> None:
    fake = FakeExchange()
    client = app_with_keys(tmp_path, fake, rate_limit_calls="2/minute").test_client()
    caller_a = {"X-API-Key": KEY_A}

    first, second, third = (client.post("/calls", json=PLACE, headers=caller_a) for _ in range(3))

    assert [first.status_code, second.status_code, third.status_code] == [201, 201, 429]
    assert first.headers["RateLimit-Policy"] == '"calls";q=2;w=60'
    assert first.headers["RateLimit"] == '"calls";r=1'
    assert second.headers["RateLimit"] == '"calls";r=0'
    retry_after = int(third.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert third.headers["RateLimit"] == f'"calls";r=0;t={retry_after}'
    assert third.headers["RateLimit-Policy"] == '"calls";q=2;w=60'
    assert third.mimetype == "application/problem+json"
    assert third.get_json()["type"] == "urn:ews-gateway:problem:rate-limited"
    assert len(fake.calls) == 2


def test_each_caller_has_its_own_quota(tmp_path: Path) -> None:
    fake = FakeExchange()
    client = app_with_keys(tmp_path, fake, rate_limit_calls="1/minute").test_client()

    a_first = client.post("/calls", json=PLACE, headers={"X-API-Key": KEY_A})
    a_again = client.post("/calls", json=PLACE, headers={"X-API-Key": KEY_A})
    b_first = client.post("/calls", json=PLACE, headers={"X-API-Key": KEY_B})

    assert [a_first.status_code, a_again.status_code, b_first.status_code] == [201, 429, 201]


def test_the_request_quota_counts_every_request_and_the_refusal_is_counted(
    tmp_path: Path,
) -> None:
    fake = FakeExchange()
    app = app_with_keys(tmp_path, fake, rate_limit_requests="3/hour", rate_limit_calls=None)
    client = app.test_client()
    caller_a = {"X-API-Key": KEY_A}

    statuses = [client.get("/calls/call-1", headers=caller_a).status_code for _ in range(3)]
    refused = client.get("/calls/call-1", headers=caller_a)

    assert statuses == [404, 404, 404]  # counted even when the call is not the caller's
    assert refused.status_code == 429
    assert refused.headers["RateLimit-Policy"] == '"requests";q=3;w=3600'
    assert sample(app, 'ews_gateway_refusals_total{reason="rate_limit"}') == 1
    # Probes and metrics are never limited.
    assert client.get("/livez").status_code == 200


def test_placing_a_call_charges_both_quotas_and_shows_both_policies(tmp_path: Path) -> None:
    app = app_with_keys(
        tmp_path, FakeExchange(), rate_limit_requests="100/minute", rate_limit_calls="5/minute"
    )

    answer = app.test_client().post("/calls", json=PLACE, headers={"X-API-Key": KEY_A})

    assert answer.headers["RateLimit-Policy"] == '"requests";q=100;w=60, "calls";q=5;w=60'
    assert answer.headers["RateLimit"] == '"requests";r=99, "calls";r=4'


class UnreachableStorage(MemoryStorage):
    """Storage whose every command fails as a Redis outage does."""

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        raise StorageError(ConnectionError("Redis is down"))


def test_an_unreachable_store_lets_requests_through_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures: list[int] = []
    quotas = Quotas(
        UnreachableStorage(),
        calls="1/minute",
        requests=None,
        on_storage_error=lambda: failures.append(1),
    )

    with caplog.at_level(logging.WARNING, logger="gateway"):
        charges = [quotas.charge(CALLS, "alice") for _ in range(3)]

    assert charges == [None, None, None]
    assert len(failures) == 3  # each failure counted
    warnings = [r for r in caplog.records if "rate limit storage unreachable" in r.message]
    assert len(warnings) == 1  # but an outage does not write a warning per request
