"""Which caller a call belongs to: call ids the gateway signs for the caller that placed them.

A call id the gateway hands out is `gw1.<owner tag>.<mac>.<EWS id>`: the owner tag is an HMAC
of the caller's identity, the mac an HMAC binding that tag to the EWS id, both under the key
every replica shares (GATEWAY_CALL_ID_KEY). Any replica, before or after a restart, can tell
from the id alone whether a caller placed the call; no store is asked. The EWS id stays
readable at the end, so an operator can match a call id against Exchange's logs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from gateway.errors import CallNotFound, ExchangeBadAnswer
from gateway.guards.callers import Caller
from gateway.guards.validation import MAX_CALL_ID_CHARS

PREFIX = "gw1."
TAG_BYTES = 9  # 12 base64url characters
MAC_BYTES = 16  # 22 base64url characters: forging one takes 2**128 tries
TAG_CHARS = 12
MAC_CHARS = 22
# The longest EWS id whose wrapped form still fits the contract's 512 characters.
MAX_EWS_ID_CHARS = MAX_CALL_ID_CHARS - len(PREFIX) - TAG_CHARS - MAC_CHARS - 2
ANONYMOUS_OWNER = "anonymous"
# The one answer for any id the caller may not use: the same as for a call nobody placed.
NOT_FOUND_DETAIL = "no phone call with this id is known to the gateway for this caller"


def owner_of(caller: Caller) -> str:
    """Return the identity calls are bound to: the JWT subject or API key id, else anonymous."""
    return caller.subject or ANONYMOUS_OWNER


class CallIds:
    """Issue call ids bound to their caller, and check them on every later request."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the call id key must be at least 32 bytes")
        self._key = key

    def issue(self, ews_call_id: str, caller: Caller) -> str:
        """Wrap Exchange's call id for the caller that placed the call.

        Raises ExchangeBadAnswer when Exchange's id is too long to wrap within 512 characters.
        """
        if len(ews_call_id) > MAX_EWS_ID_CHARS:
            raise ExchangeBadAnswer(
                f"Exchange returned a call id longer than {MAX_EWS_ID_CHARS} characters"
            )
        tag = self._owner_tag(owner_of(caller))
        return f"{PREFIX}{tag}.{self._mac(tag, ews_call_id)}.{ews_call_id}"

    def ews_call_id(self, call_id: str, caller: Caller) -> str:
        """Return the EWS id behind CALL_ID if CALLER may act on the call, else raise CallNotFound.

        The one ownership check for every route that names a call (GET, DELETE, events).
        A caller may use ids the gateway issued to it. An operator (GATEWAY_OPERATOR_CLAIM,
        or everyone under GATEWAY_AUTH=none) may use any id the gateway issued, and any other
        id as a raw EWS id: calls placed elsewhere, such as Outlook Web App's Play on Phone.
        Everything else gets the same 404 as an unknown call, so existence does not leak.
        """
        parts = self._verified_parts(call_id)
        if parts is not None:
            tag, ews_id = parts
            if caller.operator or hmac.compare_digest(tag, self._owner_tag(owner_of(caller))):
                return ews_id
        elif caller.operator:
            return call_id
        raise CallNotFound(NOT_FOUND_DETAIL)

    def _verified_parts(self, call_id: str) -> tuple[str, str] | None:
        """Return (owner tag, EWS id) of an id this gateway issued, else None."""
        if not call_id.startswith(PREFIX):
            return None
        tag, _, rest = call_id[len(PREFIX) :].partition(".")
        mac, _, ews_id = rest.partition(".")
        if len(tag) != TAG_CHARS or len(mac) != MAC_CHARS or not ews_id:
            return None
        if not hmac.compare_digest(mac, self._mac(tag, ews_id)):
            return None
        return tag, ews_id

    def _owner_tag(self, owner: str) -> str:
        return _digest(self._key, b"owner\0" + owner.encode("utf-8"), TAG_BYTES)

    def _mac(self, tag: str, ews_id: str) -> str:
        return _digest(self._key, f"call\0{tag}\0{ews_id}".encode(), MAC_BYTES)


def _digest(key: bytes, message: bytes, size: int) -> str:
    digest = hmac.new(key, message, hashlib.sha256).digest()[:size]
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")
