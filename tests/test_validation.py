"""The caller-input rules in gateway.guards.validation, without HTTP."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.guards.validation import (
    PlaceCall,
    check_call_id,
    is_sane_request_id,
    parse_place_call,
)


def place_call_error(body: Any) -> str:
    with pytest.raises(InvalidRequest) as caught:
        parse_place_call(body)
    return caught.value.detail


# Request ids


@pytest.mark.parametrize(
    "request_id",
    ["abc-123", "a.b_c:d-e", uuid.uuid4().hex, str(uuid.uuid4()), "r" * 128, "0"],
)
def test_a_short_id_of_letters_digits_and_separators_is_sane(request_id: str) -> None:
    assert is_sane_request_id(request_id)


@pytest.mark.parametrize(
    "request_id",
    [
        "",
        "r" * 129,
        "abc 123",
        "abc<script>",
        "abc\n",
        "abc\r\nX-Evil: 1",
        "trace/1",
        "caf\u00e9",
        "\u0661\u0662",
        "id=1;2",
    ],
)
def test_an_id_with_anything_else_is_not_sane(request_id: str) -> None:
    assert not is_sane_request_id(request_id)


# Call ids


def test_an_accepted_call_id_is_returned_unchanged() -> None:
    assert check_call_id("AAMkADk0+NzI/ZTQ==") == "AAMkADk0+NzI/ZTQ=="


@pytest.mark.parametrize("call_id", ["", "abc\n", "\nabc", "a\u00a0b", "x" * 513, "\x7f"])
def test_a_call_id_outside_the_rules_raises_invalid_request_naming_call_id(call_id: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_call_id(call_id)

    assert "callId" in caught.value.detail


# Dial strings


def body_with(dial_string: Any) -> dict[str, Any]:
    return {"itemId": "item-1", "dialString": dial_string}


@pytest.mark.parametrize(
    "dial_string",
    [
        "0",
        "1" * 32,
        "+" + "1" * 32,
        "*86#",
        "#",
        "+15551234567",
        "sip:alice@example.com",
        "sips:alice@example.com;transport=tls",
        "sip:" + "a" * 250,
    ],
)
def test_a_valid_dial_string_is_kept_as_sent(dial_string: str) -> None:
    assert parse_place_call(body_with(dial_string)).dial_string == dial_string


@pytest.mark.parametrize(
    "dial_string",
    [
        "+",
        "++1555",
        "1555+",
        "+" + "1" * 33,
        "555-1234",
        "(555) 1234",
        "5551234\n",
        "\u0661\u0662\u0663",
        "\uff11\uff12\uff13",
        "sip:",
        "sip:" + "a" * 251,
        "sip:alice @example.com",
        "sip:al\u00efce@example.com",
        "tel:+15551234567",
        "mailto:alice@example.com",
    ],
)
def test_an_invalid_dial_string_is_rejected_naming_the_field(dial_string: str) -> None:
    assert "dialString" in place_call_error(body_with(dial_string))


# The POST /calls body as a whole


def test_a_complete_body_becomes_a_place_call_order() -> None:
    body = {"itemId": "AAMk=", "itemChangeKey": "CQAA", "dialString": "100"}

    assert parse_place_call(body) == PlaceCall(
        item_id="AAMk=", dial_string="100", item_change_key="CQAA"
    )


def test_a_null_change_key_counts_as_absent() -> None:
    body = {"itemId": "AAMk=", "itemChangeKey": None, "dialString": "100"}

    assert parse_place_call(body).item_change_key is None


def test_an_item_id_of_1024_characters_is_accepted() -> None:
    assert parse_place_call(body_with("100") | {"itemId": "i" * 1024}).item_id == "i" * 1024


def test_an_item_id_of_1025_characters_is_rejected() -> None:
    assert "itemId" in place_call_error(body_with("100") | {"itemId": "i" * 1025})


def test_the_first_unknown_field_is_named() -> None:
    body = body_with("100") | {"zeta": 1, "alpha": 2}

    assert "'alpha'" in place_call_error(body)
