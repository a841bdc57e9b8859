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
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway import __version__
from gateway.exchange.transport import UpstreamReply

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


class ExchangeCall:
    """What one call to Exchange learned, recorded on its CLIENT span."""

    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def answered(self, outcome: str, ews_code: str | None, reply: UpstreamReply | None) -> None:
        """Record the outcome (as in the metrics), the EWS ResponseCode, and from Exchange's
        HTTP answer (None if there was none) its status and its `request-id`."""
        self._span.set_attribute("ews.outcome", outcome)
        if ews_code is not None:
            self._span.set_attribute("ews.response_code", ews_code)
        if reply is not None:
            self._span.set_attribute("http.response.status_code", reply.status)
            request_id = reply.diagnostics.get("request-id")
            if request_id is not None:
                self._span.set_attribute("ews.request_id", request_id[:MAX_REQUEST_ID_CHARS])
        if outcome != "success":
            self._span.set_status(Status(StatusCode.ERROR, outcome))


class _Unrecorded(ExchangeCall, AbstractContextManager[ExchangeCall]):
    """Tracing is off: a shared, empty stand-in (no generator or span per call)."""

    def __init__(self) -> None:
        pass

    def answered(self, outcome: str, ews_code: str | None, reply: UpstreamReply | None) -> None:
        """Record nothing."""

    def __exit__(self, *_exc: object) -> None:
        return None


_UNRECORDED = _Unrecorded()


def exchange_call(operation: str) -> AbstractContextManager[ExchangeCall]:
    """Wrap one call to Exchange in a CLIENT span, a child of the request's span."""
    return _UNRECORDED if _tracer is None else _recorded_call(_tracer, operation)


@contextmanager
def _recorded_call(tracer: trace.Tracer, operation: str) -> Iterator[ExchangeCall]:
    attributes: dict[str, Any] = {"rpc.system": "soap", "rpc.method": operation}
    with tracer.start_as_current_span(
        operation, kind=SpanKind.CLIENT, attributes=attributes, record_exception=False
    ) as span:
        yield ExchangeCall(span)
