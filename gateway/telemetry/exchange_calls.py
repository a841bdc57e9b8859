"""What each call to Exchange tells operators: one observer for metrics, traces and logs.

The EWS client reports every call through its ExchangeObserver seam; this module is the one
implementation, so the client knows nothing of prometheus-client, OpenTelemetry or logging.
"""

from __future__ import annotations

from gateway.exchange.client import ExchangeCallReport
from gateway.telemetry import logs, tracing
from gateway.telemetry.metrics import Metrics

# Exchange's diagnostic fields (lower case, as the transport gives them) and their log names.
LOG_FIELD_BY_DIAGNOSTIC = {
    "request-id": "exchangeRequestId",
    "x-feserver": "exchangeFrontEnd",
    "x-beserver": "exchangeBackEnd",
    "x-calculatedbetarget": "exchangeBackEndTarget",
    "x-diaginfo": "exchangeDiagInfo",
}
# Exchange's values are logged, not trusted: a bounded length each.
MAX_DIAGNOSTIC_CHARS = 200


class ExchangeTelemetry:
    """Count, trace and log each call to Exchange (the EWS client's ExchangeObserver)."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    def exchange_call(self, report: ExchangeCallReport) -> None:
        """Record one call: its metric samples, its CLIENT span and the request's log fields."""
        if self._metrics is not None:
            self._metrics.upstream_call(
                report.operation, report.outcome, report.code, report.seconds
            )
        tracing.record_exchange_call(report)
        logs.add_request_fields(log_fields(report))


def log_fields(report: ExchangeCallReport) -> dict[str, str]:
    """Return the request log line's fields for a call: its client-request-id and Exchange's
    diagnostic ids, each bounded."""
    fields = {"clientRequestId": report.client_request_id}
    if report.reply is not None:
        for name, value in report.reply.diagnostics.items():
            log_name = LOG_FIELD_BY_DIAGNOSTIC.get(name)
            if log_name is not None:
                fields[log_name] = value[:MAX_DIAGNOSTIC_CHARS]
    return fields
