"""Dialing guardrails: only dial strings GATEWAY_DIAL_ALLOW matches ever reach Exchange."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import DialStringNotAllowed
from gateway.guards.dialing import DialPolicy
from tests.fake_ews import FakeExchange
from tests.guards import KEY_A, app_with_keys

DIAL_CHARACTERS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-._")


def policy_allows(text: str, pattern: str) -> bool:
    """An independent reading of the README: `*` alone allows all, else a glob must match."""
    return pattern == "*" or glob_matches(text, pattern)


def glob_matches(text: str, pattern: str) -> bool:
    """`*` stands for any run of dial characters, `?` for one, the rest for themselves."""
    if not pattern:
        return not text
    if pattern[0] == "*":
        return any(
            glob_matches(text[cut:], pattern[1:])
            for cut in range(len(text) + 1)
            if set(text[:cut]) <= DIAL_CHARACTERS
        )
    if not text:
        return False
    head = text[0] in DIAL_CHARACTERS if pattern[0] == "?" else pattern[0] == text[0]
    return head and glob_matches(text[1:], pattern[1:])


# Dial strings as callers may send them, DTMF keys and SIP URIs with parameters included.
dial_strings = st.one_of(
    st.builds(
        lambda plus, digits: plus + digits,
        st.sampled_from(["", "+"]),
        st.text("0123#*", min_size=1, max_size=14),
    ),
    st.builds(
        lambda user, domain: f"sip:{user}@{domain}",
        st.text("01a.+;@?=", min_size=1, max_size=8),
        st.sampled_from(["pbx.example.com", "evil.example", "pbx.example.com;maddr=evil"]),
    ),
)
patterns = st.one_of(
    st.text("012+*?#", min_size=1, max_size=6),
    st.builds(lambda user: f"sip:{user}@pbx.example.com", st.text("01a*?+", max_size=4)),
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=st.lists(patterns, min_size=1, max_size=3), dial_string=dial_strings)
def test_no_dial_string_outside_the_policy_ever_reaches_exchange(
    tmp_path: Path, policy: list[str], dial_string: str
) -> None:
    fake = FakeExchange()
    app = app_with_keys(tmp_path, fake, dial_allow=tuple(policy), rate_limit_calls=None)

    answer = app.test_client().post(
        "/calls",
        json={"itemId": "AAMkItem", "dialString": dial_string},
        headers={"X-API-Key": KEY_A},
    )

    allowed = any(policy_allows(dial_string, pattern) for pattern in policy)
    dialled = [call.arguments["dial_string"] for call in fake.calls]
    assert dialled == ([dial_string] if allowed else [])
    assert answer.status_code == (201 if allowed else 403)
    if not allowed:
        assert answer.get_json()["type"] == "urn:ews-gateway:problem:dial-string-not-allowed"


@pytest.mark.parametrize(
    ("dial_string", "allowed"),
    [
        ("+15551234567", True),
        ("+1555", True),
        ("+4915551234567", False),  # a prefix matches at the start only
        ("4711", True),
        ("47110", False),  # four-digit extensions: exactly four
        ("sip:alice@pbx.example.com", True),
        ("sip:alice@pbx.example.com.evil.example", False),
        ("SIP:alice@pbx.example.com", False),  # case-sensitive
        ("+1555*#", False),  # a wildcard never stands for the DTMF keys * and #
        ("4*#*", False),
        ("sip:alice.smith@pbx.example.com", True),
        ("sip:+900123@evil.example.net;x=@pbx.example.com", False),  # nor for @ ; + in a URI
        ("sip:alice@pbx.example.com;maddr=evil.example", False),
        ("sip:+15551234@pbx.example.com", False),  # '+' only where a pattern writes it
    ],
)
def test_the_readme_patterns_match_whole_dial_strings(dial_string: str, allowed: bool) -> None:
    policy = DialPolicy(("+1555*", "4???", "sip:*@pbx.example.com"))

    if allowed:
        assert policy.check(dial_string) == dial_string
    else:
        with pytest.raises(DialStringNotAllowed):
            policy.check(dial_string)


def test_star_alone_allows_everything_and_says_so() -> None:
    assert DialPolicy(("*",)).check("sip:+1@a.example;x=y?z#") == "sip:+1@a.example;x=y?z#"
    assert DialPolicy(("*",)).allows_everything
    assert not DialPolicy(("+1*",)).allows_everything
