"""Read an incoming SOAP request the way Exchange would, rejecting what Exchange rejects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from lxml import etree

from gateway import wire
from gateway.simulator.schema import EwsSchema

SOAP12_ENV_NS = "http://www.w3.org/2003/05/soap-envelope"
_ENVELOPE = f"{{{wire.SOAP_ENV_NS}}}Envelope"
_HEADER = f"{{{wire.SOAP_ENV_NS}}}Header"
_BODY = f"{{{wire.SOAP_ENV_NS}}}Body"
_REQUEST_SERVER_VERSION = f"{{{wire.TYPES_NS}}}RequestServerVersion"
_EXCHANGE_IMPERSONATION = f"{{{wire.TYPES_NS}}}ExchangeImpersonation"
_CONNECTING_SID = f"{{{wire.TYPES_NS}}}ConnectingSID"
# ConnectingSIDType's choice in types.xsd.
_MAILBOX_IDENTIFIERS = frozenset(
    f"{{{wire.TYPES_NS}}}{name}"
    for name in ("PrimarySmtpAddress", "SmtpAddress", "PrincipalName", "SID")
)
_OPERATION_CHILDREN = {
    wire.PLAY_ON_PHONE: ("ItemId", "DialString"),
    wire.GET_PHONE_CALL_INFORMATION: ("PhoneCallId",),
    wire.DISCONNECT_PHONE_CALL: ("PhoneCallId",),
}


class RequestRejected(Exception):
    """Raised for a request Exchange would answer with an ErrorSchemaValidation fault."""

    def __init__(self, message: str, operation: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.operation = operation


class ConnectingSid(NamedTuple):
    """How ExchangeImpersonation names the mailbox: the ConnectingSID child and its text."""

    kind: str  # PrimarySmtpAddress, SmtpAddress, PrincipalName or SID
    value: str


@dataclass(frozen=True)
class EwsRequest:
    """What the simulator needs from one accepted request; `impersonated` is None when the
    request runs as the authenticated account itself."""

    operation: str
    impersonated: ConnectingSid | None
    phone_call_id: str | None = None
    item_id: str | None = None
    dial_string: str | None = None


def read_request(body: bytes, soap_action: str | None, schema: EwsSchema | None) -> EwsRequest:
    """Parse and check one request body; raise RequestRejected for anything Exchange refuses."""
    envelope = _parse_xml(body)
    headers, operation_element = _split_envelope(envelope)
    operation = _operation_name(operation_element)
    try:
        if schema is not None:
            _validate_against_schema(schema, [*headers, operation_element])
        _check_soap_action(soap_action, operation)
        impersonated = _read_headers(headers)
        return _read_operation(operation_element, operation, impersonated)
    except RequestRejected as rejected:
        raise RequestRejected(rejected.message, operation) from None


def _parse_xml(body: bytes) -> etree._Element:
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False
    )
    try:
        root = etree.fromstring(body, parser)
    except etree.XMLSyntaxError as error:
        raise RequestRejected(f"The request is not well-formed XML: {error}") from None
    if root.getroottree().docinfo.internalDTD is not None:
        raise RequestRejected("The request has a DOCTYPE; DTDs are not allowed in EWS requests.")
    return root


def _split_envelope(envelope: etree._Element) -> tuple[list[etree._Element], etree._Element]:
    if envelope.tag != _ENVELOPE:
        if etree.QName(envelope).namespace == SOAP12_ENV_NS:
            raise RequestRejected("SOAP 1.2 envelopes are not accepted; send a SOAP 1.1 envelope.")
        raise RequestRejected(
            f"The request is not a SOAP 1.1 envelope: the root is {envelope.tag}."
        )
    parts = _element_children(envelope)
    tags = [part.tag for part in parts]
    if tags not in ([_BODY], [_HEADER, _BODY]):
        raise RequestRejected("A SOAP envelope holds an optional Header and then one Body.")
    body_children = _element_children(parts[-1])
    if len(body_children) != 1:
        raise RequestRejected("The SOAP Body must hold exactly one EWS operation element.")
    headers = _element_children(parts[0]) if len(parts) == 2 else []
    return headers, body_children[0]


def _operation_name(element: etree._Element) -> str:
    name = etree.QName(element)
    if name.namespace == wire.MESSAGES_NS.replace("http://", "https://", 1):
        raise RequestRejected(
            f"The namespace {name.namespace} is not the EWS messages namespace; "
            f"Exchange only accepts {wire.MESSAGES_NS}."
        )
    if name.namespace != wire.MESSAGES_NS:
        raise RequestRejected(f"The body element {element.tag} is not in {wire.MESSAGES_NS}.")
    if name.localname not in wire.OPERATIONS:
        raise RequestRejected(
            f"The operation {name.localname} is not one the simulator knows: "
            f"{', '.join(wire.OPERATIONS)}."
        )
    return name.localname


def _validate_against_schema(schema: EwsSchema, elements: list[etree._Element]) -> None:
    for element in elements:
        error = schema.first_error(element)
        if error is not None:
            raise RequestRejected(f"The request failed schema validation: {error}")


def _check_soap_action(soap_action: str | None, operation: str) -> None:
    if soap_action is None:
        return
    unquoted = soap_action.strip()
    if len(unquoted) >= 2 and unquoted[0] == unquoted[-1] == '"':
        unquoted = unquoted[1:-1]
    if unquoted != wire.soap_action(operation):
        raise RequestRejected(
            f"The SOAPAction header {soap_action!r} does not match the body operation "
            f"{operation}; expected {wire.soap_action(operation)!r}."
        )


def _read_headers(headers: list[etree._Element]) -> ConnectingSid | None:
    impersonated = None
    for header in headers:
        if header.tag == _REQUEST_SERVER_VERSION:
            _check_server_version(header.get("Version"))
        elif header.tag == _EXCHANGE_IMPERSONATION:
            impersonated = _connecting_sid(header)
    return impersonated


def _check_server_version(version: str | None) -> None:
    if version not in wire.EXCHANGE_VERSIONS:
        raise RequestRejected(
            f"RequestServerVersion Version={version!r} is not an ExchangeVersionType value; "
            f"use one of {', '.join(sorted(wire.EXCHANGE_VERSIONS))}."
        )


def _connecting_sid(impersonation: etree._Element) -> ConnectingSid:
    children = _element_children(impersonation)
    if [child.tag for child in children] != [_CONNECTING_SID]:
        raise RequestRejected("ExchangeImpersonation must hold exactly one t:ConnectingSID.")
    identifiers = _element_children(children[0])
    if len(identifiers) != 1 or identifiers[0].tag not in _MAILBOX_IDENTIFIERS:
        raise RequestRejected(
            "ConnectingSID must hold exactly one of t:PrimarySmtpAddress, t:SmtpAddress, "
            "t:PrincipalName or t:SID."
        )
    kind = etree.QName(identifiers[0]).localname
    value = (identifiers[0].text or "").strip()
    if not value:
        raise RequestRejected(f"ConnectingSID/{kind} is empty.")
    return ConnectingSid(kind, value)


def _read_operation(
    element: etree._Element, operation: str, impersonated: ConnectingSid | None
) -> EwsRequest:
    children = _expected_children(element, operation)
    if operation != wire.PLAY_ON_PHONE:
        return EwsRequest(
            operation, impersonated, phone_call_id=_required_id(children["PhoneCallId"])
        )
    return EwsRequest(
        operation,
        impersonated,
        item_id=_required_id(children["ItemId"]),
        dial_string=children["DialString"].text or "",
    )


def _expected_children(element: etree._Element, operation: str) -> dict[str, etree._Element]:
    """Check the operation's children are exactly the expected m: elements, in order."""
    expected = _OPERATION_CHILDREN[operation]
    children = _element_children(element)
    for index, local_name in enumerate(expected):
        wanted = f"{{{wire.MESSAGES_NS}}}{local_name}"
        if index >= len(children):
            raise RequestRejected(f"{operation} lacks the required element m:{local_name}.")
        if children[index].tag != wanted:
            raise RequestRejected(
                f"{operation}: the element {children[index].tag} is not expected here; "
                f"expected m:{local_name}, that is {wanted}."
            )
    if len(children) > len(expected):
        raise RequestRejected(
            f"{operation}: the element {children[len(expected)].tag} is not expected."
        )
    return dict(zip(expected, children, strict=True))


def _required_id(element: etree._Element) -> str:
    value = element.get("Id")
    if value is None:
        raise RequestRejected(
            f"m:{etree.QName(element).localname} lacks the required Id attribute."
        )
    return value


def _element_children(element: etree._Element) -> list[etree._Element]:
    # Comments and processing instructions are children too, but never meaningful here.
    return [child for child in element if isinstance(child.tag, str)]
