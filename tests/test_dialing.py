"""Dialing guardrails: only dial strings GATEWAY_DIAL_ALLOW matches ever reach Exchange."""

from __future__ import annotations

from pathlib import Path

# The program `re` runs for a pattern; the standard library has no public parse tree.
from re import _parser as regex_parser
from re._constants import ANY, ATOMIC_GROUP, IN, LITERAL, MAX_REPEAT, MIN_REPEAT
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import DialStringNotAllowed, InvalidRequest
from gateway.guards.dialing import DialPolicy, glob_regex, never_matches
from gateway.guards.validation import MAX_DIAL_KEYS, MAX_SIP_URI_CHARS, parse_place_call
from tests.fake_ews import FakeExchange
from tests.guards import KEY_A, app_with_keys

DIAL_CHARACTERS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-._")


def policy_allows(text: str, pattern: str) -> bool:
    """An independent reading of docs/configuration.md: `*` alone allows all, else a glob."""
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
def test_the_documented_patterns_match_whole_dial_strings(dial_string: str, allowed: bool) -> None:
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


# Matching work: a pattern cannot make a check backtrack more than linearly.

# The longest dial string a caller may send (gateway.guards.validation).
LONGEST_DIAL_STRING = len("sips:") + MAX_SIP_URI_CHARS
ONE_CHARACTER = (LITERAL, IN, ANY)
# Every character a pattern may hold, wildcards and those a wildcard never stands for included.
any_patterns = st.text("0a.-_+*?#@;:", min_size=1, max_size=40)


def matching_steps(pattern: str, length: int) -> int:
    """Bound the steps `re` takes to fullmatch PATTERN's program against LENGTH characters.

    Read off the parsed program, failing on any shape the bound does not cover. A character
    is one step. An atomic group (a lazy run, then characters) tries at most LENGTH + 1 run
    lengths, each costing its characters, and is never entered again once it matched. The one
    greedy run, after every atomic group, backtracks over at most LENGTH + 1 lengths, each
    retrying the characters after it.
    """
    program: list[tuple[Any, Any]] = list(regex_parser.parse(glob_regex(pattern)))
    steps = 0
    for index, (op, value) in enumerate(program):
        if op in ONE_CHARACTER:
            steps += 1
        elif op is ATOMIC_GROUP:
            (run, (_, _, repeated)), *after = list(value)
            assert run is MIN_REPEAT
            assert is_one_character(repeated)
            assert all(op in ONE_CHARACTER for op, _ in after)
            steps += (length + 1) * (1 + len(after))
        else:
            assert op is MAX_REPEAT
            after = program[index + 1 :]
            assert is_one_character(value[2])
            assert all(op in ONE_CHARACTER for op, _ in after)
            return steps + (length + 1) * (1 + len(after))
    return steps


def is_one_character(items: Any) -> bool:
    return len(items) == 1 and items[0][0] in ONE_CHARACTER


def glob_matches_by_table(text: str, pattern: str) -> bool:
    """glob_matches in O(len(text) * len(pattern)), for the longest dial strings."""
    # matched[j]: the pattern read so far matches text[:j].
    matched = [True] + [False] * len(text)
    for token in pattern:
        if token == "*":
            for j in range(1, len(text) + 1):
                matched[j] = matched[j] or (matched[j - 1] and text[j - 1] in DIAL_CHARACTERS)
            continue
        fits = [char in DIAL_CHARACTERS if token == "?" else char == token for char in text]
        matched = [False] + [matched[j] and fits[j] for j in range(len(text))]
    return matched[-1]


longest_dial_strings = st.one_of(
    st.builds(
        lambda body: "sips:" + body,
        st.text("0a.-@;", min_size=MAX_SIP_URI_CHARS, max_size=MAX_SIP_URI_CHARS),
    ),
    st.builds(
        lambda keys: "+" + keys, st.text("0#*", min_size=MAX_DIAL_KEYS, max_size=MAX_DIAL_KEYS)
    ),
)


@settings(max_examples=300, deadline=None)
@given(policy=st.lists(any_patterns | patterns, min_size=1, max_size=4), text=longest_dial_strings)
def test_matching_work_is_linear_in_the_longest_dial_string_for_any_policy(
    policy: list[str], text: str
) -> None:
    """Whatever the policy, at most n + 1 steps per pattern character for the longest dial
    string a caller may send (n characters), and the answer trying every match would give."""
    for pattern in policy:
        steps = matching_steps(pattern, LONGEST_DIAL_STRING)
        assert steps <= (LONGEST_DIAL_STRING + 1) * (len(pattern) + 1), pattern

    allowed = any(pattern == "*" or glob_matches_by_table(text, pattern) for pattern in policy)
    assert allows(DialPolicy(tuple(policy)), text) == allowed


@settings(max_examples=1000)
@given(pattern=st.text("ab;?*", min_size=1, max_size=8), text=st.text("ab;", max_size=10))
def test_each_wildcard_taking_its_first_fit_decides_as_trying_every_fit_would(
    pattern: str, text: str
) -> None:
    """A wildcard keeps the first fit of the text after it; `;`, which no wildcard stands
    for, makes fits overlap and end where a later wildcard cannot reach past."""
    assert allows(DialPolicy((pattern,)), text) == policy_allows(text, pattern)


def test_five_wildcards_against_a_dial_string_of_240_characters_are_decided_at_once() -> None:
    """This pair once held a worker for 13 s: each `*` backtracked over each other's runs."""
    policy = DialPolicy(("sip:*-*-*-*-*@pbx.example.com",))

    assert not allows(policy, "sip:" + "-" * 236)
    assert allows(policy, "sip:" + "-" * 207 + "@pbx.example.com")


def allows(policy: DialPolicy, dial_string: str) -> bool:
    try:
        policy.check(dial_string)
    except DialStringNotAllowed:
        return False
    return True


# Patterns no dial string can match are refused at start (gateway.config reads them).


def is_dial_string(text: str) -> bool:
    try:
        parse_place_call({"itemId": "AAMkItem", "dialString": text})
    except InvalidRequest:
        return False
    return True


@settings(max_examples=500)
@given(
    pattern=st.one_of(
        any_patterns,
        st.builds(
            str.__add__,
            st.sampled_from(["sip:", "sips:", "s?p:", "*:", "sip*:", "+", ""]),
            st.text("019#*?@;.-a:", max_size=12),
        ),
    ),
    data=st.data(),
)
def test_a_pattern_refused_as_fitting_no_dial_string_matches_none(
    pattern: str, data: st.DataObject
) -> None:
    """Fill the wildcards in; whenever that makes a dial string a caller may send, the
    pattern must have been accepted (or refused as regular-expression syntax)."""
    filled = "".join(
        data.draw(st.sampled_from("0ais"))
        if char == "?"
        else data.draw(st.text("0sip", max_size=3))
        if char == "*"
        else char
        for char in pattern
    )
    assert allows(DialPolicy((pattern,)), filled)

    if is_dial_string(filled):
        reason = never_matches(pattern)
        assert reason is None or "regular-expression syntax" in reason, (pattern, filled)
