"""The typed seams between Flask and the rest of the gateway.

`Services` holds what the app factory wired (one per app, at `app.extensions["gateway"]`);
`RequestState` holds what one request learns as it runs (one per request, on `flask.g`).
Routes and hooks reach both through gateway.api.routes' `services()` and `request_state()`,
by attribute, never by string key; once a request has its state, `state.services` is the
same `Services`, read without another lookup.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from gateway.api.streams import EventStreams
from gateway.errors import ExchangeOutcome
from gateway.exchange.client import PhoneCalls
from gateway.guards.audit import AuditTrail
from gateway.guards.callers import ANONYMOUS, Caller, CallerAuthenticator
from gateway.guards.dialing import DialPolicy
from gateway.guards.idempotency import IdempotentCalls
from gateway.guards.ownership import CallIds
from gateway.guards.quotas import Charge, Quotas
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tracing import ServerSpan

EXTENSION = "gateway"


class ServiceState:
    """Whether this process should take traffic (it stops while draining), and its streams."""

    def __init__(self) -> None:
        self.draining = False
        self.streams: EventStreams | None = None

    def begin_draining(self) -> None:
        """Answer /readyz 503 from now on and end the open event streams."""
        self.draining = True
        if self.streams is not None:
            self.streams.drain()


@dataclass(slots=True)
class Services:
    """Everything a request may use, wired once by gateway.app.create_app."""

    ews: PhoneCalls
    metrics: Metrics
    state: ServiceState
    streams: EventStreams
    callers: CallerAuthenticator
    call_ids: CallIds
    dial_policy: DialPolicy
    quotas: Quotas
    idempotency: IdempotentCalls
    audit: AuditTrail
    openapi: bytes  # the spec served at /openapi.yaml


@dataclass(slots=True)
class RequestState:
    """What one request learned on its way: who called, what Exchange said, what to log."""

    request_id: str
    started: float  # time.perf_counter() when the request began
    span: ServerSpan | None
    # Exchange's correlation ids, which the EWS client's observer adds for the log line.
    upstream_log_fields: dict[str, str]
    services: Services  # what the app factory wired, read once rather than per use
    caller: Caller = ANONYMOUS
    ews_code: str | None = None
    upstream_outcome: ExchangeOutcome | None = None
    upstream_status: int | None = None
    error_detail: str | None = None
    log_level: int = logging.INFO
    rate_limits: list[Charge] = field(default_factory=list)
    call_id: str | None = None  # the call the request named or created
    dial_string: str | None = None
    refusal: str | None = None  # the guard that refused the request (a metric label)
    problem: str | None = None  # the slug of the problem answered
    audit_outcome: str | None = None
