"""Dialing guardrails: which dial strings callers may have Exchange dial (GATEWAY_DIAL_ALLOW)."""

from __future__ import annotations

import re

from gateway.errors import DialStringNotAllowed
from gateway.guards.validation import MAX_DIAL_KEYS, MAX_SIP_URI_CHARS

ALLOW_ALL = "*"

# What a wildcard may stand for: letters, digits, '-', '.' and '_'. Never '+', so only a
# pattern that writes its '+' allows an international number; never the DTMF keys '*' and '#',
# which reach PBX features; never '@', ';', '?' or ':', so a wildcard in a SIP user part cannot
# reach into another domain, URI parameters or headers (RFC 3261 §19.1.1).
DIAL_CHARACTER = "[0-9A-Za-z._-]"
# Patterns are globs; these only turn up in one written as a regular expression.
REGEX_SYNTAX = re.compile(r"\.\*|[\\^$()\[\]{}|]")
# A pattern that can match a number: an optional leading '+', then digits, '#' and wildcards.
NUMBER_PATTERN = re.compile(r"\+?[0-9#?*]+")
SIP_SCHEMES = ("sip", "sips")


class DialPolicy:
    """Glob patterns (case-sensitive) that a whole dial string must match one of.

    `*` stands for any run, and `?` for one, of letters, digits, `-`, `.` and `_`; every
    other character, `+ # @ ;` included, matches only itself. So `+1555*` allows a prefix,
    `4???` four-digit extensions, `sip:*@pbx.example.com` users of one SIP domain, and none of
    them `+1555*#` or `sip:+900@evil.example;x=@pbx.example.com`. A pattern of `*` alone
    allows every dial string. Checked before anything reaches Exchange: toll fraud
    (premium-rate and international numbers through a stolen token) is the abuse this stops.
    """

    def __init__(self, patterns: tuple[str, ...]) -> None:
        if not patterns:
            raise ValueError("a dial policy needs at least one pattern")
        self.patterns = patterns
        # One compiled alternation that cannot backtrack more than linearly (glob_regex):
        # 0.7 µs for 240 characters where a plain translation took 13 s (benchmarks/RESULTS.md).
        self._match = re.compile("|".join(f"(?:{glob_regex(p)})" for p in patterns), re.DOTALL)

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


def glob_regex(pattern: str) -> str:
    """Return a regular expression for PATTERN that matches in O(len(text) * len(pattern)).

    Each `*` but the last takes the first fit of the text that follows it and keeps it (an
    atomic group): if a later fit led to a match, the first would too, since the text between
    the two fits' ends is dial characters that the next `*` covers. Only the last `*`
    backtracks, over one run.
    """
    if pattern == ALLOW_ALL:
        return ".*"
    segments = re.split(r"\*+", pattern)
    if len(segments) == 1:
        return _fixed(pattern)
    first, *middle, last = segments
    committed = "".join(f"(?>{DIAL_CHARACTER}*?{_fixed(segment)})" for segment in middle)
    return f"{_fixed(first)}{committed}{DIAL_CHARACTER}*{_fixed(last)}"


def never_matches(pattern: str) -> str | None:
    """Return why no dial string a caller may send can match PATTERN, or None if one can."""
    if pattern == ALLOW_ALL:
        return None
    stray = next((char for char in pattern if not "!" <= char <= "~"), None)
    if stray is not None:
        return f"no dial string holds {stray!r}"
    syntax = REGEX_SYNTAX.search(pattern)
    if syntax is not None:
        return (
            f"{syntax.group()!r} is regular-expression syntax; in a pattern * stands for any "
            "run and ? for one character"
        )
    if not (_fits_a_number(pattern) or _fits_a_sip_uri(pattern)):
        return (
            f"it fits neither a number (an optional leading +, then up to {MAX_DIAL_KEYS} "
            f"digits, * or #) nor a sip: or sips: URI of up to {MAX_SIP_URI_CHARS} characters "
            "after the colon"
        )
    return None


def _fixed(segment: str) -> str:
    return "".join(DIAL_CHARACTER if char == "?" else re.escape(char) for char in segment)


def _fits_a_number(pattern: str) -> bool:
    # A wildcard stands for digits here, never for '+' or the DTMF keys; so wildcards before
    # the '+' can only stand for nothing ("*+1555" matches "+1555").
    stars, plus, after = pattern.partition("+")
    if plus and not stars.strip("*"):
        pattern = plus + after
    keys = pattern.removeprefix("+")
    return bool(NUMBER_PATTERN.fullmatch(pattern)) and len(keys.replace("*", "")) <= MAX_DIAL_KEYS


def _fits_a_sip_uri(pattern: str) -> bool:
    # No wildcard stands for ':', so the pattern's first colon is the one after the scheme.
    scheme, colon, rest = pattern.partition(":")
    fixed = len(rest.replace("*", ""))
    return (
        bool(colon)
        and any(re.fullmatch(glob_regex(scheme), name) for name in SIP_SCHEMES)
        and (fixed > 0 or "*" in rest)
        and fixed <= MAX_SIP_URI_CHARS
    )
