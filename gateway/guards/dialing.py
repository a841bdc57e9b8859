"""Dialing guardrails: which dial strings callers may have Exchange dial (GATEWAY_DIAL_ALLOW)."""

from __future__ import annotations

import re

from gateway.errors import DialStringNotAllowed

ALLOW_ALL = "*"

# What a wildcard may stand for: letters, digits, '-', '.' and '_'. Never '+', so only a
# pattern that writes its '+' allows an international number; never the DTMF keys '*' and '#',
# which reach PBX features; never '@', ';', '?' or ':', so a wildcard in a SIP user part cannot
# reach into another domain, URI parameters or headers (RFC 3261 §19.1.1).
DIAL_CHARACTER = "[0-9A-Za-z._-]"


class DialPolicy:
    """Glob patterns (case-sensitive) that a whole dial string must match one of.

    `*` stands for any run, and `?` for one, of letters, digits, `-`, `.` and `_`; every
    other character, `+ * # @ ; [` included, matches only itself. So `+1555*` allows a prefix,
    `4???` four-digit extensions, `sip:*@pbx.example.com` users of one SIP domain, and none of
    them `+1555*#` or `sip:+900@evil.example;x=@pbx.example.com`. A pattern of `*` alone
    allows every dial string. Checked before anything reaches Exchange: toll fraud
    (premium-rate and international numbers through a stolen token) is the abuse this stops.
    """

    def __init__(self, patterns: tuple[str, ...]) -> None:
        if not patterns:
            raise ValueError("a dial policy needs at least one pattern")
        self.patterns = patterns
        # One compiled alternation: about 0.2 µs a check (benchmarks/RESULTS.md).
        self._match = re.compile("|".join(f"(?:{_regex(p)})" for p in patterns), re.DOTALL)

    @property
    def allows_everything(self) -> bool:
        """Whether the policy is `*` (or holds it), which serve warns about at start."""
        return ALLOW_ALL in self.patterns

    def check(self, dial_string: str) -> str:
        """Return DIAL_STRING if a pattern matches it whole, else raise DialStringNotAllowed."""
        if self._match.fullmatch(dial_string):
            return dial_string
        raise DialStringNotAllowed(
            "the gateway's dial policy (GATEWAY_DIAL_ALLOW) does not allow this dial string"
        )


def _regex(pattern: str) -> str:
    if pattern == ALLOW_ALL:
        return ".*"
    wildcards = {"*": DIAL_CHARACTER + "*", "?": DIAL_CHARACTER}
    return "".join(wildcards.get(char) or re.escape(char) for char in pattern)
