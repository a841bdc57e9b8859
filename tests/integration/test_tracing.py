"""Traces from real gunicorn workers to a real OTLP/HTTP receiver that the test runs."""

from __future__ import annotations

import gzip
import json
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.integration.processes import Server, free_port, gateway_env, http, start

REQUESTS = 40
# Each worker exits after about this many requests, so REQUESTS take several worker
# processes, and spans of workers that exited must still arrive.
RECYCLE_AFTER = 10
CLIENTS = 4  # each worker has 4 slots for calls to Exchange (GATEWAY_THREADS=8)


@dataclass
class Received:
    """A span as the receiver decoded it, with its worker's resource attributes."""

    span: Span
    resource: dict[str, Any]

    def attribute(self, key: str) -> Any:
        for item in self.span.attributes:
            if item.key == key:
                value = item.value
                return getattr(value, value.WhichOneof("value"))
        return None


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver on loopback: POST /v1/traces, protobuf bodies."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.spans: list[Received] = []
        self.lock = threading.Lock()

    def by_trace(self, trace_id: str) -> list[Received]:
        with self.lock:
            return [got for got in self.spans if got.span.trace_id.hex() == trace_id]


class _ReceiverHandler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert self.path == "/v1/traces"
        assert self.headers["Content-Type"] == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            resource = {
                item.key: getattr(item.value, item.value.WhichOneof("value"))
                for item in resource_spans.resource.attributes
            }
            for scope_spans in resource_spans.scope_spans:
                with self.server.lock:
                    self.server.spans += [Received(span, resource) for span in scope_spans.spans]
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *_args: Any) -> None:
        """Quiet: the test reads the spans, not the receiver's log."""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Server]:
    """The simulator as a front end with two mailbox servers: it sends Exchange's `request-id`."""
    port = free_port()
    args = ["simulator", "--bind", f"127.0.0.1:{port}", "--mailbox-servers", "2"]
    base_url = f"http://127.0.0.1:{port}"
    server = start(args, {}, base_url, "/simulator/health", tmp_path / "sim.log")
    yield server
    server.stop()


@pytest.fixture
def traced_gateway(deployment: Server, receiver: Receiver, tmp_path: Path) -> Iterator[Server]:
    """`serve` with two workers exporting spans to the receiver."""
    simulator = deployment
    port = free_port()
    env = gateway_env(
        simulator,
        port,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.server_address[1]}",
        OTEL_SERVICE_NAME="ews-gateway-under-test",
        OTEL_BSP_SCHEDULE_DELAY="100",
        GATEWAY_MAX_REQUESTS=str(RECYCLE_AFTER),
    )
    server = start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", tmp_path / "gw.log")
    yield server
    server.stop()


def wait_for_spans(receiver: Receiver, trace_id: str, count: int) -> list[Received]:
    deadline = time.monotonic() + 15
    while len(receiver.by_trace(trace_id)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return receiver.by_trace(trace_id)


def access_lines(gateway: Server) -> dict[str, dict[str, Any]]:
    """The gateway's request log lines by request id."""
    lines = {}
    for line in gateway.log().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record["logger"] == "gateway.access":
                lines[record["requestId"]] = record
    return lines


def hang_up(gateway: Server, trace_id: str, parent_id: str) -> tuple[str, Any]:
    for _ in range(500):
        try:
            answer = http(
                "DELETE",
                f"{gateway.url}/calls/no-such-call",
                headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
            )
            break
        except OSError:
            time.sleep(0.01)  # both workers are being recycled at this moment
    assert answer.status == 404
    return answer.headers["X-Request-ID"], answer.json()["ewsResponseCode"]


def test_each_request_is_a_server_span_continuing_traceparent_with_a_client_span_to_exchange(
    traced_gateway: Server, receiver: Receiver
) -> None:
    calls = [(secrets.token_hex(16), secrets.token_hex(8)) for _ in range(REQUESTS)]
    with ThreadPoolExecutor(CLIENTS) as clients:
        answers = list(clients.map(lambda ids: hang_up(traced_gateway, *ids), calls))
    workers = set()
    for (trace_id, parent_id), (_request_id, ews_code) in zip(calls, answers, strict=True):
        spans = wait_for_spans(receiver, trace_id, 2)
        [server] = [got for got in spans if got.span.kind == Span.SPAN_KIND_SERVER]
        [client] = [got for got in spans if got.span.kind == Span.SPAN_KIND_CLIENT]
        assert server.span.parent_span_id.hex() == parent_id
        assert server.span.name == "DELETE /calls/<call_id>"
        assert server.attribute("http.response.status_code") == 404
        assert server.attribute("http.route") == "/calls/<call_id>"
        assert client.span.parent_span_id == server.span.span_id
        assert client.span.name == "DisconnectPhoneCall"
        assert client.attribute("ews.outcome") == "ews_error"
        assert client.attribute("ews.response_code") == ews_code
        assert server.resource["service.name"] == "ews-gateway-under-test"
        assert client.resource == server.resource
        workers.add(server.resource["process.pid"])
    # No worker process answers more than RECYCLE_AFTER (+ a tenth) requests.
    assert len(workers) >= REQUESTS // (RECYCLE_AFTER + 1) + 1


def test_the_request_log_line_carries_the_trace_id(
    traced_gateway: Server, receiver: Receiver
) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    request_id, _ = hang_up(traced_gateway, trace_id, parent_id)
    untraced = http("GET", f"{traced_gateway.url}/livez")
    wait_for_spans(receiver, trace_id, 2)
    time.sleep(0.2)  # the log line is written right after the span ends
    lines = access_lines(traced_gateway)
    assert lines[request_id]["traceId"] == trace_id
    # The client span names Exchange's own id for the call, as the log line does.
    [client] = [
        got for got in receiver.by_trace(trace_id) if got.span.kind == Span.SPAN_KIND_CLIENT
    ]
    assert lines[request_id]["exchangeRequestId"]
    assert client.attribute("ews.request_id") == lines[request_id]["exchangeRequestId"]
    assert client.attribute("http.response.status_code") == lines[request_id]["upstreamStatus"]
    # A request without traceparent starts a trace of its own, named in its line too.
    new_trace = lines[untraced.headers["X-Request-ID"]]["traceId"]
    assert new_trace not in (None, trace_id)
    [root] = wait_for_spans(receiver, new_trace, 1)
    assert root.span.parent_span_id == b""
    assert root.span.name == "GET /livez"
