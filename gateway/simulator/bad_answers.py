"""Answers a real Exchange, its IIS front end or a hostile server may give instead of EWS XML."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from gateway import wire
from gateway.simulator.envelopes import ERROR, OperationResult, operation_response, soap_fault
from gateway.simulator.faults import FiredRule
from gateway.simulator.outcomes import (
    HTML_CONTENT_TYPE,
    ConnectionReset,
    Outcome,
    Reply,
    Silence,
    StreamedReply,
)

BUSY_MESSAGE = "The server cannot service this request right now. Try again later."
ERROR_PAGE_LOCATION = "/owa/auth/errorFE.aspx?httpCode=500"
INTERNAL_SERVER_ERROR = "ErrorInternalServerError"
_CHUNK = 64 * 1024

IIS_ERROR_PAGE = b"""<!DOCTYPE html>
<html><head><title>Runtime Error</title></head>
<body bgcolor="white">
<span><h1>Server Error in '/EWS' Application.<hr width=100% size=1 color=silver></h1>
<h2><i>Runtime Error</i></h2></span>
<b>Description:</b> An application error occurred on the server.
</body></html>
"""
SERVICE_UNAVAILABLE_PAGE = b"""<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01//EN">
<html><head><title>Service Unavailable</title></head>
<body><h2>Service Unavailable</h2><hr><p>HTTP Error 503. The service is unavailable.</p></body>
</html>
"""
OBJECT_MOVED_PAGE = (
    b'<html><head><title>Object moved</title></head><body><h2>Object moved to <a href="'
    + ERROR_PAGE_LOCATION.encode()
    + b'">here</a>.</h2></body></html>'
)
NOT_SOAP_DOCUMENT = (
    b'<?xml version="1.0" encoding="utf-8"?>\n'
    b"<html><body><p>This is a well-formed document, but not a SOAP envelope.</p></body></html>"
)
# Ten entities, each ten times the one before: a few hundred bytes that expand to 3 GB.
_LAUGHS = "".join(f'<!ENTITY lol{level} "{f"&lol{level - 1};" * 10}">' for level in range(1, 10))
_BILLION_LAUGHS_DOCTYPE = f'<!DOCTYPE s:Envelope [<!ENTITY lol0 "lol">{_LAUGHS}]>'


def bad_answer(fired: FiredRule, operation: str) -> Outcome:
    """Build the answer a misbehaviour rule asks for (every kind but latency, warning, sip)."""
    return _BAD_ANSWERS[fired.rule.kind](fired, operation)


def _busy(fired: FiredRule, _operation: str) -> Outcome:
    back_off_ms = fired.rule.number("backOffMs")
    return Reply(500, soap_fault(wire.ERROR_SERVER_BUSY, BUSY_MESSAGE, back_off_ms))


def _ews_error(fired: FiredRule, operation: str) -> Outcome:
    code = fired.rule.text("code")
    result = OperationResult(
        response_class=ERROR,
        code=code,
        message_text=f"The simulator was told to answer {code}.",
        back_off_ms=fired.rule.number("backOffMs"),
    )
    return Reply(200, operation_response(operation, result))


def _fault(fired: FiredRule, _operation: str) -> Outcome:
    code = fired.rule.text("code")
    return Reply(500, soap_fault(code, f"The simulator was told to fault with {code}."))


def _http_401(_fired: FiredRule, _operation: str) -> Outcome:
    challenges = (("WWW-Authenticate", "Negotiate"), ("WWW-Authenticate", "NTLM"))
    return Reply(401, content_type=None, headers=challenges)


def _http_503(fired: FiredRule, _operation: str) -> Outcome:
    retry_after = fired.rule.number("retryAfter")
    headers = () if retry_after is None else (("Retry-After", str(retry_after)),)
    return Reply(503, SERVICE_UNAVAILABLE_PAGE, HTML_CONTENT_TYPE, headers)


def _html_500(_fired: FiredRule, _operation: str) -> Outcome:
    return Reply(500, IIS_ERROR_PAGE, HTML_CONTENT_TYPE)


def _redirect(_fired: FiredRule, _operation: str) -> Outcome:
    return Reply(302, OBJECT_MOVED_PAGE, HTML_CONTENT_TYPE, (("Location", ERROR_PAGE_LOCATION),))


def _malformed(_fired: FiredRule, operation: str) -> Outcome:
    whole = operation_response(operation, OperationResult())
    return Reply(200, whole[: len(whole) // 2])


def _not_soap(_fired: FiredRule, _operation: str) -> Outcome:
    return Reply(200, NOT_SOAP_DOCUMENT)


def _hang(fired: FiredRule, _operation: str) -> Outcome:
    return Silence((fired.rule.number("ms") or 0) / 1000, fired.released)


def _reset(_fired: FiredRule, _operation: str) -> Outcome:
    return ConnectionReset()


def _billion_laughs(_fired: FiredRule, operation: str) -> Outcome:
    return Reply(200, _envelope_with_doctype(operation, _BILLION_LAUGHS_DOCTYPE, "&lol9;"))


def _external_entity(fired: FiredRule, operation: str) -> Outcome:
    doctype = f'<!DOCTYPE s:Envelope [<!ENTITY xxe SYSTEM "{fired.rule.text("url")}">]>'
    return Reply(200, _envelope_with_doctype(operation, doctype, "&xxe;"))


def _envelope_with_doctype(operation: str, doctype: str, entity_reference: str) -> bytes:
    marker = "ENTITY-REFERENCE-GOES-HERE"
    envelope = _error_envelope(operation, marker).decode("utf-8")
    declaration, _, rest = envelope.partition("?>")
    return f"{declaration}?>\n{doctype}\n{rest.replace(marker, entity_reference)}".encode()


def _huge(fired: FiredRule, operation: str) -> Outcome:
    marker = "HUGE-MESSAGE-TEXT-GOES-HERE"
    head, _, tail = _error_envelope(operation, marker).partition(marker.encode())
    length = max((fired.rule.number("megabytes") or 1) * 1024 * 1024, len(head) + len(tail))
    filler_length = length - len(head) - len(tail)

    def chunks() -> Iterator[bytes]:
        yield head
        for start in range(0, filler_length, _CHUNK):
            yield b"x" * min(_CHUNK, filler_length - start)
        yield tail

    return StreamedReply(200, length, chunks)


def _error_envelope(operation: str, message_text: str) -> bytes:
    result = OperationResult(ERROR, INTERNAL_SERVER_ERROR, message_text)
    return operation_response(operation, result)


_BAD_ANSWERS: Mapping[str, Callable[[FiredRule, str], Outcome]] = {
    "busy": _busy,
    "ews-error": _ews_error,
    "fault": _fault,
    "http-401": _http_401,
    "http-503": _http_503,
    "html-500": _html_500,
    "redirect": _redirect,
    "malformed": _malformed,
    "not-soap": _not_soap,
    "hang": _hang,
    "reset": _reset,
    "billion-laughs": _billion_laughs,
    "external-entity": _external_entity,
    "huge": _huge,
}
