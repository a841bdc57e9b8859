"""The in-process CPU cost of tracing per request, off and on.

    .venv/bin/python -m benchmarks.tracing

Runs `DELETE /calls/<id>` through the whole app (Flask, hooks, EwsClient,
envelope, answer) in one process, against a transport that returns a
recorded DisconnectPhoneCall success at once, so nothing but the gateway's
own work is timed. Rounds alternate off / on (ABBA); on exports every span
over OTLP/HTTP to a loopback receiver (another process) that answers 200; the
exporter's background thread is part of the process CPU measured. Prints a Markdown table.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import Config
from gateway.exchange.client import EwsClient
from gateway.exchange.transport import ExchangeReply
from gateway.telemetry import tracing

REQUESTS = 3000
ROUNDS = 4
REPLY = (
    Path(__file__).parent.parent / "tests" / "fixtures" / "disconnect_success.xml"
).read_bytes()


class InstantExchange:
    def post(
        self, body: bytes, headers: Mapping[str, str], *, deadline: float | None = None
    ) -> ExchangeReply:
        return ExchangeReply(200, "text/xml; charset=utf-8", None, None, REPLY)


class Collector(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        """Quiet."""


def cpu_us_per_request(client: Any) -> float:
    started = time.process_time()
    for index in range(REQUESTS):
        answer = client.delete(f"/calls/call-{index}")
        assert answer.status_code == 200, answer.data
    return (time.process_time() - started) / REQUESTS * 1e6


def main() -> None:
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    collector = multiprocessing.get_context("fork").Process(target=receiver.serve_forever)
    collector.start()  # its CPU is the collector's, not the gateway's
    config = Config.from_env(
        {"EWS_URL": "http://127.0.0.1:9/EWS/Exchange.asmx", "GATEWAY_AUTH": "none"}
    )
    ews = EwsClient(InstantExchange(), server_version=config.ews_server_version)
    client = create_app(config, ews=ews, registry=CollectorRegistry()).test_client()
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}/v1/traces"
    os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = endpoint
    results: dict[str, list[float]] = {"off": [], "on": []}
    cpu_us_per_request(client)  # warm-up
    for mode in ["off", "on", "on", "off"] * (ROUNDS // 2):
        if mode == "on":
            tracing.start_worker("ews-gateway-benchmark")
        results[mode].append(cpu_us_per_request(client))
        tracing.stop_worker()  # flushes: the export's CPU counts in the "on" round
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    print(f"{REQUESTS} requests a round, {ROUNDS * 2} rounds alternating (ABBA), median\n")
    print("| tracing | CPU µs per request |")
    print("|---|---|")
    print(f"| off | {off:.0f} |")
    print(f"| on (OTLP/HTTP to loopback) | {on:.0f} (+{on - off:.0f}, +{(on / off - 1):.0%}) |")
    collector.terminate()


if __name__ == "__main__":
    main()
