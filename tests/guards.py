"""Helpers for the tests of the gateway's guards (not a test module)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from flask import Flask
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import Config
from gateway.exchange.client import EwsClient
from tests.fake_ews import FakeExchange

KEY_A, KEY_B = "key-of-caller-a", "key-of-caller-b"
PLACE = {"itemId": "AAMkItem", "dialString": "+15551234567"}


def subject_of(key: str) -> str:
    return "apikey:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def app_with_keys(tmp_path: Path, fake: FakeExchange, **settings: Any) -> Flask:
    """A gateway with two API key callers (KEY_A, KEY_B) in front of the fake Exchange."""
    keys = tmp_path / "api-keys"
    keys.write_text(
        "\n".join(hashlib.sha256(key.encode()).hexdigest() for key in (KEY_A, KEY_B)) + "\n"
    )
    config = Config(
        ews_url="http://exchange.invalid/EWS/Exchange.asmx",
        gateway_auth="apikey",
        api_keys_file=str(keys),
        call_id_key=b"c" * 32,
    )
    config = replace(config, **settings)
    return create_app(config, ews=cast(EwsClient, fake), registry=CollectorRegistry())


def sample(app: Flask, series: str) -> float:
    """Return one sample of the app's /metrics exposition (0 when absent)."""
    text = app.test_client().get("/metrics").text
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
