"""The call screen (gateway/demo/index.html) in real Chromium, as a user sees it.

The page is served from one origin, the gateway (`serve`, API keys, CORS for that
origin) from another, the simulator behind it. Screenshots of each run are kept in
test-artefacts/ at the repository's root; docs/call-screen.png is a copy of call-screen.png.
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.chromium import headless_chromium
from tests.integration.processes import (
    Server,
    free_port,
    http,
    set_faults,
    simulator_requests,
    start,
)

ROOT = Path(__file__).parents[2]
PAGE_DIR = ROOT / "gateway" / "demo"
ARTEFACTS = ROOT / "test-artefacts"
API_KEY = "call-screen-key"
WAIT_S = 20


@pytest.fixture
def page_origin() -> Iterator[str]:
    """The page on its own origin: a plain static file server."""
    handler = functools.partial(QuietHandler, directory=str(PAGE_DIR))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output clean."""


@pytest.fixture
def step_simulator(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    args = ["simulator", "--bind", f"127.0.0.1:{port}", "--step-seconds", "1.5"]
    server = start(args, {}, f"http://127.0.0.1:{port}", "/simulator/health", tmp_path / "sim.log")
    yield server
    server.stop()


@pytest.fixture
def gateway(step_simulator: Server, page_origin: str, tmp_path: Path) -> Iterator[Server]:
    keys = tmp_path / "api-keys"
    keys.write_text(hashlib.sha256(API_KEY.encode()).hexdigest() + "\n")
    port = free_port()
    env = {
        "EWS_URL": f"{step_simulator.url}/EWS/Exchange.asmx",
        "GATEWAY_AUTH": "apikey",
        "GATEWAY_API_KEYS_FILE": str(keys),
        "GATEWAY_CORS_ORIGINS": page_origin,
        "GATEWAY_DIAL_ALLOW": "*",
        "GATEWAY_BIND": f"127.0.0.1:{port}",
        "GATEWAY_WORKERS": "2",
        "GATEWAY_EVENTS_POLL_SECONDS": "0.25",
    }
    server = start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", tmp_path / "gw.log")
    yield server
    server.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    with headless_chromium() as driver:
        yield driver


def wait_for(driver: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415 - optional import

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
        condition, message=f"waiting for {what}"
    )


def text_of(driver: Any, element_id: str) -> str:
    text: str = driver.find_element("id", element_id).text
    return text


def enabled(driver: Any, element_id: str) -> bool:
    is_enabled: bool = driver.find_element("id", element_id).is_enabled()
    return is_enabled


def history(driver: Any) -> list[str]:
    return [item.text for item in driver.find_elements("css selector", "#history li")]


def operations(simulator: Server) -> list[str | None]:
    """The EWS operations that reached the simulator, in order (its request journal)."""
    return [request["operation"] for request in simulator_requests(simulator)]


def open_page(driver: Any, page_origin: str, gateway_url: str) -> None:
    driver.get(f"{page_origin}/index.html")
    for element_id, value in (("gateway-url", gateway_url), ("api-key", API_KEY)):
        field = driver.find_element("id", element_id)
        field.clear()
        field.send_keys(value)


def dial(driver: Any, number: str) -> None:
    field = driver.find_element("id", "dial-string")
    field.clear()
    field.send_keys(number)


# Keeps what the page asks fetch() to send, so a test can see the headers of each request.
RECORD_FETCHES = """
window.sentRequests = [];
const send = window.fetch.bind(window);
window.fetch = (url, init = {}) => {
  const {method = "GET", headers = {}} = init;
  window.sentRequests.push({url: String(url), method, headers});
  return send(url, init);
};
"""


def sent_requests(driver: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = driver.execute_script("return window.sentRequests;")
    return sent


def screenshot(driver: Any, name: str) -> None:
    ARTEFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTEFACTS / name))


def test_the_call_screen_places_a_call_shows_it_live_hangs_up_and_shows_problems(
    browser: Any, page_origin: str, gateway: Server, step_simulator: Server
) -> None:
    open_page(browser, page_origin, gateway.url)

    browser.find_element("id", "place-call").click()
    wait_for(browser, lambda d: "Connected" in history(d), "Connected")
    # Connected is shown before anyone hangs up: the states came live from the stream.
    assert history(browser) == ["Connecting", "Alerted", "Connected"]
    assert text_of(browser, "state") == "Connected"
    # One call at a time: neither Call nor Watch can take the screen from a live call.
    assert not enabled(browser, "place-call")
    assert not enabled(browser, "watch")
    browser.find_element("id", "hang-up").click()
    wait_for(browser, lambda d: text_of(d, "state") == "Call ended", "the call's end")
    assert history(browser) == ["Connecting", "Alerted", "Connected", "Disconnected"]
    assert not browser.find_element("id", "problem").is_displayed()
    assert enabled(browser, "place-call")
    assert not enabled(browser, "hang-up")
    screenshot(browser, "call-screen.png")

    browser.find_element("id", "watch-id").send_keys("no-such-call")
    browser.find_element("id", "watch").click()
    problem = wait_for(
        browser, lambda d: d.find_element("id", "problem").is_displayed() and d, "the problem"
    ).find_element("id", "problem")
    assert "Phone call not found (404)" in problem.text
    # An id the gateway did not issue to this caller stops at the gateway (guards.ownership).
    assert "no phone call with this id is known to the gateway" in problem.text
    assert text_of(browser, "state") == "No call"
    # A call the gateway does not know is over for the screen: the next one may start.
    wait_for(browser, lambda d: enabled(d, "place-call"), "Call enabled again")
    assert not enabled(browser, "hang-up")
    screenshot(browser, "call-screen-unknown-call.png")


def test_a_double_click_on_call_places_one_call(
    browser: Any, page_origin: str, gateway: Server, step_simulator: Server
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains  # noqa: PLC0415

    open_page(browser, page_origin, gateway.url)
    ActionChains(browser).double_click(browser.find_element("id", "place-call")).perform()
    wait_for(browser, lambda d: "Connected" in history(d), "Connected")

    assert operations(step_simulator).count("PlayOnPhone") == 1


def test_call_is_disabled_while_a_call_is_live_and_hang_up_works_while_it_rings(
    browser: Any, page_origin: str, gateway: Server, step_simulator: Server
) -> None:
    open_page(browser, page_origin, gateway.url)

    browser.find_element("id", "place-call").click()
    # From the click on, before the gateway has answered.
    assert not enabled(browser, "place-call")
    wait_for(browser, lambda d: "Alerted" in history(d), "ringing")
    assert text_of(browser, "state") == "Ringing…"
    assert not enabled(browser, "place-call")
    assert not enabled(browser, "watch")
    assert enabled(browser, "hang-up")

    browser.find_element("id", "hang-up").click()
    wait_for(browser, lambda d: text_of(d, "state") == "Call ended", "the call's end")
    assert enabled(browser, "place-call")
    assert not enabled(browser, "hang-up")
    done = operations(step_simulator)
    assert (done.count("PlayOnPhone"), done.count("DisconnectPhoneCall")) == (1, 1)


def test_hang_up_stays_available_after_exchange_answered_503_while_the_call_rings(
    browser: Any, page_origin: str, gateway: Server, step_simulator: Server
) -> None:
    open_page(browser, page_origin, gateway.url)
    dial(browser, "+15550000480")  # rings for a while, unanswered
    browser.find_element("id", "place-call").click()
    wait_for(browser, lambda d: "Alerted" in history(d), "ringing")

    # IIS's 503 page with a Retry-After too long for the gateway to wait out itself.
    set_faults(
        step_simulator,
        {"kind": "http-503", "retryAfter": 3, "operation": "GetPhoneCallInformation", "count": 1},
    )
    wait_for(
        browser,
        lambda d: "Exchange is unavailable; trying again in" in text_of(d, "problem"),
        "the 503 and its countdown",
    )
    assert "Exchange is temporarily unavailable (503)" in text_of(browser, "problem")
    assert enabled(browser, "hang-up")
    assert not enabled(browser, "place-call")
    screenshot(browser, "call-screen-503-while-ringing.png")

    browser.find_element("id", "hang-up").click()
    wait_for(browser, lambda d: text_of(d, "state") == "Call ended", "the call's end")
    assert "DisconnectPhoneCall" in operations(step_simulator)
    assert history(browser)[-1] == "Disconnected"
    assert not browser.find_element("id", "problem").is_displayed()
    assert enabled(browser, "place-call")


def test_a_busy_line_and_an_unanswered_call_are_said_in_words(
    browser: Any, page_origin: str, gateway: Server
) -> None:
    open_page(browser, page_origin, gateway.url)

    dial(browser, "+15550000486")
    browser.find_element("id", "place-call").click()
    wait_for(browser, lambda d: text_of(d, "state") == "Line busy", "Line busy")
    assert history(browser)[-1] == "Disconnected (UserBusy)"
    screenshot(browser, "call-screen-busy.png")

    dial(browser, "+15550000480")
    browser.find_element("id", "place-call").click()
    wait_for(browser, lambda d: text_of(d, "state") == "No answer", "No answer")
    # Exchange says only Disconnected with None: it rang, and nobody answered.
    assert history(browser) == ["Connecting", "Alerted", "Disconnected"]
    screenshot(browser, "call-screen-no-answer.png")


def test_an_unreachable_gateway_is_named_by_its_url(browser: Any, page_origin: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    open_page(browser, page_origin, closed)

    browser.find_element("id", "place-call").click()
    wait_for(browser, lambda d: d.find_element("id", "problem").is_displayed(), "the problem")
    assert f"The gateway cannot be reached at {closed}" in text_of(browser, "problem")
    assert text_of(browser, "state") == "No call"
    assert enabled(browser, "place-call")
    screenshot(browser, "call-screen-unreachable.png")

    # Reading a call is safe to repeat: the page keeps trying, and Hang up stays available.
    browser.find_element("id", "watch-id").send_keys("gw1.some.call")
    browser.find_element("id", "watch").click()
    wait_for(
        browser,
        lambda d: "The gateway cannot be reached; trying again in" in text_of(d, "problem"),
        "the countdown",
    )
    assert f"The gateway cannot be reached at {closed}" in text_of(browser, "problem")
    assert enabled(browser, "hang-up")


def test_an_empty_watch_id_is_refused_and_nothing_is_sent(browser: Any, page_origin: str) -> None:
    browser.get(f"{page_origin}/index.html")
    browser.execute_script(RECORD_FETCHES)

    browser.find_element("id", "watch-id").send_keys("   ")
    browser.find_element("id", "watch").click()

    assert "Enter the id of a call to watch" in text_of(browser, "watch-message")
    assert text_of(browser, "state") == "No call yet"
    assert enabled(browser, "watch")
    assert sent_requests(browser) == []


def test_retry_after_is_counted_down_and_the_retry_places_the_call_once(
    browser: Any, page_origin: str, gateway: Server, step_simulator: Server
) -> None:
    open_page(browser, page_origin, gateway.url)
    browser.execute_script(RECORD_FETCHES)
    set_faults(
        step_simulator, {"kind": "busy", "backOffMs": 3000, "operation": "PlayOnPhone", "count": 1}
    )

    browser.find_element("id", "place-call").click()
    wait_for(
        browser,
        lambda d: "Exchange is busy; trying again in 3 s" in text_of(d, "problem"),
        "the Retry-After",
    )
    assert "Exchange is throttling requests (503)" in text_of(browser, "problem")
    assert not enabled(browser, "place-call")
    screenshot(browser, "call-screen-retry-after.png")
    wait_for(
        browser,
        lambda d: "Exchange is busy; trying again in 1 s" in text_of(d, "problem"),
        "the countdown",
    )
    wait_for(browser, lambda d: "Connected" in history(d), "Connected after the retry")
    assert not browser.find_element("id", "problem").is_displayed()

    posts = [sent for sent in sent_requests(browser) if sent["method"] == "POST"]
    keys = [post["headers"]["Idempotency-Key"] for post in posts]
    assert len(keys) == 2
    assert keys[0] == keys[1]
    assert re.fullmatch(
        r'"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"', keys[0]
    )
    # The throttled PlayOnPhone and the one that dialled; one call came of them.
    assert operations(step_simulator).count("PlayOnPhone") == 2
    assert len(http("GET", f"{step_simulator.url}/simulator/calls").json()) == 1


def test_the_demo_serves_the_call_screen_and_serve_does_not(
    gateway: Server, tmp_path: Path
) -> None:
    port = free_port()
    demo = start(
        ["demo"],
        {"GATEWAY_BIND": f"127.0.0.1:{port}"},
        f"http://127.0.0.1:{port}",
        "/readyz",
        tmp_path / "demo.log",
    )
    try:
        page = http("GET", f"{demo.url}/demo/")
        assert page.status == 200
        assert page.headers["Content-Type"] == "text/html; charset=utf-8"
        assert page.body == (PAGE_DIR / "index.html").read_bytes()
        assert f"Call screen: {demo.url}/demo/" in demo.log()
    finally:
        demo.stop()
    assert http("GET", f"{gateway.url}/demo/").status == 404
