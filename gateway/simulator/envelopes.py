"""Well-formed EWS answers, shaped like those of Exchange 2016: responses and SOAP faults."""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from gateway import wire
from gateway.simulator.calls import Phase

SUCCESS, WARNING, ERROR = "Success", "Warning", "Error"
XML_DECLARATION = b'<?xml version="1.0" encoding="utf-8"?>'
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
SERVER_VERSION_INFO = {
    "MajorVersion": "15",
    "MinorVersion": "1",
    "MajorBuildNumber": "2507",
    "MinorBuildNumber": "6",
    "Version": "V2017_07_11",
}
_M, _T, _S, _E = wire.MESSAGES_NS, wire.TYPES_NS, wire.SOAP_ENV_NS, wire.ERRORS_NS


@dataclass(frozen=True)
class SipResponse:
    """The SIP status a GetPhoneCallInformation answer carries, when one is asked for."""

    code: int | None
    text: str | None = None


@dataclass(frozen=True)
class OperationResult:
    """What an operation answers in-band; `phase` (and `sip`) for GetPhoneCallInformation."""

    response_class: str = SUCCESS
    code: str = wire.NO_ERROR
    message_text: str | None = None
    back_off_ms: int | None = None
    phone_call_id: str | None = None
    phase: Phase | None = None
    sip: SipResponse | None = None


def operation_response(operation: str, result: OperationResult) -> bytes:
    """Render `<m:{operation}Response>` in an envelope with ServerVersionInfo."""
    envelope = etree.Element(f"{{{_S}}}Envelope", nsmap={"s": _S})
    header = etree.SubElement(envelope, f"{{{_S}}}Header")
    etree.SubElement(header, f"{{{_T}}}ServerVersionInfo", SERVER_VERSION_INFO, nsmap={"h": _T})
    body = etree.SubElement(envelope, f"{{{_S}}}Body")
    response = etree.SubElement(
        body,
        f"{{{_M}}}{operation}Response",
        ResponseClass=result.response_class,
        nsmap={"m": _M, "t": _T},
    )
    _add_response_message(response, result)
    if result.phone_call_id is not None:
        etree.SubElement(response, f"{{{_M}}}PhoneCallId", Id=result.phone_call_id)
    if result.phase is not None:
        _add_phone_call_information(response, result.phase, result.sip)
    return _serialize(envelope)


def _add_response_message(response: etree._Element, result: OperationResult) -> None:
    if result.message_text is not None:
        _text_child(response, f"{{{_M}}}MessageText", result.message_text)
    _text_child(response, f"{{{_M}}}ResponseCode", result.code)
    if result.response_class != SUCCESS:
        _text_child(response, f"{{{_M}}}DescriptiveLinkKey", "0")
    if result.back_off_ms is not None:
        message_xml = etree.SubElement(response, f"{{{_M}}}MessageXml")
        _add_back_off(message_xml, result.back_off_ms)


def _add_phone_call_information(
    response: etree._Element, phase: Phase, sip: SipResponse | None
) -> None:
    information = etree.SubElement(response, f"{{{_M}}}PhoneCallInformation")
    _text_child(information, f"{{{_T}}}PhoneCallState", phase.state)
    _text_child(information, f"{{{_T}}}ConnectionFailureCause", phase.failure_cause)
    if sip is not None and sip.text is not None:
        _text_child(information, f"{{{_T}}}SIPResponseText", sip.text)
    if sip is not None and sip.code is not None:
        _text_child(information, f"{{{_T}}}SIPResponseCode", str(sip.code))


def soap_fault(code: str, message: str, back_off_ms: int | None = None) -> bytes:
    """Render a SOAP 1.1 fault as Exchange does: `a:{code}` with an errors-namespace detail."""
    envelope = etree.Element(f"{{{_S}}}Envelope", nsmap={"s": _S})
    body = etree.SubElement(envelope, f"{{{_S}}}Body")
    fault = etree.SubElement(body, f"{{{_S}}}Fault")
    # Exchange binds the faultcode prefix `a` to the types namespace on the element itself.
    _text_child(fault, "faultcode", f"a:{code}", nsmap={"a": _T})
    _text_child(fault, "faultstring", message).set(XML_LANG, "en-US")
    detail = etree.SubElement(fault, "detail")
    _text_child(detail, f"{{{_E}}}ResponseCode", code, nsmap={"e": _E})
    _text_child(detail, f"{{{_E}}}Message", message, nsmap={"e": _E})
    if back_off_ms is not None:
        message_xml = etree.SubElement(detail, f"{{{_T}}}MessageXml", nsmap={"t": _T})
        _add_back_off(message_xml, back_off_ms)
    return _serialize(envelope)


def _add_back_off(message_xml: etree._Element, back_off_ms: int) -> None:
    value = _text_child(message_xml, f"{{{_T}}}Value", str(back_off_ms))
    value.set("Name", wire.BACK_OFF_MILLISECONDS)


def _text_child(
    parent: etree._Element, tag: str, text: str, nsmap: dict[str, str] | None = None
) -> etree._Element:
    child = etree.SubElement(parent, tag, nsmap=nsmap)
    child.text = text
    return child


def _serialize(envelope: etree._Element) -> bytes:
    # Exchange writes the declaration with double quotes and no line break after it.
    return XML_DECLARATION + etree.tostring(envelope, encoding="utf-8", xml_declaration=False)
