"""Dialing guardrails: only dial strings GATEWAY_DIAL_ALLOW matches ever reach Exchange."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dialing import DialPolicy
from gateway.errors import DialStringNotAllowed
from tests.guards import KEY_A, app_with_keys
from tests.test_api import FakeExchange

DIGITS = "0123456789"


def glob_matches(text: str, pattern: str) -> bool:
    """An independent reading of the globs the README documents: `*` any run, `?` one char."""
    if not pattern:
        return not text
    if pattern[0] == "*":
        return any(glob_matches(text[cut:], pattern[1:]) for cut in range(len(text) + 1))
    if not text:
        return False
    return (pattern[0] == "?" or pattern[0] == text[0]) and glob_matches(text[1:], pattern[1:])


dial_strings = st.builds(
    lambda plus, digits: plus + digits,
    st.sampled_from(["", "+"]),
    st.text(DIGITS, min_size=1, max_size=14),
)
patterns = st.text(DIGITS[:3] + "+*?", min_size=1, max_size=6)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
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

    allowed = any(glob_matches(dial_string, pattern) for pattern in policy)
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
    assert DialPolicy(("*",)).allows_everything
    assert not DialPolicy(("+1*",)).allows_everything
