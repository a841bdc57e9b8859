"""The front door's pieces: facts read from a refused head, the answer it gets, the mapping."""

from __future__ import annotations

import io
import json
import socket
from types import SimpleNamespace

import pytest
from gunicorn.http import errors as parse_errors

from gateway import errors, frontdoor, serving
from gateway.frontdoor import CallerFacts

APP_ORIGIN = "https://app.example.com"


def test_the_method_request_id_and_origin_are_read_from_a_raw_head() -> None:
    head = (
        b"GET /calls/abc HTTP/1.1\r\nHost: x\r\norigin:  https://app.example.com \r\n"
        b"X-REQUEST-ID: trace-1\r\n\r\n"
    )

    facts = CallerFacts.from_head(head)

    assert facts == CallerFacts("GET", "trace-1", "https://app.example.com")


def test_headers_are_not_read_from_the_body_after_the_head() -> None:
    head = b"POST /calls HTTP/1.1\r\nHost: x\r\n\r\nOrigin: https://app.example.com\r\n"

    assert CallerFacts.from_head(head).origin is None


def test_a_head_cut_short_still_gives_what_it_holds() -> None:
    facts = CallerFacts.from_head(b"DELETE /calls/abc HTTP/1.1\r\nX-Request-ID: trace-2\r\nX-Pad")

    assert (facts.method, facts.request_id, facts.origin) == ("DELETE", "trace-2", None)


def test_an_unknown_method_is_labelled_other() -> None:
    assert CallerFacts.from_head(b"BREW /pot HTTP/1.1\r\n").method_label == "other"
    assert CallerFacts.from_head(b"\x16\x03\x01garbage").method_label == "other"


def parse_answer(raw: bytes) -> tuple[str, dict[str, str], dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    assert int(headers["Content-Length"]) == len(body)
    return status_line, headers, json.loads(body)


def test_a_refusal_is_a_problem_with_the_request_id_and_cors_for_a_listed_origin() -> None:
    raw = frontdoor.answer(
        errors.HeadersTooLarge("too large"), "trace-3", "https://APP.example.com", (APP_ORIGIN,)
    )

    status_line, headers, problem = parse_answer(raw)
    assert status_line == "HTTP/1.1 431 Request Header Fields Too Large"
    assert headers["Content-Type"] == "application/problem+json"
    assert headers["X-Request-ID"] == "trace-3"
    assert headers["Connection"] == "close"
    assert headers["Access-Control-Allow-Origin"] == "https://APP.example.com"
    assert headers["Access-Control-Expose-Headers"] == "Location, Retry-After, X-Request-ID"
    assert headers["Vary"] == "Origin"
    assert problem == {
        "type": "urn:ews-gateway:problem:request-header-fields-too-large",
        "title": errors.HeadersTooLarge.title,
        "status": 431,
        "detail": "too large",
        "requestId": "trace-3",
    }


@pytest.mark.parametrize("origin", [None, "https://evil.example.com", APP_ORIGIN + ".evil.com"])
def test_a_refusal_carries_no_cors_headers_for_any_other_origin(origin: str | None) -> None:
    raw = frontdoor.answer(errors.MalformedRequest("bad"), "trace-4", origin, (APP_ORIGIN,))

    _, headers, _ = parse_answer(raw)
    assert not [name for name in headers if name.startswith("Access-Control-")]


@pytest.mark.parametrize(
    ("raised", "error_class"),
    [
        (parse_errors.LimitRequestLine(9000, 8190), errors.UriTooLong),
        (parse_errors.LimitRequestHeaders("limit request headers fields"), errors.HeadersTooLarge),
        (parse_errors.InvalidRequestLine("GET / HTTP/1.1 x"), errors.MalformedRequest),
        (parse_errors.InvalidHeaderName("X Y"), errors.MalformedRequest),
        (parse_errors.InvalidChunkSize(b"zz"), errors.MalformedRequest),
        (parse_errors.UnsupportedTransferCoding("zstd"), errors.TransferCodingNotImplemented),
        (parse_errors.ExpectationFailed("teapot"), errors.ExpectationFailed),
    ],
)
def test_each_parse_error_is_the_gateway_error_for_it_without_echoing_the_callers_bytes(
    raised: Exception, error_class: type[errors.GatewayError]
) -> None:
    error = frontdoor.as_gateway_error(raised)

    assert type(error) is error_class
    assert error is not None
    assert str(raised) not in error.detail


def test_a_failure_of_the_gateway_itself_is_not_taken_for_the_callers() -> None:
    assert frontdoor.as_gateway_error(RuntimeError("boom")) is None
    assert frontdoor.as_gateway_error(parse_errors.ConfigurationProblem("x")) is None


def test_a_pipelined_request_already_read_is_served_without_waiting_for_the_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Were the socket polled, this would wait five seconds and then say no."""
    monkeypatch.setattr(serving, "NEXT_REQUEST_WAIT_S", 5.0)
    quiet, peer = socket.socketpair()
    with quiet, peer:
        buffered = io.BytesIO()
        buffered.write(b"GET /livez HTTP/1.1\r\n\r\n")
        conn = SimpleNamespace(
            sock=quiet, parser=SimpleNamespace(unreader=SimpleNamespace(buf=buffered))
        )
        worker = SimpleNamespace(alive=True, _waiting_for_thread=0)

        assert serving.GatewayThreadWorker._next_request_is_here(worker, conn) is True
