"""Exchange's answers: the only module that reads EWS response XML.

Answers are parsed securely (no DTDs, no entities, no network) and mapped to
the gateway's errors or to plain result dataclasses. The few fields the
gateway uses are read by their schema paths with lxml; the tests hold this
reading to zeep's WSDL-driven one for every recorded answer, at a fraction of
its cost per request.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from lxml import etree

from gateway import wire
from gateway.errors import (
    ExchangeBadAnswer,
    ExchangeOutcome,
    ExchangeUnavailable,
    GatewayError,
    error_for_http_status,
    error_for_response_code,
)
from gateway.exchange.transport import ExchangeReply

_SOAP = f"{{{wire.SOAP_ENV_NS}}}"
_M = f"{{{wire.MESSAGES_NS}}}"
_T = f"{{{wire.TYPES_NS}}}"
_ENVELOPE = f"{_SOAP}Envelope"
_FAULT = f"{_SOAP}Body/{_SOAP}Fault"


@dataclass(frozen=True)
class Disconnected:
    """Exchange ended the call."""

    ews_code: str
    warning: str | None = None


@dataclass(frozen=True)
class PlacedCall:
    """Exchange started dialing; `call_id` names the new call."""

    call_id: str
    ews_code: str
    warning: str | None = None


@dataclass(frozen=True)
class CallInformation:
    """The state of a call as Exchange reports it."""

    state: str
    connection_failure_cause: str
    sip_response_code: int | None
    sip_response_text: str | None
    ews_code: str
    warning: str | None = None


@dataclass(frozen=True)
class EwsAnswer:
    """A successful (or warning) response message of one operation."""

    message: etree._Element
    code: str
    warning: str | None


def read_ews_answer(operation: str, reply: ExchangeReply) -> EwsAnswer:
    """Return the operation's response message from Exchange's answer, or raise the mapped error."""
    _raise_for_http_status(reply)
    envelope = _parse_envelope(reply)
    fault = envelope.find(_FAULT)
    if fault is not None:
        raise _fault_error(fault)
    message = envelope.find(f"{_SOAP}Body/{_M}{operation}Response")
    if message is None:
        raise ExchangeBadAnswer(
            f"Exchange's answer holds no {operation}Response",
            outcome=ExchangeOutcome.INVALID_RESPONSE,
        )
    if reply.status != 200:
        raise ExchangeUnavailable(
            f"Exchange answered HTTP {reply.status} without a SOAP fault",
            outcome=ExchangeOutcome.HTTP_ERROR,
        )
    return _classify(message)


def disconnected(answer: EwsAnswer) -> Disconnected:
    """Read a DisconnectPhoneCall answer."""
    return Disconnected(ews_code=answer.code, warning=answer.warning)


def placed_call(answer: EwsAnswer) -> PlacedCall:
    """Read a PlayOnPhone answer: the new call's id."""
    phone_call_id = answer.message.find(f"{_M}PhoneCallId")
    call_id = phone_call_id.get("Id") if phone_call_id is not None else None
    if not call_id:
        raise ExchangeBadAnswer(
            "Exchange accepted PlayOnPhone but returned no PhoneCallId",
            outcome=ExchangeOutcome.INVALID_RESPONSE,
        )
    return PlacedCall(call_id=call_id, ews_code=answer.code, warning=answer.warning)


def call_information(answer: EwsAnswer) -> CallInformation:
    """Read a GetPhoneCallInformation answer."""
    info = answer.message.find(f"{_M}PhoneCallInformation")
    state = info.findtext(f"{_T}PhoneCallState") if info is not None else None
    cause = info.findtext(f"{_T}ConnectionFailureCause") if info is not None else None
    if info is None or state is None or cause is None:
        raise ExchangeBadAnswer(
            "Exchange answered without PhoneCallInformation",
            outcome=ExchangeOutcome.INVALID_RESPONSE,
        )
    return CallInformation(
        state=state,
        connection_failure_cause=cause,
        sip_response_code=_sip_response_code(info.findtext(f"{_T}SIPResponseCode")),
        sip_response_text=info.findtext(f"{_T}SIPResponseText"),
        ews_code=answer.code,
        warning=answer.warning,
    )


def _sip_response_code(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ExchangeBadAnswer(
            "Exchange's SIPResponseCode is not a number", outcome=ExchangeOutcome.INVALID_RESPONSE
        ) from None


def _classify(message: etree._Element) -> EwsAnswer:
    """Raise the mapped error for ResponseClass="Error"; otherwise return the answer."""
    response_class = message.get("ResponseClass")
    if response_class is None:
        raise ExchangeBadAnswer(
            "Exchange answered without a response message", outcome=ExchangeOutcome.INVALID_RESPONSE
        )
    code = (message.findtext(f"{_M}ResponseCode") or "").strip() or wire.NO_ERROR
    text = (message.findtext(f"{_M}MessageText") or "").strip()
    if response_class == "Error":
        raise error_for_response_code(
            code, text, outcome=ExchangeOutcome.EWS_ERROR, back_off_ms=_back_off_ms(message)
        )
    if response_class not in ("Success", "Warning"):
        raise ExchangeBadAnswer(
            f"Exchange answered an unknown ResponseClass {response_class!r}",
            outcome=ExchangeOutcome.INVALID_RESPONSE,
        )
    warning = (text or code) if response_class == "Warning" else None
    return EwsAnswer(message=message, code=code, warning=warning)


def _raise_for_http_status(reply: ExchangeReply) -> None:
    """Map the HTTP statuses that carry no SOAP answer (the table is in gateway.errors)."""
    status = reply.status
    if status in (200, 500):
        return
    if 300 <= status < 400:
        raise ExchangeBadAnswer(
            f"Exchange redirected the request (HTTP {status}), usually to its error page",
            outcome=ExchangeOutcome.HTTP_ERROR,
        )
    error = error_for_http_status(status, retry_after_seconds(reply.retry_after))
    if error is not None:
        raise error
    raise ExchangeBadAnswer(f"Exchange answered HTTP {status}", outcome=ExchangeOutcome.HTTP_ERROR)


def retry_after_seconds(header: str | None, now: datetime | None = None) -> int | None:
    """Read Retry-After as whole seconds from now: delay-seconds or an HTTP-date (RFC 9110 10.2.3).

    A date in the past is 0; anything unreadable is None.
    """
    if header is None:
        return None
    value = header.strip()
    if value.isascii() and value.isdigit():
        return int(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; "-0000" parses as naive
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0, math.ceil(seconds))


def _parse_envelope(reply: ExchangeReply) -> etree._Element:
    """Parse a SOAP envelope without resolving DTDs, entities or anything remote."""
    try:
        root = etree.fromstring(reply.body, parser=_parser())
    except etree.XMLSyntaxError:
        root = None
    if root is None or _has_doctype(root) or root.tag != _ENVELOPE:
        if reply.status == 500:
            raise ExchangeUnavailable(
                "Exchange answered HTTP 500 with an error page", outcome=ExchangeOutcome.HTTP_ERROR
            )
        raise ExchangeBadAnswer(
            "Exchange's answer is not a well-formed SOAP envelope",
            outcome=ExchangeOutcome.INVALID_RESPONSE,
        )
    return root


_PARSERS = threading.local()


def _parser() -> etree.XMLParser:
    """Return this thread's secure parser (a parser used by two threads at once serializes them)."""
    parser: etree.XMLParser | None = getattr(_PARSERS, "parser", None)
    if parser is None:
        parser = _PARSERS.parser = etree.XMLParser(
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            huge_tree=False,
            remove_comments=True,
            remove_pis=True,
        )
    return parser


def _has_doctype(root: etree._Element) -> bool:
    # A SOAP message may not carry a DTD (SOAP 1.1, section 3); entity tricks live there.
    docinfo: Any = root.getroottree().docinfo
    return bool(docinfo.doctype)


def _local_text(parent: etree._Element, local_name: str) -> str | None:
    """Return the text of the first descendant with this local name, in any namespace."""
    for element in parent.iter():
        if isinstance(element.tag, str) and etree.QName(element).localname == local_name:
            return (element.text or "").strip()
    return None


def _back_off_ms(parent: etree._Element) -> int | None:
    for element in parent.iter():
        if (
            isinstance(element.tag, str)
            and etree.QName(element).localname == "Value"
            and element.get("Name") == wire.BACK_OFF_MILLISECONDS
        ):
            text = (element.text or "").strip()
            return int(text) if text.isdigit() else None
    return None


def _fault_error(fault: etree._Element) -> GatewayError:
    """Map a SOAP fault by detail/ResponseCode, else by the local part of faultcode."""
    detail = fault.find("detail")
    code = _local_text(detail, "ResponseCode") if detail is not None else None
    if not code:
        code = (fault.findtext("faultcode") or "").strip().rpartition(":")[2] or "Other"
    message = (fault.findtext("faultstring") or "").strip()
    back_off = _back_off_ms(detail) if detail is not None else None
    return error_for_response_code(
        code, message, outcome=ExchangeOutcome.SOAP_FAULT, back_off_ms=back_off
    )
