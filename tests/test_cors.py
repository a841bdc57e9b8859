"""Browsers: CORS headers for exactly the origins in GATEWAY_CORS_ORIGINS, and none for others."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.identity import (
    EXCHANGE_URL,
    RecordingExchange,
    access_control_headers,
    bearer,
    claims,
    client_for,
    jwt_environ,
    rsa_key,
)

APP_ORIGIN = "https://app.example.com"
API_HEADERS = ("Authorization", "Content-Type", "X-Request-ID", "X-API-Key")


def environ(origins: str | None, **extra: str) -> dict[str, str]:
    values = {"EWS_URL": EXCHANGE_URL, "GATEWAY_AUTH": "none", **extra}
    if origins is not None:
        values["GATEWAY_CORS_ORIGINS"] = origins
    return values


@pytest.fixture
def exchange() -> RecordingExchange:
    return RecordingExchange()


@pytest.fixture
def client(exchange: RecordingExchange) -> FlaskClient:
    return client_for(environ(APP_ORIGIN), exchange)


def preflight(
    client: FlaskClient,
    origin: str,
    method: str = "DELETE",
    headers: str = "Authorization, X-Request-ID",
    path: str = "/calls/abc",
) -> TestResponse:
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
    )


def listed(header_value: str) -> set[str]:
    return {item.strip().lower() for item in header_value.split(",") if item.strip()}


def test_a_preflight_from_a_listed_origin_allows_the_apis_methods_and_headers(
    client: FlaskClient, exchange: RecordingExchange
) -> None:
    answer = preflight(client, APP_ORIGIN)

    assert answer.status_code in (200, 204)
    assert answer.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert listed(answer.headers["Access-Control-Allow-Methods"]) >= {"get", "post", "delete"}
    assert listed(answer.headers["Access-Control-Allow-Headers"]) >= {
        "authorization",
        "x-request-id",
    }
    assert "origin" in listed(answer.headers.get("Vary", ""))
    # Tokens travel in Authorization, never in cookies: credentials mode stays off.
    assert "Access-Control-Allow-Credentials" not in answer.headers
    assert exchange.calls == []


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_a_preflight_allows_all_four_api_headers_for_every_method(
    client: FlaskClient, method: str
) -> None:
    path = "/calls" if method == "POST" else "/calls/abc"

    answer = preflight(client, APP_ORIGIN, method, ", ".join(API_HEADERS), path)

    assert answer.status_code in (200, 204)
    assert listed(answer.headers["Access-Control-Allow-Headers"]) >= {
        header.lower() for header in API_HEADERS
    }


def test_a_preflight_does_not_allow_headers_outside_the_api(client: FlaskClient) -> None:
    answer = preflight(client, APP_ORIGIN, headers="X-Forwarded-For, Cookie")

    allowed = listed(answer.headers.get("Access-Control-Allow-Headers", ""))
    assert not allowed & {"x-forwarded-for", "cookie"}


def test_an_actual_request_from_a_listed_origin_may_read_the_answer_and_its_headers(
    client: FlaskClient, exchange: RecordingExchange
) -> None:
    answer = client.delete("/calls/abc", headers={"Origin": APP_ORIGIN})

    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert listed(answer.headers["Access-Control-Expose-Headers"]) >= {"x-request-id", "location"}
    assert exchange.calls == [("disconnect_call", "abc", None)]


def test_a_placed_calls_location_is_readable_from_a_listed_origin(client: FlaskClient) -> None:
    answer = client.post(
        "/calls",
        json={"itemId": "item-1", "dialString": "100"},
        headers={"Origin": APP_ORIGIN},
    )

    assert answer.status_code == 201
    assert answer.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert "location" in listed(answer.headers["Access-Control-Expose-Headers"])


UNLISTED_ORIGINS = [
    "https://evil.example.com",
    "https://app.example.com.evil.com",
    "https://evilapp.example.com",
    "https://app.example.comevil.com",
    "http://app.example.com",
    "https://app.example.com:8443",
    "null",
]


@pytest.mark.parametrize("origin", UNLISTED_ORIGINS)
def test_an_unlisted_origin_gets_no_cors_headers(client: FlaskClient, origin: str) -> None:
    answers = [preflight(client, origin), client.delete("/calls/abc", headers={"Origin": origin})]

    for answer in answers:
        assert list(access_control_headers(answer.headers.items())) == []


def test_with_no_origins_configured_there_are_no_cors_headers_at_all(
    exchange: RecordingExchange,
) -> None:
    client = client_for(environ(None), exchange)

    answers = [
        preflight(client, APP_ORIGIN),
        client.delete("/calls/abc", headers={"Origin": APP_ORIGIN}),
        client.get("/livez", headers={"Origin": APP_ORIGIN}),
    ]

    for answer in answers:
        assert list(access_control_headers(answer.headers.items())) == []


IPV6_ORIGIN = "http://[::1]:3000"


def test_an_ipv6_origin_is_matched_exactly(exchange: RecordingExchange) -> None:
    client = client_for(environ(IPV6_ORIGIN), exchange)

    answer = client.delete("/calls/abc", headers={"Origin": IPV6_ORIGIN})

    assert answer.headers["Access-Control-Allow-Origin"] == IPV6_ORIGIN


# If "[::1]" were read as a regex character class, these would match it.
@pytest.mark.parametrize(
    "origin",
    ["http://1:3000", "http://::3000", "http://[::1]:30000", "http://[::1]:3000.evil.com"],
)
def test_the_brackets_of_an_ipv6_origin_are_not_a_regex(
    origin: str, exchange: RecordingExchange
) -> None:
    client = client_for(environ(IPV6_ORIGIN), exchange)

    answer = client.delete("/calls/abc", headers={"Origin": origin})

    assert list(access_control_headers(answer.headers.items())) == []


def test_each_of_several_listed_origins_gets_its_own_origin_back(
    exchange: RecordingExchange,
) -> None:
    other = "https://admin.example.org"
    client = client_for(environ(f"{APP_ORIGIN}, {other}"), exchange)

    for origin in (APP_ORIGIN, other):
        answer = client.get("/calls/abc", headers={"Origin": origin})
        assert answer.headers["Access-Control-Allow-Origin"] == origin


# Browsers send preflights without credentials: they must pass whatever GATEWAY_AUTH says.


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(hashlib.sha256(b"browser-key").hexdigest() + "\n", encoding="utf-8")
    return path


def authenticating_environ(gateway_auth: str, keys_file: Path) -> dict[str, str]:
    if gateway_auth == "jwt":
        return jwt_environ(
            GATEWAY_JWT_PUBLIC_KEY=rsa_key().public_pem(), GATEWAY_CORS_ORIGINS=APP_ORIGIN
        )
    return environ(APP_ORIGIN, GATEWAY_AUTH="apikey", GATEWAY_API_KEYS_FILE=str(keys_file))


@pytest.mark.parametrize("gateway_auth", ["jwt", "apikey"])
def test_a_preflight_needs_no_caller_credentials(
    gateway_auth: str, keys_file: Path, exchange: RecordingExchange
) -> None:
    client = client_for(authenticating_environ(gateway_auth, keys_file), exchange)

    answer = preflight(client, APP_ORIGIN, headers=", ".join(API_HEADERS))

    assert answer.status_code in (200, 204), answer.text
    assert answer.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert exchange.calls == []


@pytest.mark.parametrize("gateway_auth", ["jwt", "apikey"])
def test_a_browser_can_read_why_its_request_was_refused(
    gateway_auth: str, keys_file: Path, exchange: RecordingExchange
) -> None:
    client = client_for(authenticating_environ(gateway_auth, keys_file), exchange)

    answer = client.delete("/calls/abc", headers={"Origin": APP_ORIGIN})

    assert answer.status_code == 401
    assert answer.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert exchange.calls == []


def test_an_unlisted_origin_with_a_valid_token_still_gets_no_cors_headers(
    exchange: RecordingExchange,
) -> None:
    signer = rsa_key()
    jwt_settings = jwt_environ(
        GATEWAY_JWT_PUBLIC_KEY=signer.public_pem(), GATEWAY_CORS_ORIGINS=APP_ORIGIN
    )
    client = client_for(jwt_settings, exchange)
    headers = {"Origin": "https://evil.example.com", **bearer(signer.token(claims()))}

    answer = client.delete("/calls/abc", headers=headers)

    assert list(access_control_headers(answer.headers.items())) == []


def test_a_browser_may_send_an_idempotency_key_and_read_the_rate_limit_fields(
    exchange: RecordingExchange,
) -> None:
    client = client_for(environ(APP_ORIGIN, GATEWAY_RATE_LIMIT_CALLS="5/minute"), exchange)

    allowed = preflight(client, APP_ORIGIN, "POST", "Content-Type, Idempotency-Key", "/calls")
    placed = client.post(
        "/calls",
        json={"itemId": "AAMkItem", "dialString": "100"},
        headers={"Origin": APP_ORIGIN, "Idempotency-Key": '"k-1"'},
    )

    assert listed(allowed.headers["Access-Control-Allow-Headers"]) >= {"idempotency-key"}
    assert placed.status_code == 201
    assert listed(placed.headers["Access-Control-Expose-Headers"]) >= {
        "ratelimit",
        "ratelimit-policy",
        "retry-after",
        "location",
    }
    assert placed.headers["RateLimit"] == '"calls";r=4'


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/no/such/route", 404), ("DELETE", "/calls", 405), ("POST", "/calls/abc", 405)],
)
def test_a_browser_sees_the_real_404_or_405_not_a_cors_failure(
    client: FlaskClient, method: str, path: str, status: int
) -> None:
    answer = preflight(client, APP_ORIGIN, method=method, path=path)

    assert answer.status_code == 204
    assert answer.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert method in answer.headers["Access-Control-Allow-Methods"]

    actual = client.open(path, method=method, headers={"Origin": APP_ORIGIN})

    assert actual.status_code == status
    assert actual.mimetype == "application/problem+json"
    assert actual.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert "X-Request-ID" in actual.headers["Access-Control-Expose-Headers"]


def test_a_preflight_to_an_unknown_path_from_an_unlisted_origin_allows_nothing(
    client: FlaskClient,
) -> None:
    answer = preflight(client, "https://evil.example.com", path="/no/such/route")

    assert list(access_control_headers(answer.headers)) == []
