"""The call screen (gateway/demo/index.html) in real Chromium, as a user sees it.

The page is served from one origin, the gateway (`serve`, API keys, CORS for that
origin) from another, the simulator behind it. A screenshot of each run is kept in
test-artefacts/ at the repository's root.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import tempfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.integration.processes import Server, free_port, http, set_faults, start

ROOT = Path(__file__).parents[2]
PAGE_DIR = ROOT / "gateway" / "demo"
ARTEFACTS = ROOT / "test-artefacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
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
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not tool.exists():
            pytest.skip(f"{tool.name} is not installed (Debian: chromium, chromium-driver)")
    profile = tempfile.mkdtemp(prefix="call-screen-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=900,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options
    )
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415 - optional import

    return WebDriverWait(driver, WAIT_S).until(condition, message=f"waiting for {what}")


def text_of(driver: Any, element_id: str) -> str:
    text: str = driver.find_element("id", element_id).text
    return text


def history(driver: Any) -> list[str]:
    return [item.text for item in driver.find_elements("css selector", "#history li")]


def open_page(driver: Any, page_origin: str, gateway: Server) -> None:
    driver.get(f"{page_origin}/index.html")
    for element_id, value in (("gateway-url", gateway.url), ("api-key", API_KEY)):
        field = driver.find_element("id", element_id)
        field.clear()
        field.send_keys(value)


def test_the_call_screen_places_a_call_shows_it_live_hangs_up_and_shows_problems(
    browser: Any, page_origin: str, gateway: Server, step_simulator: Server
) -> None:
    open_page(browser, page_origin, gateway)

    browser.find_element("id", "place-call").click()
    wait_for(browser, lambda d: "Connected" in history(d), "Connected")
    # Connected is shown before anyone hangs up: the states came live from the stream.
    assert history(browser) == ["Connecting", "Alerted", "Connected"]
    assert text_of(browser, "state") == "Connected"
    browser.find_element("id", "hang-up").click()
    wait_for(browser, lambda d: text_of(d, "state") == "Disconnected", "Disconnected")
    assert history(browser) == ["Connecting", "Alerted", "Connected", "Disconnected"]
    assert not browser.find_element("id", "problem").is_displayed()
    ARTEFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTEFACTS / "call-screen.png"))

    browser.find_element("id", "watch-id").send_keys("no-such-call")
    browser.find_element("id", "watch").click()
    problem = wait_for(
        browser, lambda d: d.find_element("id", "problem").is_displayed() and d, "the problem"
    ).find_element("id", "problem")
    assert "Phone call not found (404)" in problem.text
    # An id the gateway did not issue to this caller stops at the gateway (guards.ownership).
    assert "no phone call with this id is known to the gateway" in problem.text
    assert text_of(browser, "state") == "No call"
    browser.save_screenshot(str(ARTEFACTS / "call-screen-unknown-call.png"))

    set_faults(step_simulator, {"kind": "busy", "backOffMs": 2500, "operation": "PlayOnPhone"})
    browser.find_element("id", "place-call").click()
    wait_for(browser, lambda d: "Try again in 3 s." in text_of(d, "problem"), "Retry-After")
    assert "Exchange is throttling requests (503)" in text_of(browser, "problem")
    assert text_of(browser, "state") == "No call"
    # No call was placed: the screen no longer names the one watched before.
    assert text_of(browser, "call-id") == ""
    assert not browser.find_element("id", "hang-up").is_enabled()


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
