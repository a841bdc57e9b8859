"""Exchange Web Services over SOAP: the only module that knows zeep and EWS XML.

It builds envelopes from the project's WSDL with zeep, sends them through the
transport, reads Exchange's answer (securely: no DTDs, no entities, no
network) and returns plain dataclasses or raises the gateway's own errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol, TypeVar

import tenacity
import zeep
from lxml import etree
from zeep.exceptions import Error as ZeepError

from gateway import wire
from gateway.errors import (
    EwsUnavailable,
    GatewayError,
    GatewayOverloaded,
    UpstreamAuthFailed,
    UpstreamBadResponse,
    error_for_response_code,
)
from gateway.resilience import UpstreamPolicy
from gateway.transport import UpstreamReply

WSDL_FILE = "wsdl/um.wsdl"
CONTENT_TYPE = "text/xml; charset=utf-8"


class Transport(Protocol):
    """Sends one envelope to Exchange (gateway.transport.ExchangeTransport in production)."""

    def post(
        self, body: bytes, headers: Mapping[str, str], *, deadline: float | None = None
    ) -> UpstreamReply:
        """Return Exchange's whole answer by the deadline (monotonic), or raise a GatewayError."""


class UpstreamObserver(Protocol):
    """Receives one report per upstream call (the metrics layer implements it)."""

    def upstream_call(self, operation: str, outcome: str, code: str | None, seconds: float) -> None:
        """Record an upstream call."""


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


class PhoneCalls(Protocol):
    """The phone-call operations the HTTP layer needs (EwsClient, or a fake in tests)."""

    def disconnect_call(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> Disconnected:
        """Hang up a call."""

    def play_on_phone(
        self,
        item_id: str,
        dial_string: str,
        *,
        request_id: str,
        change_key: str | None = None,
        mailbox: str | None = None,
    ) -> PlacedCall:
        """Start a call."""

    def get_call_information(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> CallInformation:
        """Read the state of a call."""


class EwsClient:
    """Call the Unified Messaging operations of one Exchange server."""

    def __init__(
        self,
        transport: Transport,
        *,
        server_version: str,
        observer: UpstreamObserver | None = None,
        policy: UpstreamPolicy | None = None,
    ) -> None:
        wsdl = resources.files("gateway").joinpath(WSDL_FILE)
        with resources.as_file(wsdl) as wsdl_path:
            self._zeep = zeep.Client(str(wsdl_path), settings=zeep.Settings(forbid_dtd=True))
        self._zeep.set_ns_prefix("m", wire.MESSAGES_NS)
        self._zeep.set_ns_prefix("t", wire.TYPES_NS)
        self._binding = next(iter(self._zeep.wsdl.bindings.values()))
        self._transport = transport
        self._server_version = server_version
        self._observer = observer
        self._policy = policy or UpstreamPolicy()

    def disconnect_call(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> Disconnected:
        """Hang up a call (DisconnectPhoneCall)."""
        body = {"PhoneCallId": {"Id": call_id}}
        return self._invoke(wire.DISCONNECT_PHONE_CALL, body, request_id, mailbox, _disconnected)

    def play_on_phone(
        self,
        item_id: str,
        dial_string: str,
        *,
        request_id: str,
        change_key: str | None = None,
        mailbox: str | None = None,
    ) -> PlacedCall:
        """Dial a phone and play a voice item to it (PlayOnPhone)."""
        body = {"ItemId": {"Id": item_id, "ChangeKey": change_key}, "DialString": dial_string}
        return self._invoke(wire.PLAY_ON_PHONE, body, request_id, mailbox, _placed_call)

    def get_call_information(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> CallInformation:
        """Read the state of a call (GetPhoneCallInformation)."""
        body = {"PhoneCallId": {"Id": call_id}}
        return self._invoke(
            wire.GET_PHONE_CALL_INFORMATION, body, request_id, mailbox, _call_information
        )

    def build_envelope(
        self, operation: str, body: Mapping[str, Any], mailbox: str | None = None
    ) -> bytes:
        """Serialize the SOAP envelope for an operation, headers included."""
        headers: dict[str, Any] = {"RequestVersion": {"Version": self._server_version}}
        if mailbox is not None:
            headers["Impersonation"] = {"ConnectingSID": {"PrimarySmtpAddress": mailbox}}
        envelope = self._zeep.create_message(
            self._zeep.service, operation, **body, _soapheaders=headers
        )
        return bytes(etree.tostring(envelope, xml_declaration=True, encoding="utf-8"))

    def _invoke(
        self,
        operation: str,
        body: Mapping[str, Any],
        request_id: str,
        mailbox: str | None,
        read_result: Callable[[_Answer], ResultT],
    ) -> ResultT:
        """Send one operation and read its result; every outcome is observed once."""
        envelope = self.build_envelope(operation, body, mailbox)
        headers = {
            "Content-Type": CONTENT_TYPE,
            "SOAPAction": f'"{wire.soap_action(operation)}"',
            "X-Request-ID": request_id,
        }
        deadline = time.monotonic() + self._policy.timeout_s
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(2),
            retry=tenacity.retry_if_exception(
                lambda error: self._policy.may_retry(operation, error, deadline)
            ),
            wait=_exchange_back_off,
            reraise=True,
        )
        started = time.perf_counter()
        try:
            with self._policy.call_slot():
                result: ResultT = retrying(
                    self._attempt, operation, envelope, headers, deadline, read_result
                )
        except GatewayOverloaded as error:
            self._observe(operation, error.outcome or "rejected", None, started)
            raise
        return result

    def _attempt(
        self,
        operation: str,
        envelope: bytes,
        headers: Mapping[str, str],
        deadline: float,
        read_result: Callable[[_Answer], ResultT],
    ) -> ResultT:
        """Make one call to Exchange and read its result; every outcome is observed once."""
        started = time.perf_counter()
        try:
            with self._policy.guard():
                reply = self._transport.post(envelope, headers, deadline=deadline)
            answer = self._read_reply(operation, reply)
            result = read_result(answer)
        except GatewayError as error:
            self._observe(operation, error.outcome or "invalid_response", error.ews_code, started)
            raise
        self._observe(operation, "success", answer.code, started)
        return result

    def _observe(self, operation: str, outcome: str, code: str | None, started: float) -> None:
        if self._observer is not None:
            self._observer.upstream_call(operation, outcome, code, time.perf_counter() - started)

    def _read_reply(self, operation: str, reply: UpstreamReply) -> _Answer:
        """Turn Exchange's HTTP answer into an _Answer, or raise the mapped error."""
        _raise_for_http_status(reply)
        envelope = _parse_envelope(reply)
        fault = envelope.find(f"{{{wire.SOAP_ENV_NS}}}Body/{{{wire.SOAP_ENV_NS}}}Fault")
        if fault is not None:
            raise _fault_error(fault)
        expected = f"{{{wire.MESSAGES_NS}}}{operation}Response"
        if envelope.find(f"{{{wire.SOAP_ENV_NS}}}Body/{expected}") is None:
            raise UpstreamBadResponse(
                f"Exchange's answer holds no {operation}Response", outcome="invalid_response"
            )
        if reply.status != 200:
            raise EwsUnavailable(
                f"Exchange answered HTTP {reply.status} without a SOAP fault", outcome="http_error"
            )
        try:
            body = self._binding.get(operation).process_reply(envelope)
        except ZeepError as exc:
            raise UpstreamBadResponse(
                f"Exchange's {operation} answer does not match the schema ({exc})",
                outcome="invalid_response",
            ) from None
        return _answer_from_body(body, envelope)


@dataclass(frozen=True)
class _Answer:
    body: Any
    code: str
    warning: str | None


ResultT = TypeVar("ResultT")


def _exchange_back_off(retry_state: tenacity.RetryCallState) -> float:
    """Wait as long as Exchange asked before the one retry."""
    assert retry_state.outcome is not None
    error = retry_state.outcome.exception()
    back_off_s = getattr(error, "back_off_s", None)
    return float(back_off_s) if back_off_s is not None else 0.0


def _disconnected(answer: _Answer) -> Disconnected:
    return Disconnected(ews_code=answer.code, warning=answer.warning)


def _placed_call(answer: _Answer) -> PlacedCall:
    phone_call_id = answer.body["PhoneCallId"]
    if phone_call_id is None or not phone_call_id["Id"]:
        raise UpstreamBadResponse(
            "Exchange accepted PlayOnPhone but returned no PhoneCallId", outcome="invalid_response"
        )
    return PlacedCall(call_id=phone_call_id["Id"], ews_code=answer.code, warning=answer.warning)


def _call_information(answer: _Answer) -> CallInformation:
    info = answer.body["PhoneCallInformation"]
    if info is None:
        raise UpstreamBadResponse(
            "Exchange answered without PhoneCallInformation", outcome="invalid_response"
        )
    return CallInformation(
        state=info["PhoneCallState"],
        connection_failure_cause=info["ConnectionFailureCause"],
        sip_response_code=info["SIPResponseCode"],
        sip_response_text=info["SIPResponseText"],
        ews_code=answer.code,
        warning=answer.warning,
    )


def _raise_for_http_status(reply: UpstreamReply) -> None:
    """Map the HTTP statuses that carry no SOAP answer at all."""
    status = reply.status
    if 300 <= status < 400:
        raise UpstreamBadResponse(
            f"Exchange redirected the request (HTTP {status}), usually to its error page",
            outcome="http_error",
        )
    if status in (401, 403):
        raise UpstreamAuthFailed(
            "Upstream authentication failed: Exchange refused the gateway's credentials "
            f"(HTTP {status})",
            outcome="http_error",
        )
    if status == 503:
        retry_after_s = _retry_after_seconds(reply.retry_after)
        raise EwsUnavailable(
            "Exchange answered HTTP 503 Service Unavailable",
            retry_after_s=retry_after_s,
            back_off_s=retry_after_s,
            outcome="http_error",
        )
    if status not in (200, 500):
        raise UpstreamBadResponse(f"Exchange answered HTTP {status}", outcome="http_error")


def _retry_after_seconds(header: str | None) -> int | None:
    if header is not None and header.strip().isdigit():
        return int(header.strip())
    return None


def _parse_envelope(reply: UpstreamReply) -> etree._Element:
    """Parse a SOAP envelope without resolving DTDs, entities or anything remote."""
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )
    try:
        root = etree.fromstring(reply.body, parser=parser)
    except etree.XMLSyntaxError:
        root = None
    if root is None or _has_doctype(root) or root.tag != _ENVELOPE:
        if reply.status == 500:
            raise EwsUnavailable(
                "Exchange answered HTTP 500 with an error page", outcome="http_error"
            )
        raise UpstreamBadResponse(
            "Exchange's answer is not a well-formed SOAP envelope", outcome="invalid_response"
        )
    return root


_ENVELOPE = f"{{{wire.SOAP_ENV_NS}}}Envelope"


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
    return error_for_response_code(code, message, outcome="soap_fault", back_off_ms=back_off)


def _answer_from_body(body: Any, envelope: etree._Element) -> _Answer:
    if body is None or body["ResponseClass"] is None:
        raise UpstreamBadResponse(
            "Exchange answered without a response message", outcome="invalid_response"
        )
    response_class = body["ResponseClass"]
    code = body["ResponseCode"] or wire.NO_ERROR
    message = (body["MessageText"] or "").strip()
    if response_class == "Error":
        raise error_for_response_code(
            code, message, outcome="ews_error", back_off_ms=_back_off_ms(envelope)
        )
    if response_class not in ("Success", "Warning"):
        raise UpstreamBadResponse(
            f"Exchange answered an unknown ResponseClass {response_class!r}",
            outcome="invalid_response",
        )
    warning = (message or code) if response_class == "Warning" else None
    return _Answer(body=body, code=code, warning=warning)
