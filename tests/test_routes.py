"""The HTTP API, driven through Flask's test client with a fake EWS client behind it."""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import io
import logging
from typing import Any, cast
from urllib.parse import quote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry
from werkzeug.test import TestResponse

from gateway import __version__, errors
from gateway.api.services import ServiceState
from gateway.app import create_app
from gateway.config import Config
from gateway.exchange.client import CallInformation, Disconnected, EwsClient, PlacedCall
from tests.fake_ews import FakeExchange
from tests.problems import assert_problem

PRINTABLE_ASCII = "".join(chr(code) for code in range(0x21, 0x7F))


def build_app(fake: FakeExchange, state: ServiceState | None = None) -> Flask:
    config = Config(ews_url="http://exchange.invalid/EWS/Exchange.asmx", gateway_auth="none")
    return create_app(config, ews=cast(EwsClient, fake), registry=CollectorRegistry(), state=state)


@pytest.fixture
def fake() -> FakeExchange:
    return FakeExchange()


@pytest.fixture
def state() -> ServiceState:
    return ServiceState()


@pytest.fixture
def client(fake: FakeExchange, state: ServiceState) -> FlaskClient:
    return build_app(fake, state).test_client()


def place(client: FlaskClient, body: Any) -> TestResponse:
    return client.post("/calls", json=body)


def call_path(call_id: str) -> str:
    return "/calls/" + quote(call_id, safe="")


# DELETE /calls/{callId}


def test_hanging_up_a_call_answers_200_disconnected_and_passes_the_id_to_exchange(
    client: FlaskClient, fake: FakeExchange
) -> None:
    response = client.delete("/calls/call-42")

    assert response.status_code == 200
    assert response.get_json() == {
        "callId": "call-42",
        "status": "disconnected",
        "ewsResponseCode": "NoError",
    }
    assert fake.last.operation == "disconnect_call"
    assert fake.last.arguments["call_id"] == "call-42"


def test_a_warning_from_exchange_on_hang_up_is_passed_on_as_warning(
    client: FlaskClient, fake: FakeExchange
) -> None:
    fake.disconnected = Disconnected(ews_code="NoError", warning="the call already ended")

    response = client.delete("/calls/call-42")

    assert response.status_code == 200
    assert response.get_json()["warning"] == "the call already ended"


def test_a_plain_success_has_no_warning_field(client: FlaskClient) -> None:
    assert "warning" not in client.delete("/calls/call-42").get_json()


# POST /calls


def test_placing_a_call_answers_201_with_the_location_and_id_of_the_new_call(
    client: FlaskClient, fake: FakeExchange
) -> None:
    fake.placed = PlacedCall(call_id="new-call-7", ews_code="NoError")

    response = place(client, {"itemId": "item-1", "dialString": "+15551234567"})

    assert response.status_code == 201
    # The gateway signs Exchange's id for its caller; the EWS id stays readable at the end.
    call_id = response.get_json()["callId"]
    assert call_id.startswith("gw1.")
    assert call_id.endswith(".new-call-7")
    assert response.headers["Location"] == "/calls/" + quote(call_id, safe="")
    assert fake.last.operation == "play_on_phone"
    assert fake.last.arguments["item_id"] == "item-1"
    assert fake.last.arguments["dial_string"] == "+15551234567"
    assert fake.last.arguments["change_key"] is None


def test_an_item_change_key_is_passed_to_exchange(client: FlaskClient, fake: FakeExchange) -> None:
    body = {"itemId": "item-1", "itemChangeKey": "CQAAABYA", "dialString": "100"}

    assert place(client, body).status_code == 201
    assert fake.last.arguments["change_key"] == "CQAAABYA"


def test_the_location_of_a_placed_call_leads_back_to_the_same_call_id(
    client: FlaskClient, fake: FakeExchange
) -> None:
    # Exchange's ids are opaque: a '%', '?' or '#' in one must not change where Location points.
    fake.placed = PlacedCall(call_id="a%41b?c#d", ews_code="NoError")

    location = place(client, {"itemId": "item-1", "dialString": "100"}).headers["Location"]
    client.get(location)

    assert fake.last.operation == "get_call_information"
    assert fake.last.arguments["call_id"] == "a%41b?c#d"


@pytest.mark.parametrize("dial_string", ["+15551234567", "*86#", "sip:alice@example.com"])
def test_a_valid_dial_string_reaches_exchange_unchanged(
    client: FlaskClient, fake: FakeExchange, dial_string: str
) -> None:
    assert place(client, {"itemId": "item-1", "dialString": dial_string}).status_code == 201
    assert fake.last.arguments["dial_string"] == dial_string


def test_a_body_that_is_not_json_is_400_and_exchange_is_not_contacted(
    client: FlaskClient, fake: FakeExchange
) -> None:
    response = client.post("/calls", data="{itemId: nope", content_type="application/json")

    assert_problem(response, 400)
    assert fake.calls == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_sent_without_a_json_content_type_is_415(
    client: FlaskClient, fake: FakeExchange, content_type: str | None
) -> None:
    response = client.post(
        "/calls", data='{"itemId": "item-1", "dialString": "100"}', content_type=content_type
    )

    assert_problem(response, 415)
    assert fake.calls == []


@pytest.mark.parametrize("body", [[], ["itemId"], "item-1", 42, True])
def test_a_json_body_that_is_not_an_object_is_400(
    client: FlaskClient, fake: FakeExchange, body: Any
) -> None:
    problem = assert_problem(place(client, body), 400)

    assert "object" in problem["detail"]
    assert fake.calls == []


@pytest.mark.parametrize(
    ("body", "field_at_fault"),
    [
        ({"dialString": "100"}, "itemId"),
        ({"itemId": "", "dialString": "100"}, "itemId"),
        ({"itemId": None, "dialString": "100"}, "itemId"),
        ({"itemId": 12, "dialString": "100"}, "itemId"),
        ({"itemId": ["item-1"], "dialString": "100"}, "itemId"),
        ({"itemId": "x" * 1025, "dialString": "100"}, "itemId"),
        ({"itemId": "item 1", "dialString": "100"}, "itemId"),
        ({"itemId": "item-1", "itemChangeKey": "", "dialString": "100"}, "itemChangeKey"),
        ({"itemId": "item-1", "itemChangeKey": 7, "dialString": "100"}, "itemChangeKey"),
        ({"itemId": "item-1", "itemChangeKey": "c k", "dialString": "100"}, "itemChangeKey"),
        ({"itemId": "item-1", "itemChangeKey": "k" * 513, "dialString": "100"}, "itemChangeKey"),
        ({"itemId": "item-1"}, "dialString"),
        ({"itemId": "item-1", "dialString": 15551234567}, "dialString"),
        ({"itemId": "item-1", "dialString": "12 34"}, "dialString"),
        ({"itemId": "item-1", "dialString": "abc"}, "dialString"),
        ({"itemId": "item-1", "dialString": ""}, "dialString"),
        ({"itemId": "item-1", "dialString": "1" * 33}, "dialString"),
        ({"itemId": "item-1", "dialString": "100", "callerId": "me"}, "callerId"),
    ],
)
def test_an_invalid_field_is_400_naming_the_field_and_exchange_is_not_contacted(
    client: FlaskClient, fake: FakeExchange, body: dict[str, Any], field_at_fault: str
) -> None:
    problem = assert_problem(place(client, body), 400)

    assert field_at_fault in problem["detail"]
    assert fake.calls == []


# GET /calls/{callId}


def test_call_information_has_state_and_failure_cause_and_no_sip_fields_when_absent(
    client: FlaskClient, fake: FakeExchange
) -> None:
    response = client.get("/calls/call-42")

    assert response.status_code == 200
    body = response.get_json()
    assert body["callId"] == "call-42"
    assert body["state"] == "Connected"
    assert body["connectionFailureCause"] == "None"
    assert "sipResponseCode" not in body
    assert "sipResponseText" not in body
    assert fake.last.operation == "get_call_information"
    assert fake.last.arguments["call_id"] == "call-42"


def test_call_information_includes_the_sip_response_when_exchange_gave_one(
    client: FlaskClient, fake: FakeExchange
) -> None:
    fake.information = CallInformation(
        state="Disconnected",
        connection_failure_cause="UserBusy",
        sip_response_code=486,
        sip_response_text="Busy Here",
        ews_code="NoError",
    )

    body = client.get("/calls/call-42").get_json()

    assert body["state"] == "Disconnected"
    assert body["connectionFailureCause"] == "UserBusy"
    assert body["sipResponseCode"] == 486
    assert body["sipResponseText"] == "Busy Here"


# Gateway errors as problem+json

STATUS_BY_ERROR: dict[type[errors.GatewayError], int] = {
    errors.GatewayError: 500,
    errors.InvalidRequest: 400,
    errors.Unauthenticated: 401,
    errors.UnsupportedMediaType: 415,
    errors.Forbidden: 403,
    errors.KeysUnavailable: 503,
    errors.CircuitOpen: 503,
    errors.GatewayOverloaded: 503,
    errors.CallNotFound: 404,
    errors.MailboxNotFound: 404,
    errors.ExchangeAccessDenied: 403,
    errors.ExchangeUnprocessable: 422,
    errors.ExchangeBusy: 503,
    errors.ExchangeUnavailable: 503,
    errors.ExchangeReportedError: 502,
    errors.ExchangeAuthFailed: 502,
    errors.ExchangeBadAnswer: 502,
    errors.ExchangeUnreachable: 502,
    errors.ExchangeTimeout: 504,
    errors.DialStringNotAllowed: 403,
    errors.RateLimited: 429,
    errors.IdempotencyKeyInUse: 409,
    errors.IdempotencyOutcomeUnknown: 409,
    errors.IdempotencyKeyReused: 422,
    errors.SharedStateUnavailable: 503,
    errors.RouteNotFound: 404,
    errors.MethodNotAllowed: 405,
    errors.RequestTimeout: 408,
    errors.BodyTooLarge: 413,
    errors.UriTooLong: 414,
    errors.ExpectationFailed: 417,
    errors.HeadersTooLarge: 431,
    errors.MalformedRequest: 400,
    errors.TransferCodingNotImplemented: 501,
    errors.StreamLimitReached: 503,
    errors.CallerStreamLimitReached: 429,
    errors.ShuttingDown: 503,
}


def descendants(cls: type[errors.GatewayError]) -> set[type[errors.GatewayError]]:
    direct = set(cls.__subclasses__())
    return direct.union(*(descendants(child) for child in direct))


# The tree's inner classes, never raised themselves: each names whose fault a failure is.
INNER_CLASSES = {errors.CallerError, errors.ExchangeError, errors.ServiceUnavailable}


def test_every_gateway_error_class_has_an_expected_status_here() -> None:
    concrete = descendants(errors.GatewayError) - INNER_CLASSES
    assert concrete | {errors.GatewayError} == set(STATUS_BY_ERROR)


@pytest.mark.parametrize("error_class", STATUS_BY_ERROR, ids=lambda v: v.__name__)
def test_each_error_sits_under_the_inner_class_of_its_status(
    error_class: type[errors.GatewayError],
) -> None:
    """4xx is the caller's, 502-504 Exchange's unless the gateway's own limits said 503."""
    status = STATUS_BY_ERROR[error_class]
    if 400 <= status < 500 or status == 501:
        assert issubclass(error_class, errors.CallerError)
    elif issubclass(error_class, errors.ServiceUnavailable):
        assert status == 503
    elif error_class is not errors.GatewayError:
        assert issubclass(error_class, errors.ExchangeError)
        assert status in (502, 503, 504)


@pytest.mark.parametrize(
    ("error_class", "status"), STATUS_BY_ERROR.items(), ids=lambda v: getattr(v, "__name__", v)
)
def test_a_gateway_error_becomes_a_problem_with_its_status(
    client: FlaskClient, fake: FakeExchange, error_class: type[errors.GatewayError], status: int
) -> None:
    fake.error = error_class("what went wrong", ews_code="ErrorSomething")

    problem = assert_problem(client.delete("/calls/call-42"), status)

    assert problem["detail"] == "what went wrong"
    assert problem["title"] == error_class.title
    assert problem["type"].endswith(error_class.slug)
    assert problem["ewsResponseCode"] == "ErrorSomething"


def test_a_problem_without_an_exchange_code_has_no_ews_response_code(
    client: FlaskClient, fake: FakeExchange
) -> None:
    fake.error = errors.ExchangeTimeout("Exchange did not answer in time")

    problem = assert_problem(client.get("/calls/call-42"), 504)

    assert "ewsResponseCode" not in problem


def test_exchange_throttling_tells_the_caller_when_to_retry(
    client: FlaskClient, fake: FakeExchange
) -> None:
    fake.error = errors.ExchangeBusy("busy", ews_code="ErrorServerBusy", retry_after_s=7)

    response = client.delete("/calls/call-42")

    assert_problem(response, 503)
    assert response.headers["Retry-After"] == "7"


def test_a_back_off_from_exchange_is_rounded_up_to_whole_seconds_of_retry_after(
    client: FlaskClient, fake: FakeExchange
) -> None:
    fake.error = errors.error_for_response_code(
        "ErrorServerBusy", "slow down", outcome="ews_error", back_off_ms=2100
    )

    response = client.delete("/calls/call-42")

    assert_problem(response, 503)
    assert response.headers["Retry-After"] == "3"


def test_an_error_without_retry_after_sends_no_retry_after_header(
    client: FlaskClient, fake: FakeExchange
) -> None:
    fake.error = errors.ExchangeUnavailable("the UM server is down")

    assert "Retry-After" not in client.delete("/calls/call-42").headers


def test_an_unexpected_exception_is_a_500_problem_that_hides_the_exception(
    client: FlaskClient, fake: FakeExchange
) -> None:
    fake.error = RuntimeError("secret-internal-state at 0xdeadbeef")

    response = client.post("/calls", json={"itemId": "item-1", "dialString": "100"})

    assert_problem(response, 500)
    assert "secret-internal-state" not in response.text
    assert "RuntimeError" not in response.text


# Call id rules


@pytest.mark.parametrize(
    "call_id",
    ["x", "~" * 512, PRINTABLE_ASCII, "AAMkADk0+NzI/ZTQ=="],
    ids=["1-char", "512-chars", "all-printable", "base64"],
)
@pytest.mark.parametrize("method", ["DELETE", "GET"])
def test_a_call_id_of_printable_ascii_up_to_512_chars_reaches_exchange(
    client: FlaskClient, fake: FakeExchange, method: str, call_id: str
) -> None:
    response = client.open(call_path(call_id), method=method)

    assert response.status_code == 200
    assert response.get_json()["callId"] == call_id
    assert fake.last.arguments["call_id"] == call_id


@pytest.mark.parametrize(
    "encoded_id",
    [
        "x" * 513,
        "a%20b",
        "a%09b",
        "a%0Ab",
        "a%0D%0Ab",
        "a%00b",
        "a%1Fb",
        "a%7Fb",
        "%C3%A9",
        "caf%C3%A9",
        "%E2%80%8B",
        "%FF",
    ],
)
@pytest.mark.parametrize("method", ["DELETE", "GET"])
def test_a_call_id_outside_printable_ascii_or_too_long_is_400_and_exchange_is_not_contacted(
    client: FlaskClient, fake: FakeExchange, method: str, encoded_id: str
) -> None:
    problem = assert_problem(client.open(f"/calls/{encoded_id}", method=method), 400)

    assert "callId" in problem["detail"]
    assert fake.calls == []


def test_a_call_id_with_a_space_is_400_and_exchange_is_not_contacted(
    client: FlaskClient, fake: FakeExchange
) -> None:
    assert_problem(client.delete("/calls/call%2042"), 400)
    assert fake.calls == []


@pytest.mark.parametrize("method", ["DELETE", "GET"])
def test_an_empty_call_id_is_400_and_exchange_is_not_contacted(
    client: FlaskClient, fake: FakeExchange, method: str
) -> None:
    assert_problem(client.open("/calls/", method=method), 400)
    assert fake.calls == []


@pytest.mark.parametrize(
    "call_id",
    ["a/b", "a//b", "ends/", 'a"b', "a<b>", "a&b", "a'b", "a%b", "%41", "a?b#c", "/starts"],
)
@pytest.mark.parametrize("method", ["DELETE", "GET"])
def test_a_call_id_with_url_or_xml_special_characters_reaches_exchange_unchanged(
    client: FlaskClient, fake: FakeExchange, method: str, call_id: str
) -> None:
    response = client.open(call_path(call_id), method=method)

    assert response.status_code == 200
    assert response.get_json()["callId"] == call_id
    assert fake.last.arguments["call_id"] == call_id


# X-Request-ID


def test_a_sane_caller_request_id_is_echoed_and_sent_to_exchange(
    client: FlaskClient, fake: FakeExchange
) -> None:
    response = client.delete("/calls/call-42", headers={"X-Request-ID": "abc-123"})

    assert response.headers["X-Request-ID"] == "abc-123"
    assert fake.last.arguments["request_id"] == "abc-123"


@pytest.mark.parametrize("caller_id", ["r" * 129, "abc 123", "abc<script>", "", "abc\t1"])
def test_an_insane_caller_request_id_is_replaced_by_a_fresh_one(
    client: FlaskClient, fake: FakeExchange, caller_id: str
) -> None:
    response = client.delete("/calls/call-42", headers={"X-Request-ID": caller_id})

    fresh_id = response.headers["X-Request-ID"]
    assert fresh_id
    assert fresh_id != caller_id
    assert fake.last.arguments["request_id"] == fresh_id


def test_requests_without_an_id_get_different_ids(client: FlaskClient) -> None:
    first = client.get("/livez").headers["X-Request-ID"]
    second = client.get("/livez").headers["X-Request-ID"]

    assert first
    assert first != second


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/livez", 200),
        ("DELETE", "/calls/call-42", 200),
        ("GET", "/no/such/route", 404),
        ("PUT", "/calls/call-42", 405),
        ("DELETE", "/calls/bad%20id", 400),
        ("POST", "/calls", 415),
    ],
)
def test_every_response_carries_the_request_id(
    client: FlaskClient, method: str, path: str, status: int
) -> None:
    response = client.open(path, method=method, headers={"X-Request-ID": "trace-77"})

    assert response.status_code == status
    assert response.headers["X-Request-ID"] == "trace-77"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/no/such/route", 404), ("PUT", "/calls/x", 405), ("GET", "/calls/a%20b", 400)],
)
def test_a_problem_body_carries_the_same_request_id_as_the_header(
    client: FlaskClient, method: str, path: str, status: int
) -> None:
    for headers in ({}, {"X-Request-ID": "trace-78"}, {"X-Request-ID": "not sane"}):
        response = client.open(path, method=method, headers=headers)
        problem = assert_problem(response, status)
        assert problem["requestId"] == response.headers["X-Request-ID"]


# Operational routes


def test_livez_answers_200(client: FlaskClient) -> None:
    assert client.get("/livez").status_code == 200


def test_readyz_answers_200_while_serving(client: FlaskClient) -> None:
    assert client.get("/readyz").status_code == 200


def test_readyz_is_a_503_problem_while_draining(client: FlaskClient, state: ServiceState) -> None:
    state.draining = True

    assert_problem(client.get("/readyz"), 503)
    assert client.get("/livez").status_code == 200


def test_the_openapi_spec_is_served_as_yaml(client: FlaskClient) -> None:
    response = client.get("/openapi.yaml")

    assert response.status_code == 200
    assert response.mimetype == "application/yaml"
    assert response.text.startswith("openapi:")
    if importlib.util.find_spec("yaml") is None:
        return
    spec = importlib.import_module("yaml").safe_load(response.text)
    assert str(spec["openapi"]).startswith("3.1")
    assert "/calls/{callId}" in spec["paths"]


def test_an_unknown_route_is_a_404_problem(client: FlaskClient) -> None:
    assert_problem(client.get("/no/such/route"), 404)


def test_an_unsupported_method_is_a_405_problem_listing_the_allowed_ones(
    client: FlaskClient, fake: FakeExchange
) -> None:
    response = client.put("/calls/x")

    assert_problem(response, 405)
    allowed = {method.strip() for method in response.headers["Allow"].split(",")}
    assert {"GET", "DELETE"} <= allowed
    assert "PUT" not in allowed
    assert fake.calls == []


WEBSOCKET_HANDSHAKE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/livez"),
        ("POST", "/livez"),
        ("GET", "/calls/abc"),
        ("PUT", "/calls/abc"),
        ("GET", "/calls/abc/events"),
        ("DELETE", "/calls/abc/events"),
        ("GET", "/no/such/route"),
    ],
)
def test_a_websocket_handshake_is_answered_as_the_plain_request(
    client: FlaskClient, method: str, path: str
) -> None:
    """The gateway upgrades to nothing; it answers what the same request without Upgrade gets
    (RFC 9110 section 7.8), never a 500 from routing a WebSocket request."""
    plain = client.open(path, method=method)
    handshake = client.open(path, method=method, headers=WEBSOCKET_HANDSHAKE)

    assert handshake.status_code == plain.status_code < 500
    assert handshake.headers.get("Allow") == plain.headers.get("Allow")
    assert handshake.mimetype == plain.mimetype


@pytest.mark.parametrize("host", [".", "a..b", "x" * 64 + ".example.com"])
def test_a_host_header_naming_no_host_is_a_400_that_says_so(client: FlaskClient, host: str) -> None:
    problem = assert_problem(client.get("/livez", headers={"Host": host}), 400)

    assert "Host header" in problem["detail"]


def test_a_number_too_long_to_read_is_a_400_in_the_gateways_words(
    client: FlaskClient, fake: FakeExchange
) -> None:
    body = b'{"itemId": "item-1", "dialString": "100", "n": ' + b"9" * 5000 + b"}"

    problem = assert_problem(client.post("/calls", data=body, content_type="application/json"), 400)

    assert problem["detail"] == "a number in the body has more than 4300 digits"
    assert fake.calls == []


def test_a_body_over_16_kib_is_a_413_problem_and_exchange_is_not_contacted(
    client: FlaskClient, fake: FakeExchange
) -> None:
    body = {"itemId": "item-1", "dialString": "100", "padding": "x" * (16 * 1024)}

    assert_problem(place(client, body), 413)
    assert fake.calls == []


def place_chunked(client: FlaskClient, body: bytes, **headers: str) -> TestResponse:
    """POST /calls as gunicorn hands over a chunked body: decoded, with no Content-Length."""
    return client.post(
        "/calls",
        input_stream=io.BytesIO(body),
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked", **headers},
        environ_overrides={"wsgi.input_terminated": True},
    )


def padded_call(size: int, tail: bytes = b"") -> bytes:
    """A valid POST /calls body padded with spaces to SIZE bytes, then TAIL."""
    body = b'{"itemId": "item-1", "dialString": "100"}'
    return body + b" " * (size - len(body)) + tail


def test_a_chunked_body_over_16_kib_is_413_even_when_its_first_16_kib_are_a_valid_call(
    client: FlaskClient, fake: FakeExchange
) -> None:
    # Was 201: the first 16 KiB were read as the whole body and a call was placed.
    body = padded_call(16 * 1024, b"not json" * 500)

    problem = assert_problem(place_chunked(client, body), 413)

    assert problem["type"] == "urn:ews-gateway:problem:request-entity-too-large"
    assert problem["detail"] == "the body is larger than the 16 KiB a request may carry"
    assert fake.calls == []


@pytest.mark.parametrize(("size", "status"), [(16 * 1024, 201), (16 * 1024 + 1, 413)])
def test_the_limit_is_the_same_16_kib_for_chunked_bodies_and_content_length(
    client: FlaskClient, size: int, status: int
) -> None:
    body = padded_call(size)

    chunked = place_chunked(client, body)
    announced = client.post("/calls", data=body, content_type="application/json")

    assert (chunked.status_code, announced.status_code) == (status, status)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "x-gzip", "GZIP", "identity, gzip"])
def test_a_body_with_a_content_coding_is_415_naming_content_encoding(
    client: FlaskClient, fake: FakeExchange, coding: str
) -> None:
    # Was 400 "'utf-8' codec can't decode": the gzip bytes were read as JSON.
    body = gzip.compress(b'{"itemId": "item-1", "dialString": "100"}')

    response = client.post(
        "/calls", data=body, content_type="application/json", headers={"Content-Encoding": coding}
    )

    problem = assert_problem(response, 415)
    assert problem["type"] == "urn:ews-gateway:problem:unsupported-media-type"
    assert "Content-Encoding" in problem["detail"]
    assert response.headers["Accept-Encoding"] == "identity"
    assert fake.calls == []


def test_a_gzip_body_sent_chunked_is_415_too(client: FlaskClient, fake: FakeExchange) -> None:
    body = gzip.compress(b'{"itemId": "item-1", "dialString": "100"}')

    response = place_chunked(client, body, **{"Content-Encoding": "gzip"})

    assert "Content-Encoding gzip" in assert_problem(response, 415)["detail"]
    assert fake.calls == []


def test_a_coding_that_is_no_token_is_not_echoed_in_the_detail(client: FlaskClient) -> None:
    response = client.post(
        "/calls",
        data=b"{}",
        content_type="application/json",
        headers={"Content-Encoding": "gzip<script>" + "x" * 100},
    )

    assert assert_problem(response, 415)["detail"] == (
        "Content-Encoding other than identity is not supported; send the JSON body unencoded"
    )


def test_content_encoding_identity_is_no_coding_and_the_call_is_placed(
    client: FlaskClient, fake: FakeExchange
) -> None:
    response = client.post(
        "/calls",
        data=b'{"itemId": "item-1", "dialString": "100"}',
        content_type="application/json",
        headers={"Content-Encoding": "identity"},
    )

    assert response.status_code == 201
    assert fake.last.operation == "play_on_phone"


# Metrics


def scrape(client: FlaskClient) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    return response.text


def test_requests_are_counted_by_method_route_and_status(client: FlaskClient) -> None:
    client.delete("/calls/call-42")
    client.delete("/calls/bad%20id")

    text = scrape(client)

    assert (
        'ews_gateway_http_requests_total{method="DELETE",route="/calls/<call_id>",status="200"} 1.0'
        in text
    )
    assert (
        'ews_gateway_http_requests_total{method="DELETE",route="/calls/<call_id>",status="400"} 1.0'
        in text
    )


def test_request_durations_are_a_histogram_by_method_and_route(client: FlaskClient) -> None:
    client.get("/calls/call-42")

    text = scrape(client)

    assert (
        'ews_gateway_http_request_duration_seconds_count{method="GET",route="/calls/<call_id>"} 1.0'
        in text
    )
    assert (
        'ews_gateway_http_request_duration_seconds_bucket{le="+Inf",method="GET",'
        'route="/calls/<call_id>"} 1.0' in text
    )


def test_no_request_stays_in_progress_after_it_is_answered(fake: FakeExchange) -> None:
    registry = CollectorRegistry()
    config = Config(ews_url="http://exchange.invalid/EWS/Exchange.asmx", gateway_auth="none")
    client = create_app(config, ews=cast(EwsClient, fake), registry=registry).test_client()
    client.delete("/calls/call-42")
    client.get("/calls/bad%20id")
    client.get("/no/such/route")
    client.post("/calls", json={"itemId": "item-1", "dialString": "100", "x": "y" * 20000})
    fake.error = RuntimeError("boom")
    client.delete("/calls/call-42")

    assert registry.get_sample_value("ews_gateway_http_requests_in_progress") == 0.0


def test_the_build_version_is_exposed(client: FlaskClient) -> None:
    assert f'ews_gateway_build_info{{version="{__version__}"}} 1.0' in scrape(client)


def test_no_call_id_or_raw_path_ever_appears_in_the_metrics(
    client: FlaskClient, fake: FakeExchange
) -> None:
    client.delete("/calls/secret-call-id-1")
    client.get("/calls/secret-call-id-2")
    client.get("/calls/secret%20call%20id%203")
    client.put("/calls/secret-call-id-4")
    client.get("/secret-route-5")
    fake.error = errors.CallNotFound("no such call", ews_code="ErrorInvalidPhoneCallId")
    client.delete("/calls/secret-call-id-6")

    assert "secret" not in scrape(client)


def test_a_nonstandard_method_is_counted_as_other_so_callers_cannot_mint_series(
    client: FlaskClient,
) -> None:
    for method in ("BREW", "WHEN", "PROPFIND"):
        assert client.open("/calls/abc", method=method).status_code == 405

    text = scrape(client)

    assert 'method="other",route="/calls/<call_id>",status="405"} 3.0' in text
    assert "BREW" not in text
    assert "PROPFIND" not in text


def test_unknown_routes_are_labelled_unmatched(client: FlaskClient) -> None:
    client.get("/wp-admin/setup.php")

    text = scrape(client)

    assert 'ews_gateway_http_requests_total{method="GET",route="<unmatched>",status="404"} 1.0' in (
        text
    )
    assert "wp-admin" not in text


# Access log


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "gateway.access"]


def test_each_request_writes_one_access_log_record_with_its_facts(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")

    response = client.delete("/calls/call-42", headers={"X-Request-ID": "log-1"})

    [record] = access_records(caplog)
    assert response.headers["X-Request-ID"] == "log-1"
    assert record.__dict__["requestId"] == "log-1"
    assert record.__dict__["method"] == "DELETE"
    assert record.__dict__["route"] == "/calls/<call_id>"
    assert record.__dict__["status"] == 200
    assert isinstance(record.__dict__["durationMs"], float)
    assert record.__dict__["durationMs"] >= 0


def test_failed_and_unmatched_requests_are_logged_too(
    client: FlaskClient, fake: FakeExchange, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    fake.error = errors.ExchangeAccessDenied("denied", ews_code="ErrorAccessDenied")

    first = client.get("/calls/call-42")
    second = client.get("/nowhere")

    records = access_records(caplog)
    assert [r.__dict__["status"] for r in records] == [403, 404]
    assert [r.__dict__["route"] for r in records] == ["/calls/<call_id>", "<unmatched>"]
    assert [r.__dict__["requestId"] for r in records] == [
        first.headers["X-Request-ID"],
        second.headers["X-Request-ID"],
    ]


def test_a_405_on_a_real_route_is_counted_under_that_route(client: FlaskClient) -> None:
    client.put("/calls/abc")
    client.delete("/calls")

    text = scrape(client)

    assert (
        'ews_gateway_http_requests_total{method="PUT",route="/calls/<call_id>",status="405"} 1.0'
        in (text)
    )
    assert (
        'ews_gateway_http_requests_total{method="DELETE",route="/calls",status="405"} 1.0' in text
    )
    assert "<unmatched>" not in text


# The gateway's own words, whatever failed


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error_class"),
    [
        ("GET", "/no/such/route", None, 404, errors.RouteNotFound),
        ("PUT", "/calls/abc", None, 405, errors.MethodNotAllowed),
        ("POST", "/calls", {"padding": "x" * 20000}, 413, errors.BodyTooLarge),
    ],
)
def test_routing_and_protocol_errors_speak_the_gateways_words_not_werkzeugs(
    client: FlaskClient,
    method: str,
    path: str,
    body: Any,
    status: int,
    error_class: type[errors.GatewayError],
) -> None:
    problem = assert_problem(client.open(path, method=method, json=body), status)

    assert problem["title"] == error_class.title
    assert problem["type"] == f"urn:ews-gateway:problem:{error_class.slug}"
    assert "If you entered the URL manually" not in problem["detail"]
    assert "The method is not allowed" not in problem["detail"]
    assert "The data value transmitted exceeds" not in problem["detail"]


def test_a_post_to_calls_with_a_trailing_slash_is_404_pointing_at_post_calls(
    client: FlaskClient, fake: FakeExchange
) -> None:
    response = client.post("/calls/", json={"itemId": "item-1", "dialString": "100"})

    problem = assert_problem(response, 404)
    assert "POST /calls/" in problem["detail"]
    assert "/calls?" in problem["detail"]
    assert "Allow" not in response.headers
    assert fake.calls == []


def test_a_405_lists_exactly_the_methods_of_the_route(client: FlaskClient) -> None:
    response = client.post("/calls/abc")

    assert_problem(response, 405)
    assert response.headers["Allow"] == "DELETE, GET, HEAD, OPTIONS"


@pytest.mark.parametrize("body", [b"null", b"[]", b'"text"', b"42"])
def test_a_json_body_that_is_not_an_object_is_400_saying_it_must_be_one(
    client: FlaskClient, fake: FakeExchange, body: bytes
) -> None:
    response = client.post("/calls", data=body, content_type="application/json")

    problem = assert_problem(response, 400)
    assert problem["detail"] == "the body must be a JSON object with itemId and dialString"
    assert fake.calls == []


@pytest.mark.parametrize(
    ("body", "name"),
    [
        (b'{"itemId": "item-1", "dialString": "4711", "dialString": "+900123456"}', "dialString"),
        (b'{"itemId": "item-1", "itemChangeKey": {"a": 1, "a": 2}, "dialString": "4711"}', "a"),
    ],
)
def test_a_member_named_twice_is_refused_with_400_and_nothing_is_dialled(
    client: FlaskClient, fake: FakeExchange, body: bytes, name: str
) -> None:
    response = client.post("/calls", data=body, content_type="application/json")

    problem = assert_problem(response, 400)
    assert problem["detail"] == f"the body names {name!r} twice; name each field once"
    assert fake.calls == []


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json_and_are_refused_with_400(
    client: FlaskClient, fake: FakeExchange, constant: str
) -> None:
    body = f'{{"itemId": "item-1", "dialString": "100", "x": {constant}}}'.encode()

    response = client.post("/calls", data=body, content_type="application/json")

    problem = assert_problem(response, 400)
    assert problem["detail"].startswith("the body is not valid JSON")
    assert constant in problem["detail"]
    assert fake.calls == []


def test_options_without_an_origin_is_204_with_allow_and_no_html(client: FlaskClient) -> None:
    response = client.options("/calls/abc")

    assert response.status_code == 204
    assert response.data == b""
    assert "text/html" not in response.headers.get("Content-Type", "")
    assert response.headers["Allow"] == "DELETE, GET, HEAD, OPTIONS"
    assert response.headers["X-Request-ID"]


def test_options_on_an_unknown_path_without_an_origin_is_a_404_problem(client: FlaskClient) -> None:
    assert_problem(client.options("/no/such/route"), 404)


# Log lines that say why


def the_access_record(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    [record] = access_records(caplog)
    return record


def test_an_exchange_failure_is_logged_as_a_warning_with_its_status_code_and_detail(
    client: FlaskClient, fake: FakeExchange, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    error = errors.ExchangeAuthFailed(
        "Exchange refused the gateway's credentials (HTTP 401)", outcome="http_error"
    )
    error.upstream_status = 401
    fake.error = error

    client.get("/calls/call-42")

    record = the_access_record(caplog)
    assert record.levelno == logging.WARNING
    assert record.__dict__["status"] == 502
    assert record.__dict__["upstreamStatus"] == 401
    assert record.__dict__["upstreamOutcome"] == "http_error"
    assert record.__dict__["detail"] == "Exchange refused the gateway's credentials (HTTP 401)"


def test_an_exchange_outage_and_bad_credentials_read_differently_in_the_log(
    client: FlaskClient, fake: FakeExchange, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    down = errors.ExchangeUnavailable("Exchange answered HTTP 503", outcome="http_error")
    down.upstream_status = 503
    fake.error = down

    client.get("/calls/call-42")

    record = the_access_record(caplog)
    assert record.levelno == logging.WARNING
    assert record.__dict__["status"] == 503
    assert record.__dict__["upstreamStatus"] == 503
    assert record.__dict__["detail"] == "Exchange answered HTTP 503"


def test_an_ews_error_is_logged_with_its_code_and_detail(
    client: FlaskClient, fake: FakeExchange, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    fake.error = errors.error_for_response_code(
        "ErrorInvalidPhoneCallId", "The phone call ID is not valid.", outcome="ews_error"
    )
    fake.error.upstream_status = 200

    client.get("/calls/call-42")

    record = the_access_record(caplog)
    assert record.levelno == logging.INFO
    assert record.__dict__["status"] == 404
    assert record.__dict__["upstreamStatus"] == 200
    assert record.__dict__["ewsResponseCode"] == "ErrorInvalidPhoneCallId"
    assert record.__dict__["detail"] == (
        "Exchange answered ErrorInvalidPhoneCallId: The phone call ID is not valid."
    )


def test_a_success_is_logged_at_info_with_exchanges_200_and_no_detail(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")

    client.delete("/calls/call-42")

    record = the_access_record(caplog)
    assert record.levelno == logging.INFO
    assert record.__dict__["upstreamOutcome"] == "success"
    assert record.__dict__["upstreamStatus"] == 200
    assert record.__dict__["ewsResponseCode"] == "NoError"
    assert "detail" not in record.__dict__


def test_a_caller_error_is_logged_at_info_with_its_detail(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")

    client.get("/calls/a%20b")

    record = the_access_record(caplog)
    assert record.levelno == logging.INFO
    assert record.__dict__["detail"].startswith("callId must be")
    assert record.__dict__["upstreamStatus"] is None
    assert record.__dict__["upstreamOutcome"] is None


def test_the_gateways_own_500_is_logged_as_an_error_without_the_exception_text(
    client: FlaskClient, fake: FakeExchange, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    fake.error = RuntimeError("password=hunter2")

    client.get("/calls/call-42")

    record = the_access_record(caplog)
    assert record.levelno == logging.ERROR
    assert record.__dict__["status"] == 500
    assert record.__dict__["detail"] == "unexpected RuntimeError"
    assert "hunter2" not in record.getMessage() + str(record.__dict__)
