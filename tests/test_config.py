"""Config.from_env: defaults, and one clear error naming the variable for every bad value."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
from pathlib import Path

import pytest

from gateway import cli
from gateway.config import VARIABLES, Config, known_variables
from gateway.errors import ConfigError

EWS_URL = "https://mail.example.com/EWS/Exchange.asmx"
MINIMAL = {"EWS_URL": EWS_URL, "GATEWAY_AUTH": "none"}


def from_env(**overrides: str) -> Config:
    return Config.from_env({**MINIMAL, **overrides})


def config_error(environ: dict[str, str]) -> str:
    """Return the message of the ConfigError this environment raises."""
    with pytest.raises(ConfigError) as caught:
        Config.from_env(environ)
    return str(caught.value)


def rejects(**overrides: str) -> str:
    return config_error({**MINIMAL, **overrides})


def secret_file(tmp_path: Path, content: str, name: str = "secret") -> str:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return str(path)


def test_defaults_apply_when_only_the_required_variables_are_set() -> None:
    config = from_env()

    assert config.ews_url == EWS_URL
    assert config.gateway_auth == "none"
    assert config.ews_server_version == "Exchange2010"
    assert config.ews_timeout_s == 10.0
    assert config.ews_auth == "none"
    assert config.ews_verify_tls is True
    assert config.ews_ca_bundle is None
    assert config.bind == "0.0.0.0:8080"
    assert config.workers is None
    assert config.threads is None
    assert config.log_level == "info"


def test_the_config_is_frozen() -> None:
    config = from_env()

    with pytest.raises(AttributeError):
        config.ews_url = "https://elsewhere.example.com/"  # type: ignore[misc]


# EWS_URL


@pytest.mark.parametrize("environ", [{"GATEWAY_AUTH": "none"}, {**MINIMAL, "EWS_URL": "  "}])
def test_ews_url_is_required(environ: dict[str, str]) -> None:
    assert "EWS_URL" in config_error(environ)


@pytest.mark.parametrize(
    "url",
    ["ftp://mail.example.com/EWS/Exchange.asmx", "mail.example.com/EWS", "https://", "file:///x"],
)
def test_ews_url_must_be_http_or_https(url: str) -> None:
    assert "EWS_URL" in rejects(EWS_URL=url)


@pytest.mark.parametrize("url", ["http://mail.example.com/EWS", "https://10.0.0.5:8443/EWS/x"])
def test_an_http_or_https_ews_url_is_accepted(url: str) -> None:
    assert from_env(EWS_URL=url).ews_url == url


@pytest.mark.parametrize(
    "url",
    [
        "https://svc:hunter2@mail.example.com/EWS/Exchange.asmx",
        "https://:hunter2@mail.example.com/EWS/Exchange.asmx",
        "https://svc@mail.example.com/EWS/Exchange.asmx",
    ],
)
def test_ews_url_must_not_carry_credentials(url: str) -> None:
    message = rejects(EWS_URL=url)

    assert "EWS_URL" in message
    assert "hunter2" not in message


def test_a_rejected_ews_url_never_repeats_an_embedded_password() -> None:
    # A typo in the scheme must not put the password into start-up logs.
    message = rejects(EWS_URL="htps://svc:hunter2@mail.example.com/EWS/Exchange.asmx")

    assert "EWS_URL" in message
    assert "hunter2" not in message


# GATEWAY_AUTH


def test_gateway_auth_is_required() -> None:
    assert "GATEWAY_AUTH" in config_error({"EWS_URL": EWS_URL})


@pytest.mark.parametrize("value", ["open", "off", "basic", "NONE", "yes"])
def test_gateway_auth_is_limited_to_the_allowed_values(value: str) -> None:
    assert "GATEWAY_AUTH" in rejects(GATEWAY_AUTH=value)


def test_gateway_auth_apikey_is_accepted_with_a_keys_file(tmp_path: Path) -> None:
    keys = secret_file(tmp_path, "0" * 64 + "\n", name="keys")

    config = from_env(GATEWAY_AUTH="apikey", GATEWAY_API_KEYS_FILE=keys)

    assert config.gateway_auth == "apikey"
    assert config.api_keys_file == keys


def test_gateway_auth_apikey_needs_a_keys_file() -> None:
    assert "GATEWAY_API_KEYS_FILE" in rejects(GATEWAY_AUTH="apikey")


# EWS_SERVER_VERSION


@pytest.mark.parametrize("version", ["Exchange2016", "Exchange2013_SP1", "Exchange2010_SP2"])
def test_a_version_from_exchange_version_type_is_accepted(version: str) -> None:
    assert from_env(EWS_SERVER_VERSION=version).ews_server_version == version


@pytest.mark.parametrize("version", ["Exchange2019", "exchange2010", "2010", "Exchange2010x"])
def test_a_version_outside_exchange_version_type_is_rejected(version: str) -> None:
    assert "EWS_SERVER_VERSION" in rejects(EWS_SERVER_VERSION=version)


# EWS_TIMEOUT_SECONDS


@pytest.mark.parametrize(
    ("raw", "seconds"), [("2.5", 2.5), ("30", 30.0), ("0.1", 0.1), ("300", 300.0)]
)
def test_the_timeout_is_read_as_seconds(raw: str, seconds: float) -> None:
    assert from_env(EWS_TIMEOUT_SECONDS=raw).ews_timeout_s == seconds


@pytest.mark.parametrize("raw", ["ten", "10s", "0", "-1", "0.05", "301", "nan", "inf"])
def test_a_timeout_that_is_not_a_sane_number_is_rejected(raw: str) -> None:
    assert "EWS_TIMEOUT_SECONDS" in rejects(EWS_TIMEOUT_SECONDS=raw)


# GATEWAY_WORKERS, GATEWAY_THREADS


@pytest.mark.parametrize("variable", ["GATEWAY_WORKERS", "GATEWAY_THREADS"])
def test_workers_and_threads_are_whole_numbers(variable: str) -> None:
    config = from_env(**{variable: "4"})

    assert (config.workers if variable == "GATEWAY_WORKERS" else config.threads) == 4


@pytest.mark.parametrize("variable", ["GATEWAY_WORKERS", "GATEWAY_THREADS"])
@pytest.mark.parametrize("raw", ["0", "-2", "2.5", "four", "1e2", "257", "\u00b2"])
def test_workers_and_threads_that_are_not_whole_numbers_are_rejected_naming_the_variable(
    variable: str, raw: str
) -> None:
    assert variable in rejects(**{variable: raw})


# GATEWAY_MAX_REQUESTS


@pytest.mark.parametrize(("raw", "expected"), [("", None), ("1", 1), ("0", 0), ("500000", 500_000)])
def test_max_requests_is_a_whole_number_or_unset(raw: str, expected: int | None) -> None:
    assert from_env(GATEWAY_MAX_REQUESTS=raw).max_requests == expected


@pytest.mark.parametrize("raw", ["-1", "2.5", "many", "1e6", "1000000001", "\u00b2"])
def test_max_requests_that_is_not_a_whole_number_is_rejected_naming_it(raw: str) -> None:
    assert "GATEWAY_MAX_REQUESTS" in rejects(GATEWAY_MAX_REQUESTS=raw)


# EWS_VERIFY_TLS


@pytest.mark.parametrize("raw", ["true", "TRUE", "1", "yes", "on"])
def test_verify_tls_accepts_true_words(raw: str) -> None:
    assert from_env(EWS_VERIFY_TLS=raw).ews_verify_tls is True


@pytest.mark.parametrize("raw", ["false", "False", "0", "no", "off"])
def test_verify_tls_accepts_false_words(raw: str) -> None:
    assert from_env(EWS_VERIFY_TLS=raw).ews_verify_tls is False


@pytest.mark.parametrize("raw", ["maybe", "disabled", "2"])
def test_verify_tls_rejects_other_words(raw: str) -> None:
    assert "EWS_VERIFY_TLS" in rejects(EWS_VERIFY_TLS=raw)


# EWS_CA_BUNDLE


def test_an_existing_ca_bundle_is_accepted(tmp_path: Path) -> None:
    bundle = secret_file(tmp_path, "-----BEGIN CERTIFICATE-----\n", name="ca.pem")

    assert from_env(EWS_CA_BUNDLE=bundle).ews_ca_bundle == bundle


def test_a_missing_ca_bundle_is_rejected(tmp_path: Path) -> None:
    assert "EWS_CA_BUNDLE" in rejects(EWS_CA_BUNDLE=str(tmp_path / "absent.pem"))


def test_a_directory_is_not_a_ca_bundle(tmp_path: Path) -> None:
    assert "EWS_CA_BUNDLE" in rejects(EWS_CA_BUNDLE=str(tmp_path))


# Secrets and EWS_AUTH


def test_the_state_directory_is_unset_by_default_and_never_the_stores_own() -> None:
    config = from_env()

    # serve fills in state_dir (the instance's store); the environment only names its parent.
    assert (config.state_root, config.state_dir) == (None, None)


def test_gateway_state_dir_names_an_existing_directory_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "state").mkdir()
    monkeypatch.chdir(tmp_path)

    assert from_env(GATEWAY_STATE_DIR="state").state_root == str(tmp_path / "state")


def test_gateway_state_dir_must_be_a_directory(tmp_path: Path) -> None:
    not_a_directory = secret_file(tmp_path, "x")

    for value in (str(tmp_path / "missing"), not_a_directory):
        message = rejects(GATEWAY_STATE_DIR=value)
        assert message.startswith("GATEWAY_STATE_DIR names")
        assert "not a directory the gateway can write" in message


def test_the_password_is_read_from_its_file_without_the_trailing_newline(tmp_path: Path) -> None:
    password_file = secret_file(tmp_path, "s3cret pass\n")

    config = from_env(EWS_AUTH="basic", EWS_USERNAME="svc", EWS_PASSWORD_FILE=password_file)

    assert config.ews_password == "s3cret pass"


def test_the_bearer_token_is_read_from_its_file(tmp_path: Path) -> None:
    token_file = secret_file(tmp_path, "eyJ.token.sig\r\n")

    config = from_env(EWS_AUTH="bearer", EWS_BEARER_TOKEN_FILE=token_file)

    assert config.ews_bearer_token == "eyJ.token.sig"


def test_a_secret_and_its_file_together_are_an_error(tmp_path: Path) -> None:
    password_file = secret_file(tmp_path, "from-file\n")

    message = rejects(
        EWS_AUTH="basic",
        EWS_USERNAME="svc",
        EWS_PASSWORD="from-env",
        EWS_PASSWORD_FILE=password_file,
    )

    assert "EWS_PASSWORD" in message
    assert "from-env" not in message
    assert "from-file" not in message


def test_an_unreadable_secret_file_is_an_error_naming_the_variable(tmp_path: Path) -> None:
    message = rejects(
        EWS_AUTH="basic", EWS_USERNAME="svc", EWS_PASSWORD_FILE=str(tmp_path / "absent")
    )

    assert "EWS_PASSWORD_FILE" in message


@pytest.mark.parametrize(
    "credentials",
    [{}, {"EWS_USERNAME": "svc"}, {"EWS_PASSWORD": "pw"}, {"EWS_USERNAME": "", "EWS_PASSWORD": ""}],
)
def test_basic_auth_without_username_and_password_is_rejected(credentials: dict[str, str]) -> None:
    message = rejects(EWS_AUTH="basic", **credentials)

    assert "EWS_USERNAME" in message
    assert "EWS_PASSWORD" in message


def test_basic_auth_accepts_a_domain_user() -> None:
    config = from_env(EWS_AUTH="basic", EWS_USERNAME="CORP\\svc-ews", EWS_PASSWORD="pw")

    assert config.ews_username == "CORP\\svc-ews"


def test_bearer_auth_without_a_token_is_rejected() -> None:
    assert "EWS_BEARER_TOKEN" in rejects(EWS_AUTH="bearer")


@pytest.mark.parametrize("token", ["two\nlines", "has space", "tab\there", "caf\u00e9"])
def test_a_bearer_token_that_could_not_be_sent_is_rejected_without_echoing_it(token: str) -> None:
    message = rejects(EWS_AUTH="bearer", EWS_BEARER_TOKEN=token)

    assert "EWS_BEARER_TOKEN" in message
    assert token not in message


@pytest.mark.parametrize("value", ["Kerberos", "Basic", "digest", "spnego"])
def test_ews_auth_is_limited_to_the_allowed_values(value: str) -> None:
    assert "EWS_AUTH" in rejects(EWS_AUTH=value)


@pytest.mark.parametrize("mode", ["kerberos", "negotiate"])
def test_kerberos_without_gssapi_says_in_one_line_what_to_install(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "gssapi" else real_find_spec(name)
    )

    message = rejects(EWS_AUTH=mode)

    assert message == (
        f"EWS_AUTH={mode} needs GSSAPI: pip install 'ews-call-gateway[kerberos]' "
        "(builds against libkrb5-dev)"
    )


@pytest.fixture
def gssapi_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether GSSAPI is installed is not what these tests are about: say it is."""
    real_find_spec = importlib.util.find_spec
    installed = importlib.machinery.ModuleSpec("gssapi", None)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: installed if name == "gssapi" else real_find_spec(name),
    )


@pytest.mark.usefixtures("gssapi_installed")
def test_kerberos_takes_a_keytab_a_password_or_the_ticket_cache(tmp_path: Path) -> None:
    keytab = secret_file(tmp_path, "", name="gateway.keytab")

    by_keytab = from_env(EWS_AUTH="kerberos", EWS_KEYTAB=keytab, EWS_USERNAME="svc@CORP.EXAMPLE")
    by_password = from_env(EWS_AUTH="negotiate", EWS_USERNAME="svc@CORP", EWS_PASSWORD="pw")
    by_cache = from_env(EWS_AUTH="kerberos", EWS_SPN="HTTP/cas01.corp.example.com")

    assert (by_keytab.ews_keytab, by_keytab.ews_password) == (keytab, "")
    assert (by_password.ews_username, by_password.ews_keytab) == ("svc@CORP", None)
    assert (by_cache.ews_spn, by_cache.ews_username) == ("HTTP/cas01.corp.example.com", "")


@pytest.mark.usefixtures("gssapi_installed")
def test_kerberos_refuses_a_password_and_a_keytab_together(tmp_path: Path) -> None:
    keytab = secret_file(tmp_path, "", name="gateway.keytab")

    message = rejects(EWS_AUTH="kerberos", EWS_KEYTAB=keytab, EWS_USERNAME="u", EWS_PASSWORD="p")

    assert "EWS_PASSWORD or EWS_KEYTAB" in message


@pytest.mark.usefixtures("gssapi_installed")
def test_a_keytab_without_the_principal_it_is_for_is_refused(tmp_path: Path) -> None:
    keytab = secret_file(tmp_path, "", name="gateway.keytab")

    assert "EWS_USERNAME" in rejects(EWS_AUTH="kerberos", EWS_KEYTAB=keytab)


def test_a_keytab_that_does_not_exist_is_refused_naming_the_variable() -> None:
    assert "EWS_KEYTAB" in rejects(EWS_AUTH="kerberos", EWS_KEYTAB="/nonexistent/gw.keytab")


@pytest.mark.parametrize("spn", ["HTTP/mail.example.com@CORP", "mail.example.com", "HTTP/"])
@pytest.mark.usefixtures("gssapi_installed")
def test_an_spn_not_of_the_form_service_slash_host_is_refused(spn: str) -> None:
    assert "EWS_SPN" in rejects(EWS_AUTH="kerberos", EWS_SPN=spn)


def test_the_bearer_token_file_is_remembered_to_be_read_again(tmp_path: Path) -> None:
    token_file = secret_file(tmp_path, "eyJ.first.sig\n")

    config = from_env(EWS_AUTH="bearer", EWS_BEARER_TOKEN_FILE=token_file)

    assert (config.ews_bearer_token, config.ews_bearer_token_file) == ("eyJ.first.sig", token_file)


def test_the_log_level_is_limited_to_the_allowed_values() -> None:
    assert "GATEWAY_LOG_LEVEL" in rejects(GATEWAY_LOG_LEVEL="verbose")


def test_libraries_log_at_their_own_level_only_when_asked() -> None:
    assert from_env().library_log_level is None
    assert from_env(GATEWAY_LIBRARY_LOG_LEVEL="debug").library_log_level == "debug"
    assert "GATEWAY_LIBRARY_LOG_LEVEL" in rejects(GATEWAY_LIBRARY_LOG_LEVEL="trace")


def test_secrets_never_appear_in_the_repr(tmp_path: Path) -> None:
    basic = from_env(EWS_AUTH="basic", EWS_USERNAME="svc", EWS_PASSWORD="hunter2-password")
    bearer = from_env(EWS_AUTH="bearer", EWS_BEARER_TOKEN="eyJ-secret-token")

    assert "hunter2-password" not in repr(basic)
    assert "eyJ-secret-token" not in repr(bearer)
    assert "svc" in repr(basic)


# OpenTelemetry (OTEL_*)

COLLECTOR = "http://127.0.0.1:4318"


def test_tracing_is_off_without_an_exporter_endpoint() -> None:
    assert from_env().tracing is False


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
)
def test_an_otlp_endpoint_turns_tracing_on_as_ews_gateway(variable: str) -> None:
    config = from_env(**{variable: COLLECTOR})
    assert (config.tracing, config.trace_service_name) == (True, "ews-gateway")


def test_otel_service_name_names_the_traced_service() -> None:
    config = from_env(OTEL_EXPORTER_OTLP_ENDPOINT=COLLECTOR, OTEL_SERVICE_NAME="calls-eu")
    assert config.trace_service_name == "calls-eu"


@pytest.mark.parametrize("off", [{"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_SDK_DISABLED": "true"}])
def test_the_standard_switches_turn_tracing_off_even_with_an_endpoint(off: dict[str, str]) -> None:
    assert from_env(OTEL_EXPORTER_OTLP_ENDPOINT=COLLECTOR, **off).tracing is False


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
        ("OTEL_TRACES_EXPORTER", "console"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "otel-collector:4318"),
    ],
)
def test_tracing_settings_the_gateway_cannot_honour_stop_start_naming_the_variable(
    variable: str, value: str
) -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR, variable: value}
    assert variable in rejects(**environ)


# GATEWAY_BIND and GATEWAY_READ_TIMEOUT_SECONDS


@pytest.mark.parametrize(
    "bind", ["127.0.0.1:8082", "0.0.0.0:1", "gateway.internal:65535", "[::1]:8080", "[::]:80"]
)
def test_a_listen_address_with_host_and_port_is_taken_as_given(bind: str) -> None:
    assert from_env(GATEWAY_BIND=bind).bind == bind


@pytest.mark.parametrize(
    ("bind", "says"),
    [
        ("8082", "must be HOST:PORT"),
        ("localhost", "must be HOST:PORT"),
        (":8080", "must be HOST:PORT"),
        ("127.0.0.1:99999", "port must be a number from 1 to 65535"),
        ("127.0.0.1:0", "port must be a number from 1 to 65535"),
        ("127.0.0.1:http", "port must be a number from 1 to 65535"),
        ("::1:8080", "is not a host name or address"),
        ("[::1:8080", "is not a bracketed IPv6 address"),
        ("[not-ipv6]:8080", "is not a bracketed IPv6 address"),
        ("host name:8080", "is not a host name or address"),
    ],
)
def test_a_listen_address_without_a_host_or_a_valid_port_is_refused_in_one_line(
    bind: str, says: str
) -> None:
    message = rejects(GATEWAY_BIND=bind)

    assert message.startswith("GATEWAY_BIND")
    assert says in message
    assert "\n" not in message


def test_the_read_timeout_defaults_to_ten_seconds_and_is_bounded() -> None:
    assert from_env().read_timeout_s == 10.0
    assert from_env(GATEWAY_READ_TIMEOUT_SECONDS="2.5").read_timeout_s == 2.5
    assert "GATEWAY_READ_TIMEOUT_SECONDS" in rejects(GATEWAY_READ_TIMEOUT_SECONDS="0")


# GATEWAY_MAX_CONNECTIONS, GATEWAY_MAX_CONNECTIONS_PER_CLIENT


def test_a_worker_keeps_a_thousand_connections_and_256_from_one_client_by_default() -> None:
    config = from_env()

    assert (config.max_connections, config.max_connections_per_client) == (1000, 256)


def test_connection_limits_are_read() -> None:
    config = from_env(GATEWAY_MAX_CONNECTIONS="50", GATEWAY_MAX_CONNECTIONS_PER_CLIENT="5")

    assert (config.max_connections, config.max_connections_per_client) == (50, 5)


@pytest.mark.parametrize("name", ["GATEWAY_MAX_CONNECTIONS", "GATEWAY_MAX_CONNECTIONS_PER_CLIENT"])
@pytest.mark.parametrize("raw", ["0", "-1", "1.5", "many", "100001"])
def test_a_connection_limit_that_is_not_a_sane_whole_number_is_rejected_naming_it(
    name: str, raw: str
) -> None:
    assert name in rejects(**{name: raw})


# GATEWAY_EVENTS_POLL_SECONDS, GATEWAY_EVENTS_MAX_STREAMS, GATEWAY_EVENTS_MAX_STREAMS_PER_CALLER


def test_event_streams_poll_each_second_and_hold_1000_streams_20_a_caller_by_default() -> None:
    config = from_env()

    assert config.events_poll_s == 1.0
    assert config.events_max_streams == 1000
    assert config.events_max_streams_per_caller == 20
    assert config.demo_page is False


def test_event_stream_settings_are_read() -> None:
    config = from_env(
        GATEWAY_EVENTS_POLL_SECONDS="0.5",
        GATEWAY_EVENTS_MAX_STREAMS="5000",
        GATEWAY_EVENTS_MAX_STREAMS_PER_CALLER="50",
    )

    assert config.events_poll_s == 0.5
    assert config.events_max_streams == 5000
    assert config.events_max_streams_per_caller == 50


@pytest.mark.parametrize("raw", ["0", "0.05", "61", "fast", "nan"])
def test_a_poll_interval_out_of_range_is_rejected_naming_the_variable(raw: str) -> None:
    assert "GATEWAY_EVENTS_POLL_SECONDS" in rejects(GATEWAY_EVENTS_POLL_SECONDS=raw)


@pytest.mark.parametrize(
    "name", ["GATEWAY_EVENTS_MAX_STREAMS", "GATEWAY_EVENTS_MAX_STREAMS_PER_CALLER"]
)
@pytest.mark.parametrize("raw", ["0", "-1", "1.5", "many", "100001", "\u00b2"])
def test_a_stream_limit_that_is_not_a_sane_whole_number_is_rejected_naming_it(
    name: str, raw: str
) -> None:
    assert name in rejects(**{name: raw})


def test_half_the_bulkhead_polls_watched_calls() -> None:
    assert from_env(GATEWAY_THREADS="64").poll_threads == 30
    assert from_env(GATEWAY_THREADS="2").poll_threads == 1


def test_an_impersonated_mailbox_is_named_by_smtp_address_by_default() -> None:
    assert from_env().ews_impersonation_id == "smtp"
    assert from_env(GATEWAY_JWT_MAILBOX_CLAIM="preferred_username").ews_impersonation_id == "smtp"


@pytest.mark.parametrize(
    ("claim", "impersonation_id"),
    [
        ("email", "smtp"),
        ("upn", "upn"),
        ("http://schemas.xmlsoap.org/ws/2005/05/identity/claims/upn", "upn"),
        ("sid", "sid"),
        ("onprem_sid", "sid"),
        ("primarysid", "sid"),
        ("http://schemas.microsoft.com/ws/2008/06/identity/claims/primarysid", "sid"),
    ],
)
def test_the_impersonation_id_type_follows_the_mailbox_claim(
    claim: str, impersonation_id: str
) -> None:
    assert from_env(GATEWAY_JWT_MAILBOX_CLAIM=claim).ews_impersonation_id == impersonation_id


@pytest.mark.parametrize("impersonation_id", ["smtp", "upn", "sid"])
def test_a_chosen_impersonation_id_type_wins_over_the_claim(impersonation_id: str) -> None:
    for claim in ("email", "upn", "onprem_sid"):
        config = from_env(GATEWAY_JWT_MAILBOX_CLAIM=claim, EWS_IMPERSONATION_ID=impersonation_id)
        assert config.ews_impersonation_id == impersonation_id


@pytest.mark.parametrize("raw", ["primary", "SMTP", "PrimarySmtpAddress", "email", "sid,upn"])
def test_an_unknown_impersonation_id_type_is_one_line_naming_the_variable(raw: str) -> None:
    message = rejects(EWS_IMPERSONATION_ID=raw)
    assert message == f"EWS_IMPERSONATION_ID must be one of smtp, upn, sid, got {raw!r}"


class RecordingEnviron(dict[str, str]):
    """An environment that remembers every name looked up in it."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def test_the_variables_table_names_every_variable_from_env_reads_and_no_other() -> None:
    names_read: set[str] = set()
    for extra in (
        {},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
        {"EWS_URL": "http://mail.example.com/EWS/Exchange.asmx"},
    ):
        environ = RecordingEnviron({**MINIMAL, **extra})
        Config.from_env(environ)
        names_read |= environ.read

    assert names_read <= known_variables()
    table = {name for variable in VARIABLES for name in (variable.name, *variable.aliases)}
    assert table - names_read == set()


@pytest.mark.parametrize("command", ["serve", "check"])
def test_help_lists_the_variables_required_first_with_their_defaults(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_status:
        cli.main([command, "--help"])

    assert exit_status.value.code == 0
    text = capsys.readouterr().out
    listed = re.findall(r"^  ([A-Z][A-Z0-9_]+)", text, re.MULTILINE)
    assert listed[:3] == ["EWS_URL", "GATEWAY_AUTH", "GATEWAY_DIAL_ALLOW"]
    assert set(listed) == {variable.name for variable in VARIABLES}
    assert "  EWS_URL  required\n" in text
    assert "  EWS_TIMEOUT_SECONDS  default: 10\n" in text
    assert "  GATEWAY_CALL_ID_KEY (_FILE)  default: a random key per instance\n" in text


def test_an_unknown_variable_is_warned_with_the_closest_known_name() -> None:
    config = from_env(
        GATEWAY_DIAL_ALOW="+1555*",
        EWS_PASSWROD="not-shown-anywhere",
        EWS_PASSWORD_FILE="",
        GATEWAY_ZZZ="1",
        EWS_SCHEMA_DIR="/schema",
        https_proxy="",
    )

    assert config.warnings == (
        "EWS_PASSWROD is not a variable the gateway reads; did you mean EWS_PASSWORD?",
        "GATEWAY_DIAL_ALOW is not a variable the gateway reads; did you mean GATEWAY_DIAL_ALLOW?",
        "GATEWAY_ZZZ is not a variable the gateway reads (serve --help lists them)",
    )
    assert "not-shown-anywhere" not in repr(config)


@pytest.mark.parametrize(
    ("environ", "warning"),
    [
        (
            {"EWS_AUTH": "basic", "EWS_USERNAME": "svc", "EWS_PASSWORD": "pw"},
            "EWS_AUTH=basic over http:// sends the password to Exchange in clear text; "
            "start EWS_URL with https://",
        ),
        (
            {"EWS_AUTH": "bearer", "EWS_BEARER_TOKEN": "t0ken"},
            "EWS_AUTH=bearer over http:// sends the token to Exchange in clear text; "
            "start EWS_URL with https://",
        ),
    ],
)
def test_credentials_in_clear_text_over_http_are_warned(
    environ: dict[str, str], warning: str
) -> None:
    plain = from_env(EWS_URL="http://mail.example.com/EWS/Exchange.asmx", **environ)
    encrypted = from_env(**environ)

    assert plain.warnings == (warning,)
    assert encrypted.warnings == ()


def test_ntlm_over_http_is_not_warned_as_clear_text() -> None:
    config = from_env(
        EWS_URL="http://mail.example.com/EWS/Exchange.asmx",
        EWS_AUTH="ntlm",
        EWS_USERNAME="EXAMPLE\\svc",
        EWS_PASSWORD="pw",
    )

    assert config.warnings == ()


def test_the_check_at_start_is_off_unless_asked_for() -> None:
    assert from_env().check_at_start is False
    assert from_env(GATEWAY_CHECK_AT_START="true").check_at_start is True
    assert "GATEWAY_CHECK_AT_START" in rejects(GATEWAY_CHECK_AT_START="maybe")


def test_the_start_up_summary_names_exchange_and_the_setup_without_a_secret() -> None:
    config = from_env(
        EWS_URL="https://mail.example.com:8443/EWS/Exchange.asmx?token=abc",
        EWS_AUTH="ntlm",
        EWS_USERNAME="EXAMPLE\\svc",
        EWS_PASSWORD="pw-secret",
        HTTPS_PROXY="http://user:proxy-secret@proxy.example.com:3128",
        GATEWAY_REDIS_URL="redis://redis.example.com:6379/0",
        GATEWAY_DIAL_ALLOW="+1555*,4???",
    )

    assert config.summary() == {
        "ewsUrl": "https://mail.example.com:8443/EWS/Exchange.asmx",
        "ewsAuth": "ntlm",
        "ewsProxy": "proxy.example.com:3128",
        "sharedState": "redis",
        "dialPatterns": 2,
    }
    assert from_env().summary()["sharedState"] == "embedded"
