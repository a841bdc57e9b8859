"""Mailbox servers behind one front end, as Exchange 2013/2016 is deployed.

Each mailbox lives on one mailbox server, and Unified Messaging runs there
too: a call lives on the server of the mailbox that placed it. The front end
(Client Access) routes each EWS request to one back end: by X-AnchorMailbox
when the client sends it, else to the authenticated account's own mailbox
server. Source: Microsoft's "Managing Affinity for EWS Impersonation in
Exchange 2013 and Exchange Online (W15)" (2013), which asks impersonating
clients to send X-AnchorMailbox matching the ExchangeImpersonation header.
What Exchange answers when a call id is asked of a server that never issued
it is not documented; the simulator answers ErrorInvalidPhoneCallId, as for
any call id unknown to the server that handles the request. Answers carry
the routing diagnostics Exchange adds (X-FEServer, X-BEServer,
X-CalculatedBETarget, X-DiagInfo, request-id).
"""

from __future__ import annotations

import base64
import binascii
import uuid
import zlib
from collections.abc import Callable

from gateway.simulator.calls import CallBook, CallView

FRONT_END = "CAS01"
BACK_END_DOMAIN = "mbx.simulator.invalid"


class Deployment:
    """Mailbox servers MBX01, MBX02... each with its own call book, behind one front end."""

    def __init__(self, server_count: int, new_book: Callable[[], CallBook]) -> None:
        if server_count < 1:
            raise ValueError(f"a deployment needs at least one mailbox server, not {server_count}")
        self.servers = {f"MBX{number:02d}": new_book() for number in range(1, server_count + 1)}
        self._names = list(self.servers)

    def home_of(self, mailbox: str | None) -> str:
        """Return the server a mailbox (or account) lives on; the same name always the same one."""
        key = (mailbox or "").casefold().encode()
        return self._names[zlib.crc32(key) % len(self._names)]

    def route(self, anchor_mailbox: str | None, authorization: str | None) -> str:
        """Return the back end the front end sends a request to."""
        return self.home_of(anchor_mailbox or authenticated_account(authorization))

    def all_calls(self) -> list[tuple[str, CallView]]:
        """Return every call of every server, with the server holding it."""
        return [(name, call) for name, book in self.servers.items() for call in book.all_calls()]

    @staticmethod
    def diagnostics(server: str) -> tuple[tuple[str, str], ...]:
        """Return the routing fields Exchange adds to an answer from this back end."""
        return (
            ("request-id", str(uuid.uuid4())),
            ("X-FEServer", FRONT_END),
            ("X-BEServer", server),
            ("X-CalculatedBETarget", f"{server.lower()}.{BACK_END_DOMAIN}"),
            ("X-DiagInfo", server),
        )


def authenticated_account(authorization: str | None) -> str | None:
    """Return the account a Basic Authorization names (user@domain or DOMAIN\\user), if any."""
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user.rpartition("\\")[2] or None
