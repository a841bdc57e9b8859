"""The real EWS schema (EWS_SCHEMA_DIR, else ../shared/ews-schema), to check what the SOAP
layer sends.

Not a test module: test modules import `assert_envelope_valid` and
`requires_schema` from here. The schema loads lazily, once per process.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway import wire

SCHEMA_DIR = Path(
    os.environ.get("EWS_SCHEMA_DIR")
    or Path(__file__).resolve().parents[2] / "shared" / "ews-schema"
)
SCHEMA_FILES = ("messages.xsd", "types.xsd", "xml.xsd")
# Where to get them: the Makefile's `make test` says the same.
SKIP_REASON = (
    f"EWS schema not found in {SCHEMA_DIR}: set EWS_SCHEMA_DIR to a folder holding "
    "messages.xsd and types.xsd (any Exchange serves them at /EWS/messages.xsd and "
    "/EWS/types.xsd) and xml.xsd (https://www.w3.org/2001/xml.xsd)"
)

_XS_NS = "http://www.w3.org/2001/XMLSchema"
_XML_NS = "http://www.w3.org/XML/1998/namespace"
# Where the XML namespace schema officially lives; types.xsd imports the
# namespace without saying, so the wrapper names this URL and the resolver
# answers it from the local stub instead of the network.
_XML_XSD_URL = "http://www.w3.org/2001/xml.xsd"

_schema: etree.XMLSchema | None = None


class _LocalXmlSchemaResolver(etree.Resolver):
    """Serve every request for the XML namespace schema from the folder's xml.xsd."""

    def resolve(self, system_url: str | None, public_id: str | None, context: Any) -> Any:
        if system_url and system_url.rsplit("/", 1)[-1] == "xml.xsd":
            return self.resolve_filename(str(SCHEMA_DIR / "xml.xsd"), context)
        return None


def schema_available() -> bool:
    """Tell whether the schema folder holds the files the conformance tests need."""
    return all((SCHEMA_DIR / name).is_file() for name in SCHEMA_FILES)


requires_schema = pytest.mark.skipif(not schema_available(), reason=SKIP_REASON)


def _wrapper_xsd() -> bytes:
    imports = (
        (_XML_NS, _XML_XSD_URL),
        (wire.TYPES_NS, (SCHEMA_DIR / "types.xsd").as_uri()),
        (wire.MESSAGES_NS, (SCHEMA_DIR / "messages.xsd").as_uri()),
    )
    schema = etree.Element(f"{{{_XS_NS}}}schema", nsmap={"xs": _XS_NS})
    for namespace, location in imports:
        etree.SubElement(
            schema, f"{{{_XS_NS}}}import", namespace=namespace, schemaLocation=location
        )
    return etree.tostring(schema)


def _load_schema() -> etree.XMLSchema:
    global _schema  # noqa: PLW0603 - a per-process cache: loading takes ~0.2 s
    if _schema is None:
        parser = etree.XMLParser(no_network=True, resolve_entities=False)
        parser.resolvers.add(_LocalXmlSchemaResolver())
        _schema = etree.XMLSchema(etree.fromstring(_wrapper_xsd(), parser))
    return _schema


def _soap(local_name: str) -> str:
    return f"{{{wire.SOAP_ENV_NS}}}{local_name}"


def assert_envelope_valid(envelope: bytes) -> None:
    """Fail unless the SOAP 1.1 envelope's header blocks and body element match the EWS schema."""
    root = etree.fromstring(envelope, etree.XMLParser(resolve_entities=False, no_network=True))
    assert root.tag == _soap("Envelope"), f"not a SOAP 1.1 envelope: {root.tag}"
    header = root.find(_soap("Header"))
    body = root.find(_soap("Body"))
    assert body is not None, "the envelope has no Body"
    body_elements = [child for child in body if isinstance(child.tag, str)]
    assert len(body_elements) == 1, f"Body must hold one element, holds {len(body_elements)}"
    header_elements = [] if header is None else [c for c in header if isinstance(c.tag, str)]
    schema = _load_schema()
    for element in [*header_elements, *body_elements]:
        document = etree.ElementTree(copy.deepcopy(element))
        if not schema.validate(document):
            log = "\n".join(str(error) for error in schema.error_log)
            raise AssertionError(f"{etree.QName(element).localname} is not schema-valid:\n{log}")
