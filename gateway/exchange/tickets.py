"""The gateway's Kerberos tickets, from the KDC (EWS_AUTH=kerberos, negotiate).

The ticket-granting ticket is asked for with python-krb5 (installed with
pyspnego's kerberos extra) the way pyspnego itself asks for one, but once per
process rather than once per connection. Service tickets are asked for by
GSSAPI as a context makes its first token, for the configured service
principal exactly (ServicePrincipalContext). Either way the KDC is waited for
only until the call's deadline.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

import spnego
from spnego._context import GSSMech
from spnego._gss import GSSAPIProxy
from spnego.channel_bindings import GssChannelBindings


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
        # The request to the KDC under way, if any.
        self._request: _KdcRequest | None = None

    def credential(self, deadline: float) -> spnego.KerberosCCache:
        """Return the cache holding a valid ticket-granting ticket, asking the KDC if needed.

        The KDC is asked in a daemon thread and waited for until the deadline (time.monotonic()
        seconds): krb5 cannot be interrupted, and gives a silent KDC about 27 s. Calls arriving
        meanwhile wait for the same request. Raises TimeoutError when it has not ended by the
        deadline, and what krb5 raised when the KDC refused (or could not be reached), for
        HOLD_REFUSAL_S after it did.
        """
        with self._lock:
            if self._refusal is not None and time.monotonic() < self._refused_until:
                raise self._refusal
            if time.time() <= self._expires_at - self.RENEW_BEFORE_S:
                return spnego.KerberosCCache(ccache=self._name)
            request = self._request
            if request is None:
                request = self._request = _KdcRequest()
                threading.Thread(
                    target=self._ask_kdc, args=(request,), name="ews-kdc", daemon=True
                ).start()
        if not request.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the KDC did not answer in time")
        if request.error is not None:
            raise request.error
        return spnego.KerberosCCache(ccache=request.name)

    def _ask_kdc(self, request: _KdcRequest) -> None:
        """Ask the KDC for a ticket and hand the outcome to every call waiting for it."""
        try:
            cache, name, expires_at = self._get_ticket()
        except Exception as exc:  # krb5's errors
            with self._lock:
                self._refusal, self._refused_until = exc, time.monotonic() + self.HOLD_REFUSAL_S
                self._request = None
            request.error = exc
        else:
            with self._lock:
                # The handle keeps the cache alive; connections being set up may still read
                # the old one.
                self._cache, self._name, self._expires_at = cache, name, expires_at
                self._refusal = None
                self._request = None
            request.name = name
        request.done.set()

    def _get_ticket(self) -> tuple[Any, str, float]:
        """Ask the KDC for a ticket-granting ticket; return its cache, the cache's name, its end."""
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
        return cache, "MEMORY:" + (cache.name or b"").decode(), float(ticket.times.endtime)


class ServiceTickets:
    """First tokens of Kerberos and Negotiate contexts, made by one context at a time.

    GSSAPI asks the KDC for the service ticket as a context makes its first token, unless
    the cache holds it. krb5 cannot be interrupted and gives a silent KDC about 27 s, so the
    step runs in a daemon thread that is waited for until the call's deadline. One at a
    time: while the KDC is silent, new connections wait for the request under way rather
    than each leave a thread behind, and once it answers the rest find the ticket cached.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # The step under way, if any.
        self._request: _KdcRequest | None = None

    def first_token(self, context: spnego.ContextProxy, deadline: float) -> bytes | None:
        """Return the context's first token, waiting until DEADLINE (time.monotonic() seconds).

        Raises TimeoutError when neither the step under way nor this one has ended by then
        (this context is then abandoned), and what the library raised.
        """
        while True:
            with self._lock:
                busy = self._request
                if busy is None:
                    request = self._request = _KdcRequest()
                    break
            if not busy.done.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("the KDC did not answer in time")
        threading.Thread(
            target=self._step, args=(context, request), name="ews-kdc", daemon=True
        ).start()
        if not request.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the KDC did not answer in time")
        if request.error is not None:
            raise request.error
        return request.token

    def _step(self, context: spnego.ContextProxy, request: _KdcRequest) -> None:
        try:
            request.token = context.step(None)
        except Exception as exc:  # pyspnego, GSSAPI and krb5 each raise their own kinds
            request.error = exc
        with self._lock:
            self._request = None
        request.done.set()


class _KdcRequest:
    """One request to the KDC, and every call waiting for it: the cache's name or the first
    token, or why not."""

    __slots__ = ("done", "error", "name", "token")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: Exception | None = None
        self.name = ""
        self.token: bytes | None = None


def client_context(
    username: Any,
    password: str | None,
    *,
    protocol: str,
    spn: str,
    channel_bindings: GssChannelBindings | None,
) -> spnego.ContextProxy:
    """Start pyspnego's client context for PROTOCOL (ntlm, kerberos or negotiate) whose
    Kerberos service ticket, if it asks for one, is for SPN (SERVICE/host) exactly."""
    service, _, host = spn.partition("/")

    def ntlm() -> spnego.ContextProxy:
        return spnego.client(
            username,
            password,
            hostname=host,
            service=service,
            channel_bindings=channel_bindings,
            protocol="ntlm",
        )

    def kerberos() -> spnego.ContextProxy:
        return ServicePrincipalContext(username, password, spn, channel_bindings)

    if protocol != "negotiate":
        return kerberos() if protocol == "kerberos" else ntlm()
    # pyspnego's SPNEGO over these two, Kerberos first, each left out (as pyspnego leaves
    # them out) when these credentials cannot start it.
    mechanisms: dict[GSSMech, spnego.ContextProxy] = {}
    failure: Exception | None = None
    for mechanism, start in ((GSSMech.kerberos, kerberos), (GSSMech.ntlm, ntlm)):
        try:
            context = start()
        except Exception as exc:  # pyspnego, GSSAPI and krb5 each raise their own kinds
            failure = exc
            continue
        context._is_wrapped = True  # as pyspnego marks those it wraps (for its debug lines)
        mechanisms[mechanism] = context
    if not mechanisms:
        assert failure is not None  # each mechanism failed to start
        raise failure
    return spnego.client(
        username,
        password,
        hostname=host,
        service=service,
        channel_bindings=channel_bindings,
        protocol="negotiate",
        options=spnego.NegotiateOptions.use_negotiate,
        _negotiate_contexts=mechanisms,
    )


class ServicePrincipalContext(GSSAPIProxy):
    """pyspnego's Kerberos client context, with a ticket for exactly the service principal SPN.

    pyspnego names its target a host-based service (HTTP@host), which MIT krb5 canonicalises
    through DNS unless krb5.conf turns that off (dns_canonicalize_hostname and rdns, both on
    by default): the gateway asked the KDC for HTTP/<whatever Exchange's address
    reverse-resolves to>, a principal no one registered. A Kerberos principal name
    (GSS_KRB5_NT_PRINCIPAL_NAME) is used as it is, in krb5.conf's default realm.

    Rests on pyspnego 0.11 and 0.12's GSSAPIProxy, which builds its GSSAPI context at the first
    step only when none is set, from `_credential`, `_mech` and `_context_req`.
    """

    def __init__(
        self,
        username: Any,
        password: str | None,
        spn: str,
        channel_bindings: GssChannelBindings | None,
    ) -> None:
        service, _, host = spn.partition("/")
        super().__init__(
            username,
            password,
            hostname=host,
            service=service,
            channel_bindings=channel_bindings,
            protocol="kerberos",
        )
        self.spn = spn

    def step(
        self, in_token: bytes | None = None, *, channel_bindings: GssChannelBindings | None = None
    ) -> bytes | None:
        if self._context is None:
            self._context = self._security_context(channel_bindings or self.channel_bindings)
        return super().step(in_token, channel_bindings=channel_bindings)

    def _security_context(self, bindings: GssChannelBindings | None) -> Any:
        import gssapi  # noqa: PLC0415 - optional: the kerberos extra

        gss_bindings = None
        if bindings is not None:
            gss_bindings = gssapi.raw.ChannelBindings(
                initiator_address_type=bindings.initiator_addrtype,
                initiator_address=bindings.initiator_address,
                acceptor_address_type=bindings.acceptor_addrtype,
                acceptor_address=bindings.acceptor_address,
                application_data=bindings.application_data,
            )
        return gssapi.SecurityContext(
            name=gssapi.Name(self.spn, name_type=gssapi.NameType.kerberos_principal),
            creds=self._credential,
            usage="initiate",
            mech=self._mech,
            flags=self._context_req,
            channel_bindings=gss_bindings,
        )
