"""SOAP envelopes for the phone-call operations: the only module that knows zeep.

zeep builds every envelope from the project's WSDL. Serializing with zeep on
each request costs more than the rest of the gateway's own work, so each
envelope shape (operation, fields present, impersonated or not) is serialized
by zeep once, with a marker in place of every value, and later envelopes of
that shape are zeep's bytes with the escaped values in the markers' places.
The result is byte for byte what zeep writes (the tests hold it to that).
Values zeep's serializer would rewrite rather than copy (anything outside
printable ASCII) are serialized by zeep itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import zeep
from lxml import etree

from gateway import wire

# A field's place in the request body, e.g. ("ItemId", "ChangeKey").
FieldPath = tuple[str, ...]
# What makes two envelopes differ only in their values.
Shape = tuple[str, tuple[FieldPath, ...], bool]

# ConnectingSIDType's choice (types.xsd) for each EWS_IMPERSONATION_ID. Not PrimarySmtpAddress:
# Exchange accepts only the primary address there, SmtpAddress any of the mailbox's addresses.
CONNECTING_SID = {"smtp": "SmtpAddress", "upn": "PrincipalName", "sid": "SID"}

_MARKER = "ewsgatewayslot{}end"
_MARKER_SPLIT = re.compile(rb"ewsgatewayslot(\d+)end")


class EnvelopeBuilder:
    """Build the SOAP envelope of an operation, headers included."""

    def __init__(self, server_version: str, impersonation_id: str = "smtp") -> None:
        if impersonation_id not in CONNECTING_SID:
            raise ValueError(f"no such impersonation id type: {impersonation_id!r}")
        wsdl = resources.files("gateway").joinpath(wire.WSDL_RESOURCE)
        with resources.as_file(wsdl) as wsdl_path:
            self._zeep = zeep.Client(str(wsdl_path), settings=zeep.Settings(forbid_dtd=True))
        self._zeep.set_ns_prefix("m", wire.MESSAGES_NS)
        self._zeep.set_ns_prefix("t", wire.TYPES_NS)
        self._server_version = server_version
        self._connecting_sid = CONNECTING_SID[impersonation_id]
        self._templates: dict[Shape, _Template] = {}

    def build(self, operation: str, body: Mapping[str, Any], mailbox: str | None = None) -> bytes:
        """Return the envelope's bytes, from the shape's template when the values allow."""
        fields = _fields(body)
        values = [value for _, value in fields]
        if mailbox is not None:
            values.append(mailbox)
        if not all(_copied_verbatim(value) for value in values):
            return self.serialize(operation, body, mailbox)
        shape: Shape = (operation, tuple(path for path, _ in fields), mailbox is not None)
        template = self._templates.get(shape)
        if template is None:
            template = self._templates[shape] = self._compile(shape)
        return template.fill(values)

    def serialize(
        self, operation: str, body: Mapping[str, Any], mailbox: str | None = None
    ) -> bytes:
        """Return the envelope as zeep serializes it, without templates."""
        headers: dict[str, Any] = {"RequestVersion": {"Version": self._server_version}}
        if mailbox is not None:
            headers["Impersonation"] = {"ConnectingSID": {self._connecting_sid: mailbox}}
        envelope = self._zeep.create_message(
            self._zeep.service, operation, **body, _soapheaders=headers
        )
        return bytes(etree.tostring(envelope, xml_declaration=True, encoding="utf-8"))

    def _compile(self, shape: Shape) -> _Template:
        operation, paths, impersonated = shape
        body = _nest([(path, _MARKER.format(index)) for index, path in enumerate(paths)])
        mailbox = _MARKER.format(len(paths)) if impersonated else None
        return _Template.parse(self.serialize(operation, body, mailbox), len(paths) + impersonated)


@dataclass(frozen=True)
class _Template:
    """An envelope cut at its values: literals[0] slot literals[1] slot ... literals[-1]."""

    literals: Sequence[bytes]
    # For each slot: which value goes there, and whether it sits in an attribute.
    slots: Sequence[tuple[int, bool]]

    @classmethod
    def parse(cls, envelope: bytes, value_count: int) -> _Template:
        pieces = _MARKER_SPLIT.split(envelope)
        literals, indexes = pieces[0::2], [int(index) for index in pieces[1::2]]
        if sorted(indexes) != list(range(value_count)):
            raise RuntimeError("zeep did not write every value exactly once")
        slots = []
        for index, before in zip(indexes, literals, strict=False):
            if not before.endswith((b'="', b">")):
                raise RuntimeError("zeep wrote a value outside an attribute or element text")
            slots.append((index, before.endswith(b'="')))
        return cls(literals=literals, slots=slots)

    def fill(self, values: Sequence[str]) -> bytes:
        parts = [self.literals[0]]
        for (index, in_attribute), literal in zip(self.slots, self.literals[1:], strict=True):
            parts.append(_escape(values[index], in_attribute))
            parts.append(literal)
        return b"".join(parts)


def _fields(body: Mapping[str, Any], prefix: FieldPath = ()) -> list[tuple[FieldPath, Any]]:
    """Flatten a request body to (path, value) pairs; absent optional fields (None) are left out."""
    fields: list[tuple[FieldPath, Any]] = []
    for key, value in body.items():
        if isinstance(value, Mapping):
            fields.extend(_fields(value, (*prefix, key)))
        elif value is not None:
            fields.append(((*prefix, key), value))
    return fields


def _nest(fields: list[tuple[FieldPath, str]]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for path, value in fields:
        node = body
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return body


def _copied_verbatim(value: object) -> bool:
    # zeep copies printable ASCII as is, apart from the XML escapes below.
    return isinstance(value, str) and value.isascii() and value.isprintable()


def _escape(value: str, in_attribute: bool) -> bytes:
    """Escape printable ASCII exactly as lxml does in element text or a double-quoted attribute."""
    escaped = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if in_attribute:
        escaped = escaped.replace('"', "&quot;")
    return escaped.encode("ascii")
