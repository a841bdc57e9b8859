"""The files Exchange's EWS virtual directory serves beside Exchange.asmx.

Exchange serves /EWS/Services.wsdl, /EWS/messages.xsd and /EWS/types.xsd as
static files behind the same authentication as Exchange.asmx; WSDL-driven
clients (node-ews, svcutil) fetch them before their first call. The simulator
serves the project's own WSDL as Services.wsdl, without its wsdl:service
element: Exchange's Services.wsdl has none, because EWS has no address fixed in
advance, and clients add one naming the URL they were given. messages.xsd and
types.xsd come from the schema folder given at start; without one they are
404, as a missing file is on IIS. IIS matches paths without regard to case.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from lxml import etree

from gateway import wire
from gateway.simulator.outcomes import HTML_CONTENT_TYPE, Reply

EWS_DIRECTORY = "/EWS/"
SERVICES_WSDL_PATH = EWS_DIRECTORY + "Services.wsdl"
SCHEMA_DOCUMENTS = ("messages.xsd", "types.xsd")
# IIS's MIME map for .wsdl and .xsd; its static file handler adds no charset.
STATIC_CONTENT_TYPE = "text/xml"
STATIC_METHODS = ("GET", "HEAD")
_WSDL_SERVICE = "{http://schemas.xmlsoap.org/wsdl/}service"

NOT_FOUND_PAGE = b"""<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN">
<html><head><title>404 - File or directory not found.</title></head>
<body><div id="content"><h2>404 - File or directory not found.</h2>
<h3>The resource you are looking for might have been removed, had its name changed,
or is temporarily unavailable.</h3></div></body></html>
"""
METHOD_NOT_ALLOWED_PAGE = b"""<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN">
<html><head><title>405 - HTTP verb used to access this page is not allowed.</title></head>
<body><div id="content"><h2>405 - HTTP verb used to access this page is not allowed.</h2>
<h3>The page you are looking for cannot be displayed because an invalid method
(HTTP verb) was used to attempt access.</h3></div></body></html>
"""


def in_ews_directory(path: str) -> bool:
    """Tell whether a request path lies in the EWS virtual directory, which IIS guards."""
    return path.casefold().startswith(EWS_DIRECTORY.casefold())


def file_not_found() -> Reply:
    """IIS's answer for a file the virtual directory does not hold."""
    return Reply(404, NOT_FOUND_PAGE, HTML_CONTENT_TYPE)


def verb_not_allowed(allowed: tuple[str, ...]) -> Reply:
    """IIS's answer for a method the path's handler does not take."""
    return Reply(405, METHOD_NOT_ALLOWED_PAGE, HTML_CONTENT_TYPE, (("Allow", ", ".join(allowed)),))


def services_wsdl() -> bytes:
    """Return the project's WSDL as Exchange serves Services.wsdl: with no wsdl:service."""
    source = resources.files("gateway").joinpath(wire.WSDL_RESOURCE).read_bytes()
    root = etree.fromstring(source, etree.XMLParser(resolve_entities=False, no_network=True))
    for service in root.findall(_WSDL_SERVICE):
        root.remove(service)
    return bytes(etree.tostring(root, xml_declaration=True, encoding="utf-8"))


class EwsDocuments:
    """Answer GET and HEAD for the virtual directory's static files."""

    def __init__(self, documents: Mapping[str, bytes]) -> None:
        self._documents = {path.casefold(): body for path, body in documents.items()}

    @classmethod
    def load(cls, schema_dir: str | Path | None = None) -> EwsDocuments:
        """Read Services.wsdl, and the schema files when `schema_dir` names their folder."""
        documents = {SERVICES_WSDL_PATH: services_wsdl()}
        if schema_dir is not None:
            for name in SCHEMA_DOCUMENTS:
                documents[EWS_DIRECTORY + name] = (Path(schema_dir) / name).read_bytes()
        return cls(documents)

    def answer(self, method: str, path: str) -> Reply:
        """Serve the file at `path`, or IIS's 404 or 405."""
        body = self._documents.get(path.casefold())
        if body is None:
            return file_not_found()
        if method not in STATIC_METHODS:
            return verb_not_allowed(STATIC_METHODS)
        return Reply(200, body, STATIC_CONTENT_TYPE)
