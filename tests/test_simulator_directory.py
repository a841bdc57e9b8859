"""The simulator's /EWS/ virtual directory answers as IIS does in front of Exchange.

Authentication comes first, whatever the method or path; then Exchange.asmx
takes POST only, and Services.wsdl, messages.xsd and types.xsd are static files.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import spnego
from lxml import etree

from gateway.simulator import SimulatorServer
from gateway.simulator.acceptor import BasicAcceptor, NtlmAcceptor
from tests.ews_schema import SCHEMA_DIR, SKIP_REASON, requires_schema, schema_available

pytestmark = pytest.mark.network

WSDL = "http://schemas.xmlsoap.org/wsdl/"
M = "http://schemas.microsoft.com/exchange/services/2006/messages"
UM_OPERATIONS = ["PlayOnPhone", "GetPhoneCallInformation", "DisconnectPhoneCall"]
USER, PASSWORD = "svc-um", "Um-Password-1"
BASIC = (USER, PASSWORD)
PLAY_ON_PHONE = (
    '<?xml version="1.0" encoding="utf-8"?>'
    '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"'
    f' xmlns:m="{M}" xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">'
    '<s:Header><t:RequestServerVersion Version="Exchange2010"/></s:Header>'
    '<s:Body><m:PlayOnPhone><m:ItemId Id="AAMkADk="/><m:DialString>+4930123456</m:DialString>'
    "</m:PlayOnPhone></s:Body></s:Envelope>"
).encode()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture
def open_simulator() -> Iterator[SimulatorServer]:
    """No authentication and no schema folder."""
    with SimulatorServer().start() as server:
        yield server


@pytest.fixture
def basic_simulator() -> Iterator[SimulatorServer]:
    with SimulatorServer(acceptor=BasicAcceptor({USER: PASSWORD})).start() as server:
        yield server


@pytest.fixture
def schema_simulator() -> Iterator[SimulatorServer]:
    """Basic authentication, with the real schema folder."""
    if not schema_available():
        pytest.skip(SKIP_REASON)
    acceptor = BasicAcceptor({USER: PASSWORD})
    with SimulatorServer(acceptor=acceptor, schema_dir=SCHEMA_DIR).start() as server:
        yield server


# Authentication before everything else --------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/EWS/Exchange.asmx"),
        ("PUT", "/EWS/Exchange.asmx"),
        ("HEAD", "/ews/exchange.asmx"),
        ("POST", "/EWS/Exchange.asmx"),
        ("GET", "/EWS/Services.wsdl"),
        ("POST", "/EWS/Services.wsdl"),
        ("GET", "/EWS/messages.xsd"),
        ("GET", "/EWS/no-such-file"),
    ],
)
def test_without_credentials_every_ews_request_is_challenged_first(
    basic_simulator: SimulatorServer, http: requests.Session, method: str, path: str
) -> None:
    response = http.request(method, basic_simulator.url + path)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="mail.example.com"'
    assert "Allow" not in response.headers


def test_with_credentials_a_get_of_exchange_asmx_is_405_allowing_post(
    basic_simulator: SimulatorServer, http: requests.Session
) -> None:
    response = http.get(basic_simulator.ews_url, auth=BASIC)

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.headers["Content-Type"].startswith("text/html")


def test_with_credentials_a_missing_file_is_iis_s_404(
    basic_simulator: SimulatorServer, http: requests.Session
) -> None:
    response = http.get(basic_simulator.url + "/EWS/no-such-file", auth=BASIC)

    assert response.status_code == 404
    assert "404 - File or directory not found." in response.text


def test_the_control_api_needs_no_credentials(
    basic_simulator: SimulatorServer, http: requests.Session
) -> None:
    assert http.get(basic_simulator.url + "/simulator/health").status_code == 200


def test_ntlm_begun_on_a_get_authenticates_the_connection_for_the_post(
    http: requests.Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As @ewsjs/xhr does: NTLM's negotiate message on a GET, its authenticate on the POST."""
    users = tmp_path / "ntlm-users"
    users.write_text(f"CONTOSO:{USER}:{PASSWORD}\n", encoding="utf-8")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))
    acceptor = NtlmAcceptor()
    client = spnego.client(f"CONTOSO\\{USER}", PASSWORD, protocol="ntlm")
    with SimulatorServer(acceptor=acceptor).start() as server:
        negotiate = base64.b64encode(client.step() or b"").decode()
        challenged = http.get(server.ews_url, headers={"Authorization": f"NTLM {negotiate}"})
        assert challenged.status_code == 401
        scheme, _, challenge = challenged.headers["WWW-Authenticate"].partition(" ")
        assert scheme == "NTLM"

        authenticate = base64.b64encode(client.step(base64.b64decode(challenge)) or b"")
        answered = http.post(
            server.ews_url,
            data=PLAY_ON_PHONE,
            headers={"Authorization": f"NTLM {authenticate.decode()}", "Content-Type": "text/xml"},
        )

    assert answered.status_code == 200, answered.text
    assert b"NoError" in answered.content
    assert acceptor.users == [f"CONTOSO\\{USER}"]


# Services.wsdl and the schema files ----------------------------------------------------------


def test_services_wsdl_is_the_projects_wsdl_without_a_service_element(
    open_simulator: SimulatorServer, http: requests.Session
) -> None:
    """Exchange's Services.wsdl names no address: each client adds the URL it was given."""
    response = http.get(open_simulator.url + "/EWS/Services.wsdl")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/xml"
    wsdl = etree.fromstring(response.content)
    assert wsdl.find(f"{{{WSDL}}}service") is None
    binding = wsdl.find(f"{{{WSDL}}}binding")
    assert binding is not None
    assert binding.get("name") == "ExchangeServiceBinding"
    operations = [op.get("name") for op in binding.iterfind(f"{{{WSDL}}}operation")]
    assert operations == UM_OPERATIONS


@pytest.mark.parametrize("path", ["/ews/services.wsdl", "/EWS/SERVICES.WSDL"])
def test_paths_in_the_ews_directory_ignore_case_as_on_iis(
    open_simulator: SimulatorServer, http: requests.Session, path: str
) -> None:
    assert http.get(open_simulator.url + path).status_code == 200


def test_a_head_of_services_wsdl_has_the_length_and_no_body(
    open_simulator: SimulatorServer, http: requests.Session
) -> None:
    whole = http.get(open_simulator.url + "/EWS/Services.wsdl")

    head = http.head(open_simulator.url + "/EWS/Services.wsdl")

    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["Content-Length"] == whole.headers["Content-Length"]
    # The connection is still in step: another request on it is answered.
    assert http.get(open_simulator.url + "/EWS/Services.wsdl").content == whole.content


def test_the_files_take_only_get_and_head(
    open_simulator: SimulatorServer, http: requests.Session
) -> None:
    response = http.post(open_simulator.url + "/EWS/Services.wsdl", data=b"x")

    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("name", ["messages.xsd", "types.xsd"])
def test_without_a_schema_folder_the_schema_files_are_404(
    open_simulator: SimulatorServer, http: requests.Session, name: str
) -> None:
    assert http.get(f"{open_simulator.url}/EWS/{name}").status_code == 404


@requires_schema
@pytest.mark.parametrize("name", ["messages.xsd", "types.xsd"])
def test_the_schema_files_are_served_from_the_schema_folder_behind_authentication(
    schema_simulator: SimulatorServer, http: requests.Session, name: str
) -> None:
    url = f"{schema_simulator.url}/EWS/{name}"

    assert http.get(url).status_code == 401
    response = http.get(url, auth=BASIC)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/xml"
    assert response.content == (SCHEMA_DIR / name).read_bytes()


@requires_schema
@pytest.mark.parametrize("name", ["xml.xsd", "README.md"])
def test_only_the_files_exchange_serves_come_from_the_schema_folder(
    schema_simulator: SimulatorServer, http: requests.Session, name: str
) -> None:
    assert http.get(f"{schema_simulator.url}/EWS/{name}", auth=BASIC).status_code == 404
