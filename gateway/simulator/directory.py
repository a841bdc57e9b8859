"""The mailboxes the simulator knows, found as Exchange finds them in Active Directory.

ExchangeImpersonation names a mailbox by one of ConnectingSIDType's choices:
SmtpAddress finds it by any of its SMTP addresses, PrimarySmtpAddress only by
the primary one (Microsoft's PrimarySmtpAddress reference: "Proxy or
alternative addresses are not accepted"), PrincipalName by its account's UPN
and SID by its account's security identifier. X-AnchorMailbox routes by an
SMTP address or a UPN.

A name the directory does not list in any form is a mailbox of its own, whose
only address and UPN is that name, so any address works for trying a gateway;
an SID must be listed. Names compare case-insensitively, as in Active Directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Mailbox:
    """A mailbox and the names its account is known by."""

    primary_smtp_address: str
    aliases: tuple[str, ...] = ()  # its other SMTP (proxy) addresses
    principal_name: str | None = None
    sid: str | None = None

    def as_json(self) -> dict[str, object]:
        """Describe the mailbox as the control API shows it."""
        return {
            "primarySmtpAddress": self.primary_smtp_address,
            "aliases": list(self.aliases),
            "principalName": self.principal_name,
            "sid": self.sid,
        }


# Listed for frontend developers (GET /simulator/mailboxes); every other name is a mailbox too.
DEFAULT_MAILBOXES = (
    Mailbox(
        "dana.ortiz@example.com",
        aliases=("dana@example.com", "d.ortiz@example.org"),
        principal_name="dortiz@corp.example.com",
        sid="S-1-5-21-3623811015-3361044348-30300820-1104",
    ),
    Mailbox(
        "yuki.sato@example.com",
        aliases=("yuki@example.com",),
        principal_name="ysato@corp.example.com",
        sid="S-1-5-21-3623811015-3361044348-30300820-1105",
    ),
)


class Directory:
    """Find the mailbox a ConnectingSID or an X-AnchorMailbox names; read-only once built."""

    def __init__(self, mailboxes: Iterable[Mailbox] = DEFAULT_MAILBOXES) -> None:
        self.mailboxes = tuple(mailboxes)
        self._by_address: dict[str, Mailbox] = {}
        self._by_principal_name: dict[str, Mailbox] = {}
        self._by_sid: dict[str, Mailbox] = {}
        for mailbox in self.mailboxes:
            for address in (mailbox.primary_smtp_address, *mailbox.aliases):
                self._by_address[address.casefold()] = mailbox
            if mailbox.principal_name is not None:
                self._by_principal_name[mailbox.principal_name.casefold()] = mailbox
            if mailbox.sid is not None:
                self._by_sid[mailbox.sid.casefold()] = mailbox
        self._listed = {*self._by_address, *self._by_principal_name, *self._by_sid}

    def impersonated(self, kind: str, value: str) -> str | None:
        """Return the mailbox a ConnectingSID child names (its primary address, case-folded),
        or None when no mailbox answers to that name in that form."""
        key = value.casefold()
        if kind == "SID":
            return _name(self._by_sid.get(key))
        if key not in self._listed:
            return key
        if kind == "PrincipalName":
            return _name(self._by_principal_name.get(key))
        mailbox = self._by_address.get(key)
        if kind == "PrimarySmtpAddress" and _name(mailbox) != key:
            return None
        return _name(mailbox)

    def anchored(self, anchor_mailbox: str) -> str:
        """Return the mailbox an X-AnchorMailbox names; an unknown name stands for itself."""
        key = anchor_mailbox.casefold()
        mailbox = self._by_address.get(key) or self._by_principal_name.get(key)
        return _name(mailbox) or key


def _name(mailbox: Mailbox | None) -> str | None:
    return None if mailbox is None else mailbox.primary_smtp_address.casefold()
