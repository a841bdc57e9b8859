"""Config for the way to Exchange: URL host and port, idle limit, anchor mailbox, proxy."""

from __future__ import annotations

import base64

import pytest

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.exchange.proxy import bypasses_proxy

EWS_URL = "https://mail.example.com/EWS/Exchange.asmx"
MINIMAL = {"EWS_URL": EWS_URL, "GATEWAY_AUTH": "none"}


def from_env(**overrides: str) -> Config:
    return Config.from_env({**MINIMAL, **overrides})


def rejects(**overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({**MINIMAL, **overrides})
    return str(caught.value)


@pytest.mark.parametrize("port", ["0", "65536", "99999", "-1", "http"])
def test_an_ews_url_port_outside_1_to_65535_is_refused_naming_the_variable(port: str) -> None:
    message = rejects(EWS_URL=f"https://mail.example.com:{port}/EWS/Exchange.asmx")
    assert message == "EWS_URL has a port outside 1-65535"


@pytest.mark.parametrize("port", ["1", "443", "65535"])
def test_an_ews_url_port_from_1_to_65535_is_accepted(port: str) -> None:
    assert from_env(EWS_URL=f"https://mail.example.com:{port}/EWS").ews_url.endswith("/EWS")


def test_an_ews_url_host_that_idna_2008_refuses_is_refused_naming_the_variable() -> None:
    # U+2665 (a heart) was allowed by IDNA 2003 and is not by IDNA 2008.
    message = rejects(EWS_URL="https://mail.\u2665.example/EWS/Exchange.asmx")
    assert message.startswith("EWS_URL: the host name is not a valid IDNA 2008 name")


def test_an_ews_url_host_idna_2008_allows_is_accepted() -> None:
    assert from_env(EWS_URL="https://straße.example/EWS/Exchange.asmx").ews_url


def test_the_connection_idle_limit_defaults_to_30_seconds_and_is_read_in_seconds() -> None:
    assert from_env().connection_idle_s == 30.0
    assert from_env(EWS_CONNECTION_IDLE_SECONDS="4.5").connection_idle_s == 4.5


@pytest.mark.parametrize("raw", ["0", "0.05", "-3", "soon", "7200"])
def test_a_connection_idle_limit_outside_a_tenth_to_3600_seconds_is_refused(raw: str) -> None:
    assert rejects(EWS_CONNECTION_IDLE_SECONDS=raw).startswith("EWS_CONNECTION_IDLE_SECONDS")


def test_the_anchor_mailbox_is_optional_and_read_as_given() -> None:
    assert from_env().anchor_mailbox is None
    assert from_env(EWS_ANCHOR_MAILBOX="svc@example.com").anchor_mailbox == "svc@example.com"


@pytest.mark.parametrize("raw", ["svc", "a@b@c", "svc @example.com", "svc@exämple.com"])
def test_an_anchor_mailbox_that_is_not_one_sendable_address_is_refused(raw: str) -> None:
    assert rejects(EWS_ANCHOR_MAILBOX=raw).startswith("EWS_ANCHOR_MAILBOX must be one SMTP")


# The proxy, as curl chooses it


def test_without_proxy_variables_exchange_is_reached_directly() -> None:
    assert from_env().ews_proxy is None


def test_https_proxy_is_used_for_an_https_url() -> None:
    proxy = from_env(HTTPS_PROXY="http://proxy.corp:3128").ews_proxy
    assert proxy is not None
    assert (proxy.host, proxy.port, proxy.authorization) == ("proxy.corp", 3128, None)


def test_the_lower_case_variable_wins_over_the_upper_case_one() -> None:
    proxy = from_env(https_proxy="http://lower:1", HTTPS_PROXY="http://upper:2").ews_proxy
    assert proxy is not None
    assert proxy.host == "lower"


def test_http_proxy_is_used_for_an_http_url_only() -> None:
    assert from_env(HTTP_PROXY="http://proxy.corp:3128").ews_proxy is None
    proxy = from_env(EWS_URL="http://mail.example.com/EWS", http_proxy="proxy.corp:3128").ews_proxy
    assert proxy is not None
    assert (proxy.host, proxy.port) == ("proxy.corp", 3128)


def test_a_proxy_without_a_port_is_on_port_1080_as_for_curl() -> None:
    proxy = from_env(HTTPS_PROXY="proxy.corp").ews_proxy
    assert proxy is not None
    assert proxy.port == 1080


def test_proxy_credentials_become_a_basic_proxy_authorization_never_shown() -> None:
    config = from_env(HTTPS_PROXY="http://svc%40corp:s%3Acret@proxy.corp:3128")
    assert config.ews_proxy is not None
    expected = base64.b64encode(b"svc@corp:s:cret").decode()
    assert config.ews_proxy.authorization == f"Basic {expected}"
    assert "s:cret" not in repr(config)
    assert expected not in repr(config)
    assert config.ews_proxy.address == "proxy.corp:3128"


@pytest.mark.parametrize("url", ["https://proxy.corp:3128", "socks5://proxy.corp:1080"])
def test_a_proxy_that_is_not_http_is_refused_naming_the_variable(url: str) -> None:
    assert rejects(HTTPS_PROXY=url).startswith("HTTPS_PROXY must be an http:// proxy")


def test_a_proxy_port_out_of_range_is_refused_naming_the_variable() -> None:
    assert (
        rejects(https_proxy="http://proxy.corp:70000") == "https_proxy has a port outside 1-65535"
    )


@pytest.mark.parametrize(
    ("no_proxy", "bypassed"),
    [
        ("*", True),
        ("example.com", True),
        (".example.com", True),
        ("mail.example.com", True),
        ("MAIL.EXAMPLE.COM.", True),
        ("other.com, example.com", True),
        ("ail.example.com", False),
        ("xample.com", False),
        ("other.com", False),
        ("", False),
    ],
)
def test_no_proxy_matches_the_host_and_its_domains_as_curl_does(
    no_proxy: str, bypassed: bool
) -> None:
    assert (from_env(HTTPS_PROXY="http://proxy:3128", NO_PROXY=no_proxy).ews_proxy is None) is (
        bypassed
    )


@pytest.mark.parametrize(
    ("host", "entry", "bypassed"),
    [
        ("10.1.2.3", "10.0.0.0/8", True),
        ("10.1.2.3", "10.1.2.3", True),
        ("11.1.2.3", "10.0.0.0/8", False),
        ("2001:db8::7", "2001:db8::/32", True),
        ("2001:db9::7", "2001:db8::/32", False),
        ("10.1.2.3", "2001:db8::/32", False),
        # A name is not resolved to match a range: curl compares what the URL says.
        ("mail.example.com", "10.0.0.0/8", False),
    ],
)
def test_no_proxy_matches_addresses_by_cidr_range(host: str, entry: str, bypassed: bool) -> None:
    assert bypasses_proxy(entry, host) is bypassed


@pytest.mark.parametrize(
    ("host", "entry", "bypassed"),
    [
        ("exchange.bücher.example", ".xn--bcher-kva.example", True),
        ("exchange.xn--bcher-kva.example", "bücher.example", True),
        ("exchange.BÜCHER.example", "bücher.example", True),
        ("mail.straße.example", "strasse.example", False),  # IDNA 2008 keeps ß
    ],
)
def test_no_proxy_matches_international_names_in_either_form(
    host: str, entry: str, bypassed: bool
) -> None:
    assert bypasses_proxy(entry, host.lower()) is bypassed


def test_lower_case_no_proxy_wins_over_upper_case() -> None:
    environ = {"HTTPS_PROXY": "http://proxy:3128", "no_proxy": "", "NO_PROXY": "example.com"}
    assert from_env(**environ).ews_proxy is not None


LONG_LABEL = "a" * 64


@pytest.mark.parametrize("host", ["mail..example.com", f"{LONG_LABEL}.example.com", ".example.com"])
def test_an_ews_url_host_dns_cannot_carry_is_refused_naming_the_variable(host: str) -> None:
    # Was accepted, and every call then failed in the resolver as a 500 with a traceback.
    message = rejects(EWS_URL=f"https://{host}/EWS/Exchange.asmx")
    assert message == ("EWS_URL: the host name has an empty label or one longer than 63 characters")


@pytest.mark.parametrize(
    "host", ["mail.example.com.", f"{'a' * 63}.example.com", "10.0.0.1", "[2001:db8::1]"]
)
def test_an_ews_url_host_of_labels_from_1_to_63_characters_is_accepted(host: str) -> None:
    assert from_env(EWS_URL=f"https://{host}/EWS").ews_url == f"https://{host}/EWS"


@pytest.mark.parametrize("host", ["proxy..corp.example.com", f"{LONG_LABEL}.corp.example.com"])
def test_a_proxy_host_dns_cannot_carry_is_refused_naming_the_variable(host: str) -> None:
    message = rejects(HTTPS_PROXY=f"http://{host}:3128")
    assert message == (
        "HTTPS_PROXY: the host name has an empty label or one longer than 63 characters"
    )


def test_a_proxy_host_name_that_is_not_ascii_is_reached_by_its_idna_2008_a_labels() -> None:
    # The resolver's own codec is IDNA 2003, which names another host for "ß".
    proxy = from_env(HTTPS_PROXY="http://proxy.straße.example:3128").ews_proxy
    assert proxy is not None
    assert (proxy.host, proxy.port) == ("proxy.xn--strae-oqa.example", 3128)
