"""Caller authentication: GATEWAY_AUTH=apikey and none."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.callers import ApiKeys
from gateway.config import Config, ConfigError
from gateway.ews import Disconnected

KEY = "s3cret-key-for-tests"


class FakeEws:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def disconnect_call(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> Disconnected:
        self.calls.append(call_id)
        return Disconnected(ews_code="NoError")


def keys_file(tmp_path: Path, *keys: str) -> Path:
    path = tmp_path / "keys"
    lines = ["# one SHA-256 digest per line", ""]
    lines += [hashlib.sha256(key.encode()).hexdigest() for key in keys]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def fake() -> FakeEws:
    return FakeEws()


@pytest.fixture
def client(tmp_path: Path, fake: FakeEws) -> FlaskClient:
    config = Config(
        ews_url="http://exchange.invalid/EWS/Exchange.asmx",
        gateway_auth="apikey",
        api_keys_file=str(keys_file(tmp_path, "other-key", KEY)),
    )
    app = create_app(config, ews=fake, registry=CollectorRegistry())  # type: ignore[arg-type]
    return app.test_client()


def test_a_request_without_a_key_is_401_with_a_challenge_and_exchange_is_not_contacted(
    client: FlaskClient, fake: FakeEws
) -> None:
    answer = client.delete("/calls/abc")
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == 'APIKey header="X-API-Key"'
    assert answer.mimetype == "application/problem+json"
    assert fake.calls == []


def test_a_wrong_key_is_401(client: FlaskClient, fake: FakeEws) -> None:
    answer = client.delete("/calls/abc", headers={"X-API-Key": "guess"})
    assert answer.status_code == 401
    assert fake.calls == []


def test_a_listed_key_is_let_through(client: FlaskClient, fake: FakeEws) -> None:
    answer = client.delete("/calls/abc", headers={"X-API-Key": KEY})
    assert answer.status_code == 200
    assert fake.calls == ["abc"]


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/metrics", "/openapi.yaml"])
def test_probes_metrics_and_the_spec_need_no_key(client: FlaskClient, path: str) -> None:
    assert client.get(path).status_code == 200


def test_the_keys_file_must_hold_digests_not_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("plain-text-key\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="GATEWAY_API_KEYS_FILE line 1"):
        ApiKeys.from_file(str(path))


def test_an_empty_keys_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# nobody yet\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no key digests"):
        ApiKeys.from_file(str(path))
