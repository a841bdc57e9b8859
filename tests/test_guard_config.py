"""Configuration of the guards: dial policy, limits, Redis, call id key, operator claim."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway import cli
from gateway.config import PLACEHOLDER_CALL_ID_KEY, Config
from gateway.errors import ConfigError

SECRETS_EXAMPLE = Path(__file__).parents[1] / "deploy" / "kubernetes" / "secret.yaml"

MINIMAL = {"EWS_URL": "https://mail.example.com/EWS/Exchange.asmx", "GATEWAY_AUTH": "none"}


def from_env(**extra: str) -> Config:
    return Config.from_env({**MINIMAL, **extra})


def rejects(**extra: str) -> str:
    with pytest.raises(ConfigError) as error:
        from_env(**extra)
    return str(error.value)


def test_defaults_limit_calls_only_and_leave_the_policy_to_serve() -> None:
    config = from_env()

    assert config.dial_allow is None
    assert config.rate_limit_calls == "10/minute"
    assert config.rate_limit_requests is None
    assert config.redis_url is None
    assert config.call_id_key == b""


def test_the_dial_policy_is_a_list_of_trimmed_patterns() -> None:
    config = from_env(GATEWAY_DIAL_ALLOW=" +1555* , 4???,sip:*@pbx.example.com")

    assert config.dial_allow == ("+1555*", "4???", "sip:*@pbx.example.com")
    assert "GATEWAY_DIAL_ALLOW" in rejects(GATEWAY_DIAL_ALLOW="+1555*,,4???")


@pytest.mark.parametrize(
    "pattern",
    [
        r"^\+1555.*$",  # a regular expression
        "[0-9]",
        r"\+1555*",
        "+1555.*",
        "sip:.*@pbx.example.com",
        "(+1555|+1666)*",
        r"4\d{3}",
        "+1555 *",  # whitespace, which no dial string holds
        "+1555\t*",
        "+1555\u2013*",  # an en dash, as word processors write a hyphen
        "1555+*",  # '+' only leads a number
        "+1555*@pbx.example.com",
        "pbx.example.com",  # neither a number nor a sip: URI
        "sip*",  # no wildcard stands for the colon
        "sip:",
        "?" * 33,  # longer than any number
    ],
)
def test_a_pattern_no_dial_string_can_match_is_refused_in_one_line_naming_it(pattern: str) -> None:
    message = rejects(GATEWAY_DIAL_ALLOW=f"4???,{pattern}")

    assert message.startswith("GATEWAY_DIAL_ALLOW: ")
    assert repr(pattern) in message
    assert "can never match a dial string" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "pattern",
    [
        "+1555*",
        "4???",
        "#*",
        "+?*",
        "*+1555*",  # the first * can only stand for nothing
        "?" * 32,
        "sip:*@pbx.example.com",
        "sips:*-*@*.example.com",
        "*:alice@pbx.example.com",  # a wildcard may spell the scheme
        "*",
    ],
)
def test_a_pattern_some_dial_string_can_match_is_accepted(pattern: str) -> None:
    assert from_env(GATEWAY_DIAL_ALLOW=pattern).dial_allow == (pattern,)


@pytest.mark.parametrize("value", ["ten per minute", "10/fortnight", "10/minute;5/second"])
def test_a_limit_outside_the_limits_notation_is_refused_naming_the_variable(value: str) -> None:
    assert "GATEWAY_RATE_LIMIT_CALLS" in rejects(GATEWAY_RATE_LIMIT_CALLS=value)


def test_limits_can_be_switched_off_or_set() -> None:
    config = from_env(GATEWAY_RATE_LIMIT_CALLS="off", GATEWAY_RATE_LIMIT_REQUESTS="600/minute")

    assert config.rate_limit_calls is None
    assert config.rate_limit_requests == "600/minute"


def test_redis_takes_a_redis_url_and_its_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret\n")

    config = from_env(
        GATEWAY_REDIS_URL="rediss://redis.example.com:6380/0",
        GATEWAY_REDIS_PASSWORD_FILE=str(secret),
    )

    assert config.redis_url == "rediss://redis.example.com:6380/0"
    assert config.redis_password == "s3cret"
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize("url", ["http://redis.example.com", "redis://:pw@redis.example.com"])
def test_a_bad_redis_url_is_refused_without_repeating_it(url: str) -> None:
    message = rejects(GATEWAY_REDIS_URL=url)

    assert "GATEWAY_REDIS_URL" in message
    assert "pw" not in message


def test_redis_may_be_found_through_sentinel_with_its_own_password(tmp_path: Path) -> None:
    secret = tmp_path / "sentinel-password"
    secret.write_text("s3ntinel\n")
    url = "redis+sentinel://sentinel-0.redis:26379,sentinel-1.redis:26379/mymaster/0"

    config = from_env(GATEWAY_REDIS_URL=url, GATEWAY_REDIS_SENTINEL_PASSWORD_FILE=str(secret))

    assert (config.redis_url, config.redis_sentinel_password) == (url, "s3ntinel")
    assert "s3ntinel" not in repr(config)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:pw@sentinel:26379/mymaster",
        "redis+sentinel://sentinel:26379",
        "redis+sentinel://sentinel:26379/mymaster/zero",
    ],
)
def test_a_bad_sentinel_url_is_refused_naming_the_variable(url: str) -> None:
    message = rejects(GATEWAY_REDIS_URL=url)

    assert message.startswith("GATEWAY_REDIS_URL ")
    assert "pw" not in message


def test_a_sentinel_password_needs_a_sentinel_url_and_sentinel_takes_no_ca_bundle(
    tmp_path: Path,
) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    plain = "redis://redis.example.com:6379/0"
    sentinel = "redis+sentinel://sentinel:26379/mymaster"

    assert "GATEWAY_REDIS_SENTINEL_PASSWORD" in rejects(
        GATEWAY_REDIS_URL=plain, GATEWAY_REDIS_SENTINEL_PASSWORD="s3ntinel"
    )
    assert "GATEWAY_REDIS_CA_BUNDLE" in rejects(
        GATEWAY_REDIS_URL=sentinel, GATEWAY_REDIS_CA_BUNDLE=str(bundle)
    )


def test_the_call_id_key_must_be_long_enough_and_is_never_shown() -> None:
    assert "GATEWAY_CALL_ID_KEY" in rejects(GATEWAY_CALL_ID_KEY="short")

    config = from_env(GATEWAY_CALL_ID_KEY="a-call-id-key-of-32-bytes-or-more")

    assert config.call_id_key == b"a-call-id-key-of-32-bytes-or-more"
    assert "32-bytes" not in repr(config)


def test_the_placeholder_key_of_the_kubernetes_example_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    secrets = next(yaml.safe_load_all(SECRETS_EXAMPLE.read_text(encoding="utf-8")))
    placeholder = secrets["stringData"]["GATEWAY_CALL_ID_KEY"]
    key_file = tmp_path / "call-id-key"
    key_file.write_text(placeholder + "\n", encoding="utf-8")

    assert placeholder == PLACEHOLDER_CALL_ID_KEY
    for message in (
        rejects(GATEWAY_CALL_ID_KEY=placeholder),
        rejects(GATEWAY_CALL_ID_KEY_FILE=str(key_file)),
    ):
        assert message.startswith("GATEWAY_CALL_ID_KEY is the example placeholder")
        assert "\n" not in message


@pytest.mark.parametrize("key", ["k" * 32, "0" * 64, "é" * 32])
def test_a_key_of_one_repeated_character_is_refused(key: str) -> None:
    assert rejects(GATEWAY_CALL_ID_KEY=key).startswith(
        "GATEWAY_CALL_ID_KEY is one character repeated"
    )


def test_the_operator_claim_is_claim_equals_value_and_needs_jwt() -> None:
    assert "GATEWAY_OPERATOR_CLAIM" in rejects(GATEWAY_OPERATOR_CLAIM="roles")
    assert "GATEWAY_OPERATOR_CLAIM" in rejects(GATEWAY_OPERATOR_CLAIM="roles=call-operator")


def test_the_demo_sets_a_permissive_dial_policy_and_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[Config] = []
    monkeypatch.setattr(cli, "serve", lambda config: served.append(config) or 0)
    monkeypatch.setattr(cli, "_wait_until_up", lambda *_args: None)
    monkeypatch.setattr(cli, "_free_loopback_port", lambda: 9)
    monkeypatch.setattr(cli, "ensure_can_listen", lambda *_args: None)
    monkeypatch.setattr(cli.subprocess, "Popen", FakeProcess)
    monkeypatch.delenv("GATEWAY_DIAL_ALLOW", raising=False)

    assert cli.main(["demo"]) == 0

    assert served[0].dial_allow == ("*",)
    assert "GATEWAY_DIAL_ALLOW=* (the demo's default * allows" in capsys.readouterr().err


class FakeProcess:
    """Stands in for the simulator process the demo starts."""

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        pass

    def terminate(self) -> None:
        pass

    def wait(self, timeout: float) -> int:
        return 0


@pytest.mark.parametrize(("value", "digits"), [("", 4), ("0", 0), ("6", 6)])
def test_the_audit_keeps_the_configured_number_of_trailing_digits(value: str, digits: int) -> None:
    assert from_env(GATEWAY_AUDIT_DIAL_DIGITS=value).audit_dial_digits == digits
    assert "GATEWAY_AUDIT_DIAL_DIGITS" in rejects(GATEWAY_AUDIT_DIAL_DIGITS="33")
