"""The SOAP layer: what it sends to Exchange, and how it reads every kind of answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from gateway import wire
from gateway.errors import (
    DEFAULT_RETRY_AFTER_S,
    ERROR_BY_RESPONSE_CODE,
    CallNotFound,
    ExchangeAccessDenied,
    ExchangeAuthFailed,
    ExchangeBadAnswer,
    ExchangeBusy,
    ExchangeReportedError,
    ExchangeUnavailable,
    ExchangeUnprocessable,
    GatewayError,
    MailboxNotFound,
)
from gateway.exchange.client import (
    CallInformation,
    Disconnected,
    EwsClient,
    ExchangeCallReport,
    PlacedCall,
)
from gateway.exchange.transport import ExchangeReply
from tests.ews_schema import assert_envelope_valid, requires_schema, schema_available

FIXTURES = Path(__file__).parent / "fixtures"
SOAP_XML = "text/xml; charset=utf-8"
REQUEST_ID = "3f2a9c1e-7b4d-4e0a-9f61-0c5d2b8e4a17"
CALL_ID = "MDAwMDAwMDAtMDAwMC0wMDAwLTAwMDAtMDAwMDAwMDAwMDAxQDE5Mi4xNjguMS4xMA=="
ITEM_ID = "AAMkADk0N2Q5ZTFlLTg2ZDMtNDUwYi04ZmE3LWNmYjQ4OTdlZGM2MABGAAAAAAA="
DIAL_STRING = "+4930123456789"
MAILBOX = "user@example.com"
# A mailbox named each way EWS_IMPERSONATION_ID allows, and the ConnectingSID child it takes.
MAILBOX_IDS = {
    "smtp": (MAILBOX, "SmtpAddress"),
    "upn": ("user@corp.example.com", "PrincipalName"),
    "sid": ("S-1-5-21-3623811015-3361044348-30300820-1013", "SID"),
}
SOAP = f"{{{wire.SOAP_ENV_NS}}}"
M = f"{{{wire.MESSAGES_NS}}}"
T = f"{{{wire.TYPES_NS}}}"

# The contract's table "From Exchange's answer to the caller's status", written
# out independently of gateway.errors so that a change there has to match it.
CONTRACT_ERRORS: dict[str, tuple[type[GatewayError], int]] = {
    "ErrorInvalidPhoneCallId": (CallNotFound, 404),
    "ErrorAccessDenied": (ExchangeAccessDenied, 403),
    "ErrorImpersonateUserDenied": (ExchangeAccessDenied, 403),
    "ErrorImpersonationDenied": (ExchangeAccessDenied, 403),
    "ErrorImpersonationFailed": (ExchangeAccessDenied, 403),
    "ErrorNonExistentMailbox": (MailboxNotFound, 404),
    "ErrorInvalidSmtpAddress": (MailboxNotFound, 404),
    "ErrorUserNotUnifiedMessagingEnabled": (ExchangeUnprocessable, 422),
    "ErrorUnifiedMessagingDialPlanNotFound": (ExchangeUnprocessable, 422),
    "ErrorInvalidPhoneNumber": (ExchangeUnprocessable, 422),
    "ErrorPhoneNumberNotDialable": (ExchangeUnprocessable, 422),
    "ErrorItemNotFound": (ExchangeUnprocessable, 422),
    "ErrorServerBusy": (ExchangeBusy, 503),
    "ErrorExceededConnectionCount": (ExchangeBusy, 503),
    "ErrorTooManyObjectsOpened": (ExchangeBusy, 503),
    "ErrorUnifiedMessagingServerNotFound": (ExchangeUnavailable, 503),
    "ErrorUMServerUnavailable": (ExchangeUnavailable, 503),
    "ErrorUnifiedMessagingRequestFailed": (ExchangeUnavailable, 503),
    "ErrorInternalServerTransientError": (ExchangeUnavailable, 503),
    "ErrorMailboxStoreUnavailable": (ExchangeUnavailable, 503),
    "ErrorADUnavailable": (ExchangeUnavailable, 503),
    "ErrorConnectionFailed": (ExchangeUnavailable, 503),
    "ErrorConnectionFailedTransientError": (ExchangeUnavailable, 503),
}
MAPPED_CODES = sorted(CONTRACT_ERRORS)
# Codes the ResponseCodeType of the reference schema (up to V2018_01_08) does not list yet.
NEWER_THAN_SCHEMA = {"ErrorConnectionFailedTransientError"}


def recorded(name: str, **fields: str) -> bytes:
    """Return a recorded answer from tests/fixtures, with its {placeholders} filled in."""
    text = (FIXTURES / name).read_text(encoding="utf-8")
    for key, value in fields.items():
        text = text.replace(f"{{{key}}}", value)
    return text.encode("utf-8")


def error_response(operation: str, code: str, message: str = "Exchange said no.") -> bytes:
    return recorded("error_response.xml", operation=operation, code=code, message=message)


def fault(code: str, message: str = "Exchange said no.") -> bytes:
    return recorded("fault.xml", code=code, message=message)


@dataclass(frozen=True)
class SentRequest:
    body: bytes
    headers: dict[str, str]


@dataclass
class RecordedExchange:
    """A transport that answers every post with one recorded reply and keeps what was sent.

    Every envelope it receives is checked against the real EWS schema when the
    schema folder is there: the conformance check for all the SOAP layer sends.
    """

    body: bytes = b""
    status: int = 200
    content_type: str = SOAP_XML
    retry_after: str | None = None
    location: str | None = None
    sent: list[SentRequest] = field(default_factory=list)

    def post(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        deadline: float | None = None,
        idempotent: bool = False,
    ) -> ExchangeReply:
        self.sent.append(SentRequest(body, dict(headers)))
        if schema_available():
            assert_envelope_valid(body)
        return ExchangeReply(
            status=self.status,
            content_type=self.content_type,
            retry_after=self.retry_after,
            location=self.location,
            body=self.body,
        )

    @property
    def envelope(self) -> etree._Element:
        assert len(self.sent) == 1, f"expected one request, Exchange got {len(self.sent)}"
        return etree.fromstring(self.sent[0].body)


@dataclass(frozen=True)
class UpstreamCall:
    operation: str
    outcome: str
    code: str | None


@dataclass
class ObserverRecorder:
    calls: list[UpstreamCall] = field(default_factory=list)

    def exchange_call(self, report: ExchangeCallReport) -> None:
        assert report.seconds >= 0
        self.calls.append(UpstreamCall(report.operation, report.outcome, report.code))


@pytest.fixture
def observer() -> ObserverRecorder:
    return ObserverRecorder()


def client_for(
    exchange: RecordedExchange,
    observer: ObserverRecorder | None = None,
    impersonation_id: str = "smtp",
) -> EwsClient:
    return EwsClient(
        exchange,
        server_version="Exchange2010",
        observer=observer,
        impersonation_id=impersonation_id,
    )


def call(
    client: EwsClient, operation: str, mailbox: str | None = None
) -> Disconnected | PlacedCall | CallInformation:
    """Run one operation with typical arguments."""
    if operation == wire.PLAY_ON_PHONE:
        return client.play_on_phone(ITEM_ID, DIAL_STRING, request_id=REQUEST_ID, mailbox=mailbox)
    if operation == wire.GET_PHONE_CALL_INFORMATION:
        return client.get_call_information(CALL_ID, request_id=REQUEST_ID, mailbox=mailbox)
    return client.disconnect_call(CALL_ID, request_id=REQUEST_ID, mailbox=mailbox)


def failure(exchange: RecordedExchange, observer: ObserverRecorder, operation: str) -> GatewayError:
    """Run the operation against the recorded answer and return the error it raised."""
    with pytest.raises(GatewayError) as raised:
        call(client_for(exchange, observer), operation)
    return raised.value


def assert_error(
    error: GatewayError,
    error_class: type[GatewayError],
    *,
    status: int,
    outcome: str,
    ews_code: str | None,
    retry_after_s: int | None = None,
) -> None:
    assert type(error) is error_class, f"{type(error).__name__}: {error.detail}"
    assert error.status == status
    assert error.outcome == outcome
    assert error.ews_code == ews_code
    assert error.retry_after_s == retry_after_s


def assert_observed(
    observer: ObserverRecorder, operation: str, outcome: str, code: str | None
) -> None:
    assert observer.calls == [UpstreamCall(operation, outcome, code)]


# What the SOAP layer sends.


@pytest.mark.parametrize("operation", wire.OPERATIONS)
def test_requests_are_utf8_text_xml(operation: str) -> None:
    exchange = RecordedExchange(error_response(operation, "ErrorInvalidPhoneCallId"))
    with pytest.raises(CallNotFound):
        call(client_for(exchange), operation)
    assert exchange.sent[0].headers["Content-Type"] == "text/xml; charset=utf-8"
    sent = etree.fromstring(exchange.sent[0].body).getroottree()
    assert sent.docinfo.encoding.lower() == "utf-8"


@pytest.mark.parametrize("operation", wire.OPERATIONS)
def test_soap_action_is_the_quoted_operation_uri_in_the_messages_namespace(operation: str) -> None:
    exchange = RecordedExchange(error_response(operation, "ErrorInvalidPhoneCallId"))
    with pytest.raises(CallNotFound):
        call(client_for(exchange), operation)
    assert exchange.sent[0].headers["SOAPAction"] == (
        f'"http://schemas.microsoft.com/exchange/services/2006/messages/{operation}"'
    )


def test_the_request_id_is_forwarded_upstream() -> None:
    exchange = RecordedExchange(recorded("disconnect_success.xml"))
    client_for(exchange).disconnect_call(CALL_ID, request_id="req-42")
    assert exchange.sent[0].headers["X-Request-ID"] == "req-42"


@pytest.mark.parametrize("version", ["Exchange2010", "Exchange2013_SP1", "V2017_07_11"])
def test_request_server_version_is_the_configured_version(version: str) -> None:
    exchange = RecordedExchange(recorded("disconnect_success.xml"))
    EwsClient(exchange, server_version=version).disconnect_call(CALL_ID, request_id=REQUEST_ID)
    versions = exchange.envelope.findall(f"{SOAP}Header/{T}RequestServerVersion")
    assert [element.get("Version") for element in versions] == [version]


@pytest.mark.parametrize(
    ("operation", "fixture"),
    [
        (wire.DISCONNECT_PHONE_CALL, "disconnect_success.xml"),
        (wire.GET_PHONE_CALL_INFORMATION, "get_call_information_with_sip.xml"),
    ],
)
def test_the_phone_call_id_is_sent_in_the_messages_namespace(operation: str, fixture: str) -> None:
    exchange = RecordedExchange(recorded(fixture))
    call(client_for(exchange), operation)
    request = exchange.envelope.find(f"{SOAP}Body/{M}{operation}")
    assert request is not None
    assert [(child.tag, child.get("Id")) for child in request] == [(f"{M}PhoneCallId", CALL_ID)]


def test_play_on_phone_sends_the_item_id_change_key_and_dial_string() -> None:
    exchange = RecordedExchange(recorded("play_on_phone_success.xml"))
    client_for(exchange).play_on_phone(
        ITEM_ID, DIAL_STRING, request_id=REQUEST_ID, change_key="CQAAABYAAAA"
    )
    request = exchange.envelope.find(f"{SOAP}Body/{M}PlayOnPhone")
    assert request is not None
    item_id, dial_string = request
    assert item_id.tag == f"{M}ItemId"
    assert dict(item_id.attrib) == {"Id": ITEM_ID, "ChangeKey": "CQAAABYAAAA"}
    assert (dial_string.tag, dial_string.text) == (f"{M}DialString", DIAL_STRING)


def test_play_on_phone_without_a_change_key_sends_no_change_key_attribute() -> None:
    exchange = RecordedExchange(recorded("play_on_phone_success.xml"))
    client_for(exchange).play_on_phone(ITEM_ID, DIAL_STRING, request_id=REQUEST_ID)
    item_id = exchange.envelope.find(f"{SOAP}Body/{M}PlayOnPhone/{M}ItemId")
    assert item_id is not None
    assert dict(item_id.attrib) == {"Id": ITEM_ID}


@pytest.mark.parametrize("impersonation_id", sorted(MAILBOX_IDS))
@pytest.mark.parametrize("operation", wire.OPERATIONS)
def test_impersonation_names_the_mailbox_by_the_configured_id_type_alone(
    operation: str, impersonation_id: str
) -> None:
    mailbox, element = MAILBOX_IDS[impersonation_id]
    exchange = RecordedExchange(error_response(operation, "ErrorInvalidPhoneCallId"))
    with pytest.raises(CallNotFound):
        call(client_for(exchange, impersonation_id=impersonation_id), operation, mailbox=mailbox)
    connecting_sid = exchange.envelope.find(
        f"{SOAP}Header/{T}ExchangeImpersonation/{T}ConnectingSID"
    )
    assert connecting_sid is not None
    assert [(child.tag, child.text) for child in connecting_sid] == [(f"{T}{element}", mailbox)]


def test_by_default_the_mailbox_is_named_by_smtp_address_never_primary_smtp_address() -> None:
    exchange = RecordedExchange(recorded("disconnect_success.xml"))
    EwsClient(exchange, server_version="Exchange2010").disconnect_call(
        CALL_ID, request_id=REQUEST_ID, mailbox=MAILBOX
    )
    assert exchange.envelope.findtext(f".//{T}ConnectingSID/{T}SmtpAddress") == MAILBOX
    assert b"PrimarySmtpAddress" not in exchange.sent[0].body


def test_an_unknown_impersonation_id_type_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="primary"):
        EwsClient(RecordedExchange(), server_version="Exchange2010", impersonation_id="primary")


@pytest.mark.parametrize("operation", wire.OPERATIONS)
def test_without_a_mailbox_no_impersonation_header_is_sent(operation: str) -> None:
    exchange = RecordedExchange(error_response(operation, "ErrorInvalidPhoneCallId"))
    with pytest.raises(CallNotFound):
        call(client_for(exchange), operation)
    assert exchange.envelope.find(f".//{T}ExchangeImpersonation") is None
    assert b"ExchangeImpersonation" not in exchange.sent[0].body


@pytest.mark.parametrize("operation", wire.OPERATIONS)
def test_envelopes_use_the_http_namespaces_never_https(operation: str) -> None:
    exchange = RecordedExchange(error_response(operation, "ErrorInvalidPhoneCallId"))
    with pytest.raises(CallNotFound):
        call(client_for(exchange), operation, mailbox=MAILBOX)
    envelope = exchange.envelope
    assert b"https://" not in exchange.sent[0].body
    assert envelope.tag == f"{SOAP}Envelope"
    namespaces = {etree.QName(element).namespace for element in envelope.iter()}
    assert namespaces == {wire.SOAP_ENV_NS, wire.MESSAGES_NS, wire.TYPES_NS}


def test_a_call_id_with_xml_special_characters_reaches_exchange_unchanged() -> None:
    call_id = "a&b<c>d\"e'f]]>g"
    exchange = RecordedExchange(recorded("disconnect_success.xml"))
    client_for(exchange).disconnect_call(call_id, request_id=REQUEST_ID)
    phone_call_id = exchange.envelope.find(f"{SOAP}Body/{M}DisconnectPhoneCall/{M}PhoneCallId")
    assert phone_call_id is not None
    assert phone_call_id.get("Id") == call_id


@st.composite
def call_ids(draw: st.DrawFn) -> str:
    return draw(
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=512)
    )


@pytest.fixture(scope="module")
def envelope_builder() -> EwsClient:
    return EwsClient(RecordedExchange(), server_version="Exchange2010")


@settings(max_examples=200, deadline=None)
@given(call_id=call_ids())
def test_any_valid_call_id_round_trips_through_the_envelope(
    envelope_builder: EwsClient, call_id: str
) -> None:
    envelope = envelope_builder.build_envelope(
        wire.DISCONNECT_PHONE_CALL, {"PhoneCallId": {"Id": call_id}}
    )
    root = etree.fromstring(envelope)
    ids = root.findall(f"{SOAP}Body/{M}DisconnectPhoneCall/{M}PhoneCallId")
    assert [element.get("Id") for element in ids] == [call_id]
    if schema_available():
        assert_envelope_valid(envelope)


# Conformance with the real EWS schema.

ENVELOPE_CASES = {
    "disconnect": (wire.DISCONNECT_PHONE_CALL, {"PhoneCallId": {"Id": CALL_ID}}),
    "get-information": (wire.GET_PHONE_CALL_INFORMATION, {"PhoneCallId": {"Id": CALL_ID}}),
    "play": (wire.PLAY_ON_PHONE, {"ItemId": {"Id": ITEM_ID}, "DialString": DIAL_STRING}),
    "play-with-change-key": (
        wire.PLAY_ON_PHONE,
        {"ItemId": {"Id": ITEM_ID, "ChangeKey": "CQAAABYAAAA"}, "DialString": DIAL_STRING},
    ),
}


@requires_schema
@pytest.mark.parametrize("impersonation_id", [None, *sorted(MAILBOX_IDS)])
@pytest.mark.parametrize("case", sorted(ENVELOPE_CASES))
def test_envelopes_are_valid_against_the_ews_schema(
    case: str, impersonation_id: str | None
) -> None:
    operation, body = ENVELOPE_CASES[case]
    mailbox = None if impersonation_id is None else MAILBOX_IDS[impersonation_id][0]
    client = EwsClient(
        RecordedExchange(),
        server_version="Exchange2010",
        impersonation_id=impersonation_id or "smtp",
    )
    assert_envelope_valid(client.build_envelope(operation, body, mailbox))


@requires_schema
@pytest.mark.parametrize(
    ("original", "broken"),
    [
        (b"<m:PhoneCallId", b"<t:PhoneCallId"),
        (b'Version="Exchange2010"', b'Version="Exchange2019"'),
        (b"<t:SmtpAddress>user@example.com<", b"<t:SmtpAddress><"),
        (b"<t:SmtpAddress>user@example.com</t:SmtpAddress>", b"<t:Smtp>user@example.com</t:Smtp>"),
    ],
)
def test_the_schema_check_rejects_envelopes_exchange_would_refuse(
    envelope_builder: EwsClient, original: bytes, broken: bytes
) -> None:
    envelope = envelope_builder.build_envelope(
        wire.DISCONNECT_PHONE_CALL, {"PhoneCallId": {"Id": CALL_ID}}, MAILBOX
    )
    assert original in envelope
    with pytest.raises(AssertionError, match="not schema-valid"):
        assert_envelope_valid(envelope.replace(original, broken))


@requires_schema
@pytest.mark.parametrize(
    "answer",
    [
        "disconnect_success.xml",
        "disconnect_warning.xml",
        "disconnect_server_busy_in_band.xml",
        "play_on_phone_success.xml",
        "play_on_phone_without_call_id.xml",
        "get_call_information_with_sip.xml",
        "get_call_information_without_sip.xml",
    ],
)
def test_recorded_answers_are_valid_against_the_ews_schema(answer: str) -> None:
    assert_envelope_valid(recorded(answer))


@requires_schema
@pytest.mark.parametrize(
    "code",
    [
        *sorted(set(MAPPED_CODES) - NEWER_THAN_SCHEMA),
        "ErrorSchemaValidation",
        "ErrorInvalidRequest",
    ],
)
@pytest.mark.parametrize("operation", wire.OPERATIONS)
def test_recorded_error_answers_are_valid_against_the_ews_schema(operation: str, code: str) -> None:
    assert_envelope_valid(error_response(operation, code))


# Successful answers.


def test_a_disconnect_success_is_no_error_without_warning(observer: ObserverRecorder) -> None:
    exchange = RecordedExchange(recorded("disconnect_success.xml"))
    result = client_for(exchange, observer).disconnect_call(CALL_ID, request_id=REQUEST_ID)
    assert result == Disconnected(ews_code="NoError", warning=None)
    assert_observed(observer, wire.DISCONNECT_PHONE_CALL, "success", "NoError")


def test_play_on_phone_returns_the_new_call_id(observer: ObserverRecorder) -> None:
    exchange = RecordedExchange(recorded("play_on_phone_success.xml"))
    result = client_for(exchange, observer).play_on_phone(
        ITEM_ID, DIAL_STRING, request_id=REQUEST_ID
    )
    assert result == PlacedCall(call_id=CALL_ID, ews_code="NoError", warning=None)
    assert_observed(observer, wire.PLAY_ON_PHONE, "success", "NoError")


def test_call_information_carries_state_cause_and_sip_response(observer: ObserverRecorder) -> None:
    exchange = RecordedExchange(recorded("get_call_information_with_sip.xml"))
    result = client_for(exchange, observer).get_call_information(CALL_ID, request_id=REQUEST_ID)
    assert result == CallInformation(
        state="Disconnected",
        connection_failure_cause="UserBusy",
        sip_response_code=486,
        sip_response_text="Busy Here",
        ews_code="NoError",
    )
    assert_observed(observer, wire.GET_PHONE_CALL_INFORMATION, "success", "NoError")


def test_call_information_without_sip_fields_has_none_for_them() -> None:
    exchange = RecordedExchange(recorded("get_call_information_without_sip.xml"))
    result = client_for(exchange).get_call_information(CALL_ID, request_id=REQUEST_ID)
    assert result == CallInformation(
        state="Connected",
        connection_failure_cause="None",
        sip_response_code=None,
        sip_response_text=None,
        ews_code="NoError",
    )


def test_a_warning_succeeds_and_passes_the_message_text_on(observer: ObserverRecorder) -> None:
    exchange = RecordedExchange(recorded("disconnect_warning.xml"))
    result = client_for(exchange, observer).disconnect_call(CALL_ID, request_id=REQUEST_ID)
    assert result == Disconnected(
        ews_code="NoError",
        warning="The phone call had already ended when the disconnect request arrived.",
    )
    assert_observed(observer, wire.DISCONNECT_PHONE_CALL, "success", "NoError")


# Errors Exchange reports in the response message (ResponseClass="Error").


def test_the_gateway_maps_exactly_the_codes_the_contract_lists() -> None:
    assert set(ERROR_BY_RESPONSE_CODE) == set(CONTRACT_ERRORS)


@pytest.mark.parametrize("code", MAPPED_CODES)
@pytest.mark.parametrize("operation", wire.OPERATIONS)
def test_an_in_band_error_code_maps_to_the_contract_status(
    observer: ObserverRecorder, operation: str, code: str
) -> None:
    error_class, status = CONTRACT_ERRORS[code]
    exchange = RecordedExchange(error_response(operation, code, "Exchange explains why."))
    error = failure(exchange, observer, operation)
    # Throttled or transient: every 503 tells the caller when to come back.
    retry_after_s = DEFAULT_RETRY_AFTER_S if status == 503 else None
    assert_error(
        error,
        error_class,
        status=status,
        outcome="ews_error",
        ews_code=code,
        retry_after_s=retry_after_s,
    )
    assert "Exchange explains why." in error.detail
    assert_observed(observer, operation, "ews_error", code)


@pytest.mark.parametrize("code", ["ErrorInvalidRequest", "ErrorSchemaValidation", "ErrorNewCode"])
def test_an_unmapped_in_band_code_is_502_and_names_the_code(
    observer: ObserverRecorder, code: str
) -> None:
    exchange = RecordedExchange(error_response(wire.DISCONNECT_PHONE_CALL, code))
    error = failure(exchange, observer, wire.DISCONNECT_PHONE_CALL)
    assert_error(error, ExchangeReportedError, status=502, outcome="ews_error", ews_code=code)
    assert_observed(observer, wire.DISCONNECT_PHONE_CALL, "ews_error", code)


def test_an_in_band_server_busy_tells_the_caller_the_back_off_rounded_up(
    observer: ObserverRecorder,
) -> None:
    exchange = RecordedExchange(recorded("disconnect_server_busy_in_band.xml"))
    error = failure(exchange, observer, wire.DISCONNECT_PHONE_CALL)
    assert_error(
        error,
        ExchangeBusy,
        status=503,
        outcome="ews_error",
        ews_code="ErrorServerBusy",
        retry_after_s=298,
    )
    assert_observed(observer, wire.DISCONNECT_PHONE_CALL, "ews_error", "ErrorServerBusy")


@pytest.mark.parametrize(("back_off_ms", "retry_after_s"), [("3000", 3), ("3001", 4), ("1", 1)])
def test_the_back_off_is_rounded_up_to_whole_seconds(back_off_ms: str, retry_after_s: int) -> None:
    body = recorded("disconnect_server_busy_in_band.xml").replace(b"297749", back_off_ms.encode())
    error = failure(RecordedExchange(body), ObserverRecorder(), wire.DISCONNECT_PHONE_CALL)
    assert isinstance(error, ExchangeBusy)
    assert error.retry_after_s == retry_after_s


def test_a_long_message_text_is_cut_short_in_the_detail() -> None:
    exchange = RecordedExchange(
        error_response(wire.DISCONNECT_PHONE_CALL, "ErrorInvalidPhoneCallId", "x" * 5000)
    )
    error = failure(exchange, ObserverRecorder(), wire.DISCONNECT_PHONE_CALL)
    assert isinstance(error, CallNotFound)
    assert "x" * 300 in error.detail
    assert "x" * 301 not in error.detail


# SOAP faults (HTTP 500).


@pytest.mark.parametrize("code", MAPPED_CODES)
def test_a_fault_code_maps_to_the_contract_status(observer: ObserverRecorder, code: str) -> None:
    error_class, status = CONTRACT_ERRORS[code]
    exchange = RecordedExchange(fault(code), status=500)
    error = failure(exchange, observer, wire.DISCONNECT_PHONE_CALL)
    # Throttled or transient: every 503 tells the caller when to come back.
    retry_after_s = DEFAULT_RETRY_AFTER_S if status == 503 else None
    assert_error(
        error,
        error_class,
        status=status,
        outcome="soap_fault",
        ews_code=code,
        retry_after_s=retry_after_s,
    )
    assert_observed(observer, wire.DISCONNECT_PHONE_CALL, "soap_fault", code)


def test_a_server_busy_fault_tells_the_caller_the_back_off_rounded_up(
    observer: ObserverRecorder,
) -> None:
    exchange = RecordedExchange(recorded("fault_server_busy.xml"), status=500)
    error = failure(exchange, observer, wire.PLAY_ON_PHONE)
    assert_error(
        error,
        ExchangeBusy,
        status=503,
        outcome="soap_fault",
        ews_code="ErrorServerBusy",
        retry_after_s=298,
    )
    assert_observed(observer, wire.PLAY_ON_PHONE, "soap_fault", "ErrorServerBusy")


def test_a_fault_with_an_unmapped_code_is_502_and_names_the_code(
    observer: ObserverRecorder,
) -> None:
    exchange = RecordedExchange(recorded("fault_schema_validation.xml"), status=500)
    error = failure(exchange, observer, wire.DISCONNECT_PHONE_CALL)
    assert_error(
        error,
        ExchangeReportedError,
        status=502,
        outcome="soap_fault",
        ews_code="ErrorSchemaValidation",
    )
    assert_observed(observer, wire.DISCONNECT_PHONE_CALL, "soap_fault", "ErrorSchemaValidation")


def test_a_fault_without_detail_is_mapped_by_the_faultcode_local_name(
    observer: ObserverRecorder,
) -> None:
    exchange = RecordedExchange(recorded("fault_access_denied_without_detail.xml"), status=500)
    error = failure(exchange, observer, wire.GET_PHONE_CALL_INFORMATION)
    assert_error(
        error, ExchangeAccessDenied, status=403, outcome="soap_fault", ews_code="ErrorAccessDenied"
    )
    assert_observed(observer, wire.GET_PHONE_CALL_INFORMATION, "soap_fault", "ErrorAccessDenied")


def test_the_detail_response_code_wins_over_the_faultcode() -> None:
    body = fault("ErrorServerBusy").replace(
        b"a:ErrorServerBusy</faultcode>", b"a:ErrorInternalServerError</faultcode>"
    )
    error = failure(RecordedExchange(body, status=500), ObserverRecorder(), "DisconnectPhoneCall")
    assert_error(
        error,
        ExchangeBusy,
        status=503,
        outcome="soap_fault",
        ews_code="ErrorServerBusy",
        retry_after_s=DEFAULT_RETRY_AFTER_S,
    )


# HTTP statuses without a SOAP answer.


@pytest.mark.parametrize("status", [401, 403])
def test_exchange_refusing_the_service_credentials_is_502_not_401(
    observer: ObserverRecorder, status: int
) -> None:
    exchange = RecordedExchange(b"", status=status, content_type="text/html")
    error = failure(exchange, observer, wire.DISCONNECT_PHONE_CALL)
    assert_error(error, ExchangeAuthFailed, status=502, outcome="http_error", ews_code=None)
    assert_observed(observer, wire.DISCONNECT_PHONE_CALL, "http_error", None)


def test_http_503_with_retry_after_is_503_and_passes_the_wait_on(
    observer: ObserverRecorder,
) -> None:
    exchange = RecordedExchange(
        recorded("service_unavailable_503.html"),
        status=503,
        content_type="text/html; charset=us-ascii",
        retry_after="120",
    )
    error = failure(exchange, observer, wire.DISCONNECT_PHONE_CALL)
    assert_error(
        error,
        ExchangeUnavailable,
        status=503,
        outcome="http_error",
        ews_code=None,
        retry_after_s=120,
    )
    assert_observed(observer, wire.DISCONNECT_PHONE_CALL, "http_error", None)


def test_http_503_without_retry_after_is_503() -> None:
    exchange = RecordedExchange(
        recorded("service_unavailable_503.html"), status=503, content_type="text/html"
    )
    error = failure(exchange, ObserverRecorder(), wire.GET_PHONE_CALL_INFORMATION)
    assert_error(error, ExchangeUnavailable, status=503, outcome="http_error", ews_code=None)
    assert "<" not in error.detail
    assert "The service is unavailable" not in error.detail


def test_http_500_with_an_html_error_page_is_503_without_the_html(
    observer: ObserverRecorder,
) -> None:
    exchange = RecordedExchange(recorded("iis_500.html"), status=500, content_type="text/html")
    error = failure(exchange, observer, wire.PLAY_ON_PHONE)
    assert_error(error, ExchangeUnavailable, status=503, outcome="http_error", ews_code=None)
    assert "<" not in error.detail
    assert "There is a problem with the resource" not in error.detail
    assert_observed(observer, wire.PLAY_ON_PHONE, "http_error", None)


def test_a_redirect_is_502_and_is_not_followed(observer: ObserverRecorder) -> None:
    location = "https://mail.example.com/owa/auth/errorfe.aspx?httpCode=500"
    exchange = RecordedExchange(
        recorded("owa_error_redirect.html"),
        status=302,
        content_type="text/html; charset=utf-8",
        location=location,
    )
    error = failure(exchange, observer, wire.DISCONNECT_PHONE_CALL)
    assert_error(error, ExchangeBadAnswer, status=502, outcome="http_error", ews_code=None)
    assert len(exchange.sent) == 1
    assert location not in error.detail
    assert_observed(observer, wire.DISCONNECT_PHONE_CALL, "http_error", None)


@pytest.mark.parametrize("status", [400, 404])
def test_a_proxy_error_status_is_502(observer: ObserverRecorder, status: int) -> None:
    exchange = RecordedExchange(b"<html><body>Not here</body></html>", status=status)
    error = failure(exchange, observer, wire.DISCONNECT_PHONE_CALL)
    assert_error(error, ExchangeBadAnswer, status=502, outcome="http_error", ews_code=None)
    assert_observed(observer, wire.DISCONNECT_PHONE_CALL, "http_error", None)


# Answers the gateway cannot read.


@pytest.mark.parametrize(
    ("answer", "operation"),
    [
        ("not_soap.xml", wire.DISCONNECT_PHONE_CALL),
        ("truncated_envelope.xml", wire.DISCONNECT_PHONE_CALL),
        ("soap12_envelope.xml", wire.DISCONNECT_PHONE_CALL),
        ("iis_500.html", wire.DISCONNECT_PHONE_CALL),
        ("play_on_phone_response_to_disconnect.xml", wire.DISCONNECT_PHONE_CALL),
        ("play_on_phone_without_call_id.xml", wire.DISCONNECT_PHONE_CALL),
        ("disconnect_success.xml", wire.PLAY_ON_PHONE),
        ("disconnect_success.xml", wire.GET_PHONE_CALL_INFORMATION),
        ("play_on_phone_without_call_id.xml", wire.PLAY_ON_PHONE),
    ],
)
def test_an_unreadable_200_answer_is_502_invalid_response(
    observer: ObserverRecorder, answer: str, operation: str
) -> None:
    exchange = RecordedExchange(recorded(answer))
    error = failure(exchange, observer, operation)
    assert_error(error, ExchangeBadAnswer, status=502, outcome="invalid_response", ews_code=None)
    assert_observed(observer, operation, "invalid_response", None)


def test_an_empty_200_answer_is_502_invalid_response() -> None:
    error = failure(RecordedExchange(b""), ObserverRecorder(), wire.DISCONNECT_PHONE_CALL)
    assert_error(error, ExchangeBadAnswer, status=502, outcome="invalid_response", ews_code=None)


def test_call_information_without_phone_call_information_is_502(
    observer: ObserverRecorder,
) -> None:
    body = recorded("get_call_information_without_sip.xml")
    start, end = body.index(b"<m:PhoneCallInformation>"), body.index(b"</m:PhoneCallInformation>")
    body = body[:start] + body[end + len(b"</m:PhoneCallInformation>") :]
    error = failure(RecordedExchange(body), observer, wire.GET_PHONE_CALL_INFORMATION)
    assert_error(error, ExchangeBadAnswer, status=502, outcome="invalid_response", ews_code=None)
    assert_observed(observer, wire.GET_PHONE_CALL_INFORMATION, "invalid_response", None)


def test_a_billion_laughs_answer_is_refused_without_expanding_entities(
    observer: ObserverRecorder,
) -> None:
    exchange = RecordedExchange(recorded("billion_laughs.xml"))
    error = failure(exchange, observer, wire.DISCONNECT_PHONE_CALL)
    # Expanded, the entities would turn this into a 404 whose detail is full of "lol".
    assert_error(error, ExchangeBadAnswer, status=502, outcome="invalid_response", ews_code=None)
    assert "lol" not in error.detail
    assert_observed(observer, wire.DISCONNECT_PHONE_CALL, "invalid_response", None)


def test_an_external_entity_is_never_resolved(observer: ObserverRecorder, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-4711", encoding="utf-8")
    exchange = RecordedExchange(recorded("external_entity.xml", secret_url=secret.as_uri()))
    error = failure(exchange, observer, wire.DISCONNECT_PHONE_CALL)
    # Resolved, the entity would make this a 404 whose detail quotes the file.
    assert_error(error, ExchangeBadAnswer, status=502, outcome="invalid_response", ews_code=None)
    assert "TOP-SECRET" not in str(error)
    assert_observed(observer, wire.DISCONNECT_PHONE_CALL, "invalid_response", None)
