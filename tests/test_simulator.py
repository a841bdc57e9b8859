"""The EWS simulator behaves like Exchange's /EWS/Exchange.asmx for the phone-call operations.

Requests are hand-written envelopes with the namespaces spelled out, so a typo in
the shared wire constants would show up here instead of being mirrored.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from lxml import etree

from gateway.simulator import SimulatorServer, parse_bind, start_in_thread
from gateway.simulator.schema import EwsSchema

pytestmark = pytest.mark.network

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
M = "http://schemas.microsoft.com/exchange/services/2006/messages"
T = "http://schemas.microsoft.com/exchange/services/2006/types"
E = "http://schemas.microsoft.com/exchange/services/2006/errors"
NS = {"s": SOAP, "m": M, "t": T, "e": E}
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "shared" / "ews-schema"
needs_schema = pytest.mark.skipif(
    not SCHEMA_DIR.is_dir(), reason="../shared/ews-schema not found"
)
VERSION_HEADER = '<t:RequestServerVersion Version="Exchange2010"/>'
EXCHANGE_ID = re.compile(r"[A-Za-z0-9_-]{48}")


def envelope(body: str, header: str = VERSION_HEADER) -> str:
    """Wrap an operation element in a SOAP 1.1 envelope as a client would send it."""
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<soap:Envelope xmlns:soap="{SOAP}" xmlns:m="{M}" xmlns:t="{T}">'
        f"<soap:Header>{header}</soap:Header><soap:Body>{body}</soap:Body></soap:Envelope>"
    )


def play_on_phone(dial_string: str = "+4930123456", item_id: str = "AAMkADk=") -> str:
    return (
        f'<m:PlayOnPhone><m:ItemId Id="{item_id}" ChangeKey="CQAAAA=="/>'
        f"<m:DialString>{dial_string}</m:DialString></m:PlayOnPhone>"
    )


def get_information(call_id: str) -> str:
    return f'<m:GetPhoneCallInformation><m:PhoneCallId Id="{call_id}"/></m:GetPhoneCallInformation>'


def disconnect(call_id: str) -> str:
    return f'<m:DisconnectPhoneCall><m:PhoneCallId Id="{call_id}"/></m:DisconnectPhoneCall>'


def impersonating(mailbox: str, child: str = "PrimarySmtpAddress") -> str:
    return (
        f"{VERSION_HEADER}<t:ExchangeImpersonation><t:ConnectingSID>"
        f"<t:{child}>{mailbox}</t:{child}></t:ConnectingSID></t:ExchangeImpersonation>"
    )


def parse(response: requests.Response) -> etree._Element:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    return etree.fromstring(response.content, parser)


def answer_of(response: requests.Response) -> etree._Element:
    """Return the element inside s:Body of a SOAP answer."""
    element = parse(response).find("s:Body/*", NS)
    assert element is not None, response.text
    return element


def response_code(response: requests.Response) -> str | None:
    return answer_of(response).findtext("m:ResponseCode", namespaces=NS)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Ews:
    """A tiny hand-rolled EWS caller, independent of the gateway's client."""

    def __init__(self, server: SimulatorServer, http: requests.Session) -> None:
        self.server = server
        self.http = http

    def post(self, body: str, header: str = VERSION_HEADER, **headers: str) -> requests.Response:
        headers.setdefault("Content-Type", "text/xml; charset=utf-8")
        return self.http.post(
            self.server.ews_url, data=envelope(body, header).encode(), headers=headers
        )

    def place_call(self, dial_string: str = "+4930123456", header: str = VERSION_HEADER) -> str:
        response = self.post(play_on_phone(dial_string), header)
        call = answer_of(response).find("m:PhoneCallId", NS)
        assert call is not None, response.text
        return str(call.get("Id"))

    def information(
        self, call_id: str, header: str = VERSION_HEADER
    ) -> tuple[str | None, ...]:
        answer = answer_of(self.post(get_information(call_id), header))
        info = answer.find("m:PhoneCallInformation", NS)
        if info is None:
            return (answer.findtext("m:ResponseCode", namespaces=NS),)
        names = ("PhoneCallState", "ConnectionFailureCause", "SIPResponseCode", "SIPResponseText")
        return tuple(info.findtext(f"t:{name}", namespaces=NS) for name in names)

    def control(self, method: str, path: str, **kwargs: object) -> requests.Response:
        return self.http.request(method, f"{self.server.url}/simulator/{path}", **kwargs)  # type: ignore[arg-type]

    def set_faults(self, *rules: dict[str, object]) -> None:
        response = self.control("PUT", "faults", json={"faults": list(rules)})
        assert response.status_code == 200, response.text


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def simulator(clock: FakeClock) -> Iterator[SimulatorServer]:
    server = start_in_thread("127.0.0.1", 0, step_seconds=1.0, clock=clock)
    yield server
    server.stop()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture
def ews(simulator: SimulatorServer, http: requests.Session) -> Ews:
    return Ews(simulator, http)


# Call lifecycle ------------------------------------------------------------------------


def test_a_new_call_moves_from_connecting_to_alerted_to_connected(
    ews: Ews, clock: FakeClock
) -> None:
    call_id = ews.place_call()
    assert ews.information(call_id) == ("Connecting", "None", None, None)
    clock.advance(1)
    assert ews.information(call_id)[:2] == ("Alerted", "None")
    clock.advance(1)
    assert ews.information(call_id)[:2] == ("Connected", "None")
    clock.advance(3600)
    assert ews.information(call_id)[:2] == ("Connected", "None")


def test_a_number_ending_in_486_is_busy(ews: Ews, clock: FakeClock) -> None:
    call_id = ews.place_call("+4930123486")
    assert ews.information(call_id)[0] == "Connecting"
    clock.advance(1)
    assert ews.information(call_id) == ("Disconnected", "UserBusy", "486", "Busy Here")


def test_a_number_ending_in_480_rings_out_unanswered(ews: Ews, clock: FakeClock) -> None:
    call_id = ews.place_call("sip:bob480@example.com".replace("480@example.com", "@x480"))
    assert ews.information(call_id)[0] == "Connecting"
    clock.advance(1)
    assert ews.information(call_id)[0] == "Alerted"
    clock.advance(3.9)
    assert ews.information(call_id)[0] == "Alerted"
    clock.advance(0.1)
    assert ews.information(call_id) == (
        "Disconnected",
        "NoAnswer",
        "480",
        "Temporarily Unavailable",
    )


def test_the_timeline_follows_the_real_clock_with_a_small_step(http: requests.Session) -> None:
    with start_in_thread("127.0.0.1", 0, step_seconds=0.05) as server:
        ews = Ews(server, http)
        call_id = ews.place_call()
        time.sleep(0.15)
        assert ews.information(call_id)[0] == "Connected"


def test_disconnecting_ends_the_call_with_no_failure_cause(ews: Ews, clock: FakeClock) -> None:
    call_id = ews.place_call()
    clock.advance(2)
    response = ews.post(disconnect(call_id))
    assert response.status_code == 200
    assert answer_of(response).get("ResponseClass") == "Success"
    assert response_code(response) == "NoError"
    assert ews.information(call_id) == ("Disconnected", "None", None, None)


def test_disconnecting_twice_succeeds_twice(ews: Ews) -> None:
    call_id = ews.place_call()
    assert response_code(ews.post(disconnect(call_id))) == "NoError"
    assert response_code(ews.post(disconnect(call_id))) == "NoError"


def test_disconnecting_a_busy_call_keeps_how_it_ended(ews: Ews, clock: FakeClock) -> None:
    call_id = ews.place_call("486")
    clock.advance(1)
    assert response_code(ews.post(disconnect(call_id))) == "NoError"
    assert ews.information(call_id) == ("Disconnected", "UserBusy", "486", "Busy Here")


def test_ended_calls_are_forgotten_ten_minutes_after_they_end(ews: Ews, clock: FakeClock) -> None:
    call_id = ews.place_call()
    ews.post(disconnect(call_id))
    clock.advance(599)
    assert ews.information(call_id)[0] == "Disconnected"
    clock.advance(1)
    assert ews.information(call_id) == ("ErrorInvalidPhoneCallId",)


def test_calls_that_have_not_ended_are_kept(ews: Ews, clock: FakeClock) -> None:
    call_id = ews.place_call()
    clock.advance(24 * 3600)
    assert ews.information(call_id)[0] == "Connected"


# PlayOnPhone ---------------------------------------------------------------------------


def test_play_on_phone_answers_success_with_an_opaque_phone_call_id(ews: Ews) -> None:
    response = ews.post(play_on_phone())
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/xml; charset=utf-8"
    answer = answer_of(response)
    assert answer.tag == f"{{{M}}}PlayOnPhoneResponse"
    assert answer.get("ResponseClass") == "Success"
    assert answer.findtext("m:ResponseCode", namespaces=NS) == "NoError"
    call = answer.find("m:PhoneCallId", NS)
    assert call is not None
    assert EXCHANGE_ID.fullmatch(str(call.get("Id")))


def test_answers_carry_exchange_2016_server_version_info(ews: Ews) -> None:
    info = parse(ews.post(play_on_phone())).find("s:Header/t:ServerVersionInfo", NS)
    assert info is not None
    assert dict(info.attrib) == {
        "MajorVersion": "15",
        "MinorVersion": "1",
        "MajorBuildNumber": "2507",
        "MinorBuildNumber": "6",
        "Version": "V2017_07_11",
    }


def test_every_call_gets_a_different_id(ews: Ews) -> None:
    assert len({ews.place_call() for _ in range(20)}) == 20


def test_an_item_id_starting_with_missing_is_error_item_not_found(ews: Ews) -> None:
    response = ews.post(play_on_phone(item_id="missing-voicemail"))
    assert response.status_code == 200
    assert answer_of(response).get("ResponseClass") == "Error"
    assert response_code(response) == "ErrorItemNotFound"
    assert ews.control("GET", "calls").json() == []


@pytest.mark.parametrize("dial_string", ["", "abc", "030-1234", "+", "++49", "sip:", "49 30"])
def test_an_undialable_string_is_error_invalid_phone_number(ews: Ews, dial_string: str) -> None:
    response = ews.post(play_on_phone(dial_string))
    assert response.status_code == 200
    assert answer_of(response).get("ResponseClass") == "Error"
    assert response_code(response) == "ErrorInvalidPhoneNumber"


@pytest.mark.parametrize("dial_string", ["+4930123456", "0301234", "*67#123", "sip:a@b.example"])
def test_dial_strings_exchange_accepts_place_a_call(ews: Ews, dial_string: str) -> None:
    assert response_code(ews.post(play_on_phone(dial_string))) == "NoError"


# Unknown ids and element order ---------------------------------------------------------


@pytest.mark.parametrize("operation", [get_information, disconnect])
def test_an_unknown_call_id_is_error_invalid_phone_call_id(
    ews: Ews, operation: Callable[[str], str]
) -> None:
    response = ews.post(operation("AAAAbm9zdWNoY2FsbA=="))
    assert response.status_code == 200
    answer = answer_of(response)
    assert answer.get("ResponseClass") == "Error"
    assert [etree.QName(child).localname for child in answer] == [
        "MessageText",
        "ResponseCode",
        "DescriptiveLinkKey",
    ]
    assert answer.findtext("m:ResponseCode", namespaces=NS) == "ErrorInvalidPhoneCallId"
    assert answer.findtext("m:DescriptiveLinkKey", namespaces=NS) == "0"


def test_phone_call_information_comes_in_schema_order(ews: Ews, clock: FakeClock) -> None:
    call_id = ews.place_call("486")
    clock.advance(1)
    info = answer_of(ews.post(get_information(call_id))).find("m:PhoneCallInformation", NS)
    assert info is not None
    assert [child.tag for child in info] == [
        f"{{{T}}}PhoneCallState",
        f"{{{T}}}ConnectionFailureCause",
        f"{{{T}}}SIPResponseText",
        f"{{{T}}}SIPResponseCode",
    ]


# Mailbox scoping -----------------------------------------------------------------------


def test_a_call_is_visible_only_to_the_mailbox_that_placed_it(ews: Ews) -> None:
    call_id = ews.place_call(header=impersonating("alice@example.com"))
    assert ews.information(call_id, impersonating("ALICE@Example.com"))[0] == "Connecting"
    assert ews.information(call_id, impersonating("alice@example.com", "SmtpAddress"))[0]
    assert ews.information(call_id, impersonating("bob@example.com")) == (
        "ErrorInvalidPhoneCallId",
    )
    assert ews.information(call_id) == ("ErrorInvalidPhoneCallId",)


def test_another_mailbox_cannot_disconnect_a_call(ews: Ews) -> None:
    call_id = ews.place_call(header=impersonating("alice@example.com"))
    response = ews.post(disconnect(call_id), impersonating("mallory@example.com"))
    assert response_code(response) == "ErrorInvalidPhoneCallId"
    assert ews.information(call_id, impersonating("alice@example.com"))[0] == "Connecting"


def test_the_service_accounts_calls_are_its_own(ews: Ews) -> None:
    call_id = ews.place_call()
    assert ews.information(call_id)[0] == "Connecting"
    assert ews.information(call_id, impersonating("alice@example.com")) == (
        "ErrorInvalidPhoneCallId",
    )


def test_the_control_api_lists_calls_with_their_mailbox(ews: Ews) -> None:
    call_id = ews.place_call("+49301", impersonating("Alice@Example.com"))
    assert ews.control("GET", "calls").json() == [
        {
            "id": call_id,
            "mailbox": "alice@example.com",
            "state": "Connecting",
            "connectionFailureCause": "None",
            "dialString": "+49301",
        }
    ]


# What Exchange rejects -----------------------------------------------------------------

REJECTED_REQUESTS = {
    "not an envelope": f'<m:DisconnectPhoneCall xmlns:m="{M}"><m:PhoneCallId Id="x"/></m:DisconnectPhoneCall>',
    "a SOAP 1.2 envelope": (
        '<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope">'
        f"<e:Body>{disconnect('x')}</e:Body></e:Envelope>"
    ),
    "an unknown operation": envelope('<m:GetItem><m:ItemShape/></m:GetItem>'),
    "two operations": envelope(disconnect("x") + disconnect("y")),
    "no PhoneCallId": envelope("<m:DisconnectPhoneCall/>"),
    "PhoneCallId in the types namespace": envelope(
        '<m:DisconnectPhoneCall><t:PhoneCallId Id="x"/></m:DisconnectPhoneCall>'
    ),
    "PhoneCallId without Id": envelope(
        "<m:GetPhoneCallInformation><m:PhoneCallId/></m:GetPhoneCallInformation>"
    ),
    "no ItemId": envelope("<m:PlayOnPhone><m:DialString>1</m:DialString></m:PlayOnPhone>"),
    "no DialString": envelope('<m:PlayOnPhone><m:ItemId Id="A"/></m:PlayOnPhone>'),
    "an Exchange2019 server version": envelope(
        disconnect("x"), '<t:RequestServerVersion Version="Exchange2019"/>'
    ),
    "an empty ConnectingSID": envelope(
        disconnect("x"),
        "<t:ExchangeImpersonation><t:ConnectingSID/></t:ExchangeImpersonation>",
    ),
    "two ConnectingSID children": envelope(
        disconnect("x"),
        "<t:ExchangeImpersonation><t:ConnectingSID><t:SID>S-1</t:SID>"
        "<t:PrincipalName>a</t:PrincipalName></t:ConnectingSID></t:ExchangeImpersonation>",
    ),
    "an empty PrimarySmtpAddress": envelope(disconnect("x"), impersonating("  ")),
    "unparsable XML": "<soap:Envelope",
    "an empty body": "",
    "a DOCTYPE": (
        '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>' + envelope(disconnect("&b;"))[38:]
    ),
}


def assert_schema_validation_fault(response: requests.Response) -> str:
    """Check the answer is Exchange's ErrorSchemaValidation fault and return its message."""
    assert response.status_code == 500, response.text
    assert response.headers["Content-Type"] == "text/xml; charset=utf-8"
    fault = answer_of(response)
    assert fault.tag == f"{{{SOAP}}}Fault"
    faultcode = fault.find("faultcode")
    assert faultcode is not None
    assert faultcode.text == "a:ErrorSchemaValidation"
    assert faultcode.nsmap["a"] == T
    assert fault.findtext("detail/e:ResponseCode", namespaces=NS) == "ErrorSchemaValidation"
    message = fault.findtext("detail/e:Message", namespaces=NS)
    assert message
    assert fault.findtext("faultstring")
    return message


@pytest.mark.parametrize("body", REJECTED_REQUESTS.values(), ids=REJECTED_REQUESTS.keys())
def test_requests_exchange_would_reject_get_a_schema_validation_fault(
    ews: Ews, body: str
) -> None:
    response = ews.http.post(ews.server.ews_url, data=body.encode())
    assert_schema_validation_fault(response)


def test_the_https_namespace_is_rejected_as_schema_validation(ews: Ews) -> None:
    body = disconnect("x").replace("<m:", '<n:', 1).replace(
        "</m:DisconnectPhoneCall>", "</n:DisconnectPhoneCall>"
    )
    https_namespace = M.replace("http://", "https://")
    body = body.replace("<n:DisconnectPhoneCall", f'<n:DisconnectPhoneCall xmlns:n="{https_namespace}"')
    message = assert_schema_validation_fault(ews.post(body))
    assert https_namespace in message


def test_a_doctype_is_rejected_without_resolving_anything(ews: Ews) -> None:
    body = REJECTED_REQUESTS["a DOCTYPE"].replace(
        '<!ENTITY a "aaaaaaaaaa">', '<!ENTITY a SYSTEM "file:///etc/hostname">'
    )
    message = assert_schema_validation_fault(ews.http.post(ews.server.ews_url, data=body))
    assert "DOCTYPE" in message
    assert Path("/etc/hostname").exists() is False or (
        Path("/etc/hostname").read_text().strip() not in message
    )


def test_a_soap_action_that_does_not_match_the_body_is_rejected(ews: Ews) -> None:
    response = ews.post(disconnect("x"), SOAPAction=f'"{M}/PlayOnPhone"')
    message = assert_schema_validation_fault(response)
    assert "SOAPAction" in message


@pytest.mark.parametrize("action", [f"{M}/DisconnectPhoneCall", f'"{M}/DisconnectPhoneCall"'])
def test_a_matching_soap_action_is_accepted_with_or_without_quotes(ews: Ews, action: str) -> None:
    response = ews.post(disconnect("x"), SOAPAction=action)
    assert response_code(response) == "ErrorInvalidPhoneCallId"


@pytest.mark.parametrize("version", ["Exchange2007_SP1", "Exchange2013_SP1", "V2018_01_08"])
def test_every_exchange_version_type_value_is_accepted(ews: Ews, version: str) -> None:
    header = f'<t:RequestServerVersion Version="{version}"/>'
    assert response_code(ews.post(play_on_phone(), header)) == "NoError"


# The request journal -------------------------------------------------------------------


def test_every_request_is_recorded_byte_for_byte(ews: Ews) -> None:
    body = envelope(disconnect("id-with-<&>-\u00e9"), impersonating("Carol@Example.com"))
    body = body.replace("id-with-<&>-", "id-with-&lt;&amp;&gt;-")
    action = f'"{M}/DisconnectPhoneCall"'
    ews.http.post(
        ews.server.ews_url,
        data=body.encode("utf-8"),
        headers={"X-Request-ID": "req-42", "SOAPAction": action},
    )
    assert ews.control("GET", "requests").json() == [
        {
            "operation": "DisconnectPhoneCall",
            "requestId": "req-42",
            "mailbox": "carol@example.com",
            "soapAction": action,
            "body": body,
        }
    ]


def test_rejected_requests_are_recorded_too(ews: Ews) -> None:
    ews.post('<m:DisconnectPhoneCall><t:PhoneCallId Id="x"/></m:DisconnectPhoneCall>')
    ews.http.post(ews.server.ews_url, data=b"not xml")
    recorded = ews.control("GET", "requests").json()
    assert [r["operation"] for r in recorded] == ["DisconnectPhoneCall", None]
    assert recorded[1]["body"] == "not xml"


def test_the_journal_keeps_the_last_200_requests_and_can_be_cleared(ews: Ews) -> None:
    for number in range(205):
        ews.post(get_information(f"call-{number}"))
    recorded = ews.control("GET", "requests").json()
    assert len(recorded) == 200
    assert 'Id="call-5"' in recorded[0]["body"]
    assert 'Id="call-204"' in recorded[-1]["body"]
    assert ews.control("DELETE", "requests").status_code == 200
    assert ews.control("GET", "requests").json() == []
