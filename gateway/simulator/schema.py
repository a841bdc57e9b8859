"""The real EWS schema, loaded from a folder, to validate what clients send."""

from __future__ import annotations

import threading
from pathlib import Path

from lxml import etree

from gateway import wire

XML_NS = "http://www.w3.org/XML/1998/namespace"
_XS_NS = "http://www.w3.org/2001/XMLSchema"
SCHEMA_FILES = ("messages.xsd", "types.xsd", "xml.xsd")


class EwsSchema:
    """Validate header and body elements against messages.xsd and types.xsd."""

    def __init__(self, schema: etree.XMLSchema) -> None:
        self._schema = schema
        # An XMLSchema keeps its error log on itself, so one validation at a time.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, schema_dir: str | Path) -> EwsSchema:
        """Load the schema files from `schema_dir` (about 0.2 s, so once at start)."""
        folder = Path(schema_dir).resolve()
        missing = [name for name in SCHEMA_FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"schema folder {folder} lacks {', '.join(missing)}")
        parser = etree.XMLParser(no_network=True, resolve_entities=False)
        wrapper = etree.fromstring(_wrapper_xsd(folder), parser)
        return cls(etree.XMLSchema(wrapper))

    def first_error(self, element: etree._Element) -> str | None:
        """Return the validator's first complaint about the element, or None if it is valid."""
        with self._lock:
            try:
                self._schema.assertValid(element)
            except etree.DocumentInvalid as invalid:
                return str(invalid)
            return None


def _wrapper_xsd(folder: Path) -> bytes:
    """Build an XSD that imports both EWS namespaces from the folder.

    types.xsd imports the XML namespace without a schemaLocation, which libxml2
    cannot resolve; importing it here first, from xml.xsd, satisfies that import.
    """
    imports = (
        (XML_NS, "xml.xsd"),
        (wire.TYPES_NS, "types.xsd"),
        (wire.MESSAGES_NS, "messages.xsd"),
    )
    schema = etree.Element("{http://www.w3.org/2001/XMLSchema}schema", nsmap={"xs": _XS_NS})
    for namespace, file_name in imports:
        etree.SubElement(
            schema,
            f"{{{_XS_NS}}}import",
            namespace=namespace,
            schemaLocation=(folder / file_name).as_uri(),
        )
    return etree.tostring(schema)
