"""The HTTP API: the only module that knows `flask.request`.

Routes turn JSON/HTTP into calls on the EWS client; one error handler turns
every failure into an RFC 9457 problem; request hooks give each request an id,
a metric sample and one log line.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from flask import Blueprint, Flask, Request, Response, current_app, g, jsonify, request
from werkzeug.datastructures import Headers
from werkzeug.exceptions import (
    BadHost,
    HTTPException,
    MethodNotAllowed,
    NotFound,
    RequestEntityTooLarge,
)
from werkzeug.routing import BaseConverter, MapAdapter, Rule

from gateway.api import events, rendering
from gateway.api.handoff import STREAM_HEADERS
from gateway.api.services import EXTENSION, RequestState, Services
from gateway.api.streams import Watch
from gateway.errors import (
    ERROR_BY_REQUEST_STATUS,
    CallerStreamLimitReached,
    CallNotFound,
    DialStringNotAllowed,
    GatewayError,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    IdempotencyOutcomeUnknown,
    InvalidRequest,
    RateLimited,
    RouteNotFound,
    UnsupportedMediaType,
)
from gateway.guards import idempotency, validation
from gateway.guards.idempotency import StoredAnswer
from gateway.guards.ownership import owner_of
from gateway.guards.quotas import CALLS, REQUESTS, Charge
from gateway.telemetry import logs, tracing

LOG = logging.getLogger("gateway")
UNMATCHED_ROUTE = "<unmatched>"
# Probes, scrapers and the spec answer without caller credentials.
PUBLIC_ENDPOINTS = frozenset(
    {"gateway.livez", "gateway.readyz", "gateway.metrics", "gateway.openapi"}
)
# Call-control routes: each request to them is one audit line; reads only when refused.
AUDITED_ACTIONS = {
    "gateway.place_call": "place-call",
    "gateway.disconnect_call": "hang-up",
    "gateway.get_call": "read-call",
    "gateway.watch_call": "watch-call",
}
ALWAYS_AUDITED = frozenset({"gateway.place_call", "gateway.disconnect_call"})
# Refusals by the gateway's own rules, by the metric's `reason` label.
REFUSAL_BY_ERROR: dict[type[GatewayError], str] = {
    DialStringNotAllowed: "dial_string",
    RateLimited: "rate_limit",
    IdempotencyKeyInUse: "idempotency_in_use",
    IdempotencyOutcomeUnknown: "idempotency_uncertain",
    IdempotencyKeyReused: "idempotency_mismatch",
    CallerStreamLimitReached: "caller_streams",
}
_CONVERTER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
# A content coding named in a problem's detail: a short RFC 9110 token, never arbitrary text.
_CODING = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,32}")

bp = Blueprint("gateway", __name__)


class CallIdConverter(BaseConverter):
    """Match any call id, even empty or with slashes, so validation answers 400, not 404."""

    regex = r"[\s\S]*"
    part_isolating = False


def services() -> Services:
    """Return what the app factory wired into the current app."""
    wired: Services = current_app.extensions[EXTENSION]
    return wired


def current_request() -> Request:
    """Return the request itself rather than Flask's proxy: each attribute read through the
    proxy costs a context lookup (1.1 us, timeit), and the hooks read a dozen a request."""
    wrapped: Request = request._get_current_object()  # type: ignore[attr-defined]
    return wrapped


def request_state() -> RequestState:
    """Return what the current request has learned so far (start_request made it)."""
    state: RequestState = g.gateway_request
    return state


def authorized_call(call_id: str) -> str:
    """Return the EWS id behind a caller's call id, or raise the 404 of an unknown call.

    Every route that names a call (GET, DELETE, the event stream) goes through here; the
    rule itself is gateway.guards.ownership.CallIds.ews_call_id(call_id, caller).
    """
    state = request_state()
    state.call_id = call_id
    checked = validation.check_call_id(call_id)
    try:
        return state.services.call_ids.ews_call_id(checked, state.caller)
    except CallNotFound:
        state.refusal = "ownership"
        raise


@bp.delete("/calls/<call_id:call_id>")
def disconnect_call(call_id: str) -> Response:
    """Hang up a call."""
    state = request_state()
    result = state.services.ews.disconnect_call(
        authorized_call(call_id), request_id=state.request_id, mailbox=state.caller.mailbox
    )
    state.ews_code = result.ews_code
    body = {"callId": call_id, "status": "disconnected", "ewsResponseCode": result.ews_code}
    return _json(body, 200, result.warning)


@bp.post("/calls")
def place_call() -> Response:
    """Start a call that plays a voice item on a phone."""
    state = request_state()
    wired = state.services
    order = validation.parse_place_call(_json_body())
    state.dial_string = order.dial_string
    wired.dial_policy.check(order.dial_string)
    header = request.headers.get("Idempotency-Key")
    if header is None:
        answer = _dial(order)
    else:
        fields = {
            "itemId": order.item_id,
            "itemChangeKey": order.item_change_key,
            "dialString": order.dial_string,
        }
        answer = wired.idempotency.place(
            owner_of(state.caller),
            idempotency.parse_key(header),
            idempotency.fingerprint(fields),
            functools.partial(_dial, order),
        )
    if answer.replayed:
        wired.metrics.replayed()
        state.audit_outcome = "replayed"
    state.call_id = answer.body["callId"]
    state.ews_code = answer.body["ewsResponseCode"]
    response = _json(dict(answer.body), answer.status)
    response.headers["Location"] = answer.location
    return response


def _dial(order: validation.PlaceCall) -> StoredAnswer:
    """Charge the caller's call quota, have Exchange dial and sign the call id for the caller."""
    state = request_state()
    wired = state.services
    _charge(CALLS)
    result = wired.ews.play_on_phone(
        order.item_id,
        order.dial_string,
        change_key=order.item_change_key,
        request_id=state.request_id,
        mailbox=state.caller.mailbox,
    )
    call_id = wired.call_ids.issue(result.call_id, state.caller)
    body = {"callId": call_id, "ewsResponseCode": result.ews_code}
    if result.warning:
        body["warning"] = result.warning
    return StoredAnswer(201, body, "/calls/" + quote(call_id, safe=""))


def _charge(quota: str) -> None:
    """Count this request against the caller's QUOTA (429 once spent); note the fields."""
    state = request_state()
    charge = state.services.quotas.charge(quota, owner_of(state.caller))
    if charge is not None:
        state.rate_limits.append(charge)


@bp.get("/calls/<call_id:call_id>")
def get_call(call_id: str) -> Response:
    """Show the state of a call."""
    state = request_state()
    info = state.services.ews.get_call_information(
        authorized_call(call_id), request_id=state.request_id, mailbox=state.caller.mailbox
    )
    state.ews_code = info.ews_code
    # The same fields, warning included, as each state event of the call's stream.
    return _json({"callId": call_id, **events.call_body(info)}, 200)


@bp.get("/calls/<call_id:call_id>/events")
def watch_call(call_id: str) -> Response:
    """Stream the call's state: the current one, then each change, until Disconnected.

    The status is chosen once the first state is read: an unknown call is its 404 problem,
    and a reconnection after the end (its Last-Event-ID names Disconnected) is 204, which
    tells a browser's EventSource to stop reconnecting.
    """
    state = request_state()
    watch = Watch(
        call_id,
        authorized_call(call_id),
        state.caller.mailbox,
        state.request_id,
        events.parse_last_event_id(request.headers.get("Last-Event-ID")),
        owner_of(state.caller),
    )
    if watch.resume is not None and watch.resume.final:
        ended = Response(status=204, headers={"Cache-Control": "no-store"})
        del ended.headers["Content-Type"]  # no content, so no type
        return ended
    streams = services().streams
    if request.method == "HEAD":
        streams.first_state(watch)
        return Response(status=200, mimetype="text/event-stream", headers=STREAM_HEADERS)
    # gunicorn lends its socket so the pump can take the connection over from this thread.
    sock = request.environ.get("gunicorn.socket")
    return streams.response(watch, sock, request.environ.get("SERVER_PROTOCOL", ""))


@bp.get("/livez")
def livez() -> Response:
    """Answer while the process serves."""
    return _json({"status": "alive"}, 200)


@bp.get("/readyz")
def readyz() -> Response:
    """Answer 200 while this process should take traffic, 503 while draining."""
    if services().state.draining:
        body = rendering.problem_body(
            503,
            "not-ready",
            "Not ready",
            "the gateway is shutting down",
            request_state().request_id,
        )
        return _problem_response(body, request_state())
    return _json({"status": "ready"}, 200)


@bp.get("/metrics")
def metrics() -> Response:
    """Expose Prometheus metrics."""
    payload, content_type = services().metrics.exposition()
    return Response(payload, 200, content_type=content_type)


@bp.get("/openapi.yaml")
def openapi() -> Response:
    """Serve the OpenAPI description of this API."""
    return Response(services().openapi, 200, content_type="application/yaml")


def _json_body() -> Any:
    """Return the parsed JSON body (`null` included: validation says what it must be)."""
    if not request.is_json:
        raise UnsupportedMediaType("send the body as application/json")
    _refuse_content_coding()
    data = _body_bytes()
    try:
        return json.loads(
            data,
            parse_constant=_refuse_constant,
            parse_int=_bounded_int,
            object_pairs_hook=_refuse_duplicates,
        )
    except RecursionError:  # deep nesting: a few kilobytes can exhaust the parser's stack
        raise InvalidRequest("the body nests too deeply") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, a refused constant
        raise InvalidRequest(f"the body is not valid JSON: {error}") from None


def _refuse_content_coding() -> None:
    """Refuse a body sent with a content coding (RFC 9110 section 8.4): the gateway decodes none,
    so gzip bytes would otherwise be read as JSON and fail as text that is not UTF-8."""
    codings = [
        coding.strip(" \t").lower()
        for field in request.headers.getlist("Content-Encoding")
        for coding in field.split(",")
    ]
    refused = [coding for coding in codings if coding not in ("", "identity")]
    if refused:
        named = refused[0] if _CODING.fullmatch(refused[0]) else "other than identity"
        raise UnsupportedMediaType(
            f"Content-Encoding {named} is not supported; send the JSON body unencoded",
            # RFC 9110 section 15.5.16: which codings a request may use instead.
            headers={"Accept-Encoding": "identity"},
        )


def _body_bytes() -> bytes:
    """Read the whole body; one over MAX_CONTENT_LENGTH is 413 however it is framed.

    Werkzeug refuses a Content-Length over the limit before reading. A body without one
    (chunked, which gunicorn decodes and marks `wsgi.input_terminated`) it reads only up to
    the limit and returns as if that were all of it; one byte more, read past its cap, tells
    a body that ends there from one that goes on.
    """
    data = request.get_data(cache=False)
    length, limit = request.content_length, request.max_content_length
    at_limit = length is None and limit is not None and len(data) >= limit
    if at_limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    if length is not None and len(data) < length:
        raise InvalidRequest("the request body ended before its announced length")
    return data


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse a member named twice (I-JSON, RFC 7493 §2.3): a proxy or log that reads the
    first `dialString` must never see another number than the one dialled. Costs 2.7 µs a
    POST body (benchmarks/RESULTS.md)."""
    members = dict(pairs)
    if len(members) < len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise InvalidRequest(f"the body names {name!r} twice; name each field once")
            seen.add(name)
    return members


def _bounded_int(digits: str) -> int:
    """Read an integer within Python's bound on digits, refused in the gateway's own words."""
    bound = sys.get_int_max_str_digits()
    if bound and len(digits.lstrip("-")) > bound:
        raise InvalidRequest(f"a number in the body has more than {bound} digits")
    return int(digits)


def _refuse_constant(name: str) -> Any:
    """Refuse NaN and +-Infinity, which Python's json reads but RFC 8259 does not allow."""
    raise ValueError(f"{name} is not a JSON number")


def _json(body: dict[str, Any], status: int, warning: str | None = None) -> Response:
    if warning:
        body["warning"] = warning
    response = jsonify(body)
    response.status_code = status
    return response


def start_request() -> Response | None:
    """Give the request an id, start its clock and find out who is calling."""
    started = time.perf_counter()
    req = current_request()
    headers = req.headers
    caller_id = headers.get("X-Request-ID", "")
    request_id = caller_id if validation.is_sane_request_id(caller_id) else logs.new_request_id()
    wired = services()
    state = g.gateway_request = RequestState(
        request_id,
        started,
        tracing.start_request(req.method, headers, request_id),
        # Exchange's correlation ids, which the EWS client's observer adds, join the log line.
        logs.start_request_fields(),
        wired,
    )
    wired.metrics.in_progress.inc()
    # CORS preflights carry no credentials; probes and the spec answer to anyone.
    if req.method == "OPTIONS":
        return _options()
    if not (req.url_rule is None or req.endpoint in PUBLIC_ENDPOINTS):
        state.caller = wired.callers.authenticate(headers)
        _charge(REQUESTS)
    return None


def _add_rate_limit_fields(headers: Headers, charges: list[Charge]) -> None:
    """List every quota the request was charged against; a 429 already holds its spent one's
    item, which goes last (draft-ietf-httpapi-ratelimit-headers: one item per policy)."""
    policies = [charge.policy for charge in charges]
    items = [charge.remaining for charge in charges]
    if "RateLimit" in headers:
        policies.append(headers["RateLimit-Policy"])
        items.append(headers["RateLimit"])
    headers["RateLimit-Policy"] = ", ".join(policies)
    headers["RateLimit"] = ", ".join(items)


def _options() -> Response:
    """Answer OPTIONS: 204 with Allow on a route, and a CORS preflight for any path.

    A preflight fails in the browser unless it succeeds, so one to an unknown path (or for a
    method the route lacks) also succeeds: the browser then sends the request itself and shows
    the real 404 or 405 instead of a CORS error. flask-cors adds the preflight's headers.
    """
    error = request.routing_exception
    is_preflight = (
        "Origin" in request.headers and "Access-Control-Request-Method" in request.headers
    )
    if isinstance(error, NotFound) and not isinstance(error, MethodNotAllowed) and not is_preflight:
        raise error
    response = Response(status=204)
    del response.headers["Content-Type"]  # no content, so no type (Werkzeug's default is HTML)
    if request.url_rule is not None:
        adapter = current_app.create_url_adapter(request)
        assert adapter is not None  # there is one for every request
        response.headers["Allow"] = ", ".join(sorted(adapter.allowed_methods()))
    return response


def finish_request(response: Response) -> Response:
    """Stamp the request id, count the request and write its log line."""
    state, req = request_state(), current_request()
    response.headers["X-Request-ID"] = state.request_id
    if state.rate_limits:
        _add_rate_limit_fields(response.headers, state.rate_limits)
    if req.endpoint in ALWAYS_AUDITED or state.refusal:
        _audit(state, req, response.status_code)
    seconds = time.perf_counter() - state.started
    route = route_label(req.url_rule)
    state.services.metrics.http_request(req.method, route, response.status_code, seconds)
    if state.span is not None:
        state.span.finish(route, response.status_code)
    rendering.log_request(
        state.request_id,
        method=req.method,
        route=route,
        status=response.status_code,
        seconds=seconds,
        trace_id=None if state.span is None else state.span.trace_id,
        upstream=_upstream_fields(state),
        detail=state.error_detail,
        level=state.log_level,
    )
    return response


def _audit(state: RequestState, req: Request, status: int) -> None:
    """Write the request's audit line: who did what to which call, and how it ended."""
    outcome = state.audit_outcome
    if outcome is None:
        refusal = state.refusal
        outcome = f"refused-{refusal}" if refusal else state.problem or "ok"
    state.services.audit.record(
        action=AUDITED_ACTIONS.get(req.endpoint or "", req.method.lower()),
        outcome=outcome,
        status=status,
        request_id=state.request_id,
        caller=state.caller,
        call_id=state.call_id,
        dial_string=state.dial_string,
    )


def _upstream_fields(state: RequestState) -> dict[str, Any]:
    """Return what the log line says about the call to Exchange: its outcome, status and code.

    Each is None when Exchange was not called; Exchange's correlation ids (request-id,
    X-FEServer...) follow, as the EWS client's observer found them.
    """
    succeeded = state.upstream_outcome is None and bool(state.ews_code)
    return {
        "upstreamOutcome": "success" if succeeded else state.upstream_outcome,
        # A successful EWS result only ever comes in an HTTP 200 answer.
        "upstreamStatus": 200 if succeeded else state.upstream_status,
        "ewsResponseCode": state.ews_code,
        **state.upstream_log_fields,
    }


def end_request(_error: BaseException | None) -> None:
    """Take the request off the in-progress gauge however it ended."""
    state: RequestState | None = g.get("gateway_request")
    if state is not None:
        state.services.metrics.in_progress.dec()
        if state.span is not None:
            state.span.close()


@functools.cache
def _label_of_rule(rule: str) -> str:
    return _CONVERTER.sub(r"<\1>", rule)


def route_label(rule: Rule | None) -> str:
    """Return the URL rule as a bounded label: never the raw path or a call id."""
    return UNMATCHED_ROUTE if rule is None else _label_of_rule(rule.rule)


def handle_gateway_error(error: GatewayError) -> Response:
    """Render a gateway error as problem+json; its log line says why, at the level it merits."""
    state = request_state()
    state.ews_code = error.ews_code
    state.upstream_outcome = error.outcome
    state.upstream_status = error.upstream_status
    state.error_detail = error.detail
    state.log_level = rendering.log_level_for(error.status)
    wired = services()
    refusal = REFUSAL_BY_ERROR.get(type(error)) or state.refusal
    if refusal:
        state.refusal = refusal
        wired.metrics.refused(refusal)
    response = _problem_response(rendering.problem_of(error, state.request_id), state)
    response.headers.update(error.headers)
    if error.retry_after_s is not None:
        response.headers["Retry-After"] = str(error.retry_after_s)
    challenge = wired.callers.challenge
    if error.status == 401 and challenge:
        response.headers["WWW-Authenticate"] = challenge
    return response


def handle_http_exception(error: HTTPException) -> Response:
    """Render Werkzeug's routing and protocol errors (404, 405, 413...) in the gateway's words."""
    if isinstance(error, MethodNotAllowed):
        return _method_not_allowed(error)
    status = error.code or 500
    problem = ERROR_BY_REQUEST_STATUS.get(status)
    if problem is None:
        state = request_state()
        body = rendering.problem_body(
            status, "http-error", "Request cannot be served", str(error.name), state.request_id
        )
        return _problem_response(body, state)
    if isinstance(error, BadHost):
        return handle_gateway_error(problem(_BAD_HOST))
    detail = _DETAIL_BY_STATUS.get(status, problem.title)
    return handle_gateway_error(problem(detail.format(method=request.method, path=request.path)))


# What a caller reads for each of Werkzeug's errors, instead of Werkzeug's own sentences.
_DETAIL_BY_STATUS = {
    400: "the request body could not be read",
    404: "no route matches {method} {path}; see /openapi.yaml",
    413: "the body is larger than the 16 KiB a request may carry",
}
# A Host that Werkzeug cannot encode as IDNA (BadHost) is a 400 about the head, not the body.
_BAD_HOST = "the Host header must name a host whose labels are 1 to 63 characters (RFC 1035)"


def _method_not_allowed(error: MethodNotAllowed) -> Response:
    """Answer 405 with Allow, counted under the route; a stray trailing slash is 404 instead."""
    path = request.path
    adapter = current_app.create_url_adapter(request)
    assert adapter is not None  # there is one for every request
    if path.endswith("/") and _matches(adapter, path.rstrip("/"), request.method):
        return handle_gateway_error(
            RouteNotFound(f"no route matches {request.method} {path}; did you mean {path[:-1]}?")
        )
    allowed = sorted(error.valid_methods or ())
    if allowed:
        request.url_rule = adapter.match(path, method=allowed[0], return_rule=True)[0]
    problem = ERROR_BY_REQUEST_STATUS[405](
        f"{request.method} is not allowed here; use {', '.join(allowed)}"
    )
    response = handle_gateway_error(problem)
    response.headers["Allow"] = ", ".join(allowed)
    return response


def _matches(adapter: MapAdapter, path: str, method: str) -> bool:
    try:
        adapter.match(path, method=method)
    except HTTPException:
        return False
    return True


def handle_unexpected(error: Exception) -> Response:
    """Log an unexpected failure with its traceback; the caller sees only a 500 problem."""
    state: RequestState | None = g.get("gateway_request")
    request_id = None if state is None else state.request_id
    LOG.exception("unexpected error", extra={"requestId": request_id})
    body = rendering.problem_body(
        500, "internal-error", "Internal error", "an unexpected error occurred", request_id
    )
    if state is None:
        return _problem_response(body, None)
    state.error_detail = f"unexpected {type(error).__name__}"
    state.log_level = logging.ERROR
    return _problem_response(body, state)


def _problem_response(body: dict[str, Any], state: RequestState | None) -> Response:
    if state is not None:
        state.problem = body["type"].removeprefix(rendering.PROBLEM_TYPE_PREFIX)
    response = jsonify(body)
    response.status_code = body["status"]
    response.mimetype = rendering.PROBLEM_JSON
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
    app.wsgi_app = _as_plain_http(app.wsgi_app)  # type: ignore[assignment,method-assign]


def _as_plain_http(wsgi_app: WSGIApplication) -> WSGIApplication:
    """Route a WebSocket handshake as the plain HTTP request it also is.

    The gateway upgrades to no other protocol, and a server may ignore Upgrade (RFC 9110
    section 7.8): a WebSocket client then reads the route's usual answer (events stream over
    Server-Sent Events). Werkzeug would instead match such a request against WebSocket
    routes only, of which there are none, and fail while finding a 405's route.
    """

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ.pop("HTTP_UPGRADE", None)
        return wsgi_app(environ, start_response)

    return serve
