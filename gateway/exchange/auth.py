"""The gateway's own credentials at Exchange (EWS_AUTH): every scheme, one transport.

`basic` and `bearer` add an Authorization header to each request. `ntlm`,
`kerberos` and `negotiate` authenticate a connection, as IIS does: the
transport (gateway.exchange.transport's ExchangeAuthenticator seam) hands each new connection
to SecurityContextAuth, which runs a pyspnego context over it with the
request itself; the connection then carries further requests
unauthenticated, as long as it stays in the pool. Over https each handshake
carries the TLS channel binding (RFC 5929 `tls-server-end-point`), so
Exchange's Extended Protection accepts it. Kerberos tickets come from
gateway.exchange.tickets.

A leg answered 401 was not acted on, so the request may go out again; the
answer the handshake ends with is the one Exchange acted on, and it is never
repeated. Security tokens are made and read only by pyspnego.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import spnego
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from spnego.channel_bindings import GssChannelBindings

from gateway.errors import ExchangeAuthFailed, ExchangeOutcome, ExchangeTimeout
from gateway.exchange.http1 import HttpAnswer
from gateway.exchange.tickets import ServiceTickets, TicketCache, client_context
from gateway.exchange.transport import Connection, ExchangeAuthenticator

# The logger's name predates the package layout; operators filter on it.
LOG = logging.getLogger("gateway.upstream_auth")
# RFC 6750's b64token: what an Authorization: Bearer value may hold.
BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

# The HTTP scheme each EWS_AUTH mode speaks, and pyspnego's name for its protocol.
SCHEMES = {
    "ntlm": ("NTLM", "ntlm"),
    "kerberos": ("Negotiate", "kerberos"),
    "negotiate": ("Negotiate", "negotiate"),
}
# The HTTP scheme of every EWS_AUTH mode that sends credentials.
SCHEME_OF_MODE = {"basic": "Basic", "bearer": "Bearer"} | {
    mode: scheme for mode, (scheme, _) in SCHEMES.items()
}

# The scheme each EWS_AUTH mode answers a 401's challenge with.
MODE_SCHEMES = {
    "basic": "Basic",
    "bearer": "Bearer",
    **{mode: scheme for mode, (scheme, _protocol) in SCHEMES.items()},
}

# HTTP authentication schemes by lower-case name (IANA's registry, those IIS offers).
KNOWN_SCHEMES = {
    name.lower(): name for name in ("Basic", "Bearer", "Digest", "Negotiate", "NTLM", "Kerberos")
}
# The EWS_AUTH mode to suggest for each scheme Exchange may offer, simplest to set up first.
MODE_FOR_SCHEME = {"NTLM": "ntlm", "Negotiate": "negotiate", "Basic": "basic", "Bearer": "bearer"}


class NoCredentials:
    """EWS_AUTH=none: nothing is sent; a 401 says which schemes Exchange would take."""

    def connected(self, connection: Connection, deadline: float) -> None:
        """Nothing to prepare."""

    def authorization(self, connection: Connection) -> str | None:
        return None

    def challenged(self, connection: Connection, answer: HttpAnswer) -> str | None:
        raise _not_offered("none", offered_schemes(answer))

    def answered(self, connection: Connection, answer: HttpAnswer) -> None:
        """Nothing to check."""


class BearerToken:
    """EWS_AUTH=bearer: an OAuth access token, re-read when its file changes.

    Token files are rotated by whatever issues the tokens (a sidecar, a mounted
    secret); the file's identity (inode, size, modification time) is checked at
    most every CHECK_INTERVAL_S (a stat costs a tenth of a call's transport CPU,
    benchmarks/RESULTS.md) and the token read again when it moved. After a
    401 the file is read again whatever the stat says, once per request.
    """

    CHECK_INTERVAL_S = 1.0

    def __init__(self, token: str, path: str | None = None) -> None:
        self._path = Path(path) if path else None
        self._lock = threading.Lock()
        self._seen = self._identity()
        self._checked_at = time.monotonic()
        self._header = f"Bearer {token}"

    def connected(self, connection: Connection, deadline: float) -> None:
        """Nothing to prepare: the token goes with each request."""

    def authorization(self, connection: Connection) -> str | None:
        # auth_state: whether this request already read the file again after a 401.
        connection.auth_state = False
        now = time.monotonic()
        if self._path is not None and now - self._checked_at >= self.CHECK_INTERVAL_S:
            self._checked_at = now
            if self._identity() != self._seen:
                self._reload()
        return self._header

    def challenged(self, connection: Connection, answer: HttpAnswer) -> str | None:
        _raise_unless_offered("bearer", answer)
        if connection.auth_state:
            return None
        connection.auth_state = True
        before = self._header
        self._reload()
        # A 401 was not acted on: the request may go again, with a token that changed.
        return self._header if self._header != before else None

    def answered(self, connection: Connection, answer: HttpAnswer) -> None:
        """Nothing to check: bearer tokens carry no answer from Exchange."""

    def _identity(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            status = os.stat(self._path)
        except OSError:
            return None
        return status.st_ino, status.st_size, status.st_mtime_ns

    def _reload(self) -> None:
        """Read the token file; a missing, partly written or invalid token keeps the last one."""
        with self._lock:
            self._seen = self._identity()
            try:
                token = self._path.read_text(encoding="utf-8").strip() if self._path else ""
            except (OSError, UnicodeDecodeError) as exc:
                LOG.warning("EWS_BEARER_TOKEN_FILE cannot be read (%s)", type(exc).__name__)
                return
            if BEARER_TOKEN.fullmatch(token) is None:
                LOG.warning("EWS_BEARER_TOKEN_FILE holds no valid bearer token; keeping the last")
                return
            self._header = f"Bearer {token}"


class BasicRefusalHold:
    """EWS_AUTH=basic: credentials Exchange refused are not sent again for HOLD_REFUSAL_S.

    The Basic header itself goes out with every request, formatted once
    (static_authorization); this only stops sending it after a 401, since each
    refused Basic logon counts toward the account's lockout as an NTLM one does.
    """

    HOLD_REFUSAL_S = 30.0

    def __init__(self) -> None:
        self._refused_until = 0.0

    def connected(self, connection: Connection, deadline: float) -> None:
        """Nothing to prepare: the header goes with each request."""

    def authorization(self, connection: Connection) -> str | None:
        if time.monotonic() < self._refused_until:
            raise _held(self.HOLD_REFUSAL_S)
        return None  # already among the request's fields

    def challenged(self, connection: Connection, answer: HttpAnswer) -> str | None:
        # Exchange without Basic never looked at the credentials: no logon failed, none held.
        _raise_unless_offered("basic", answer)
        self._refused_until = time.monotonic() + self.HOLD_REFUSAL_S
        return None  # the 401 is Exchange's answer

    def answered(self, connection: Connection, answer: HttpAnswer) -> None:
        """Nothing to check: Basic carries no answer from Exchange."""


@dataclass(frozen=True)
class Credentials:
    """Who the gateway is, for pyspnego: a password, a keytab, or the ticket cache."""

    username: str | None
    password: str | None = None
    keytab: str | None = None


@dataclass
class _Handshake:
    """A connection's security context: the token to send next, and whether it is done."""

    context: spnego.ContextProxy
    pending: bytes | None
    done: bool = False
    # Whether this request already authenticated the connection again after a 401.
    restarted: bool = False


class SecurityContextAuth:
    """EWS_AUTH=ntlm, kerberos or negotiate: one pyspnego context per connection.

    Every leg carries the request itself; a leg answered 401 was not acted on.
    Once a handshake ends, the connection carries requests without Authorization.
    """

    # How long credentials Exchange refused are not sent again: each refused NTLM or
    # Kerberos logon counts toward the account's lockout at the domain controller.
    HOLD_REFUSAL_S = 30.0

    def __init__(self, mode: str, credentials: Credentials, host: str, service: str) -> None:
        self._mode = mode
        self._refused_until = 0.0
        self._scheme, self._protocol = SCHEMES[mode]
        self._credentials = credentials
        # The service principal, used as it is: no DNS canonicalisation, whatever krb5.conf says.
        self._spn = f"{service}/{host}"
        # Kerberos with a password or keytab: one ticket for every connection. NTLM
        # needs none, and the ticket cache mode (neither) is MIT's own.
        wants_tickets = mode != "ntlm" and (credentials.password or credentials.keytab)
        self._tickets = TicketCache(credentials) if wants_tickets else None
        self._service_tickets = ServiceTickets()

    def connected(self, connection: Connection, deadline: float) -> None:
        connection.auth_state = self._start(connection)

    def authorization(self, connection: Connection) -> str | None:
        state: _Handshake = connection.auth_state
        if state.done:
            state.restarted = False  # a new request may authenticate a forgotten connection once
            return None
        if state.pending is None:
            # A handshake that ended in a 401 left the connection unauthenticated.
            state = connection.auth_state = self._start(connection)
        return self._send(state)

    def challenged(self, connection: Connection, answer: HttpAnswer) -> str | None:
        state: _Handshake = connection.auth_state
        if state.done:
            if state.restarted:
                return None
            # A kept connection answered 401: Exchange forgot it (a restart, a balancer
            # moving it). The request was not acted on; a new handshake may carry it.
            connection.auth_state = self._start(connection)
            connection.auth_state.restarted = True
            return self._send(connection.auth_state)
        offered = _offered_token(answer, self._scheme)
        if offered is None:
            schemes = offered_schemes(answer)
            if self._scheme not in schemes:
                # Not a refusal: Exchange never looked at the credentials.
                raise _not_offered(self._mode, schemes)
            # Credentials refused, or an NTLM negotiate answered without a challenge:
            # the 401 is Exchange's answer, mapped like any other.
            self._refused_until = time.monotonic() + self.HOLD_REFUSAL_S
            return None
        state.pending = _step(state.context, offered)
        return self._send(state)

    def answered(self, connection: Connection, answer: HttpAnswer) -> None:
        state: _Handshake = connection.auth_state
        if state.done:
            return
        if answer.status == 400:
            # IIS answers 400 to an Authorization it cannot read (a header too large for
            # http.sys, a token it cannot parse).
            raise _failed("Exchange refused the authentication handshake (HTTP 400)")
        offered = _offered_token(answer, self._scheme)
        if offered is not None and not state.context.complete:
            # Kerberos mutual authentication: Exchange proves who it is in the last token.
            _step(state.context, offered)
        state.done = True

    def _who(self, deadline: float) -> tuple[Any, str | None, str]:
        """Return the credentials for pyspnego and its protocol: the shared ticket, else what
        is configured. The KDC is waited for until the deadline (time.monotonic()); for
        Negotiate with a password, half the time left, then NTLM."""
        credentials = self._credentials
        protocol = self._protocol
        if self._tickets is None:
            return credentials.username, credentials.password, protocol
        falls_back = protocol == "negotiate" and credentials.password is not None
        if falls_back:
            # Half the time left for the KDC, so that NTLM still has the rest.
            deadline -= (deadline - time.monotonic()) / 2
        try:
            ticket = self._tickets.credential(deadline)
        except Exception as exc:  # krb5's errors: unknown principal, wrong password, no KDC
            if falls_back:
                # Negotiate falls back to NTLM, as Windows clients do: NTLM alone, since
                # pyspnego would otherwise ask the KDC once more with the password.
                LOG.info("no Kerberos ticket for Negotiate (%s); trying NTLM", type(exc).__name__)
                return credentials.username, credentials.password, "ntlm"
            if isinstance(exc, TimeoutError):
                raise ExchangeTimeout(
                    "The Kerberos KDC did not answer in time", outcome=ExchangeOutcome.TIMEOUT
                ) from None
            raise _library_failed("could not get a Kerberos ticket", exc) from None
        if credentials.password is not None and falls_back:
            # Kerberos from the shared ticket, NTLM from the password.
            password = spnego.Password(credentials.username or "", credentials.password)
            return [ticket, password], None, protocol
        return ticket, None, protocol

    def _send(self, state: _Handshake) -> str:
        token, state.pending = state.pending or b"", None
        return f"{self._scheme} {base64.b64encode(token).decode('ascii')}"

    def _start(self, connection: Connection) -> _Handshake:
        """Start a security context bound to this connection's TLS certificate."""
        if time.monotonic() < self._refused_until:
            raise _held(self.HOLD_REFUSAL_S)
        bindings = None
        if connection.peer_certificate is not None:
            try:
                end_point = certificate_hash(connection.peer_certificate)
            except (UnsupportedAlgorithm, ValueError):
                # OpenSSL accepted a certificate the cryptography package cannot read or
                # hash: RFC 5929 defines no binding for it, so Extended Protection cannot pass.
                raise _failed(
                    "Exchange's certificate is signed with an algorithm the gateway cannot "
                    "hash for channel binding (RFC 5929)"
                ) from None
            bindings = GssChannelBindings(application_data=b"tls-server-end-point:" + end_point)
        username, password, protocol = self._who(connection.deadline)
        context = self._context(username, password, protocol, bindings)
        if protocol == "ntlm":
            return _Handshake(context, _step(context, None))
        falls_back = protocol == "negotiate" and self._credentials.password is not None
        deadline = connection.deadline
        if falls_back:
            deadline -= (deadline - time.monotonic()) / 2  # as for the ticket-granting ticket
        try:
            return _Handshake(context, self._service_tickets.first_token(context, deadline))
        except TimeoutError:
            if not falls_back:
                raise ExchangeTimeout(
                    "The Kerberos KDC did not answer in time", outcome=ExchangeOutcome.TIMEOUT
                ) from None
        except Exception as exc:  # pyspnego, GSSAPI and krb5 each raise their own kinds
            raise _library_failed("failed", exc) from None
        LOG.info("no Kerberos service ticket for Negotiate (TimeoutError); trying NTLM")
        credentials = self._credentials
        context = self._context(credentials.username, credentials.password, "ntlm", bindings)
        return _Handshake(context, _step(context, None))

    def _context(
        self,
        username: Any,
        password: str | None,
        protocol: str,
        bindings: GssChannelBindings | None,
    ) -> spnego.ContextProxy:
        try:
            return client_context(
                username,
                password,
                protocol=protocol,
                spn=self._spn,
                channel_bindings=bindings,
            )
        except Exception as exc:  # pyspnego, GSSAPI and krb5 each raise their own kinds
            raise _library_failed("could not start", exc) from None


def _step(context: spnego.ContextProxy, token: bytes | None) -> bytes | None:
    try:
        return context.step(token)
    except Exception as exc:  # pyspnego, GSSAPI and krb5 each raise their own kinds
        raise _library_failed("failed", exc) from None


def certificate_hash(der_certificate: bytes) -> bytes:
    """Return the RFC 5929 tls-server-end-point hash of Exchange's certificate.

    The certificate's own signature hash, except SHA-256 where that is MD5 or SHA-1
    (RFC 5929 section 4.1), and where the signature names none (Ed25519).
    """
    certificate = x509.load_der_x509_certificate(der_certificate)
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(der_certificate)
    return digest.finalize()


def offered_schemes(answer: HttpAnswer) -> list[str]:
    """Return the schemes a 401's WWW-Authenticate offers, as KNOWN_SCHEMES spells them.

    Only known names: they go into problem details, and Exchange's text does not.
    """
    return schemes_in(answer.header("WWW-Authenticate"))


def schemes_in(www_authenticate: str | None) -> list[str]:
    """Return the known schemes a WWW-Authenticate value offers, in its order, once each."""
    offered: list[str] = []
    for challenge in (www_authenticate or "").split(","):
        name = KNOWN_SCHEMES.get(challenge.strip().partition(" ")[0].lower())
        if name is not None and name not in offered:
            offered.append(name)
    return offered


def _offered_token(answer: HttpAnswer, scheme: str) -> bytes | None:
    """Return the token Exchange sent for the scheme in WWW-Authenticate, if any."""
    for challenge in (answer.header("WWW-Authenticate") or "").split(","):
        name, _, value = challenge.strip().partition(" ")
        if name.lower() == scheme.lower() and value.strip():
            try:
                return base64.b64decode(value.strip(), validate=True)
            except binascii.Error:
                raise _failed("Exchange sent a challenge that is not base64") from None
    return None


def _raise_unless_offered(mode: str, answer: HttpAnswer) -> None:
    """Raise when a 401 offers schemes, but not the one MODE speaks: no credential was read.

    A 401 that names no scheme at all (a balancer's) is taken for a refusal.
    """
    schemes = offered_schemes(answer)
    if schemes and SCHEME_OF_MODE[mode] not in schemes:
        raise _not_offered(mode, schemes)


def _not_offered(mode: str, schemes: list[str]) -> ExchangeAuthFailed:
    """Say which schemes Exchange offers and which EWS_AUTH speaks one (never a token)."""
    known = ", ".join(schemes) or "no scheme the gateway knows"
    if mode == "none":
        sends = "EWS_AUTH=none sends no credentials"
    else:
        sends = f"EWS_AUTH={mode} speaks {SCHEME_OF_MODE[mode]}"
    modes = [suggested for scheme, suggested in MODE_FOR_SCHEME.items() if scheme in schemes]
    advice = f"; set EWS_AUTH={' or '.join(modes)}" if modes else ""
    return _failed(f"Exchange offers {known}, and {sends}{advice}")


def _library_failed(what: str, exc: Exception) -> ExchangeAuthFailed:
    # The library's message says why (no such principal, clock skew, wrong binding) and
    # holds no secret; it goes to the log, the caller gets its kind.
    LOG.warning("authentication to Exchange %s: %s: %s", what, type(exc).__name__, exc)
    return _failed(f"the security library {what} ({type(exc).__name__})")


def _held(hold_s: float) -> ExchangeAuthFailed:
    return _failed(
        f"Exchange refused the gateway's credentials less than {hold_s:g} s ago; they are "
        "not sent again before then"
    )


def _failed(reason: str) -> ExchangeAuthFailed:
    return ExchangeAuthFailed(
        f"Upstream authentication failed: {reason}", outcome=ExchangeOutcome.HTTP_ERROR
    )


@dataclass(frozen=True)
class ExchangeCredentials:
    """How the gateway proves itself to Exchange: EWS_AUTH and the secrets it needs."""

    mode: str = "none"
    username: str = ""
    password: str = field(default="", repr=False)
    bearer_token: str = field(default="", repr=False)
    bearer_token_file: str | None = None
    keytab: str | None = None
    spn: str | None = None


def static_authorization(config: ExchangeCredentials) -> str | None:
    """Return the Authorization every request carries as it is (EWS_AUTH=basic), if any."""
    if config.mode != "basic":
        return None
    pair = f"{config.username}:{config.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def build_exchange_authenticator(config: ExchangeCredentials, host: str) -> ExchangeAuthenticator:
    """Build the configured per-connection authentication to Exchange, whose host is host."""
    mode = config.mode
    if mode == "basic":
        return BasicRefusalHold()
    if mode == "bearer":
        return BearerToken(config.bearer_token, config.bearer_token_file)
    if mode in SCHEMES:
        service, _, spn_host = (config.spn or f"HTTP/{host}").partition("/")
        credentials = Credentials(
            username=config.username or None,
            password=config.password or None,
            keytab=config.keytab,
        )
        return SecurityContextAuth(mode, credentials, spn_host, service)
    return NoCredentials()
