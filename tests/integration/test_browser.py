"""A real browser (headless Chromium) against real gunicorn: what a frontend's fetch() sees.

The page is served from its own origin, which the gateway lists in GATEWAY_CORS_ORIGINS; the
page calls the gateway and writes down what each fetch() got, and Chromium dumps the page.
"""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.processes import Server, free_port, gateway_env, start

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

PAGE = """<html><body><pre id="out">pending</pre><script>
async function probe(name, url, init) {
  try {
    const answer = await fetch(url, init);
    const body = await answer.text();
    const type = (answer.headers.get("Content-Type") || "").split(";")[0];
    const id = answer.headers.get("X-Request-ID") ? "id" : "no-id";
    return name + "=" + answer.status + " " + type + " " + id;
  } catch (error) {
    return name + "=blocked";
  }
}
(async () => {
  const gateway = "GATEWAY";
  const bearer = (kib) => ({headers: {"Authorization": "Bearer eyJ" + "a".repeat(kib * 1024)}});
  const results = [
    await probe("token", gateway + "/livez", bearer(12)),
    await probe("oversized", gateway + "/livez", bearer(20)),
    await probe("mistyped", gateway + "/cals/abc", {method: "DELETE"}),
    await probe("wrongMethod", gateway + "/calls", {method: "DELETE"}),
  ];
  document.getElementById("out").textContent = results.join("|");
})();
</script></body></html>
"""


@pytest.fixture
def page_origin() -> Iterator[tuple[str, list[bytes]]]:
    """Serve the page on its own loopback origin; the list takes its body once known."""
    body: list[bytes] = []

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body[0])))
            self.end_headers()
            self.wfile.write(body[0])

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", body
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (a real browser)")
def test_a_browser_reads_the_gateways_real_answers_never_a_cors_failure(
    simulator: Server, page_origin: tuple[str, list[bytes]], tmp_path: Path
) -> None:
    origin, body = page_origin
    port = free_port()
    env = gateway_env(simulator, port, GATEWAY_CORS_ORIGINS=origin)
    gateway = start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", tmp_path / "gw.log")
    body.append(PAGE.replace("GATEWAY", gateway.url).encode())
    try:
        dumped = subprocess.run(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=20000",
                "--dump-dom",
                origin + "/",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        ).stdout
    finally:
        gateway.stop()

    results = dict(
        item.split("=", 1)
        for item in dumped.split('<pre id="out">')[1].split("</pre>")[0].split("|")
    )
    assert results == {
        "token": "200 application/json id",
        "oversized": "431 application/problem+json id",
        "mistyped": "404 application/problem+json id",
        "wrongMethod": "405 application/problem+json id",
    }
