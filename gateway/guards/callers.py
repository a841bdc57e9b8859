"""Who is calling: caller authentication (GATEWAY_AUTH) and the mailbox a caller acts as."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.errors import ConfigError, Forbidden, KeysUnavailable, Unauthenticated

LOG = logging.getLogger("gateway")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Only asymmetric algorithms: a public key must never be usable as an HMAC secret.
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
ASYMMETRIC_ALGORITHMS = frozenset({*RSA_ALGORITHMS, *EC_ALGORITHMS.values(), "EdDSA"})
CLOCK_SKEW_S = 30
# The JWKS fetch's socket timeout, and the longest a request waits for keys it needs.
JWKS_TIMEOUT_S = 2.0
MAX_MAILBOX_CHARS = 320
# An SID in its SDDL string form: revision 1, an authority, at most 15 sub-authorities.
_SID = re.compile(r"S-1-[0-9]{1,15}(?:-[0-9]{1,10}){1,15}")


@dataclass(frozen=True)
class Caller:
    """An authenticated caller; `mailbox` is set when calls run as the caller's own mailbox,
    and names it as EWS_IMPERSONATION_ID says (an SMTP address, a UPN or an SID).

    `subject` is the JWT `sub`, or `apikey:` and the first 16 hex digits of the key's SHA-256
    (never the key); `operator` callers may act on any call (gateway.guards.ownership).
    """

    subject: str | None = None
    mailbox: str | None = None
    operator: bool = False


ANONYMOUS = Caller()
# GATEWAY_AUTH=none: every caller is this one, which owns every call, wherever it was placed.
OPEN_CALLER = Caller(operator=True)
API_KEY_ID_HEX_DIGITS = 16


class RequestHeaders(Protocol):
    """A request's header fields, looked up case-insensitively (werkzeug's Headers)."""

    def get(self, key: str, default: str, /) -> str:
        """Return the field's value, or DEFAULT when it is absent."""


class CallerAuthenticator(Protocol):
    """Checks a request's headers and says who is calling."""

    @property
    def challenge(self) -> str | None:
        """The WWW-Authenticate value sent with a 401, if any."""

    def authenticate(self, headers: RequestHeaders) -> Caller:
        """Return the caller or raise Unauthenticated / Forbidden."""


class OpenGateway:
    """GATEWAY_AUTH=none: every caller is accepted."""

    challenge: str | None = None

    def authenticate(self, headers: RequestHeaders) -> Caller:
        """Accept every caller as the one anonymous caller."""
        return OPEN_CALLER


class ApiKeys:
    """GATEWAY_AUTH=apikey: `X-API-Key` must hash to one of the configured SHA-256 digests.

    The file is read again when it changes, so keys are added and revoked without a restart:
    its identity (inode, size, modification time) is checked at most every CHECK_INTERVAL_S
    on the request path, as EWS_BEARER_TOKEN_FILE's is. A new file that cannot be read, holds
    a line that is no digest or holds none keeps the keys read before, and is warned.
    """

    challenge: str | None = 'APIKey header="X-API-Key"'
    CHECK_INTERVAL_S = 1.0

    def __init__(self, digests: frozenset[bytes], path: str | None = None) -> None:
        self._digests = digests
        self._path = Path(path) if path else None
        self._reload_lock = threading.Lock()
        self._seen = _file_identity(self._path)
        self._checked_at = time.monotonic()

    @classmethod
    def from_file(cls, path: str) -> ApiKeys:
        """Read one hex SHA-256 digest per line; blank lines and `#` comments are skipped."""
        return cls(read_key_digests(Path(path)), path)

    def authenticate(self, headers: RequestHeaders) -> Caller:
        """Accept the caller if its key's digest matches, comparing in constant time."""
        self._follow_file()
        key = headers.get("X-API-Key", "")
        if not key:
            raise Unauthenticated("send an API key in the X-API-Key header")
        presented = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        # Compare against every digest so timing says nothing about which one matched.
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        if not matched:
            raise Unauthenticated("the API key is not valid")
        # The digest's prefix names the key in audit lines and call ownership, never the key.
        return Caller(subject="apikey:" + presented.hex()[:API_KEY_ID_HEX_DIGITS])

    def _follow_file(self) -> None:
        """Read the keys file again if it changed since it was last read (checked once a second)."""
        now = time.monotonic()
        if self._path is None or now - self._checked_at < self.CHECK_INTERVAL_S:
            return
        self._checked_at = now
        if _file_identity(self._path) == self._seen:
            return
        with self._reload_lock:
            identity = _file_identity(self._path)
            if identity == self._seen:
                return  # another thread read it meanwhile
            self._seen = identity
            try:
                self._digests = read_key_digests(self._path)
            except (OSError, UnicodeDecodeError) as error:
                LOG.warning(
                    "GATEWAY_API_KEYS_FILE cannot be read (%s); keeping the keys read before",
                    type(error).__name__,
                )
                return
            except ConfigError as error:
                LOG.warning("%s; keeping the keys read before", error)
                return
            LOG.info("GATEWAY_API_KEYS_FILE changed: %d keys read", len(self._digests))


def read_key_digests(path: Path) -> frozenset[bytes]:
    """Read an API keys file: one hex SHA-256 digest per line, `#` comments; ConfigError if none."""
    digests = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if not _SHA256_HEX.fullmatch(entry):
            raise ConfigError(f"GATEWAY_API_KEYS_FILE line {number} is not a SHA-256 hex digest")
        digests.add(bytes.fromhex(entry))
    if not digests:
        raise ConfigError("GATEWAY_API_KEYS_FILE holds no key digests")
    return frozenset(digests)


def _file_identity(path: Path | None) -> tuple[int, int, int] | None:
    """Return what changes when a file is replaced or rewritten: inode, size, mtime."""
    if path is None:
        return None
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


class KeySource(Protocol):
    """Finds the public key (and the algorithms it fits) that should have signed a token."""

    def key_for(self, token: str) -> tuple[Any, list[str]]:
        """Return (key, algorithms) or raise Unauthenticated / KeysUnavailable."""


class StaticKey:
    """One PEM public key (GATEWAY_JWT_PUBLIC_KEY)."""

    def __init__(self, pem: str) -> None:
        try:
            self._key = load_pem_public_key(pem.encode("ascii"))
        except ValueError:
            raise ConfigError("GATEWAY_JWT_PUBLIC_KEY is not a PEM public key") from None
        self._algorithms = _algorithms_for(self._key)

    def key_for(self, token: str) -> tuple[Any, list[str]]:
        """Return the configured key and the algorithms its type allows."""
        return self._key, self._algorithms


def _algorithms_for(key: object) -> list[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return list(RSA_ALGORITHMS)
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in EC_ALGORITHMS:
        return [EC_ALGORITHMS[key.curve.name]]
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ["EdDSA"]
    raise ConfigError("GATEWAY_JWT_PUBLIC_KEY must be an RSA, EC (P-256/384/521) or Ed25519 key")


class JwksKeys:
    """Keys from a JWKS URL, cached and refreshed off the request path.

    A refresh runs on its own thread, one at a time, once the keys are older than `ttl_s` or
    when a token names an unknown `kid`, and starts at most once per `min_refresh_s`, so forged
    `kid`s cannot hammer the identity provider. A request whose key is cached never waits; one
    whose key is not waits for the refresh in flight, at most `timeout_s`. A failed refresh
    keeps the keys there were. `fetch` stands in for fetching the URL (tests).
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 300,
        min_refresh_s: float = 30,
        timeout_s: float = JWKS_TIMEOUT_S,
        fetch: Callable[[], jwt.PyJWKSet] | None = None,
    ) -> None:
        if fetch is None:
            client = jwt.PyJWKClient(url, cache_keys=False, cache_jwk_set=False, timeout=timeout_s)
            fetch = partial(client.get_jwk_set, refresh=True)
        self._fetch = fetch
        self._ttl_s = ttl_s
        self._min_refresh_s = min_refresh_s
        self._wait_s = timeout_s
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._refresh_started_at = float("-inf")
        # Set when the refresh in flight ends; None while none is.
        self._refreshed: threading.Event | None = None
        # Guards the fields above, and is never held while fetching.
        self._lock = threading.Lock()

    def key_for(self, token: str) -> tuple[Any, list[str]]:
        """Return the key named by the token's `kid`, waiting for a refresh only if it is new."""
        kid = _unverified_kid(token)
        with self._lock:
            jwk = self._keys.get(kid)
            stale = time.monotonic() - self._fetched_at > self._ttl_s
            refreshed = self._start_refresh() if jwk is None or stale else None
        if jwk is None and refreshed is not None:
            refreshed.wait(self._wait_s)
            with self._lock:
                jwk = self._keys.get(kid)
        if jwk is not None:
            return jwk.key, [jwk.algorithm_name]
        if not self._keys:
            raise KeysUnavailable("the token signing keys cannot be fetched now")
        raise Unauthenticated("the token's signing key is not known")

    def _start_refresh(self) -> threading.Event | None:
        """Return the refresh in flight, starting one unless the last started too recently.

        Called with the lock held.
        """
        if self._refreshed is None:
            now = time.monotonic()
            if now - self._refresh_started_at < self._min_refresh_s:
                return None
            self._refresh_started_at = now
            self._refreshed = threading.Event()
            threading.Thread(
                target=self._refresh, args=(self._refreshed,), name="jwks-refresh", daemon=True
            ).start()
        return self._refreshed

    def _refresh(self, refreshed: threading.Event) -> None:
        keys: dict[str | None, jwt.PyJWK] = {}
        try:
            keys = _signing_keys(self._fetch())
        except Exception as error:
            # Whatever failed (no answer in time, an error page, no usable key), no caller is
            # here to raise to: the keys there were stay.
            LOG.warning("JWKS refresh failed; keeping the cached keys", extra={"error": str(error)})
        finally:
            with self._lock:
                if keys:
                    self._keys = keys
                    self._fetched_at = time.monotonic()
                self._refreshed = None
            refreshed.set()


def _signing_keys(jwk_set: jwt.PyJWKSet) -> dict[str | None, jwt.PyJWK]:
    keys = {jwk.key_id: jwk for jwk in jwk_set.keys if jwk.algorithm_name in ASYMMETRIC_ALGORITHMS}
    if not keys:
        raise ValueError("the JWKS holds no asymmetric signing key")
    if len(keys) == 1:
        # A lone key also serves tokens that name no kid.
        keys[None] = next(iter(keys.values()))
    return keys


def _unverified_kid(token: str) -> str | None:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        raise Unauthenticated("the bearer token is not a JWT") from None
    return kid if isinstance(kid, str) else None


class JwtBearer:
    """GATEWAY_AUTH=jwt: bearer tokens checked for signature, exp, nbf, iss and aud."""

    challenge: str | None = 'Bearer realm="ews-gateway"'

    def __init__(
        self,
        keys: KeySource,
        *,
        issuer: str,
        audience: str,
        mailbox_claim: str | None = None,
        impersonation_id: str = "smtp",
        operator_claim: tuple[str, str] | None = None,
    ) -> None:
        if impersonation_id not in _MAILBOX_IDS:
            raise ValueError(f"no such impersonation id type: {impersonation_id!r}")
        self._keys = keys
        self._impersonation_id = impersonation_id
        self._operator_claim = operator_claim
        self._issuer = issuer
        self._audience = audience
        self._mailbox_claim = mailbox_claim

    def authenticate(self, headers: RequestHeaders) -> Caller:
        """Verify the bearer token and return its subject (and mailbox when acting as the user)."""
        scheme, _, token = headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("send a bearer token in the Authorization header")
        key, algorithms = self._keys.key_for(token)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=self._issuer,
                audience=self._audience,
                leeway=CLOCK_SKEW_S,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as error:
            raise Unauthenticated(f"the bearer token is not valid: {error}") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            # Calls belong to their caller's subject: a token naming nobody could own nothing.
            raise Unauthenticated("the bearer token has no sub claim")
        if not _is_text(subject):
            # JSON lets a string hold half a surrogate pair, which no store or log line can.
            raise Unauthenticated("the bearer token's sub claim is not valid Unicode text")
        mailbox = None if self._mailbox_claim is None else self._mailbox(claims)
        return Caller(subject=subject, mailbox=mailbox, operator=self._is_operator(claims))

    def _is_operator(self, claims: Mapping[str, Any]) -> bool:
        """Whether the token carries GATEWAY_OPERATOR_CLAIM's value (a string, a
        space-separated list such as OAuth's `scope`, or a JSON list such as `roles`)."""
        if self._operator_claim is None:
            return False
        name, wanted = self._operator_claim
        value = claims.get(name)
        if isinstance(value, str):
            return wanted in value.split(" ")
        return isinstance(value, list) and wanted in value

    def _mailbox(self, claims: Mapping[str, Any]) -> str:
        """Return the claim's mailbox id if it has the shape EWS_IMPERSONATION_ID expects."""
        mailbox = claims.get(self._mailbox_claim or "")
        fits, expected = _MAILBOX_IDS[self._impersonation_id]
        if not isinstance(mailbox, str) or not fits(mailbox):
            raise Forbidden(f"the token's {self._mailbox_claim!r} claim names no {expected}")
        return mailbox


def _is_text(value: str) -> bool:
    """Whether VALUE is Unicode text UTF-8 can carry: no lone surrogate (RFC 8259 section 8.2)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_address(value: str) -> bool:
    """Whether VALUE is one name@domain: an SMTP address or a user principal name."""
    return (
        3 <= len(value) <= MAX_MAILBOX_CHARS
        and value.count("@") == 1
        and not value.startswith("@")
        and not value.endswith("@")
        and value.isprintable()
        and not any(char.isspace() for char in value)
    )


def _is_sid(value: str) -> bool:
    return _SID.fullmatch(value) is not None


# For each EWS_IMPERSONATION_ID: whether a claim's value fits it, and what it should name.
_MAILBOX_IDS: Mapping[str, tuple[Callable[[str], bool], str]] = {
    "smtp": (_is_address, "mailbox address"),
    "upn": (_is_address, "user principal name"),
    "sid": (_is_sid, "security identifier (S-1-5-...)"),
}
