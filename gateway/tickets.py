"""The gateway's Kerberos ticket-granting ticket, from the KDC (EWS_AUTH=kerberos, negotiate).

Asked for with python-krb5 (installed with pyspnego's kerberos extra) the way
pyspnego itself asks for one, but once per process rather than once per
connection.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import spnego


class Identity(Protocol):
    """Who asks: a principal, and its password or keytab."""

    @property
    def username(self) -> str | None: ...

    @property
    def password(self) -> str | None: ...

    @property
    def keytab(self) -> str | None: ...


class TicketCache:
    """The gateway's Kerberos ticket-granting ticket, got once and shared by all connections.

    Asked of the KDC with the password or keytab when first needed, kept in a
    MEMORY cache of this process (where GSSAPI also keeps the service tickets
    it gets), and asked again RENEW_BEFORE_S before it expires. Without it
    every new connection would cost a round trip to the KDC and, with a
    password, a key derivation.
    """

    RENEW_BEFORE_S = 300
    # How long a refusal from the KDC is the answer before it is asked again: under most
    # Active Directory lockout policies a wrong password sent with every call would lock
    # the gateway's account within minutes.
    HOLD_REFUSAL_S = 30.0

    def __init__(self, credentials: Identity) -> None:
        self._credentials = credentials
        self._lock = threading.Lock()
        self._cache: Any = None
        self._name = ""
        self._expires_at = 0.0
        self._refusal: Exception | None = None
        self._refused_until = 0.0

    def credential(self) -> spnego.KerberosCCache:
        """Return the cache holding a valid ticket-granting ticket, asking the KDC if needed.

        Raises what krb5 raised when the KDC refused (or could not be reached), for
        HOLD_REFUSAL_S after it did.
        """
        with self._lock:
            now = time.monotonic()
            if self._refusal is not None and now < self._refused_until:
                raise self._refusal
            if time.time() > self._expires_at - self.RENEW_BEFORE_S:
                try:
                    self._get_ticket()
                except Exception as exc:  # krb5's errors
                    self._refusal, self._refused_until = exc, now + self.HOLD_REFUSAL_S
                    raise
            self._refusal = None
            return spnego.KerberosCCache(ccache=self._name)

    def _get_ticket(self) -> None:
        import krb5  # noqa: PLC0415 - optional: the kerberos extra

        credentials = self._credentials
        context = krb5.init_context()
        principal = krb5.parse_name_flags(context, (credentials.username or "").encode())
        options = krb5.get_init_creds_opt_alloc(context)
        krb5.get_init_creds_opt_set_canonicalize(options, True)
        if credentials.keytab is not None:
            keytab = krb5.kt_resolve(context, credentials.keytab.encode())
            ticket = krb5.get_init_creds_keytab(context, principal, options, keytab=keytab)
        else:
            password = (credentials.password or "").encode()
            ticket = krb5.get_init_creds_password(context, principal, options, password=password)
        cache = krb5.cc_new_unique(context, b"MEMORY")
        krb5.cc_initialize(context, cache, ticket.client)
        krb5.cc_store_cred(context, cache, ticket)
        # The handle keeps the cache alive; connections being set up may still read the old one.
        self._cache = cache
        self._name = "MEMORY:" + (cache.name or b"").decode()
        self._expires_at = float(ticket.times.endtime)
