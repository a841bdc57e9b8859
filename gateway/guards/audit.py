"""The audit trail: one JSON line per call-control action on the `gateway.audit` logger.

Operators ship this logger apart from the access log (its lines carry `"logger":
"gateway.audit"`). A line holds who acted, on which call, what was asked and how it ended;
never a token, an API key or a whole phone number.
"""

from __future__ import annotations

import logging

from gateway.guards.callers import Caller
from gateway.guards.ownership import owner_of

AUDIT_LOG = logging.getLogger("gateway.audit")
MASK = "*"


def mask_dial_string(dial_string: str, visible_digits: int) -> str:
    """Hide all but the last VISIBLE_DIGITS characters of a dial string (`********4567`), and
    at least its first half, so a short one (an extension, `**11`) is never logged whole."""
    hidden = max(len(dial_string) - visible_digits, (len(dial_string) + 1) // 2)
    return MASK * hidden + dial_string[hidden:]


class AuditTrail:
    """Writes the audit lines; dial strings keep only their last `visible_digits` characters."""

    def __init__(self, visible_digits: int) -> None:
        self._visible_digits = visible_digits

    def record(
        self,
        *,
        action: str,
        outcome: str,
        status: int,
        request_id: str,
        caller: Caller,
        call_id: str | None = None,
        dial_string: str | None = None,
    ) -> None:
        """Write one line: ACTION (`place-call`, `hang-up`, `read-call`) ended in OUTCOME."""
        AUDIT_LOG.info(
            "call-control",
            extra={
                "requestId": request_id,
                "subject": owner_of(caller),
                "mailbox": caller.mailbox,
                "action": action,
                "callId": call_id,
                "dialString": None
                if dial_string is None
                else mask_dial_string(dial_string, self._visible_digits),
                "outcome": outcome,
                "status": status,
            },
        )
