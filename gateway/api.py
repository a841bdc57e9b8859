"""The HTTP API: the only module that knows `flask.request`.

Routes turn JSON/HTTP into calls on the EWS client; one error handler turns
every failure into an RFC 9457 problem; request hooks give each request an id,
a metric sample and one log line.
"""

from __future__ import annotations

import functools
import logging
import re
import time
import uuid
from typing import Any
from urllib.parse import quote

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter, Rule

from gateway import tracing, validation
from gateway.callers import ANONYMOUS
from gateway.errors import GatewayError, InvalidRequest, UnsupportedMediaType
from gateway.ews import PhoneCalls
from gateway.metrics import Metrics

PROBLEM_JSON = "application/problem+json"
ACCESS_LOG = logging.getLogger("gateway.access")
LOG = logging.getLogger("gateway")
UNMATCHED_ROUTE = "<unmatched>"
# Probes, scrapers and the spec answer without caller credentials.
PUBLIC_ENDPOINTS = frozenset(
    {"gateway.livez", "gateway.readyz", "gateway.metrics", "gateway.openapi"}
)
_CONVERTER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")

bp = Blueprint("gateway", __name__)


class CallIdConverter(BaseConverter):
    """Match any call id, even empty or with slashes, so validation answers 400, not 404."""

    regex = r"[\s\S]*"
    part_isolating = False


class ServiceState:
    """Whether this process should take traffic (it stops while draining)."""

    def __init__(self) -> None:
        self.draining = False


def services() -> tuple[PhoneCalls, Metrics]:
    """Return the EWS client and metrics wired into the current app."""
    ext = current_app.extensions["gateway"]
    return ext["ews"], ext["metrics"]


@bp.delete("/calls/<call_id:call_id>")
def disconnect_call(call_id: str) -> Response:
    """Hang up a call."""
    ews, _ = services()
    result = ews.disconnect_call(
        validation.check_call_id(call_id), request_id=g.request_id, mailbox=g.caller.mailbox
    )
    g.ews_code = result.ews_code
    body = {"callId": call_id, "status": "disconnected", "ewsResponseCode": result.ews_code}
    return _json(body, 200, result.warning)


@bp.post("/calls")
def place_call() -> Response:
    """Start a call that plays a voice item on a phone."""
    ews, _ = services()
    order = validation.parse_place_call(_json_body())
    result = ews.play_on_phone(
        order.item_id,
        order.dial_string,
        change_key=order.item_change_key,
        request_id=g.request_id,
        mailbox=g.caller.mailbox,
    )
    g.ews_code = result.ews_code
    body = {"callId": result.call_id, "ewsResponseCode": result.ews_code}
    response = _json(body, 201, result.warning)
    response.headers["Location"] = "/calls/" + quote(result.call_id, safe="")
    return response


@bp.get("/calls/<call_id:call_id>")
def get_call(call_id: str) -> Response:
    """Show the state of a call."""
    ews, _ = services()
    info = ews.get_call_information(
        validation.check_call_id(call_id), request_id=g.request_id, mailbox=g.caller.mailbox
    )
    g.ews_code = info.ews_code
    body: dict[str, Any] = {
        "callId": call_id,
        "state": info.state,
        "connectionFailureCause": info.connection_failure_cause,
        "ewsResponseCode": info.ews_code,
    }
    if info.sip_response_code is not None:
        body["sipResponseCode"] = info.sip_response_code
    if info.sip_response_text is not None:
        body["sipResponseText"] = info.sip_response_text
    return _json(body, 200, info.warning)


@bp.get("/livez")
def livez() -> Response:
    """Answer while the process serves."""
    return _json({"status": "alive"}, 200)


@bp.get("/readyz")
def readyz() -> Response:
    """Answer 200 while this process should take traffic, 503 while draining."""
    if current_app.extensions["gateway"]["state"].draining:
        return _problem_response(503, "not-ready", "Not ready", "the gateway is shutting down")
    return _json({"status": "ready"}, 200)


@bp.get("/metrics")
def metrics() -> Response:
    """Expose Prometheus metrics."""
    _, metrics = services()
    payload, content_type = metrics.exposition()
    return Response(payload, 200, content_type=content_type)


@bp.get("/openapi.yaml")
def openapi() -> Response:
    """Serve the OpenAPI description of this API."""
    spec = current_app.extensions["gateway"]["openapi"]
    return Response(spec, 200, content_type="application/yaml")


def _json_body() -> Any:
    if not request.is_json:
        raise UnsupportedMediaType("send the body as application/json")
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # deep nesting: a few kilobytes can exhaust the parser's stack
        body = None
    if body is None:
        raise InvalidRequest("the body is not valid JSON")
    return body


def _json(body: dict[str, Any], status: int, warning: str | None = None) -> Response:
    if warning:
        body["warning"] = warning
    response = jsonify(body)
    response.status_code = status
    return response


def start_request() -> None:
    """Give the request an id, start its clock and find out who is calling."""
    # Each use of the g proxy costs a context lookup: take the object once.
    state = g._get_current_object()
    state.started = time.perf_counter()
    caller_id = request.headers.get("X-Request-ID", "")
    state.request_id = caller_id if validation.is_sane_request_id(caller_id) else uuid.uuid4().hex
    state.ews_code = None
    state.upstream_outcome = None
    state.span = tracing.start_request(request.method, request.headers, state.request_id)
    gateway = current_app.extensions["gateway"]
    gateway["metrics"].in_progress.inc()
    state.caller = ANONYMOUS
    # Probes, the spec and CORS preflights (which carry no credentials) answer to anyone.
    if not (
        request.method == "OPTIONS"
        or request.url_rule is None
        or request.endpoint in PUBLIC_ENDPOINTS
    ):
        state.caller = gateway["callers"].authenticate(request.headers)


def finish_request(response: Response) -> Response:
    """Stamp the request id, count the request and write its log line."""
    state = g._get_current_object()
    response.headers["X-Request-ID"] = state.request_id
    seconds = time.perf_counter() - state.started
    route = route_label(request.url_rule)
    metrics: Metrics = current_app.extensions["gateway"]["metrics"]
    metrics.http_request(request.method, route, response.status_code, seconds)
    if state.span is not None:
        state.span.finish(route, response.status_code)
    ACCESS_LOG.info(
        "request",
        extra={
            "traceId": None if state.span is None else state.span.trace_id,
            "requestId": state.request_id,
            "method": request.method,
            "route": route,
            "status": response.status_code,
            "durationMs": round(seconds * 1000, 2),
            "upstreamOutcome": state.upstream_outcome or ("success" if state.ews_code else None),
            "ewsResponseCode": state.ews_code,
        },
    )
    return response


def end_request(_error: BaseException | None) -> None:
    """Take the request off the in-progress gauge however it ended."""
    if "started" in g:
        _, metrics = services()
        metrics.in_progress.dec()
    span = g.get("span")
    if span is not None:
        span.close()


@functools.cache
def _label_of_rule(rule: str) -> str:
    return _CONVERTER.sub(r"<\1>", rule)


def route_label(rule: Rule | None) -> str:
    """Return the URL rule as a bounded label: never the raw path or a call id."""
    return UNMATCHED_ROUTE if rule is None else _label_of_rule(rule.rule)


def handle_gateway_error(error: GatewayError) -> Response:
    """Render a gateway error as problem+json."""
    g.ews_code = error.ews_code
    g.upstream_outcome = error.outcome
    response = _problem_response(
        error.status, error.slug, error.title, error.detail, ews_code=error.ews_code
    )
    if error.retry_after_s is not None:
        response.headers["Retry-After"] = str(error.retry_after_s)
    challenge = current_app.extensions["gateway"]["callers"].challenge
    if error.status == 401 and challenge:
        response.headers["WWW-Authenticate"] = challenge
    return response


def handle_http_exception(error: HTTPException) -> Response:
    """Render Werkzeug's routing and protocol errors (404, 405, 413...) as problem+json."""
    status = error.code or 500
    slug = (error.name or "error").lower().replace(" ", "-")
    response = _problem_response(status, slug, error.name, error.description or error.name)
    if status == 405 and error.valid_methods:  # type: ignore[attr-defined]
        response.headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
    return response


def handle_unexpected(error: Exception) -> Response:
    """Log an unexpected failure with its traceback; the caller sees only a 500 problem."""
    LOG.exception("unexpected error", extra={"requestId": g.get("request_id")})
    return _problem_response(
        500, "internal-error", "Internal error", "an unexpected error occurred"
    )


def _problem_response(
    status: int, slug: str, title: str, detail: str, *, ews_code: str | None = None
) -> Response:
    body: dict[str, Any] = {
        "type": f"urn:ews-gateway:problem:{slug}",
        "title": title,
        "status": status,
        "detail": detail,
        "requestId": g.get("request_id"),
    }
    if ews_code is not None:
        body["ewsResponseCode"] = ews_code
    response = jsonify(body)
    response.status_code = status
    response.mimetype = PROBLEM_JSON
    return response


def register(app: Flask) -> None:
    """Attach the routes, hooks and error handlers to an app."""
    app.url_map.converters["call_id"] = CallIdConverter
    app.register_blueprint(bp)
    app.before_request(start_request)
    app.after_request(finish_request)
    app.teardown_request(end_request)
    app.register_error_handler(GatewayError, handle_gateway_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
