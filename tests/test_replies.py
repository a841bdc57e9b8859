"""Reading Exchange's answers: the gateway reads what zeep's WSDL-driven parser reads.

zeep's `process_reply` is the reference reading of a response message; the
gateway reads the same fields by their schema paths. These tests hold the two
to the same values for every recorded answer and for generated ones.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import zeep
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from gateway import wire
from gateway.errors import ExchangeBadAnswer
from gateway.exchange import replies
from gateway.exchange.transport import ExchangeReply
from gateway.simulator.calls import Phase
from gateway.simulator.envelopes import OperationResult, SipResponse, operation_response

FIXTURES = Path(__file__).parent / "fixtures"
RECORDED_SUCCESSES = {
    "disconnect_success.xml": wire.DISCONNECT_PHONE_CALL,
    "disconnect_warning.xml": wire.DISCONNECT_PHONE_CALL,
    "play_on_phone_success.xml": wire.PLAY_ON_PHONE,
    "get_call_information_with_sip.xml": wire.GET_PHONE_CALL_INFORMATION,
    "get_call_information_without_sip.xml": wire.GET_PHONE_CALL_INFORMATION,
}


@pytest.fixture(scope="module")
def zeep_binding() -> Any:
    wsdl = resources.files("gateway").joinpath("wsdl/um.wsdl")
    with resources.as_file(wsdl) as path:
        client = zeep.Client(str(path))
    return next(iter(client.wsdl.bindings.values()))


def reply_of(body: bytes, status: int = 200) -> ExchangeReply:
    return ExchangeReply(
        status=status,
        content_type="text/xml; charset=utf-8",
        retry_after=None,
        location=None,
        body=body,
    )


def gateway_reading(operation: str, body: bytes) -> dict[str, Any]:
    """The fields the gateway passes on, as it reads them."""
    answer = replies.read_ews_answer(operation, reply_of(body))
    fields: dict[str, Any] = {"code": answer.code, "warning": answer.warning}
    if operation == wire.PLAY_ON_PHONE:
        fields["call_id"] = replies.placed_call(answer).call_id
    if operation == wire.GET_PHONE_CALL_INFORMATION:
        info = replies.call_information(answer)
        fields["call"] = (
            info.state,
            info.connection_failure_cause,
            info.sip_response_code,
            info.sip_response_text,
        )
    return fields


def zeep_reading(binding: Any, operation: str, body: bytes) -> dict[str, Any]:
    """The same fields as zeep's WSDL-driven parser reads them."""
    message = binding.get(operation).process_reply(etree.fromstring(body))
    code = message["ResponseCode"].strip()
    text = (message["MessageText"] or "").strip()
    fields: dict[str, Any] = {
        "code": code,
        "warning": (text or code) if message["ResponseClass"] == "Warning" else None,
    }
    if operation == wire.PLAY_ON_PHONE:
        fields["call_id"] = message["PhoneCallId"]["Id"]
    if operation == wire.GET_PHONE_CALL_INFORMATION:
        info = message["PhoneCallInformation"]
        fields["call"] = (
            info["PhoneCallState"],
            info["ConnectionFailureCause"],
            info["SIPResponseCode"],
            info["SIPResponseText"],
        )
    return fields


@pytest.mark.parametrize(("fixture", "operation"), RECORDED_SUCCESSES.items())
def test_recorded_answers_read_as_zeep_reads_them(
    zeep_binding: Any, fixture: str, operation: str
) -> None:
    body = (FIXTURES / fixture).read_bytes()
    assert gateway_reading(operation, body) == zeep_reading(zeep_binding, operation, body)


# Text as Exchange may write it in an answer (no control characters).
answer_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1)
phases = st.builds(
    Phase,
    after_steps=st.just(0),
    state=st.sampled_from(wire.PHONE_CALL_STATES),
    failure_cause=st.sampled_from(wire.CONNECTION_FAILURE_CAUSES),
)
sip_responses = st.none() | st.builds(
    SipResponse,
    code=st.none() | st.integers(min_value=100, max_value=699),
    text=st.none() | answer_text,
)


@st.composite
def answers(draw: st.DrawFn) -> tuple[str, bytes]:
    """A Success or Warning answer to a random operation, with that operation's fields."""
    operation = draw(st.sampled_from(wire.OPERATIONS))
    result = OperationResult(
        response_class=draw(st.sampled_from(["Success", "Warning"])),
        message_text=draw(st.none() | answer_text),
        phone_call_id=draw(answer_text) if operation == wire.PLAY_ON_PHONE else None,
        phase=draw(phases) if operation == wire.GET_PHONE_CALL_INFORMATION else None,
        sip=draw(sip_responses) if operation == wire.GET_PHONE_CALL_INFORMATION else None,
    )
    return operation, operation_response(operation, result)


@settings(max_examples=300, deadline=None)
@given(answer=answers())
def test_generated_answers_read_as_zeep_reads_them(
    zeep_binding: Any, answer: tuple[str, bytes]
) -> None:
    operation, body = answer
    assert gateway_reading(operation, body) == zeep_reading(zeep_binding, operation, body)


def test_a_sip_response_code_that_is_not_a_number_is_an_invalid_answer() -> None:
    body = operation_response(
        wire.GET_PHONE_CALL_INFORMATION,
        OperationResult(
            phase=Phase(0, "Disconnected", "UserBusy"), sip=SipResponse(486, "Busy Here")
        ),
    ).replace(b">486<", b">busy<")
    answer = replies.read_ews_answer(wire.GET_PHONE_CALL_INFORMATION, reply_of(body))
    with pytest.raises(ExchangeBadAnswer) as raised:
        replies.call_information(answer)
    assert raised.value.outcome == "invalid_response"


def test_call_information_without_a_state_is_an_invalid_answer() -> None:
    body = operation_response(
        wire.GET_PHONE_CALL_INFORMATION, OperationResult(phase=Phase(0, "Connected"))
    )
    root = etree.fromstring(body)
    for state in root.iter(f"{{{wire.TYPES_NS}}}PhoneCallState"):
        state.getparent().remove(state)
    answer = replies.read_ews_answer(
        wire.GET_PHONE_CALL_INFORMATION, reply_of(etree.tostring(root))
    )
    with pytest.raises(ExchangeBadAnswer):
        replies.call_information(answer)
