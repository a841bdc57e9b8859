"""Authentication as Exchange's IIS front end asks for it: Basic, NTLM, Kerberos, bearer.

Each acceptor hands every connection a session; the handler asks the session
to admit each EWS request before the fake Exchange sees it, so a request
answered 401 is never acted on. NTLM and Kerberos authenticate the connection
(IIS's connection-based authentication) and both require Extended Protection
when the simulator serves TLS: the client's channel binding must be present
and must match the simulator's own certificate (RFC 5929
`tls-server-end-point`). The tokens are checked by pyspnego (NTLM) and by
GSSAPI with a keytab (Kerberos): the simulator shares no code with the
gateway's client side.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import spnego
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from spnego._ntlm_raw.messages import Authenticate, AvId, NTClientChallengeV2
from spnego._spnego import unpack_token
from spnego.channel_bindings import GssChannelBindings

from gateway.simulator.outcomes import Reply

# What an admitted request's answer carries besides Exchange's own headers.
Headers = tuple[tuple[str, str], ...]
# A session's verdict: the request goes through (with these headers), or this answer.
Admission = Headers | Reply


class Session(Protocol):
    """One connection's authentication state."""

    def admit(self, authorization: str | None) -> Admission:
        """Let the request through, or return the 401 that answers it."""


class Acceptor(Protocol):
    """A way of authenticating the simulator's clients."""

    def session(self, channel_binding: bytes | None) -> Session:
        """Start a connection's session; channel_binding is the TLS binding data, if TLS."""


def channel_binding_of(cert_path: str) -> bytes:
    """Return the tls-server-end-point binding data of the simulator's PEM certificate."""
    with open(cert_path, encoding="ascii") as pem:
        der = ssl.PEM_cert_to_DER_cert(pem.read())
    certificate = x509.load_der_x509_certificate(der)
    # RFC 5929 section 4.1: the signature's hash, upgraded to SHA-256 from MD5 and SHA-1.
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None or algorithm.name in ("md5", "sha1"):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(der)
    return b"tls-server-end-point:" + digest.finalize()


def unauthorized(*challenges: str, reason: str = "") -> Reply:
    """A 401 offering the given WWW-Authenticate challenges, as IIS sends it."""
    body = f"401 - Unauthorized: {reason or 'Access is denied due to invalid credentials.'}"
    return Reply(
        401,
        body.encode(),
        content_type="text/html",
        headers=tuple(("WWW-Authenticate", challenge) for challenge in challenges),
    )


class _Stateless:
    """A session for the per-request schemes: every request is checked on its own."""

    def __init__(self, check: Callable[[str | None], Admission]) -> None:
        self.admit = check


class BasicAcceptor:
    """Basic (RFC 7617) against a fixed set of accounts."""

    def __init__(self, accounts: dict[str, str]) -> None:
        self._accounts = accounts

    def session(self, channel_binding: bytes | None) -> Session:
        return _Stateless(self._check)

    def _check(self, authorization: str | None) -> Admission:
        scheme, _, encoded = (authorization or "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user = password = ""
        expected = self._accounts.get(user)
        if scheme.lower() == "basic" and expected and hmac.compare_digest(expected, password):
            return ()
        return unauthorized('Basic realm="mail.example.com"')


class BearerAcceptor:
    """OAuth bearer tokens the simulator issues, each valid for lifetime_s."""

    def __init__(self, lifetime_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._lifetime_s = lifetime_s
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()
        # Requests answered 401.
        self.refused = 0

    def issue(self) -> str:
        """Return a new token, valid from now for the lifetime."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._expiry[token] = self._clock() + self._lifetime_s
        return token

    def expire(self, token: str) -> None:
        """End a token's life now."""
        with self._lock:
            self._expiry[token] = self._clock()

    def session(self, channel_binding: bytes | None) -> Session:
        return _Stateless(self._check)

    def _check(self, authorization: str | None) -> Admission:
        scheme, _, token = (authorization or "").partition(" ")
        with self._lock:
            expiry = self._expiry.get(token.strip())
        if scheme.lower() == "bearer" and expiry is not None and self._clock() < expiry:
            return ()
        with self._lock:
            self.refused += 1
        return unauthorized('Bearer error="invalid_token"', reason="the token is not valid")


@dataclass
class Ledger:
    """What an acceptor remembers across connections: who authenticated, and when it forgot."""

    users: list[str] = field(default_factory=list)
    # Handshakes refused (wrong password, wrong binding, unreadable token).
    refused: int = 0
    # Raised by forget_connections(): sessions authenticated before it must authenticate again.
    generation: int = 0


class _HandshakeSession:
    """A connection authenticated once by a handshake, then trusted for its lifetime."""

    # The schemes offered in a 401, in IIS's order.
    schemes: tuple[str, ...] = ()

    def __init__(self, channel_binding: bytes | None, ledger: Ledger) -> None:
        self.channel_binding = channel_binding
        self._ledger = ledger
        self._authenticated_in: int | None = None

    def admit(self, authorization: str | None) -> Admission:
        scheme, _, encoded = (authorization or "").partition(" ")
        offered = {name.lower(): name for name in self.schemes}
        if scheme.lower() not in offered or not encoded.strip():
            if authorization is None and self._authenticated_in == self._ledger.generation:
                return ()
            return unauthorized(*self.schemes)
        try:
            token = base64.b64decode(encoded.strip(), validate=True)
        except binascii.Error:
            return Reply(400, b"Bad Request", content_type="text/html")
        self._authenticated_in = None
        return self.step(offered[scheme.lower()], token)

    def authenticated(self, user: str) -> None:
        self._authenticated_in = self._ledger.generation
        self._ledger.users.append(user)

    def step(self, scheme: str, token: bytes) -> Admission:
        raise NotImplementedError


class _ConnectionAcceptor:
    """What NTLM and Kerberos acceptors share: the ledger and forgetting connections."""

    def __init__(self) -> None:
        self.ledger = Ledger()

    @property
    def users(self) -> list[str]:
        """Who authenticated, one entry per completed handshake."""
        return self.ledger.users

    def forget_connections(self) -> None:
        """Forget every connection's authentication, as a restarted IIS does."""
        self.ledger.generation += 1


class NtlmAcceptor(_ConnectionAcceptor):
    """NTLM with Extended Protection required over TLS; accounts from NTLM_USER_FILE.

    pyspnego's acceptor reads the accounts (DOMAIN:user:password lines) from the
    file the environment variable NTLM_USER_FILE names; it must be set. With
    negotiate, it also takes NTLM inside Negotiate (SPNEGO), offering both as
    IIS does by default; it has no Kerberos keys, so Kerberos is refused.
    """

    def __init__(self, *, negotiate: bool = False) -> None:
        if not os.environ.get("NTLM_USER_FILE"):
            raise ValueError("NTLM_USER_FILE must name the NTLM accounts file")
        super().__init__()
        self._schemes = ("Negotiate", "NTLM") if negotiate else ("NTLM",)

    def session(self, channel_binding: bytes | None) -> Session:
        session = _NtlmSession(channel_binding, self.ledger)
        session.schemes = self._schemes
        return session


class _NtlmSession(_HandshakeSession):
    def __init__(self, channel_binding: bytes | None, ledger: Ledger) -> None:
        super().__init__(channel_binding, ledger)
        self._context: Any = None

    def step(self, scheme: str, token: bytes) -> Admission:
        if self._context is None or self._context.complete:
            bindings = None
            if self.channel_binding is not None:
                bindings = GssChannelBindings(application_data=self.channel_binding)
            protocol = "negotiate" if scheme == "Negotiate" else "ntlm"
            # pyspnego's own SPNEGO, which carries its NTLM; GSSAPI's would want Kerberos.
            options = spnego.NegotiateOptions.none
            if protocol == "negotiate":
                options = spnego.NegotiateOptions.use_negotiate
            self._context = spnego.server(
                protocol=protocol, channel_bindings=bindings, options=options
            )
        try:
            if self.channel_binding is not None:
                _require_binding(_ntlm_message(token))
            reply = self._context.step(token)
        except Exception as exc:  # pyspnego's errors, and unreadable messages
            self._context = None
            self._ledger.refused += 1
            return unauthorized(*self.schemes, reason=type(exc).__name__)
        encoded = base64.b64encode(reply or b"").decode()
        if not self._context.complete:
            return unauthorized(f"{scheme} {encoded}")
        self.authenticated(str(self._context.client_principal))
        # SPNEGO ends with the acceptor's mechListMIC, which the client checks.
        return (("WWW-Authenticate", f"{scheme} {encoded}"),) if reply else ()


def _ntlm_message(token: bytes) -> bytes:
    """Return the NTLM message in a token, unwrapping SPNEGO (pyspnego's reading of it)."""
    if token.startswith(b"NTLMSSP\x00"):
        return token
    unwrapped = unpack_token(token)
    inner = getattr(unwrapped, "response_token", None) or getattr(unwrapped, "mech_token", None)
    return inner or b""


def _is_authenticate(token: bytes) -> bool:
    return token.startswith(b"NTLMSSP\x00\x03\x00\x00\x00")


def _require_binding(token: bytes) -> None:
    """Refuse an NTLM Authenticate message whose channel binding is absent or empty.

    Other NTLM messages (negotiate) pass: they carry no binding.

    pyspnego's acceptor takes an all-zero binding as "none given"; IIS with
    Extended Protection set to Require does not. The message is read with
    pyspnego's own MS-NLMP structures (private to it; only the simulator uses them).
    """
    if not _is_authenticate(token):
        return
    response = Authenticate.unpack(token).nt_challenge_response or b""
    if len(response) <= 24:
        raise ValueError("an NTLMv1 response carries no channel binding")
    binding = NTClientChallengeV2.unpack(response[16:]).av_pairs.get(AvId.channel_bindings)
    if not binding or binding == b"\x00" * 16:
        raise ValueError("the NTLM response carries no channel binding")


class KerberosAcceptor(_ConnectionAcceptor):
    """Negotiate with Kerberos only (no NTLM), keys from a keytab; channel binding required.

    The service principal is whichever of the keytab's the client asked a ticket for.
    """

    def __init__(self, keytab: str) -> None:
        super().__init__()
        self._keytab = keytab

    def session(self, channel_binding: bytes | None) -> Session:
        return _KerberosSession(channel_binding, self._keytab, self.ledger)


class _KerberosSession(_HandshakeSession):
    schemes = ("Negotiate",)

    def __init__(self, channel_binding: bytes | None, keytab: str, ledger: Ledger) -> None:
        super().__init__(channel_binding, ledger)
        self._keytab = keytab

    def step(self, scheme: str, token: bytes) -> Admission:
        import gssapi  # noqa: PLC0415 - optional: the kerberos extra

        bindings = None
        if self.channel_binding is not None:
            bindings = gssapi.raw.ChannelBindings(application_data=self.channel_binding)
        try:
            credentials = gssapi.Credentials(usage="accept", store={"keytab": self._keytab})
            context = gssapi.SecurityContext(
                creds=credentials, usage="accept", channel_bindings=bindings
            )
            reply = context.step(token)
            # python-gssapi raises a failed step's error from the next property read.
            complete = context.complete
            bound = complete and gssapi.RequirementFlag.channel_bound in context.actual_flags
        except gssapi.raw.misc.GSSError as exc:
            self._ledger.refused += 1
            return unauthorized(*self.schemes, reason=type(exc).__name__)
        if not complete:
            return unauthorized(f"Negotiate {base64.b64encode(reply or b'').decode()}")
        # A client that sent no binding still completes in MIT's library: Require refuses it.
        if bindings is not None and not bound:
            self._ledger.refused += 1
            return unauthorized(*self.schemes, reason="no channel binding")
        self.authenticated(str(context.initiator_name))
        if not reply:
            return ()
        # Mutual authentication: the client checks the server's answer token.
        return (("WWW-Authenticate", f"Negotiate {base64.b64encode(reply).decode()}"),)


# The modes `ews-gateway simulator --auth` offers (bearer tokens are issued in tests).
AUTH_MODES = ("none", "basic", "ntlm", "negotiate-ntlm", "kerberos")


def acceptor_for(mode: str, *, accounts: str | None, keytab: str | None) -> Acceptor | None:
    """Build the acceptor for a command-line mode; ValueError says what is missing."""
    if mode == "basic":
        if accounts is None:
            raise ValueError("--auth basic needs --accounts FILE (user:password lines)")
        with open(accounts, encoding="utf-8") as lines:
            pairs = [line.rstrip("\r\n").partition(":") for line in lines if line.strip()]
        return BasicAcceptor({user: password for user, _, password in pairs})
    if mode in ("ntlm", "negotiate-ntlm"):
        return NtlmAcceptor(negotiate=mode == "negotiate-ntlm")
    if mode == "kerberos":
        if keytab is None:
            raise ValueError("--auth kerberos needs --keytab FILE (the HTTP/host keys)")
        return KerberosAcceptor(keytab)
    return None
