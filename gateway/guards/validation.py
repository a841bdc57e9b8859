"""Rules for what a caller may send; nothing here knows HTTP or XML."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequest

# Printable ASCII without space: what an EWS phone-call id can be, and nothing
# that could need more than XML attribute escaping.
_OPAQUE_ID = re.compile(r"[\x21-\x7e]+")
MAX_CALL_ID_CHARS = 512
MAX_ITEM_ID_CHARS = 1024
MAX_CHANGE_KEY_CHARS = 512
# A dial string is a number (an optional leading '+', then digits and the DTMF keys) or a
# sip:/sips: URI of printable ASCII; gateway.guards.dialing refuses patterns outside both.
MAX_DIAL_KEYS = 32
MAX_SIP_URI_CHARS = 250
_DIAL_DIGITS = re.compile(rf"\+?[0-9*#]{{1,{MAX_DIAL_KEYS}}}")
_SIP_URI = re.compile(rf"sips?:[\x21-\x7e]{{1,{MAX_SIP_URI_CHARS}}}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

PLACE_CALL_FIELDS = frozenset({"itemId", "itemChangeKey", "dialString"})


def check_call_id(call_id: str) -> str:
    """Return the call id if it is 1-512 printable ASCII characters, else raise."""
    if not 1 <= len(call_id) <= MAX_CALL_ID_CHARS or not _OPAQUE_ID.fullmatch(call_id):
        raise InvalidRequest("callId must be 1 to 512 printable ASCII characters without spaces")
    return call_id


def is_sane_request_id(value: str) -> bool:
    """Tell whether a caller's X-Request-ID is safe to log and forward as is."""
    return bool(_REQUEST_ID.fullmatch(value))


@dataclass(frozen=True)
class PlaceCall:
    """A validated POST /calls body."""

    item_id: str
    dial_string: str
    item_change_key: str | None = None


def parse_place_call(body: Any) -> PlaceCall:
    """Validate a POST /calls JSON body; errors name the field at fault."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object with itemId and dialString")
    unknown = sorted(set(body) - PLACE_CALL_FIELDS)
    if unknown:
        raise InvalidRequest(
            f"unknown field {unknown[0]!r}; allowed: itemId, itemChangeKey, dialString"
        )
    item_id = _opaque_field(body, "itemId", MAX_ITEM_ID_CHARS, required=True)
    change_key = _opaque_field(body, "itemChangeKey", MAX_CHANGE_KEY_CHARS, required=False)
    dial_string = body.get("dialString")
    if not isinstance(dial_string, str):
        raise InvalidRequest("dialString is required and must be a string")
    if not (_DIAL_DIGITS.fullmatch(dial_string) or _SIP_URI.fullmatch(dial_string)):
        raise InvalidRequest(
            f"dialString must be up to {MAX_DIAL_KEYS} digits, '*' or '#' with an optional "
            f"leading '+', or a sip: URI of up to {MAX_SIP_URI_CHARS} characters"
        )
    assert item_id is not None
    return PlaceCall(item_id=item_id, dial_string=dial_string, item_change_key=change_key)


def _opaque_field(body: dict[str, Any], name: str, max_chars: int, *, required: bool) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} is required and must be a string")
    if not 1 <= len(value) <= max_chars or not _OPAQUE_ID.fullmatch(value):
        raise InvalidRequest(
            f"{name} must be 1 to {max_chars} printable ASCII characters without spaces"
        )
    return value
