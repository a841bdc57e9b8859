"""A browser's own EventSource against real gunicorn: it stops when the call is over.

Headless Chromium loads a page from another origin (listed in GATEWAY_CORS_ORIGINS) whose
EventSource follows a call with no code around it, reconnecting as browsers do. After the
call ends, and for an unknown call, the gateway's answer must make it stop for good: each
reconnection would cost Exchange a GetPhoneCallInformation, every few seconds, for as long
as the tab stays open.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.chromium import headless_chromium
from tests.integration.processes import Server, free_port, gateway_env, http, start, wait_until
from tests.integration.streams import (
    events_url,
    ews_id,
    place_call,
    poll_times,
    stepping_simulator,
)

# Chromium reconnects a closed stream after 3 s unless told otherwise: watch for longer.
QUIET_S = 8.0
PAGE = """<!doctype html><html><body><script>
const seen = window.seen = [];
const source = window.source = new EventSource(new URLSearchParams(location.search).get("url"));
source.addEventListener("state", (event) => {
  seen.push("state " + JSON.parse(event.data).state + " " + event.lastEventId);
});
source.addEventListener("problem", (event) => {
  seen.push("problem " + JSON.parse(event.data).status);
});
source.onerror = () => seen.push("error " + source.readyState);
</script></body></html>
"""
EVENTS_ROUTE = re.compile(
    r'^ews_gateway_http_requests_total\{method="GET",route="/calls/<call_id>/events",'
    r'status="(\d+)"\} ([0-9.]+)$',
    re.MULTILINE,
)


@pytest.fixture
def page_origin() -> Iterator[str]:
    """The page, on its own loopback origin."""
    body = PAGE.encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Server]:
    server = stepping_simulator(1.0, tmp_path / "sim.log")
    yield server
    server.stop()


@pytest.fixture
def gateway(simulator: Server, page_origin: str, tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    env = gateway_env(
        simulator,
        port,
        GATEWAY_CORS_ORIGINS=page_origin,
        GATEWAY_EVENTS_POLL_SECONDS="0.25",
    )
    server = start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", tmp_path / "gw.log")
    yield server
    server.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    with headless_chromium() as driver:
        yield driver


def stream_requests(gateway: Server) -> dict[str, int]:
    """The gateway's count of GET .../events requests by status, summed over its workers."""
    metrics = http("GET", f"{gateway.url}/metrics").body.decode()
    return {status: int(float(count)) for status, count in EVENTS_ROUTE.findall(metrics)}


def watch_in_browser(browser: Any, page_origin: str, url: str) -> None:
    browser.get(f"{page_origin}/?url={url}")


def seen(browser: Any) -> list[str]:
    events: list[str] = browser.execute_script("return window.seen")
    return events


def test_after_disconnected_a_browsers_event_source_stops_reconnecting(
    browser: Any, page_origin: str, gateway: Server, simulator: Server
) -> None:
    call_id = place_call(gateway, dial_string="+1555486")  # busy: Connecting, then the end
    watch_in_browser(browser, page_origin, events_url(gateway, call_id))
    wait_until(lambda: any("Disconnected" in event for event in seen(browser)), "Disconnected")
    polls_at_the_end = len(poll_times(simulator, call_id))
    time.sleep(QUIET_S)

    events = seen(browser)
    assert [event.split(" ")[:2] for event in events] == [
        ["state", "Connecting"],
        ["state", "Disconnected"],
        ["error", "0"],  # the stream ended: the browser reconnects, with Last-Event-ID
        ["error", "2"],  # 204 No Content: CLOSED, for good
    ]
    assert browser.execute_script("return window.source.readyState") == 2  # CLOSED
    assert stream_requests(gateway) == {"200": 1, "204": 1}
    assert len(poll_times(simulator, call_id)) == polls_at_the_end, "Exchange was left alone"


def test_an_unknown_call_is_one_request_and_the_event_source_gives_up(
    browser: Any, page_origin: str, gateway: Server, simulator: Server
) -> None:
    watch_in_browser(browser, page_origin, f"{gateway.url}/calls/no-such-call/events")
    wait_until(lambda: seen(browser), "the browser to hear back")
    time.sleep(QUIET_S)

    assert seen(browser) == ["error 2"], "not a stream: failed, closed, no problem event"
    assert stream_requests(gateway) == {"404": 1}
    assert len(poll_times(simulator, ews_id("no-such-call"))) == 1
