"""Traces: the only module that knows OpenTelemetry.

Off unless Config.tracing (an OTLP exporter endpoint is set). `start_worker`
runs in each gunicorn worker after the fork (the exporter's thread and
connection must not be shared across a fork); the SDK reads the rest of the
standard OTEL_* variables itself (endpoint, headers, timeout, sampler...).
While off, each hook is one global lookup and returns None.

Spans: one SERVER span per request, continuing the caller's W3C
`traceparent`, named `METHOD route`; one CLIENT span per call to Exchange
(each attempt), named after the EWS operation, with its outcome and EWS code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway import __version__
from gateway.errors import ExchangeOutcome
from gateway.exchange.client import ExchangeCallReport

# Exchange's values are recorded, not trusted: a bounded length.
MAX_REQUEST_ID_CHARS = 200

_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None


def start_worker(service_name: str) -> None:
    """Build this process's tracer, exporting spans over OTLP/HTTP in the background."""
    global _tracer, _provider  # noqa: PLW0603 - one provider per worker process
    resource = Resource.create(
        {"service.name": service_name, "service.version": __version__, "process.pid": os.getpid()}
    )
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = _provider.get_tracer("gateway")


def stop_worker() -> None:
    """Send the spans still queued, then stop exporting (a worker about to exit)."""
    global _tracer, _provider  # noqa: PLW0603
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


@dataclass
class ServerSpan:
    """One request's span, made current for the request's thread until `finish`."""

    span: trace.Span
    method: str
    token: object

    @property
    def trace_id(self) -> str:
        """The trace id as 32 hex digits, as W3C traceparent writes it."""
        return format(self.span.get_span_context().trace_id, "032x")

    def finish(self, route: str, status: int) -> None:
        """Name the span after its route, record the answer's status and end it."""
        self.span.update_name(f"{self.method} {route}")
        self.span.set_attribute("http.route", route)
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(Status(StatusCode.ERROR))
        self.close()

    def close(self) -> None:
        """End the span if nothing did (idempotent) and restore the thread's context."""
        if self.span.is_recording():
            self.span.end()
        if self.token is not None:
            context.detach(self.token)  # type: ignore[arg-type]
            self.token = None


def start_request(method: str, headers: Any, request_id: str) -> ServerSpan | None:
    """Start the SERVER span of a request whose headers may carry a W3C traceparent.

    HEADERS: any case-insensitive mapping with `.get` (werkzeug's Headers).
    """
    if _tracer is None:
        return None
    parent = propagate.extract(headers)
    span = _tracer.start_span(
        method,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "gateway.request_id": request_id},
    )
    return ServerSpan(span, method, context.attach(trace.set_span_in_context(span)))


def record_exchange_call(report: ExchangeCallReport) -> None:
    """Record one call to Exchange as a CLIENT span, a child of the request's span.

    The span is written once the call has ended, with the call's own start and end times, so
    a call with tracing off costs one global lookup.
    """
    if _tracer is None:
        return
    attributes: dict[str, Any] = {
        "rpc.system": "soap",
        "rpc.method": report.operation,
        "ews.outcome": str(report.outcome),
    }
    if report.code is not None:
        attributes["ews.response_code"] = report.code
    if report.reply is not None:
        attributes["http.response.status_code"] = report.reply.status
        request_id = report.reply.diagnostics.get("request-id")
        if request_id is not None:
            attributes["ews.request_id"] = request_id[:MAX_REQUEST_ID_CHARS]
    span = _tracer.start_span(
        report.operation,
        kind=SpanKind.CLIENT,
        attributes=attributes,
        start_time=report.started_ns,
        record_exception=False,
    )
    if report.outcome != ExchangeOutcome.SUCCESS:
        span.set_status(Status(StatusCode.ERROR, str(report.outcome)))
    span.end(end_time=report.started_ns + int(report.seconds * 1e9))
