"""The gateway app in process, built from environment variables, and what a simulator saw of it."""

from __future__ import annotations

from typing import Any, ClassVar

from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import Config
from gateway.simulator import SimulatorServer

CALL = {"itemId": "AAMkVoiceMail", "dialString": "+15551234567"}


class Gateway:
    """The gateway app in process, and the registry its metrics go to."""

    opened: ClassVar[list[Gateway]] = []

    def __init__(self, environ: dict[str, str]) -> None:
        self.registry = CollectorRegistry()
        config = Config.from_env({"GATEWAY_AUTH": "none", **environ})
        self.app = create_app(config, registry=self.registry)
        self.client: FlaskClient = self.app.test_client()
        Gateway.opened.append(self)

    def close(self) -> None:
        """Close the pooled connections to Exchange."""
        self.app.extensions["gateway"].ews._transport.close()

    def place_call(self) -> Any:
        return self.client.post("/calls", json=CALL)

    def upstream(self, outcome: str) -> float:
        labels = {"operation": "PlayOnPhone", "outcome": outcome}
        return self.registry.get_sample_value("ews_gateway_upstream_requests_total", labels) or 0


def https_url(simulator: SimulatorServer) -> str:
    return simulator.ews_url.replace("127.0.0.1", "localhost")


def placed_calls(simulator: SimulatorServer) -> int:
    requests = simulator.exchange.journal.recorded()
    return sum(1 for request in requests if request.operation == "PlayOnPhone")
