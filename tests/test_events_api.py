"""GET /calls/{callId}/events through the app: what is decided before the stream starts.

The request runs through Flask's test client with one end of a socket pair as the
socket gunicorn lends; the other end reads what the pump writes.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import cast
from urllib.parse import quote

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry

from gateway.api import events
from gateway.api.handoff import HandedOff
from gateway.api.services import ServiceState
from gateway.app import create_app
from gateway.config import Config
from gateway.errors import CallNotFound
from gateway.exchange.client import CallInformation, EwsClient
from gateway.guards.callers import Caller
from gateway.guards.ownership import CallIds
from tests.fake_ews import FakeExchange
from tests.problems import assert_problem

ORIGIN = "https://app.example.com"
CALL_ID_KEY = b"events-api-tests-call-id-key-0123456789"
# The call "call-1" as the gateway issued it to the caller with the key k3y (calls belong to
# their caller: gateway.guards.ownership).
CALL = "/calls/" + quote(
    CallIds(CALL_ID_KEY).issue(
        "call-1", Caller(subject="apikey:" + hashlib.sha256(b"k3y").hexdigest()[:16])
    ),
    safe="",
)
# Another call of the same caller, and a call of the caller with the key "other".
OTHER_CALL = CallIds(CALL_ID_KEY).issue(
    "call-2", Caller(subject="apikey:" + hashlib.sha256(b"k3y").hexdigest()[:16])
)
THEIR_CALL = "/calls/" + quote(
    CallIds(CALL_ID_KEY).issue(
        "call-3", Caller(subject="apikey:" + hashlib.sha256(b"other").hexdigest()[:16])
    ),
    safe="",
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server_end, watcher_end = socket.socketpair()
    watcher_end.settimeout(5)
    yield server_end, watcher_end
    server_end.close()
    watcher_end.close()


def build(
    tmp_path: Path, exchange: FakeExchange | None = None, **settings: object
) -> tuple[Flask, ServiceState]:
    keys = tmp_path / "keys"
    keys.write_text(
        hashlib.sha256(b"k3y").hexdigest() + "\n" + hashlib.sha256(b"other").hexdigest()
    )
    config = Config(
        ews_url="http://exchange.invalid/EWS/Exchange.asmx",
        gateway_auth="apikey",
        api_keys_file=str(keys),
        cors_origins=(ORIGIN,),
        call_id_key=CALL_ID_KEY,
        **settings,  # type: ignore[arg-type]
    )
    state = ServiceState()
    app = create_app(
        config,
        ews=cast(EwsClient, exchange or FakeExchange()),
        registry=CollectorRegistry(),
        state=state,
    )
    return app, state


def watch(app: Flask, path: str, sock: socket.socket | None, **headers: str) -> object:
    environ: dict[str, object] = {"SERVER_PROTOCOL": "HTTP/1.1"}
    if sock is not None:
        environ["gunicorn.socket"] = sock
    return app.test_client().get(path, headers=headers, environ_overrides=environ)


def test_the_stream_head_carries_cors_and_the_request_id_and_the_first_state(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    app, state = build(tmp_path)
    server_end, watcher_end = pair

    with pytest.raises(HandedOff):
        watch(
            app,
            f"{CALL}/events",
            server_end,
            **{"X-API-Key": "k3y", "Origin": ORIGIN, "X-Request-ID": "watch-1"},
        )
    head = watcher_end.recv(65536)
    while b"event: state" not in head:
        head += watcher_end.recv(65536)

    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert f"Access-Control-Allow-Origin: {ORIGIN}".encode() in head
    assert b"X-Request-ID: watch-1\r\n" in head
    assert b"Cache-Control: no-store, no-transform\r\n" in head
    assert b"X-Accel-Buffering: no\r\n" in head
    data = head.split(b"data: ", 1)[1].split(b"\n", 1)[0]
    assert json.loads(data)["state"] == "Connected"
    assert state.streams is not None
    state.streams.drain()
    assert state.streams.wait_closed(2)


def test_without_credentials_it_is_401_before_any_stream(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    app, _ = build(tmp_path)
    response = watch(app, f"{CALL}/events", pair[0])

    assert_problem(response, 401)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "last_event_id",
    ["abc", "1.XYZ", "9.0123456789ab", "3-0123456789ab", "99999999999-0123456789ab"],
)
def test_a_last_event_id_this_gateway_never_sent_is_400(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket], last_event_id: str
) -> None:
    app, _ = build(tmp_path)
    response = watch(
        app, f"{CALL}/events", pair[0], **{"X-API-Key": "k3y", "Last-Event-ID": last_event_id}
    )

    body = assert_problem(response, 400)  # type: ignore[arg-type]
    assert "Last-Event-ID" in body["detail"]


def test_another_callers_call_is_the_404_of_an_unknown_call_before_any_stream(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    app, _ = build(tmp_path)
    theirs = watch(app, f"{CALL}/events", pair[0], **{"X-API-Key": "other"})
    unknown = watch(app, "/calls/call-1/events", pair[0], **{"X-API-Key": "k3y"})

    assert assert_problem(theirs, 404)["detail"] == assert_problem(unknown, 404)["detail"]  # type: ignore[arg-type]


def test_a_bad_call_id_is_400_before_any_stream(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    app, _ = build(tmp_path)
    response = watch(app, "/calls/" + "x" * 513 + "/events", pair[0], **{"X-API-Key": "k3y"})

    assert_problem(response, 400)  # type: ignore[arg-type]


def test_beyond_the_stream_limit_it_is_503_with_retry_after(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    app, state = build(tmp_path, events_max_streams=1)
    with pytest.raises(HandedOff):
        watch(app, f"{CALL}/events", pair[0], **{"X-API-Key": "k3y"})
    other_server, other_watcher = socket.socketpair()
    with other_server, other_watcher:
        response = watch(
            app, f"{CALL}/events", other_server, **{"X-API-Key": "k3y", "Origin": ORIGIN}
        )

    body = assert_problem(response, 503)  # type: ignore[arg-type]
    assert body["type"] == "urn:ews-gateway:problem:too-many-streams"
    assert response.headers["Retry-After"] == "2"  # type: ignore[attr-defined]
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN  # type: ignore[attr-defined]
    assert state.streams is not None
    state.streams.drain()
    assert state.streams.wait_closed(2)


def test_a_server_that_lends_no_socket_gets_the_stream_relayed_through_its_thread(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(hashlib.sha256(b"k3y").hexdigest() + "\n")
    ended = FakeExchange()
    ended.information = CallInformation(
        state="Disconnected",
        connection_failure_cause="NoAnswer",
        sip_response_code=480,
        sip_response_text="Temporarily Unavailable",
        ews_code="NoError",
    )
    config = Config(
        ews_url="http://exchange.invalid/EWS/Exchange.asmx",
        gateway_auth="apikey",
        api_keys_file=str(keys),
        call_id_key=CALL_ID_KEY,
    )
    app = create_app(config, ews=cast(EwsClient, ended), registry=CollectorRegistry())
    response = watch(app, f"{CALL}/events", None, **{"X-API-Key": "k3y"})

    assert response.status_code == 200  # type: ignore[attr-defined]
    assert response.mimetype == "text/event-stream"  # type: ignore[attr-defined]
    text = response.get_data(as_text=True)  # type: ignore[attr-defined]
    assert text.startswith("id: 4."), "the rank of Disconnected"
    assert "event: state\n" in text
    data = json.loads(text.split("data: ", 1)[1].split("\n", 1)[0])
    assert data["state"] == "Disconnected"
    assert data["sipResponseCode"] == 480
    assert text.endswith("\n\n"), "the stream ended after Disconnected"


def test_a_browser_may_send_last_event_id_across_origins(tmp_path: Path) -> None:
    app, _ = build(tmp_path)
    response = app.test_client().options(
        f"{CALL}/events",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "X-API-Key, Last-Event-ID",
        },
    )

    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "last-event-id" in allowed
    assert "x-api-key" in allowed


def test_a_reconnection_after_the_end_is_204_and_asks_exchange_nothing(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    exchange = FakeExchange()
    app, _ = build(tmp_path, exchange)
    ended = events.snapshot(
        CallInformation(
            state="Disconnected",
            connection_failure_cause="None",
            sip_response_code=None,
            sip_response_text=None,
            ews_code="NoError",
        )
    )
    response = watch(
        app,
        f"{CALL}/events",
        pair[0],
        **{"X-API-Key": "k3y", "Origin": ORIGIN, "Last-Event-ID": ended.position.event_id},
    )

    assert response.status_code == 204  # type: ignore[attr-defined]
    assert response.data == b""  # type: ignore[attr-defined]
    assert "Content-Type" not in response.headers  # type: ignore[attr-defined]
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN  # type: ignore[attr-defined]
    assert exchange.calls == [], "Exchange is not asked about a call the watcher saw end"


def test_an_unknown_call_is_its_404_problem_not_a_stream(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    exchange = FakeExchange()
    exchange.error = CallNotFound(
        "Exchange answered ErrorInvalidPhoneCallId", ews_code="ErrorInvalidPhoneCallId"
    )
    app, state = build(tmp_path, exchange, events_max_streams=1)
    response = watch(app, f"{CALL}/events", pair[0], **{"X-API-Key": "k3y", "Origin": ORIGIN})

    body = assert_problem(response, 404)  # type: ignore[arg-type]
    assert body["type"] == "urn:ews-gateway:problem:call-not-found"
    assert body["ewsResponseCode"] == "ErrorInvalidPhoneCallId"
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN  # type: ignore[attr-defined]
    assert len(exchange.calls) == 1
    assert state.streams is not None
    assert state.streams.wait_closed(0), "the stream's slot was given back"


def test_head_reads_the_call_like_get_without_a_stream(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    exchange = FakeExchange()
    app, _ = build(tmp_path, exchange)
    known = app.test_client().head(f"{CALL}/events", headers={"X-API-Key": "k3y"})
    exchange.error = CallNotFound("Exchange answered ErrorInvalidPhoneCallId")
    unknown = app.test_client().head(
        "/calls/" + quote(OTHER_CALL, safe="") + "/events", headers={"X-API-Key": "k3y"}
    )

    assert known.status_code == 200
    assert known.mimetype == "text/event-stream"
    assert known.headers["Cache-Control"] == "no-store, no-transform"
    assert unknown.status_code == 404


def test_beyond_the_callers_own_limit_it_is_429_and_another_caller_still_watches(
    tmp_path: Path,
) -> None:
    app, state = build(tmp_path, events_max_streams=10, events_max_streams_per_caller=2)
    ends = [socket.socketpair() for _ in range(4)]
    try:
        for server_end, _ in ends[:2]:
            with pytest.raises(HandedOff):
                watch(app, f"{CALL}/events", server_end, **{"X-API-Key": "k3y"})
        refused = watch(app, f"{CALL}/events", ends[2][0], **{"X-API-Key": "k3y", "Origin": ORIGIN})
        body = assert_problem(refused, 429)  # type: ignore[arg-type]
        assert body["type"] == "urn:ews-gateway:problem:too-many-streams-for-caller"
        assert refused.headers["Retry-After"] == "2"  # type: ignore[attr-defined]
        assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN  # type: ignore[attr-defined]
        with pytest.raises(HandedOff):
            watch(app, f"{THEIR_CALL}/events", ends[3][0], **{"X-API-Key": "other"})
    finally:
        assert state.streams is not None
        state.streams.drain()
        assert state.streams.wait_closed(2)
        for server_end, watcher_end in ends:
            server_end.close()
            watcher_end.close()
