"""Envelopes from templates are byte for byte what zeep serializes, whatever the values."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lxml import etree

from gateway import wire
from gateway.exchange.envelopes import CONNECTING_SID, EnvelopeBuilder

M = f"{{{wire.MESSAGES_NS}}}"
T = f"{{{wire.TYPES_NS}}}"

# Printable ASCII (templated) and any text an XML document can hold (serialized by zeep).
printable_ascii = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1)
xml_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]) | st.sampled_from("\t\n\r"),
    min_size=1,
)
values = printable_ascii | xml_text
impersonation_ids = st.sampled_from(sorted(CONNECTING_SID))

Builders = dict[str, EnvelopeBuilder]


@pytest.fixture(scope="module")
def builders() -> Builders:
    """One builder for each EWS_IMPERSONATION_ID, each with its own templates."""
    return {kind: EnvelopeBuilder("Exchange2013", kind) for kind in CONNECTING_SID}


@pytest.fixture(scope="module")
def builder(builders: Builders) -> EnvelopeBuilder:
    return builders["smtp"]


@settings(max_examples=400, deadline=None)
@given(call_id=values, mailbox=st.none() | values, impersonation_id=impersonation_ids)
@example(call_id="<&>\"'", mailbox="a&b<c>@example.com", impersonation_id="smtp")
@example(call_id="<&>\"'", mailbox="a&b<c>@corp.example.com", impersonation_id="upn")
@example(call_id="ewsgatewayslot0end", mailbox="ewsgatewayslot1end", impersonation_id="sid")
@example(call_id="&amp;]]>", mailbox=None, impersonation_id="smtp")
def test_call_id_operations_match_zeep(
    builders: Builders, call_id: str, mailbox: str | None, impersonation_id: str
) -> None:
    builder = builders[impersonation_id]
    for operation in (wire.DISCONNECT_PHONE_CALL, wire.GET_PHONE_CALL_INFORMATION):
        body = {"PhoneCallId": {"Id": call_id}}
        envelope = builder.build(operation, body, mailbox)
        assert envelope == builder.serialize(operation, body, mailbox)


@settings(max_examples=400, deadline=None)
@given(
    item_id=values,
    change_key=st.none() | values,
    dial_string=values,
    mailbox=st.none() | values,
    impersonation_id=impersonation_ids,
)
@example(
    item_id='"quoted"',
    change_key="<ck>",
    dial_string="+49 & <30>",
    mailbox=None,
    impersonation_id="smtp",
)
def test_play_on_phone_matches_zeep(
    builders: Builders,
    item_id: str,
    change_key: str | None,
    dial_string: str,
    mailbox: str | None,
    impersonation_id: str,
) -> None:
    builder = builders[impersonation_id]
    body = {"ItemId": {"Id": item_id, "ChangeKey": change_key}, "DialString": dial_string}
    envelope = builder.build(wire.PLAY_ON_PHONE, body, mailbox)
    assert envelope == builder.serialize(wire.PLAY_ON_PHONE, body, mailbox)


def test_values_land_in_their_own_places_whatever_the_shape(builder: EnvelopeBuilder) -> None:
    for change_key in ("ck-1", None):
        for mailbox in ("someone@example.com", None):
            body = {"ItemId": {"Id": "item-1", "ChangeKey": change_key}, "DialString": "+4930"}
            root = etree.fromstring(builder.build(wire.PLAY_ON_PHONE, body, mailbox))

            item = root.find(f".//{M}PlayOnPhone/{M}ItemId")
            assert item is not None
            assert (item.get("Id"), item.get("ChangeKey")) == ("item-1", change_key)
            assert root.findtext(f".//{M}PlayOnPhone/{M}DialString") == "+4930"
            assert root.findtext(f".//{T}ConnectingSID/{T}SmtpAddress") == mailbox


def test_one_template_serves_different_values(builder: EnvelopeBuilder) -> None:
    first = builder.build(wire.DISCONNECT_PHONE_CALL, {"PhoneCallId": {"Id": "first"}})
    second = builder.build(wire.DISCONNECT_PHONE_CALL, {"PhoneCallId": {"Id": "second"}})
    assert first.replace(b'"first"', b'"second"') == second


@settings(max_examples=200, deadline=None)
@given(mailbox=values, impersonation_id=impersonation_ids)
@example(mailbox="a&b<c>]]>@example.com", impersonation_id="smtp")
@example(mailbox="S-1-5-21-1&<>", impersonation_id="sid")
def test_the_mailbox_reads_back_unchanged_from_its_connecting_sid_child(
    builders: Builders, mailbox: str, impersonation_id: str
) -> None:
    envelope = builders[impersonation_id].build(
        wire.DISCONNECT_PHONE_CALL, {"PhoneCallId": {"Id": "call-1"}}, mailbox
    )
    connecting_sid = etree.fromstring(envelope).find(f".//{T}ConnectingSID")
    assert connecting_sid is not None
    (child,) = connecting_sid
    assert child.tag == f"{T}{CONNECTING_SID[impersonation_id]}"
    assert child.text == mailbox
