"""Who is calling: caller authentication, decided by GATEWAY_AUTH."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from gateway.config import Config, ConfigError
from gateway.errors import Unauthenticated

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class Authenticator(Protocol):
    """Checks a request's headers; raises Unauthenticated when they do not identify a caller."""

    @property
    def challenge(self) -> str | None:
        """The WWW-Authenticate value sent with a 401, if any."""

    def authenticate(self, headers: Mapping[str, str]) -> None:
        """Accept the caller or raise Unauthenticated."""


class OpenGateway:
    """GATEWAY_AUTH=none: every caller is accepted."""

    challenge: str | None = None

    def authenticate(self, headers: Mapping[str, str]) -> None:
        """Accept every caller."""


class ApiKeys:
    """GATEWAY_AUTH=apikey: `X-API-Key` must hash to one of the configured SHA-256 digests."""

    challenge: str | None = 'APIKey header="X-API-Key"'

    def __init__(self, digests: frozenset[bytes]) -> None:
        self._digests = digests

    @classmethod
    def from_file(cls, path: str) -> ApiKeys:
        """Read one hex SHA-256 digest per line; blank lines and `#` comments are skipped."""
        digests = set()
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            entry = line.split("#", 1)[0].strip().lower()
            if not entry:
                continue
            if not _SHA256_HEX.fullmatch(entry):
                raise ConfigError(
                    f"GATEWAY_API_KEYS_FILE line {number} is not a SHA-256 hex digest"
                )
            digests.add(bytes.fromhex(entry))
        if not digests:
            raise ConfigError("GATEWAY_API_KEYS_FILE holds no key digests")
        return cls(frozenset(digests))

    def authenticate(self, headers: Mapping[str, str]) -> None:
        """Accept the caller if its key's digest matches, comparing in constant time."""
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


def build_authenticator(config: Config) -> Authenticator:
    """Return the authenticator GATEWAY_AUTH asks for."""
    if config.gateway_auth == "apikey":
        assert config.api_keys_file is not None
        return ApiKeys.from_file(config.api_keys_file)
    return OpenGateway()
