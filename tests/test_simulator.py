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
from typing import Any

import pytest
import requests
from lxml import etree

from gateway.simulator import SimulatorServer, parse_bind, start_in_thread
from gateway.simulator.calls import CallBook
from gateway.simulator.exchange import FakeExchange
from gateway.simulator.faults import FaultBook
from gateway.simulator.journal import RecordedRequest, RequestJournal
from gateway.simulator.outcomes import Reply
from gateway.simulator.schema import EwsSchema
from tests.ews_schema import SCHEMA_DIR, SKIP_REASON, requires_schema, schema_available

pytestmark = pytest.mark.network

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
M = "http://schemas.microsoft.com/exchange/services/2006/messages"
T = "http://schemas.microsoft.com/exchange/services/2006/types"
E = "http://schemas.microsoft.com/exchange/services/2006/errors"
NS = {"s": SOAP, "m": M, "t": T, "e": E}
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

    def information(self, call_id: str, header: str = VERSION_HEADER) -> tuple[str | None, ...]:
        answer = answer_of(self.post(get_information(call_id), header))
        info = answer.find("m:PhoneCallInformation", NS)
        if info is None:
            return (answer.findtext("m:ResponseCode", namespaces=NS),)
        names = ("PhoneCallState", "ConnectionFailureCause", "SIPResponseCode", "SIPResponseText")
        return tuple(info.findtext(f"t:{name}", namespaces=NS) for name in names)

    def control(
        self, method: str, path: str, json: Any = None, data: bytes | None = None
    ) -> requests.Response:
        url = f"{self.server.url}/simulator/{path}"
        return self.http.request(method, url, json=json, data=data)

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


def test_a_number_ending_in_486_is_busy_with_no_sip_fields(ews: Ews, clock: FakeClock) -> None:
    """MS-OXWUMS: SIPResponseCode and SIPResponseText are absent from a successful answer."""
    call_id = ews.place_call("+4930123486")
    assert ews.information(call_id)[0] == "Connecting"
    clock.advance(1)
    assert ews.information(call_id) == ("Disconnected", "UserBusy", None, None)


def test_a_number_ending_in_480_rings_out_unanswered_with_no_sip_fields(
    ews: Ews, clock: FakeClock
) -> None:
    call_id = ews.place_call("+4930123480")
    assert ews.information(call_id)[0] == "Connecting"
    clock.advance(1)
    assert ews.information(call_id)[0] == "Alerted"
    clock.advance(3.9)
    assert ews.information(call_id)[0] == "Alerted"
    clock.advance(0.1)
    assert ews.information(call_id) == ("Disconnected", "None", None, None)


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
    assert ews.information(call_id) == ("Disconnected", "UserBusy", None, None)


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
    assert dict(info.items()) == {
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
    ews.set_faults({"kind": "sip", "code": 486, "text": "Busy Here"})
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


# Naming the impersonated mailbox --------------------------------------------------------

# A mailbox the simulator lists (gateway.simulator.directory.DEFAULT_MAILBOXES) by every name.
DANA = "dana.ortiz@example.com"
DANA_NAMES = {
    "primary address": ("PrimarySmtpAddress", DANA),
    "primary address through SmtpAddress": ("SmtpAddress", "Dana.Ortiz@Example.com"),
    "alias": ("SmtpAddress", "dana@example.com"),
    "alias in another domain": ("SmtpAddress", "d.ortiz@example.org"),
    "UPN": ("PrincipalName", "DOrtiz@corp.example.com"),
    "SID": ("SID", "S-1-5-21-3623811015-3361044348-30300820-1104"),
}


def as_dana(name: str) -> str:
    child, value = DANA_NAMES[name]
    return impersonating(value, child)


def assert_no_such_mailbox_fault(response: requests.Response) -> str:
    """Check the answer is Exchange's ErrorNonExistentMailbox fault and return its message."""
    assert response.status_code == 500, response.text
    fault = answer_of(response)
    assert fault.tag == f"{{{SOAP}}}Fault"
    assert fault.findtext("faultcode") == "a:ErrorNonExistentMailbox"
    assert fault.findtext("detail/e:ResponseCode", namespaces=NS) == "ErrorNonExistentMailbox"
    return str(fault.findtext("detail/e:Message", namespaces=NS))


@pytest.mark.parametrize(
    ("placed_by", "hung_up_by"), [("alias", "SID"), ("UPN", "primary address")]
)
def test_every_name_of_a_listed_mailbox_reaches_the_same_calls(
    ews: Ews, placed_by: str, hung_up_by: str
) -> None:
    call_id = ews.place_call(header=as_dana(placed_by))
    for name in DANA_NAMES:
        assert ews.information(call_id, as_dana(name))[0] == "Connecting", name
    response = ews.post(disconnect(call_id), as_dana(hung_up_by))
    assert response_code(response) == "NoError"
    (call,) = ews.control("GET", "calls").json()
    assert call["mailbox"] == DANA


@pytest.mark.parametrize("alias", ["dana@example.com", "D.Ortiz@example.org"])
def test_an_alias_as_primary_smtp_address_is_refused_as_a_mailbox_that_does_not_exist(
    ews: Ews, alias: str
) -> None:
    """Exchange takes only the primary address in PrimarySmtpAddress; SmtpAddress takes any."""
    call_id = ews.place_call(header=impersonating(alias, "SmtpAddress"))

    refused = ews.post(get_information(call_id), impersonating(alias, "PrimarySmtpAddress"))

    message = assert_no_such_mailbox_fault(refused)
    assert message == "The SMTP address has no mailbox associated with it."
    assert ews.information(call_id, impersonating(alias, "SmtpAddress"))[0] == "Connecting"


@pytest.mark.parametrize(
    ("child", "value"),
    [
        ("SID", "S-1-5-21-1-2-3-4242"),
        ("PrincipalName", DANA),  # Dana's address, but not her UPN
        ("SmtpAddress", "dortiz@corp.example.com"),  # Dana's UPN, but not an address of hers
    ],
)
def test_a_name_the_directory_does_not_hold_in_that_form_is_refused(
    ews: Ews, child: str, value: str
) -> None:
    response = ews.post(play_on_phone(), impersonating(value, child))

    assert_no_such_mailbox_fault(response)
    assert ews.control("GET", "calls").json() == []
    (recorded,) = ews.control("GET", "requests").json()
    assert recorded["mailbox"] is None


def test_an_unlisted_address_or_upn_is_a_mailbox_of_its_own(ews: Ews) -> None:
    call_id = ews.place_call(header=impersonating("zoe@example.net", "SmtpAddress"))
    assert ews.information(call_id, impersonating("Zoe@example.net"))[0] == "Connecting"
    assert ews.information(call_id, impersonating("zoe@example.net", "PrincipalName"))[0] == (
        "Connecting"
    )


def test_the_control_api_lists_the_mailboxes_and_their_names(ews: Ews) -> None:
    mailboxes = ews.control("GET", "mailboxes").json()
    dana = next(m for m in mailboxes if m["primarySmtpAddress"] == DANA)
    assert dana == {
        "primarySmtpAddress": DANA,
        "aliases": ["dana@example.com", "d.ortiz@example.org"],
        "principalName": "dortiz@corp.example.com",
        "sid": "S-1-5-21-3623811015-3361044348-30300820-1104",
    }


# What Exchange rejects -----------------------------------------------------------------

REJECTED_REQUESTS = {
    "not an envelope": f'<m:PlayOnPhone xmlns:m="{M}"><m:ItemId Id="A"/></m:PlayOnPhone>',
    "a SOAP 1.2 envelope": (
        '<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope">'
        f"<e:Body>{disconnect('x')}</e:Body></e:Envelope>"
    ),
    "an unknown operation": envelope("<m:GetItem><m:ItemShape/></m:GetItem>"),
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
    "nested entities": (
        '<!DOCTYPE soap:Envelope [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
        + envelope(disconnect("&b;")).partition("\n")[2]
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
def test_requests_exchange_would_reject_get_a_schema_validation_fault(ews: Ews, body: str) -> None:
    response = ews.http.post(ews.server.ews_url, data=body.encode())
    assert_schema_validation_fault(response)


def test_the_https_namespace_is_rejected_as_schema_validation(ews: Ews) -> None:
    https_namespace = M.replace("http://", "https://")
    body = (
        f'<n:DisconnectPhoneCall xmlns:n="{https_namespace}">'
        '<n:PhoneCallId Id="x"/></n:DisconnectPhoneCall>'
    )
    message = assert_schema_validation_fault(ews.post(body))
    assert https_namespace in message


def test_a_doctype_is_rejected_without_resolving_anything(ews: Ews) -> None:
    body = (
        '<?xml version="1.0"?>'
        '<!DOCTYPE soap:Envelope [<!ENTITY secret SYSTEM "file:///etc/passwd">]>'
        + envelope(play_on_phone("&secret;")).partition("\n")[2]
    )
    message = assert_schema_validation_fault(ews.http.post(ews.server.ews_url, data=body))
    assert "DOCTYPE" in message
    assert "root:" not in message


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
    body = envelope(disconnect("id-&lt;&amp;&gt;-\u00e9"), impersonating("Carol@Example.com"))
    action = f'"{M}/DisconnectPhoneCall"'
    ews.http.post(
        ews.server.ews_url,
        data=body.encode("utf-8"),
        headers={"X-Request-ID": "req-42", "SOAPAction": action, "Authorization": "Basic c3ZjOng="},
    )
    recorded = ews.control("GET", "requests").json()
    received_at = recorded[0].pop("receivedAt")
    assert abs(received_at - time.time()) < 60, "the wall-clock time it arrived"
    assert recorded == [
        {
            "operation": "DisconnectPhoneCall",
            "requestId": "req-42",
            "mailbox": "carol@example.com",
            "soapAction": action,
            "body": body,
            "authorization": "Basic c3ZjOng=",
        }
    ]


def test_rejected_requests_are_recorded_too(ews: Ews) -> None:
    ews.post('<m:DisconnectPhoneCall><t:PhoneCallId Id="x"/></m:DisconnectPhoneCall>')
    ews.http.post(ews.server.ews_url, data=b"not xml")
    recorded = ews.control("GET", "requests").json()
    assert [r["operation"] for r in recorded] == ["DisconnectPhoneCall", None]
    assert recorded[1]["body"] == "not xml"


def test_the_journal_keeps_only_the_last_requests_up_to_its_size() -> None:
    journal = RequestJournal(size=3)
    for number in range(5):
        journal.record(RecordedRequest(None, f"req-{number}", None, None, b""))
    assert [seen.request_id for seen in journal.recorded()] == ["req-2", "req-3", "req-4"]


def test_the_journal_can_be_cleared(ews: Ews) -> None:
    for number in range(5):
        ews.post(get_information(f"call-{number}"))
    assert len(ews.control("GET", "requests").json()) == 5
    assert ews.control("DELETE", "requests").status_code == 200
    assert ews.control("GET", "requests").json() == []


# Fault rules ---------------------------------------------------------------------------


def test_a_busy_rule_answers_error_server_busy_with_its_back_off(ews: Ews) -> None:
    ews.set_faults({"kind": "busy", "backOffMs": 297749})
    response = ews.post(disconnect("x"))
    assert response.status_code == 500
    fault = answer_of(response)
    assert fault.findtext("faultcode") == "a:ErrorServerBusy"
    assert fault.findtext("faultstring") == (
        "The server cannot service this request right now. Try again later."
    )
    assert fault.findtext("detail/e:ResponseCode", namespaces=NS) == "ErrorServerBusy"
    assert fault.findtext("detail/e:Message", namespaces=NS)
    back_off = fault.find("detail/t:MessageXml/t:Value", NS)
    assert back_off is not None
    assert (back_off.get("Name"), back_off.text) == ("BackOffMilliseconds", "297749")


def test_a_busy_rule_backs_off_five_seconds_by_default(ews: Ews) -> None:
    ews.set_faults({"kind": "busy"})
    fault = answer_of(ews.post(disconnect("x")))
    assert fault.findtext("detail/t:MessageXml/t:Value", namespaces=NS) == "5000"


def test_an_ews_error_rule_answers_in_band_and_skips_the_operation(ews: Ews) -> None:
    ews.set_faults({"kind": "ews-error", "code": "ErrorServerBusy", "backOffMs": 1500})
    response = ews.post(play_on_phone())
    assert response.status_code == 200
    answer = answer_of(response)
    assert answer.tag == f"{{{M}}}PlayOnPhoneResponse"
    assert answer.get("ResponseClass") == "Error"
    assert answer.findtext("m:ResponseCode", namespaces=NS) == "ErrorServerBusy"
    assert answer.findtext("m:MessageText", namespaces=NS)
    assert answer.findtext("m:MessageXml/t:Value", namespaces=NS) == "1500"
    assert ews.control("GET", "calls").json() == []


def test_a_fault_rule_answers_a_soap_fault_with_that_code(ews: Ews) -> None:
    ews.set_faults({"kind": "fault", "code": "ErrorInternalServerTransientError"})
    response = ews.post(disconnect("x"))
    assert response.status_code == 500
    fault = answer_of(response)
    assert fault.findtext("faultcode") == "a:ErrorInternalServerTransientError"
    detail_code = fault.findtext("detail/e:ResponseCode", namespaces=NS)
    assert detail_code == "ErrorInternalServerTransientError"


def test_a_warning_rule_answers_warning_and_still_does_the_operation(ews: Ews) -> None:
    call_id = ews.place_call()
    ews.set_faults({"kind": "warning", "message": "Careful <now> & then"})
    answer = answer_of(ews.post(disconnect(call_id)))
    assert answer.get("ResponseClass") == "Warning"
    assert answer.findtext("m:MessageText", namespaces=NS) == "Careful <now> & then"
    assert answer.findtext("m:ResponseCode", namespaces=NS) == "NoError"
    ews.control("DELETE", "faults")
    assert ews.information(call_id)[0] == "Disconnected"


def test_a_sip_rule_adds_sip_fields_to_call_information(ews: Ews, clock: FakeClock) -> None:
    call_id = ews.place_call("+4930123486")
    clock.advance(1)
    ews.set_faults({"kind": "sip", "code": 486, "text": "Busy Here", "count": 1})
    assert ews.information(call_id) == ("Disconnected", "UserBusy", "486", "Busy Here")
    assert ews.information(call_id) == ("Disconnected", "UserBusy", None, None)


def test_a_sip_rule_without_text_adds_only_the_code(ews: Ews) -> None:
    call_id = ews.place_call()
    ews.set_faults({"kind": "sip", "code": 183})
    assert ews.information(call_id) == ("Connecting", "None", "183", None)


def test_a_sip_rule_applies_only_to_get_phone_call_information(ews: Ews) -> None:
    ews.set_faults({"kind": "sip", "code": 480, "count": 1})
    call_id = ews.place_call()
    assert response_code(ews.post(disconnect(call_id))) == "NoError"
    assert ews.control("GET", "faults").json()["faults"] == [
        {
            "kind": "sip",
            "rate": 1.0,
            "count": 1,
            "operation": "GetPhoneCallInformation",
            "code": 480,
        }
    ]
    assert ews.information(call_id) == ("Disconnected", "None", "480", None)


def test_a_sip_rule_leaves_an_error_answer_alone(ews: Ews) -> None:
    ews.set_faults({"kind": "sip", "code": 486, "text": "Busy Here"})
    answer = answer_of(ews.post(get_information("unknown")))
    assert answer.findtext("m:ResponseCode", namespaces=NS) == "ErrorInvalidPhoneCallId"
    assert answer.find("m:PhoneCallInformation", NS) is None


def test_an_http_401_rule_challenges_with_negotiate_and_ntlm(ews: Ews) -> None:
    ews.set_faults({"kind": "http-401"})
    with ews.post(disconnect("x")) as response:
        assert response.status_code == 401
        assert response.content == b""
        assert response.raw.headers.getlist("WWW-Authenticate") == ["Negotiate", "NTLM"]


@pytest.mark.parametrize(("rule", "retry_after"), [({}, None), ({"retryAfter": 30}, "30")])
def test_an_http_503_rule_answers_an_html_page(
    ews: Ews, rule: dict[str, object], retry_after: str | None
) -> None:
    ews.set_faults({"kind": "http-503", **rule})
    response = ews.post(disconnect("x"))
    assert response.status_code == 503
    assert response.headers["Content-Type"].startswith("text/html")
    assert "Service Unavailable" in response.text
    assert response.headers.get("Retry-After") == retry_after


def test_an_html_500_rule_answers_an_iis_error_page(ews: Ews) -> None:
    ews.set_faults({"kind": "html-500"})
    response = ews.post(disconnect("x"))
    assert response.status_code == 500
    assert response.headers["Content-Type"].startswith("text/html")
    assert "Server Error in '/EWS' Application." in response.text


def test_a_redirect_rule_points_at_the_owa_error_page(ews: Ews) -> None:
    ews.set_faults({"kind": "redirect"})
    response = ews.http.post(
        ews.server.ews_url, data=envelope(disconnect("x")), allow_redirects=False
    )
    assert response.status_code == 302
    assert response.headers["Location"] == "/owa/auth/errorFE.aspx?httpCode=500"
    assert response.headers["Content-Type"].startswith("text/html")


def test_a_malformed_rule_answers_a_truncated_envelope(ews: Ews) -> None:
    ews.set_faults({"kind": "malformed"})
    response = ews.post(disconnect("x"))
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/xml; charset=utf-8"
    assert response.text.startswith("<?xml")
    with pytest.raises(etree.XMLSyntaxError):
        parse(response)


def test_a_not_soap_rule_answers_well_formed_xml_that_is_not_an_envelope(ews: Ews) -> None:
    ews.set_faults({"kind": "not-soap"})
    response = ews.post(disconnect("x"))
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/xml; charset=utf-8"
    assert parse(response).tag == "html"


def test_a_hang_rule_says_nothing_until_the_rules_are_cleared(
    ews: Ews, simulator: SimulatorServer
) -> None:
    ews.set_faults({"kind": "hang"})
    outcome: list[BaseException] = []

    def call_and_wait() -> None:
        with requests.Session() as session:
            try:
                session.post(simulator.ews_url, data=envelope(disconnect("x")), timeout=10)
            except requests.ConnectionError as error:
                outcome.append(error)

    caller = threading.Thread(target=call_and_wait)
    started = time.monotonic()
    caller.start()
    caller.join(0.3)
    assert caller.is_alive()
    ews.control("DELETE", "faults")
    caller.join(5)
    assert not caller.is_alive()
    assert time.monotonic() - started < 2
    assert len(outcome) == 1


def test_a_hang_rule_with_ms_closes_the_connection_after_that_long(ews: Ews) -> None:
    ews.set_faults({"kind": "hang", "ms": 150})
    started = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        ews.post(disconnect("x"))
    assert 0.15 <= time.monotonic() - started < 2


def test_a_reset_rule_drops_the_connection_with_a_tcp_reset(
    ews: Ews, simulator: SimulatorServer
) -> None:
    ews.set_faults({"kind": "reset"})
    body = envelope(disconnect("x")).encode()
    host, port = simulator.url.removeprefix("http://").split(":")
    request = (
        f"POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: text/xml\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(request)
        with pytest.raises(ConnectionResetError):
            connection.recv(1024)


def test_a_billion_laughs_rule_answers_nested_entities_small_on_the_wire(ews: Ews) -> None:
    ews.set_faults({"kind": "billion-laughs"})
    response = ews.post(disconnect("x"))
    assert response.status_code == 200
    assert len(response.content) < 4096
    assert "<!DOCTYPE" in response.text
    assert re.search(r'<!ENTITY lol9 "(&lol8;){10}">', response.text)
    assert "&lol9;" in response.text


def test_an_external_entity_rule_declares_a_system_entity_for_the_url(ews: Ews) -> None:
    ews.set_faults({"kind": "external-entity", "url": "http://169.254.169.254/latest/meta-data/"})
    response = ews.post(disconnect("x"))
    assert response.status_code == 200
    assert '<!ENTITY xxe SYSTEM "http://169.254.169.254/latest/meta-data/">' in response.text
    assert "&xxe;" in response.text


def test_a_huge_rule_streams_an_envelope_of_that_size(ews: Ews) -> None:
    ews.set_faults({"kind": "huge", "megabytes": 2})
    with ews.http.post(ews.server.ews_url, data=envelope(disconnect("x")), stream=True) as response:
        assert response.status_code == 200
        assert response.headers["Content-Length"] == str(2 * 1024 * 1024)
        content = response.content
    assert len(content) == 2 * 1024 * 1024
    assert content.startswith(b'<?xml version="1.0" encoding="utf-8"?>')
    assert content.endswith(b"</s:Envelope>")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)
    answer = etree.fromstring(content, parser).find("s:Body/*", NS)
    assert answer is not None
    assert len(answer.findtext("m:MessageText", namespaces=NS) or "") > 2_000_000


def test_a_latency_rule_delays_the_answer_then_answers_normally(ews: Ews) -> None:
    ews.set_faults({"kind": "latency", "ms": 200})
    started = time.monotonic()
    response = ews.post(play_on_phone())
    assert time.monotonic() - started >= 0.2
    assert response_code(response) == "NoError"


def test_a_counted_rule_applies_to_the_next_n_requests_then_is_removed(ews: Ews) -> None:
    ews.set_faults({"kind": "busy", "count": 2})
    statuses = [ews.post(disconnect("x")).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert ews.control("GET", "faults").json() == {"faults": []}


def test_a_rule_for_one_operation_leaves_the_others_alone(ews: Ews) -> None:
    ews.set_faults({"kind": "busy", "operation": "DisconnectPhoneCall"})
    assert ews.post(play_on_phone()).status_code == 200
    assert ews.post(get_information("x")).status_code == 200
    assert ews.post(disconnect("x")).status_code == 500


def test_rules_are_tried_in_order_and_the_first_that_fires_applies(ews: Ews) -> None:
    ews.set_faults(
        {"kind": "busy", "rate": 0},
        {"kind": "fault", "code": "ErrorMailboxStoreUnavailable"},
        {"kind": "http-401"},
    )
    fault = answer_of(ews.post(disconnect("x")))
    assert fault.findtext("faultcode") == "a:ErrorMailboxStoreUnavailable"


def test_the_rate_decides_how_often_a_rule_fires(http: requests.Session) -> None:
    draws = iter([0.1, 0.9, 0.49, 0.5])
    with start_in_thread("127.0.0.1", 0, chance=lambda: next(draws)) as server:
        ews = Ews(server, http)
        ews.set_faults({"kind": "busy", "rate": 0.5})
        statuses = [ews.post(disconnect("x")).status_code for _ in range(4)]
    assert statuses == [500, 200, 500, 200]


def test_a_rule_that_is_not_counted_down_by_requests_it_skips(http: requests.Session) -> None:
    draws = iter([0.9, 0.1, 0.1])
    with start_in_thread("127.0.0.1", 0, chance=lambda: next(draws)) as server:
        ews = Ews(server, http)
        ews.set_faults({"kind": "busy", "rate": 0.5, "count": 1})
        statuses = [ews.post(disconnect("x")).status_code for _ in range(3)]
    assert statuses == [200, 500, 200]


def test_the_active_rules_are_shown_with_defaults_and_remaining_counts(ews: Ews) -> None:
    ews.set_faults({"kind": "hang", "count": 3, "operation": "PlayOnPhone"}, {"kind": "busy"})
    assert ews.control("GET", "faults").json() == {
        "faults": [
            {"kind": "hang", "rate": 1.0, "count": 3, "operation": "PlayOnPhone", "ms": 300000},
            {"kind": "busy", "rate": 1.0, "backOffMs": 5000},
        ]
    }
    assert ews.control("DELETE", "faults").json() == {"faults": []}


BAD_RULES = {
    "unknown kind": ({"faults": [{"kind": "bussy"}]}, "faults[0].kind"),
    "rate above one": ({"faults": [{"kind": "busy", "rate": 2}]}, "faults[0].rate"),
    "rate as text": ({"faults": [{"kind": "busy", "rate": "1"}]}, "faults[0].rate"),
    "zero count": ({"faults": [{"kind": "busy", "count": 0}]}, "faults[0].count"),
    "unknown operation": ({"faults": [{"kind": "busy", "operation": "GetItem"}]}, "operation"),
    "latency without ms": ({"faults": [{"kind": "latency"}]}, "'ms'"),
    "misspelt parameter": ({"faults": [{"kind": "busy", "backoffMs": 1}]}, "backoffMs"),
    "huge of zero megabytes": ({"faults": [{"kind": "huge", "megabytes": 0}]}, "megabytes"),
    "code with a space": ({"faults": [{"kind": "fault", "code": "a b"}]}, "faults[0].code"),
    "url with a quote": ({"faults": [{"kind": "external-entity", "url": 'x"y'}]}, "url"),
    "sip without a code": ({"faults": [{"kind": "sip", "text": "Busy Here"}]}, "'code'"),
    "sip code below 100": ({"faults": [{"kind": "sip", "code": 99}]}, "faults[0].code"),
    "sip code above 699": ({"faults": [{"kind": "sip", "code": 700}]}, "faults[0].code"),
    "sip code as text": ({"faults": [{"kind": "sip", "code": "486"}]}, "faults[0].code"),
    "sip for another operation": (
        {"faults": [{"kind": "sip", "code": 486, "operation": "PlayOnPhone"}]},
        "GetPhoneCallInformation",
    ),
    "rules not in a list": ({"faults": {"kind": "busy"}}, "list"),
    "no faults key": ([{"kind": "busy"}], "faults"),
}


@pytest.mark.parametrize(("document", "named"), BAD_RULES.values(), ids=BAD_RULES.keys())
def test_a_bad_rule_is_400_naming_the_problem(ews: Ews, document: object, named: str) -> None:
    ews.set_faults({"kind": "busy"})
    response = ews.control("PUT", "faults", json=document)
    assert response.status_code == 400
    assert named in response.json()["error"]
    assert ews.control("GET", "faults").json()["faults"][0]["kind"] == "busy"


def test_a_rules_body_that_is_not_json_is_400(ews: Ews) -> None:
    response = ews.control("PUT", "faults", data=b"{kind: busy}")
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]


# Control API and server ----------------------------------------------------------------


def test_health_says_it_is_a_simulator(ews: Ews) -> None:
    response = ews.control("GET", "health")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"status": "ok", "simulator": True}


@pytest.mark.parametrize("path", ["/", "/simulator/nothing"])
def test_unknown_paths_are_404_json(ews: Ews, path: str) -> None:
    response = ews.http.get(ews.server.url + path)
    assert response.status_code == 404
    assert path in response.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/EWS/Exchange.asmx", "POST"),
        ("POST", "/simulator/health", "GET"),
        ("PATCH", "/simulator/faults", "GET, PUT, DELETE"),
    ],
)
def test_wrong_methods_are_405(ews: Ews, method: str, path: str, allowed: str) -> None:
    response = ews.http.request(method, ews.server.url + path)
    assert response.status_code == 405
    assert response.headers["Allow"] == allowed


def test_one_keep_alive_connection_serves_many_requests(ews: Ews) -> None:
    for _ in range(5):
        response = ews.post(play_on_phone())
        assert response.headers.get("Connection", "keep-alive").lower() != "close"
    assert len(ews.control("GET", "calls").json()) == 5


def test_a_chunked_request_body_is_read_like_any_other(ews: Ews) -> None:
    body = envelope(play_on_phone()).encode()
    pieces = iter([body[:100], body[100:]])
    response = ews.http.post(ews.server.ews_url, data=pieces)
    assert response.request.headers["Transfer-Encoding"] == "chunked"
    assert response_code(response) == "NoError"


def test_a_request_body_over_a_mebibyte_is_413(ews: Ews) -> None:
    response = ews.http.post(ews.server.ews_url, data=b" " * (1024 * 1024 + 1))
    assert response.status_code == 413
    assert ews.control("GET", "requests").json() == []


def test_the_simulator_serves_ipv6_loopback(http: requests.Session) -> None:
    try:
        server = start_in_thread("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with server:
        assert re.fullmatch(r"http://\[::1\]:\d+", server.url)
        assert Ews(server, http).control("GET", "health").status_code == 200


def test_latency_ms_delays_every_ews_answer(http: requests.Session) -> None:
    with start_in_thread("127.0.0.1", 0, latency_ms=100) as server:
        ews = Ews(server, http)
        started = time.monotonic()
        ews.post(play_on_phone())
        ews.post(disconnect("x"))
        assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize(
    ("answered_after_s", "held_for_s"), [(0.0, [0.1]), (0.03, [0.07]), (0.1, []), (0.25, [])]
)
def test_latency_counts_from_the_request_s_arrival_so_answering_takes_part_of_it(
    answered_after_s: float, held_for_s: list[float]
) -> None:
    arrived = 50.0
    held: list[float] = []
    exchange = FakeExchange(
        calls=CallBook(),
        faults=FaultBook(),
        journal=RequestJournal(),
        latency_ms=100,
        sleep=held.append,
        # Only read once the answer is ready: reading and answering took ANSWERED_AFTER_S.
        clock=lambda: arrived + answered_after_s,
    )
    outcome = exchange.answer(envelope(play_on_phone()).encode(), None, "r1", received_at=arrived)
    assert isinstance(outcome, Reply)
    assert outcome.status == 200
    assert held == pytest.approx(held_for_s)


def test_urls_name_the_bound_port_and_the_ews_path(simulator: SimulatorServer) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", simulator.url)
    assert simulator.ews_url == simulator.url + "/EWS/Exchange.asmx"


def test_stop_is_idempotent_and_closes_the_socket() -> None:
    server = start_in_thread("127.0.0.1", 0)
    port = int(server.url.rsplit(":", 1)[1])
    server.stop()
    server.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("127.0.0.1:8081", ("127.0.0.1", 8081)),
        ("[::1]:9000", ("::1", 9000)),
        ("localhost:0", ("localhost", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_bind_addresses_are_host_colon_port(bind: str, expected: tuple[str, int]) -> None:
    assert parse_bind(bind) == expected


@pytest.mark.parametrize(
    "bind", ["8081", "127.0.0.1", ":8081", "::1:8081", "[::1]", "[]:80", "host:http", "h:70000"]
)
def test_a_bad_bind_address_is_a_clear_value_error(bind: str) -> None:
    with pytest.raises(ValueError, match="bad bind address"):
        parse_bind(bind)


def test_serve_forever_announces_a_simulator_and_stops_on_sigterm() -> None:
    code = "from gateway.simulator import serve_forever; serve_forever('127.0.0.1:0')"
    with subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stderr is not None
        banner = "".join(process.stderr.readline() for _ in range(4))
        assert "NOT A REAL EXCHANGE SERVER" in banner
        ews_url = re.search(r"http://\S+/EWS/Exchange\.asmx", banner)
        assert ews_url is not None
        with requests.get(ews_url[0].replace("/EWS/Exchange.asmx", "/simulator/health")) as health:
            assert health.json()["simulator"] is True
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
        process.stderr.read()


# Against the real schema ---------------------------------------------------------------


@pytest.fixture(scope="module")
def schema_checked() -> Iterator[SimulatorServer]:
    if not schema_available():
        pytest.skip(SKIP_REASON)
    server = start_in_thread("127.0.0.1", 0, schema_dir=SCHEMA_DIR)
    yield server
    server.stop()


@requires_schema
def test_with_the_real_schema_valid_requests_pass(
    schema_checked: SimulatorServer, http: requests.Session
) -> None:
    ews = Ews(schema_checked, http)
    header = impersonating("alice@example.com")
    call_id = ews.place_call(header=header)
    assert ews.information(call_id, header)[0] == "Connecting"
    assert response_code(ews.post(disconnect(call_id), header)) == "NoError"


@requires_schema
def test_with_the_real_schema_a_types_namespace_phone_call_id_is_rejected(
    schema_checked: SimulatorServer, http: requests.Session
) -> None:
    ews = Ews(schema_checked, http)
    response = ews.post('<m:DisconnectPhoneCall><t:PhoneCallId Id="x"/></m:DisconnectPhoneCall>')
    message = assert_schema_validation_fault(response)
    assert "This element is not expected" in message


@requires_schema
def test_with_the_real_schema_an_unknown_header_element_is_rejected(
    schema_checked: SimulatorServer, http: requests.Session
) -> None:
    ews = Ews(schema_checked, http)
    header = VERSION_HEADER + "<t:TimeZoneContext><t:Nonsense/></t:TimeZoneContext>"
    assert_schema_validation_fault(ews.post(disconnect("x"), header))


@requires_schema
def test_the_simulators_answers_are_valid_against_the_real_schema(
    ews: Ews, clock: FakeClock
) -> None:
    schema = EwsSchema.load(SCHEMA_DIR)
    busy_call = ews.place_call("486")
    clock.advance(1)
    answers = [
        ews.post(play_on_phone()),
        ews.post(get_information(busy_call)),
        ews.post(get_information("unknown")),
        ews.post(disconnect(busy_call)),
    ]
    ews.set_faults({"kind": "ews-error", "code": "ErrorServerBusy", "backOffMs": 10, "count": 1})
    answers.append(ews.post(disconnect("x")))
    ews.set_faults({"kind": "warning", "message": "careful", "count": 1})
    answers.append(ews.post(play_on_phone()))
    ews.set_faults({"kind": "sip", "code": 486, "text": "Busy Here", "count": 1})
    answers.append(ews.post(get_information(busy_call)))
    for response in answers:
        envelope_element = parse(response)
        info = envelope_element.find("s:Header/t:ServerVersionInfo", NS)
        assert info is not None
        assert schema.first_error(info) is None
        assert schema.first_error(answer_of(response)) is None, response.text
