"""The gateway's errors, and the contract's table from Exchange's codes to them.

Every failure a caller or Exchange can cause is one of these. The SOAP layer
raises them; gateway.api.problems renders them as problem+json from the class
attributes, so each class *is* a row of the contract's mapping table. The tree:

    ConfigError                     configuration refused at start (ValueError)
    GatewayError                    500: the gateway itself failed
    ├── CallerError                 4xx: what the caller sent or asked for
    │   ├── InvalidRequest, Unauthenticated, Forbidden, UnsupportedMediaType, ...
    │   ├── DialStringNotAllowed, RateLimited, Idempotency*           (the guards)
    │   ├── CallerStreamLimitReached                     (one caller's event streams)
    │   ├── RouteNotFound, MethodNotAllowed, BodyTooLarge, ...        (HTTP itself)
    │   └── CallNotFound, MailboxNotFound, ExchangeAccessDenied,
    │       ExchangeUnprocessable                  (Exchange refused what was asked)
    ├── ExchangeError               502-504: Exchange failed, or could not be asked
    │   ├── ExchangeBusy, ExchangeUnavailable, ExchangeReportedError
    │   ├── ExchangeAuthFailed, ExchangeBadAnswer, ExchangeUnreachable, ExchangeTimeout
    │   └── CircuitOpen
    └── ServiceUnavailable          503: the gateway's own limits and dependencies
        └── KeysUnavailable, SharedStateUnavailable, GatewayOverloaded,
            StreamLimitReached, ShuttingDown

How a call to Exchange ended is an `ExchangeOutcome`, the `outcome` label of
ews_gateway_upstream_requests_total.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class ExchangeOutcome(StrEnum):
    """How one call to Exchange ended (the contract's `outcome` metric label)."""

    SUCCESS = "success"
    EWS_ERROR = "ews_error"  # a response message with ResponseClass="Error"
    SOAP_FAULT = "soap_fault"
    HTTP_ERROR = "http_error"  # an HTTP status without a usable SOAP answer
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    INVALID_RESPONSE = "invalid_response"  # an answer the gateway cannot read
    REJECTED = "rejected"  # never sent: the bulkhead or the circuit breaker said no


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


class GatewayError(Exception):
    """A failure the caller gets as an RFC 9457 problem with a precise status."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        ews_code: str | None = None,
        retry_after_s: int | None = None,
        warning: str | None = None,
        outcome: ExchangeOutcome | None = None,
        back_off_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        # Extra response fields the problem carries (RateLimit, RateLimit-Policy).
        self.headers = headers or {}
        self.outcome = outcome
        # Exchange's own wait hint, to the millisecond (retry_after_s is it rounded up).
        self.back_off_s = back_off_s
        self.detail = detail
        self.ews_code = ews_code
        self.retry_after_s = retry_after_s
        self.warning = warning
        # Exchange's HTTP status, when its answer got that far (for the log line).
        self.upstream_status: int | None = None
        # True when the failure came before any byte of the request was sent (a name that
        # did not resolve, a refused connection, a failed TLS handshake or ticket request):
        # Exchange cannot have acted on it, so a PlayOnPhone that failed so dialled nothing.
        self.before_sending = False


class CallerError(GatewayError):
    """The caller's request cannot be served as sent (4xx)."""

    status = 400


class ExchangeError(GatewayError):
    """Exchange failed the call, or could not be asked (502-504)."""

    status = 502


class ServiceUnavailable(GatewayError):
    """The gateway's own limits or dependencies stop it from serving now (503)."""

    status = 503


# Caller-side problems: Exchange is never contacted.


class InvalidRequest(CallerError):
    status = 400
    slug = "invalid-request"
    title = "Invalid request"


class Unauthenticated(CallerError):
    status = 401
    slug = "unauthenticated"
    title = "Missing or invalid credentials"


class Forbidden(CallerError):
    status = 403
    slug = "forbidden"
    title = "Not allowed"


class KeysUnavailable(ServiceUnavailable):
    status = 503
    slug = "keys-unavailable"
    title = "Caller credentials cannot be checked right now"


class UnsupportedMediaType(CallerError):
    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported media type"


class DialStringNotAllowed(CallerError):
    status = 403
    slug = "dial-string-not-allowed"
    title = "This number may not be dialled through the gateway"


class RateLimited(CallerError):
    status = 429
    slug = "rate-limited"
    title = "Too many requests from this caller"


class IdempotencyKeyInUse(CallerError):
    status = 409
    slug = "idempotency-key-in-use"
    title = "A request with this Idempotency-Key is still being answered"


class IdempotencyOutcomeUnknown(CallerError):
    status = 409
    slug = "idempotency-outcome-unknown"
    title = "The first request with this Idempotency-Key may have placed a call"


class IdempotencyKeyReused(CallerError):
    status = 422
    slug = "idempotency-key-reused"
    title = "This Idempotency-Key was used with another request body"


class SharedStateUnavailable(ServiceUnavailable):
    status = 503
    slug = "shared-state-unavailable"
    title = "The gateway's shared state (Redis) cannot be reached"


# The HTTP exchange itself: the request cannot be served as it was sent. The gateway's
# front door (gateway.serving.frontdoor) raises these for requests gunicorn refuses before the
# app sees them; the app raises them for routing and protocol failures.


class RouteNotFound(CallerError):
    status = 404
    slug = "not-found"
    title = "No such route"


class MethodNotAllowed(CallerError):
    status = 405
    slug = "method-not-allowed"
    title = "Method not allowed on this route"


class RequestTimeout(CallerError):
    status = 408
    slug = "request-timeout"
    title = "The request did not arrive in time"


class BodyTooLarge(CallerError):
    status = 413
    slug = "request-entity-too-large"
    title = "The request body is too large"


class UriTooLong(CallerError):
    status = 414
    slug = "uri-too-long"
    title = "The request URL is too long"


class ExpectationFailed(CallerError):
    status = 417
    slug = "expectation-failed"
    title = "The Expect header cannot be met"


class HeadersTooLarge(CallerError):
    status = 431
    slug = "request-header-fields-too-large"
    title = "The request headers are too large or too many"


class MalformedRequest(CallerError):
    status = 400
    slug = "malformed-request"
    title = "The request is not valid HTTP/1.1"


class TransferCodingNotImplemented(CallerError):
    status = 501
    slug = "not-implemented"
    title = "The request's transfer coding is not supported"


# Werkzeug's routing and protocol errors, in the gateway's words (any other status: generic).
ERROR_BY_REQUEST_STATUS: dict[int, type[GatewayError]] = {
    400: MalformedRequest,
    404: RouteNotFound,
    405: MethodNotAllowed,
    408: RequestTimeout,
    413: BodyTooLarge,
    414: UriTooLong,
    415: UnsupportedMediaType,
    417: ExpectationFailed,
    431: HeadersTooLarge,
    501: TransferCodingNotImplemented,
}


# What Exchange said, by ResponseCode.


class CallNotFound(CallerError):
    status = 404
    slug = "call-not-found"
    title = "Phone call not found"


class MailboxNotFound(CallerError):
    status = 404
    slug = "mailbox-not-found"
    title = "Mailbox not found"


class ExchangeAccessDenied(CallerError):
    status = 403
    slug = "access-denied"
    title = "Exchange denied access"


class ExchangeUnprocessable(CallerError):
    status = 422
    slug = "cannot-place-call"
    title = "Exchange cannot do this for the mailbox or item"


class ExchangeBusy(ExchangeError):
    status = 503
    slug = "exchange-busy"
    title = "Exchange is throttling requests"


class ExchangeUnavailable(ExchangeError):
    status = 503
    slug = "exchange-unavailable"
    title = "Exchange is temporarily unavailable"


class ExchangeReportedError(ExchangeError):
    status = 502
    slug = "exchange-error"
    title = "Exchange reported an error"


# What went wrong on the way to Exchange.


class CircuitOpen(ExchangeError):
    status = 503
    slug = "exchange-circuit-open"
    title = "Exchange is failing; calls are paused"


class GatewayOverloaded(ServiceUnavailable):
    status = 503
    slug = "gateway-overloaded"
    title = "Too many calls to Exchange are in flight"


class ExchangeAuthFailed(ExchangeError):
    status = 502
    slug = "upstream-authentication-failed"
    title = "The gateway could not authenticate to Exchange"


class ExchangeBadAnswer(ExchangeError):
    status = 502
    slug = "bad-upstream-response"
    title = "Exchange sent an answer the gateway cannot read"


class ExchangeUnreachable(ExchangeError):
    status = 502
    slug = "upstream-unreachable"
    title = "Exchange could not be reached"


class ExchangeTimeout(ExchangeError):
    status = 504
    slug = "upstream-timeout"
    title = "Exchange did not answer in time"


# Event streams (GET /calls/{callId}/events).


class CallerStreamLimitReached(CallerError):
    status = 429
    slug = "too-many-streams-for-caller"
    title = "This caller holds as many event streams as it may"


class StreamLimitReached(ServiceUnavailable):
    status = 503
    slug = "too-many-streams"
    title = "This worker holds as many event streams as it may"


class ShuttingDown(ServiceUnavailable):
    status = 503
    slug = "shutting-down"
    title = "This instance is shutting down"


# Exchange's MessageText is passed on, but bounded: a caller needs the gist, not a dump.
MAX_MESSAGE_CHARS = 300

# Seconds a caller is told to wait when Exchange throttles without saying how long.
DEFAULT_RETRY_AFTER_S = 5

ERROR_BY_RESPONSE_CODE: dict[str, type[GatewayError]] = {
    "ErrorInvalidPhoneCallId": CallNotFound,
    "ErrorAccessDenied": ExchangeAccessDenied,
    "ErrorImpersonateUserDenied": ExchangeAccessDenied,
    "ErrorImpersonationDenied": ExchangeAccessDenied,
    "ErrorImpersonationFailed": ExchangeAccessDenied,
    "ErrorNonExistentMailbox": MailboxNotFound,
    "ErrorInvalidSmtpAddress": MailboxNotFound,
    "ErrorUserNotUnifiedMessagingEnabled": ExchangeUnprocessable,
    "ErrorUnifiedMessagingDialPlanNotFound": ExchangeUnprocessable,
    "ErrorInvalidPhoneNumber": ExchangeUnprocessable,
    "ErrorPhoneNumberNotDialable": ExchangeUnprocessable,
    "ErrorItemNotFound": ExchangeUnprocessable,
    "ErrorServerBusy": ExchangeBusy,
    "ErrorExceededConnectionCount": ExchangeBusy,
    "ErrorTooManyObjectsOpened": ExchangeBusy,
    "ErrorUnifiedMessagingServerNotFound": ExchangeUnavailable,
    "ErrorUMServerUnavailable": ExchangeUnavailable,
    "ErrorUnifiedMessagingRequestFailed": ExchangeUnavailable,
    "ErrorInternalServerTransientError": ExchangeUnavailable,
    "ErrorMailboxStoreUnavailable": ExchangeUnavailable,
    "ErrorADUnavailable": ExchangeUnavailable,
    "ErrorConnectionFailed": ExchangeUnavailable,
    "ErrorConnectionFailedTransientError": ExchangeUnavailable,
}

# Codes reported by name in metrics; any other is "Other", keeping label sets bounded.
KNOWN_RESPONSE_CODES = frozenset({"NoError", "ErrorSchemaValidation", *ERROR_BY_RESPONSE_CODE})


def error_for_response_code(
    code: str, message: str, *, outcome: ExchangeOutcome, back_off_ms: int | None = None
) -> GatewayError:
    """Translate an EWS ResponseCode into the gateway error the contract maps it to."""
    error_class = ERROR_BY_RESPONSE_CODE.get(code, ExchangeReportedError)
    retry_after_s = None
    back_off_s = back_off_ms / 1000 if back_off_ms is not None else None
    if error_class.status == 503:
        # Throttled or transient: the caller is always told when to come back.
        retry_after_s = DEFAULT_RETRY_AFTER_S
        if back_off_ms is not None:
            retry_after_s = max(1, -(-back_off_ms // 1000))
    message = message[:MAX_MESSAGE_CHARS]
    detail = f"Exchange answered {code}: {message}" if message else f"Exchange answered {code}"
    return error_class(
        detail, ews_code=code, retry_after_s=retry_after_s, outcome=outcome, back_off_s=back_off_s
    )


# What an HTTP status means when Exchange (or a balancer in front of it) answered no SOAP.
# 440 Login Timeout is a forms-based login page in front of EWS: credentials, like 401.
# A 401 reaches this table only when the gateway sent credentials in a scheme Exchange
# offers (gateway.exchange.auth says so otherwise).
ERROR_BY_HTTP_STATUS: dict[int, tuple[type[GatewayError], str]] = {
    401: (
        ExchangeAuthFailed,
        "Upstream authentication failed: Exchange refused the gateway's credentials (HTTP 401)",
    ),
    403: (
        ExchangeAuthFailed,
        "Upstream authentication failed: Exchange refused the gateway's credentials (HTTP 403)",
    ),
    440: (
        ExchangeAuthFailed,
        "Upstream authentication failed: a login page stands in front of EWS (Login Timeout) "
        "(HTTP 440)",
    ),
    404: (
        ExchangeBadAnswer,
        "EWS_URL's path answered 404: EWS is usually at /EWS/Exchange.asmx",
    ),
    429: (ExchangeBusy, "Exchange answered Too Many Requests (HTTP 429)"),
    503: (ExchangeUnavailable, "Exchange answered HTTP 503 Service Unavailable (HTTP 503)"),
    504: (ExchangeTimeout, "A gateway in front of Exchange timed out waiting for it (HTTP 504)"),
}


def error_for_http_status(status: int, retry_after_s: int | None) -> GatewayError | None:
    """Translate an HTTP status that carries no SOAP answer; None for any other status.

    retry_after_s is Exchange's Retry-After in whole seconds, when it sent a usable one.
    """
    row = ERROR_BY_HTTP_STATUS.get(status)
    if row is None:
        return None
    error_class, detail = row
    if error_class is ExchangeBusy and retry_after_s is None:
        retry_after_s = DEFAULT_RETRY_AFTER_S  # throttled callers are always told when to return
    if error_class is ExchangeAuthFailed:
        retry_after_s = None
    return error_class(
        detail,
        retry_after_s=retry_after_s,
        back_off_s=retry_after_s,
        outcome=ExchangeOutcome.HTTP_ERROR,
    )


def metric_code(code: str | None) -> str:
    """Return the code as a bounded metric label value."""
    return code if code in KNOWN_RESPONSE_CODES else "Other"
