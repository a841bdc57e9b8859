"""The outbound proxy, through a real forward proxy (Debian's tinyproxy) started per test.

The gateway is built from environment variables as `serve` builds it, so these
tests cover reading HTTPS_PROXY / HTTP_PROXY / NO_PROXY as well as the CONNECT
tunnel, the absolute-form requests and the proxy's credentials.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import Config
from tests.certificates import Certificate, exchange_certificate
from tests.integration.tinyproxy import (
    PROXY_SECRET,
    PROXY_USER,
    Tinyproxy,
    requires_tinyproxy,
    tinyproxies,
)
from tests.loopback_exchange import Answer, FakeExchange, TlsExchange, exchange, tls_exchanges

__all__ = ["exchange", "exchange_certificate", "tinyproxies", "tls_exchanges"]  # fixtures

pytestmark = requires_tinyproxy
SUCCESS = (Path(__file__).parent.parent / "fixtures" / "disconnect_success.xml").read_bytes()


@pytest.fixture
def apps() -> Iterator[Callable[..., Flask]]:
    """The gateway as `serve` builds it from these variables; its connections closed after."""
    built: list[Flask] = []

    def build(**environ: str) -> Flask:
        config = Config.from_env({"GATEWAY_AUTH": "none", "EWS_TIMEOUT_SECONDS": "5", **environ})
        built.append(create_app(config, registry=CollectorRegistry()))
        return built[-1]

    yield build
    for app in built:
        app.extensions["gateway"].ews._transport.close()


def https_exchange(
    certificate: Certificate, tls_exchanges: Callable[[Certificate], TlsExchange]
) -> TlsExchange:
    server = tls_exchanges(certificate)
    server.answer = Answer(body=SUCCESS)
    return server


def test_https_goes_through_the_proxy_in_a_connect_tunnel(
    exchange_certificate: Certificate,
    tls_exchanges: Callable[[Certificate], TlsExchange],
    tinyproxies: Callable[..., Tinyproxy],
    apps: Callable[..., Flask],
) -> None:
    server = https_exchange(exchange_certificate, tls_exchanges)
    proxy = tinyproxies()
    app = apps(
        EWS_URL=server.url,
        EWS_CA_BUNDLE=str(exchange_certificate.cert_path),
        HTTPS_PROXY=proxy.url(),
    )
    client = app.test_client()
    assert client.delete("/calls/call-1").status_code == 200
    assert client.delete("/calls/call-2").status_code == 200
    assert f"CONNECT 127.0.0.1:{server.server_port} HTTP/1.1" in proxy.log()
    # One tunnel, kept alive for the second call like any pooled connection.
    assert proxy.log().count("CONNECT 127.0.0.1") == 1
    assert len(server.received) == 2


def test_http_goes_through_the_proxy_in_absolute_form_with_its_credentials(
    exchange: FakeExchange,
    tinyproxies: Callable[..., Tinyproxy],
    apps: Callable[..., Flask],
) -> None:
    exchange.answer = Answer(body=SUCCESS)
    proxy = tinyproxies(credentials=True)
    app = apps(EWS_URL=exchange.url, http_proxy=proxy.url(f"{PROXY_USER}:{PROXY_SECRET}@"))
    assert app.test_client().delete("/calls/call-1").status_code == 200
    assert f"POST {exchange.url} HTTP/1.1" in proxy.log()
    # The proxy took its credentials off; Exchange never sees them.
    assert "Proxy-Authorization" not in exchange.received[0].headers


def test_https_through_a_proxy_needing_credentials_sends_them_on_connect(
    exchange_certificate: Certificate,
    tls_exchanges: Callable[[Certificate], TlsExchange],
    tinyproxies: Callable[..., Tinyproxy],
    apps: Callable[..., Flask],
) -> None:
    server = https_exchange(exchange_certificate, tls_exchanges)
    proxy = tinyproxies(credentials=True)
    app = apps(
        EWS_URL=server.url,
        EWS_CA_BUNDLE=str(exchange_certificate.cert_path),
        HTTPS_PROXY=proxy.url(f"{PROXY_USER}:{PROXY_SECRET}@"),
    )
    assert app.test_client().delete("/calls/call-1").status_code == 200
    assert "Proxy-Authorization" not in server.received[0].headers


def test_wrong_proxy_credentials_are_502_naming_the_proxy_and_never_the_secret(
    exchange_certificate: Certificate,
    tls_exchanges: Callable[[Certificate], TlsExchange],
    tinyproxies: Callable[..., Tinyproxy],
    apps: Callable[..., Flask],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = https_exchange(exchange_certificate, tls_exchanges)
    proxy = tinyproxies(credentials=True)
    wrong = "wr0ng-S3cret"
    caplog.set_level(logging.DEBUG)
    app = apps(
        EWS_URL=server.url,
        EWS_CA_BUNDLE=str(exchange_certificate.cert_path),
        HTTPS_PROXY=proxy.url(f"{PROXY_USER}:{wrong}@"),
    )
    response = app.test_client().delete("/calls/call-1")
    assert response.status_code == 502
    assert response.json is not None
    # tinyproxy refuses with 401 where RFC 9110 says 407; either is a refusal.
    assert response.json["detail"] == (
        f"The proxy 127.0.0.1:{proxy.port} refused the tunnel to Exchange (HTTP 401)"
    )
    assert server.received == []
    logged = "\n".join(record.getMessage() + repr(record.__dict__) for record in caplog.records)
    for text in (response.get_data(as_text=True), logged, repr(app.extensions)):
        assert wrong not in text
        assert PROXY_USER not in text


def test_no_proxy_sends_a_matching_host_directly(
    exchange: FakeExchange,
    tinyproxies: Callable[..., Tinyproxy],
    apps: Callable[..., Flask],
) -> None:
    exchange.answer = Answer(body=SUCCESS)
    proxy = tinyproxies()
    app = apps(EWS_URL=exchange.url, HTTP_PROXY=proxy.url(), NO_PROXY="localhost,127.0.0.0/8")
    assert app.test_client().delete("/calls/call-1").status_code == 200
    assert "POST" not in proxy.log()
    assert len(exchange.received) == 1


def test_a_silent_exchange_behind_the_proxy_is_504_within_the_one_deadline(
    tinyproxies: Callable[..., Tinyproxy],
    apps: Callable[..., Flask],
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_stay_silent() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    try:
        proxy = tinyproxies()
        port = listener.getsockname()[1]
        app = apps(
            EWS_URL=f"https://127.0.0.1:{port}/EWS/Exchange.asmx",
            EWS_TIMEOUT_SECONDS="1",
            HTTPS_PROXY=proxy.url(),
        )
        started = time.monotonic()
        response = app.test_client().delete("/calls/call-1")
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        listener.close()
        for connection in accepted:
            connection.close()
    assert response.status_code == 504
    # The contract: no later than about a second after EWS_TIMEOUT_SECONDS.
    assert elapsed < 2.0
