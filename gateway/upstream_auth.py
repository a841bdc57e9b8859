"""The gateway's own credentials at Exchange (EWS_AUTH): every scheme, one transport.

`basic` and `bearer` add an Authorization header to each request. `ntlm`,
`kerberos` and `negotiate` authenticate a connection, as IIS does: the
transport lends a new connection to a Handshake, which runs pyspnego's
context over it with the request itself, and the connection then carries
further requests unauthenticated, as long as it stays in the pool. Over https
each handshake carries the TLS channel binding (RFC 5929
`tls-server-end-point`), so Exchange's Extended Protection accepts it.

A leg answered 401 was not acted on, so the request may go out again; the
answer the handshake ends with is the one Exchange acted on, and it is never
repeated. Security tokens are made and read only by pyspnego.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import spnego
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from spnego.channel_bindings import GssChannelBindings

from gateway.config import BEARER_TOKEN, Config
from gateway.errors import UpstreamAuthFailed
from gateway.http1 import Answer

LOG = logging.getLogger(__name__)

# NTLM needs two legs and Kerberos one or two; more means Exchange is looping.
MAX_HANDSHAKE_LEGS = 4
# The HTTP scheme each EWS_AUTH mode speaks, and pyspnego's name for its protocol.
SCHEMES = {"ntlm": ("NTLM", "ntlm"), "kerberos": ("Negotiate", "kerberos")}
SCHEMES["negotiate"] = ("Negotiate", "negotiate")

# Sends the request on the connection being authenticated, with this Authorization value.
SendLeg = Callable[[str], Answer]


class UpstreamAuth(Protocol):
    """How the transport authenticates to Exchange."""

    # True when a connection must be authenticated (by handshake()) before it carries requests.
    per_connection: bool

    def headers(self) -> Mapping[str, str]:
        """Return the headers every request carries (an Authorization value, or nothing)."""

    def renew(self, *, reused: bool) -> bool:
        """After a 401 (on a kept connection if reused), say whether to send the request again."""

    def handshake(self, send_leg: SendLeg, server_certificate: bytes | None) -> Answer:
        """Authenticate a new connection with the request itself; return Exchange's final answer."""


class NoAuth:
    """EWS_AUTH=none, and the static Authorization of EWS_AUTH=basic."""

    per_connection = False

    def __init__(self, authorization: str | None = None) -> None:
        self._headers = {"Authorization": authorization} if authorization else {}

    def headers(self) -> Mapping[str, str]:
        return self._headers

    def renew(self, *, reused: bool) -> bool:
        return False

    def handshake(self, send_leg: SendLeg, server_certificate: bytes | None) -> Answer:
        raise NotImplementedError("a per-request scheme has no handshake")


def basic(username: str, password: str) -> NoAuth:
    """EWS_AUTH=basic: the same Authorization header on every request (RFC 7617)."""
    pair = f"{username}:{password}".encode()
    return NoAuth("Basic " + base64.b64encode(pair).decode("ascii"))


class BearerToken:
    """EWS_AUTH=bearer: an OAuth access token, re-read when its file changes.

    Token files are rotated by whatever issues the tokens (a sidecar, a mounted
    secret); the file's identity (inode, size, modification time) is checked on
    every request, a cheap stat, and the token read again when it moved. After a
    401 the file is read again whatever the stat says, once.
    """

    per_connection = False

    def __init__(self, token: str, path: str | None = None) -> None:
        self._path = Path(path) if path else None
        self._lock = threading.Lock()
        self._seen = self._identity()
        self._headers = {"Authorization": f"Bearer {token}"}

    def headers(self) -> Mapping[str, str]:
        if self._path is not None and self._identity() != self._seen:
            self._reload()
        return self._headers

    def renew(self, *, reused: bool) -> bool:
        before = self._headers
        self._reload()
        return self._headers != before

    def handshake(self, send_leg: SendLeg, server_certificate: bytes | None) -> Answer:
        raise NotImplementedError("a per-request scheme has no handshake")

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
            self._headers = {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class Credentials:
    """Who the gateway is, for pyspnego: a password, a keytab, or the ticket cache."""

    username: str | None
    password: str | None = None
    keytab: str | None = None


class SecurityContextAuth:
    """EWS_AUTH=ntlm, kerberos or negotiate: one pyspnego context per new connection."""

    per_connection = True

    def __init__(self, mode: str, credentials: Credentials, host: str, service: str) -> None:
        self._scheme, self._protocol = SCHEMES[mode]
        self._credentials = credentials
        self._host = host
        self._service = service

    def headers(self) -> Mapping[str, str]:
        return {}

    def renew(self, *, reused: bool) -> bool:
        # A kept connection answered 401: Exchange forgot it (a restart, a balancer moving
        # it). The request was not acted on; a new connection with a new handshake may be.
        # A 401 ending a handshake refused the credentials: trying again would only risk
        # locking the account.
        return reused

    def handshake(self, send_leg: SendLeg, server_certificate: bytes | None) -> Answer:
        context = self._context(server_certificate)
        token = self._step(context, None)
        for _ in range(MAX_HANDSHAKE_LEGS):
            answer = send_leg(f"{self._scheme} {base64.b64encode(token or b'').decode('ascii')}")
            offered = _offered_token(answer, self._scheme)
            if answer.status != 401:
                return self._final(context, answer, offered)
            if offered is None:
                # Credentials refused, or the NTLM negotiate answered without a challenge:
                # the 401 is mapped like any other.
                return answer
            if not answer.reusable:
                raise _failed("Exchange closed the connection in the middle of the handshake")
            token = self._step(context, offered)
        raise _failed(f"Exchange did not finish the handshake in {MAX_HANDSHAKE_LEGS} legs")

    def _final(self, context: spnego.ContextProxy, answer: Answer, offered: bytes | None) -> Answer:
        """Check the answer that ends the handshake; Exchange acted on the request unless 400."""
        if answer.status == 400 and not context.complete:
            # IIS answers 400 to an Authorization it cannot read (a header too large for
            # http.sys, a token it cannot parse).
            raise _failed("Exchange refused the authentication handshake (HTTP 400)")
        if offered is not None and not context.complete:
            # Kerberos mutual authentication: Exchange proves who it is in the last token.
            self._step(context, offered)
        return answer

    def _context(self, server_certificate: bytes | None) -> spnego.ContextProxy:
        bindings = None
        if server_certificate is not None:
            bindings = GssChannelBindings(
                application_data=b"tls-server-end-point:" + certificate_hash(server_certificate)
            )
        credentials = self._credentials
        username: str | spnego.KerberosKeytab | None = credentials.username
        if credentials.keytab is not None:
            username = spnego.KerberosKeytab(credentials.keytab, credentials.username)
        try:
            # With a password or keytab, pyspnego asks the KDC for a ticket here.
            return spnego.client(
                username,
                credentials.password,
                hostname=self._host,
                service=self._service,
                channel_bindings=bindings,
                protocol=self._protocol,
            )
        except Exception as exc:  # pyspnego, GSSAPI and krb5 each raise their own kinds
            raise _library_failed("could not start", exc) from None

    def _step(self, context: spnego.ContextProxy, token: bytes | None) -> bytes | None:
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


def _offered_token(answer: Answer, scheme: str) -> bytes | None:
    """Return the token Exchange sent for the scheme in WWW-Authenticate, if any."""
    for challenge in (answer.header("WWW-Authenticate") or "").split(","):
        name, _, value = challenge.strip().partition(" ")
        if name.lower() == scheme.lower() and value.strip():
            try:
                return base64.b64decode(value.strip(), validate=True)
            except binascii.Error:
                raise _failed("Exchange sent a challenge that is not base64") from None
    return None


def _library_failed(what: str, exc: Exception) -> UpstreamAuthFailed:
    # The library's message says why (no such principal, clock skew, wrong binding) and
    # holds no secret; it goes to the log, the caller gets its kind.
    LOG.warning("authentication to Exchange %s: %s: %s", what, type(exc).__name__, exc)
    return _failed(f"the security library {what} ({type(exc).__name__})")


def _failed(reason: str) -> UpstreamAuthFailed:
    return UpstreamAuthFailed(f"Upstream authentication failed: {reason}", outcome="http_error")


def build_upstream_auth(config: Config, host: str) -> UpstreamAuth:
    """Build the configured authentication to Exchange, whose host name is host."""
    mode = config.ews_auth
    if mode == "basic":
        return basic(config.ews_username, config.ews_password)
    if mode == "bearer":
        return BearerToken(config.ews_bearer_token, config.ews_bearer_token_file)
    if mode in SCHEMES:
        service, _, spn_host = (config.ews_spn or f"HTTP/{host}").partition("/")
        credentials = Credentials(
            username=config.ews_username or None,
            password=config.ews_password or None,
            keytab=config.ews_keytab,
        )
        return SecurityContextAuth(mode, credentials, spn_host, service)
    return NoAuth()
