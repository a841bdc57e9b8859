"""Production serving with real processes: gunicorn workers, signals, nginx and Prometheus."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from http.client import HTTPConnection, HTTPResponse
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.load import LoadClient
from tests.integration.processes import (
    Response,
    Server,
    free_port,
    gateway_env,
    http,
    port_of,
    set_faults,
    simulator_requests,
    start,
    wait_until,
    worker_holding,
    worker_pids,
)

PROBLEM_JSON = "application/problem+json"
CALL_ROUTE = "/calls/<call_id>"
REQUESTS = "ews_gateway_http_requests_total"
IN_PROGRESS = "ews_gateway_http_requests_in_progress"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def gateways(simulator: Server, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start `ews-gateway serve` instances (stderr apart from stdout); all are stopped after."""
    started: list[Server] = []

    def start_gateway(name: str, **env: str) -> Server:
        port = free_port()
        environ = gateway_env(
            simulator, port, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / f"{name}-metrics"), **env
        )
        server = start(
            ["serve"],
            environ,
            f"http://127.0.0.1:{port}",
            "/readyz",
            tmp_path / f"{name}.stderr",
            stdout_path=tmp_path / f"{name}.stdout",
        )
        started.append(server)
        return server

    yield start_gateway
    for server in started:
        server.stop()


def booted_workers(gateway: Server, count: int, dead: int | None = None) -> set[int] | None:
    """Return the workers once there are COUNT of them and DEAD is gone."""
    pids = set(worker_pids(gateway.process.pid))
    return pids if len(pids) == count and dead not in pids else None


def scrape(server: Server) -> Samples:
    """Scrape /metrics once (any worker may answer) into {(sample name, labels): value}."""
    answer = http("GET", f"{server.url}/metrics")
    assert answer.status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def answered(samples: Samples, **labels: str) -> float:
    """Sum the requests counted with LABELS (whatever their other labels)."""
    wanted = frozenset(labels.items())
    return sum(
        value for (name, have), value in samples.items() if name == REQUESTS and wanted <= have
    )


def in_progress(samples: Samples) -> float:
    return samples[(IN_PROGRESS, frozenset())]


def hang_up_unknown_calls(gateway: Server, count: int) -> int:
    """Send COUNT DELETEs of unknown calls from four threads, each on a new connection."""

    def hang_up(number: int) -> Response:
        return http("DELETE", f"{gateway.url}/calls/unknown-{number}")

    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = [answer.status for answer in pool.map(hang_up, range(count))]
    assert statuses == [404] * count
    return count


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def reached_exchange(simulator: Server, request_id: str) -> bool:
    return any(seen["requestId"] == request_id for seen in simulator_requests(simulator))


def test_counts_stay_exact_across_four_workers_and_one_killed_mid_request(
    gateways: Callable[..., Server], simulator: Server, tmp_path: Path
) -> None:
    """Any worker's /metrics sums them all; a SIGKILLed worker's counts stay, its gauge goes."""
    gateway = gateways("gateway", GATEWAY_WORKERS="4", EWS_TIMEOUT_SECONDS="10")
    metrics_dir = tmp_path / "gateway-metrics"
    workers = wait_until(lambda: booted_workers(gateway, 4), "four workers")

    def counted_by_all() -> bool:
        return all((metrics_dir / f"counter_{pid}.db").exists() for pid in workers)

    sent = 0
    while not counted_by_all():  # until every worker has answered some: the sum spans processes
        assert sent < 400, f"{sent} requests never reached all four workers"
        sent += hang_up_unknown_calls(gateway, 20)
    route = {"method": "DELETE", "route": CALL_ROUTE, "status": "404"}
    for _ in range(8):
        samples = scrape(gateway)
        assert answered(samples, **route) == sent
        assert in_progress(samples) == 1  # the scrape itself

    set_faults(simulator, {"kind": "hang", "ms": 30000, "count": 1})
    hung = HTTPConnection("127.0.0.1", port_of(gateway), timeout=30)
    try:
        hung.request("GET", "/calls/hung-call", headers={"X-Request-ID": "hung-request"})
        wait_until(
            lambda: reached_exchange(simulator, "hung-request"), "the call to reach Exchange"
        )
        victim = worker_holding(hung.sock, workers)
        assert in_progress(scrape(gateway)) == 2  # the hung request and the scrape
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(ConnectionError):
            hung.getresponse()
    finally:
        hung.close()

    replacements = wait_until(lambda: booted_workers(gateway, 4, victim), "a new worker")
    assert victim not in replacements
    samples = scrape(gateway)
    assert in_progress(samples) == 1  # the killed worker's request is no longer in progress
    assert answered(samples, **route) == sent  # and what it answered before still counts

    sent += hang_up_unknown_calls(gateway, 40)
    for _ in range(8):
        samples = scrape(gateway)
        assert answered(samples, **route) == sent
        assert in_progress(samples) == 1
    assert answered(samples, method="GET", route=CALL_ROUTE) == 0  # the killed one never ended


def test_sigterm_under_load_answers_every_accepted_request_and_then_refuses(
    gateways: Callable[..., Server], simulator: Server
) -> None:
    """What is in flight or connected at SIGTERM is answered in full; later connections refused."""
    # 16 threads per worker leave room for all six clients on one worker (no bulkhead 503s).
    gateway = gateways("gateway", GATEWAY_WORKERS="2", GATEWAY_THREADS="16")
    placed = http(
        "POST", f"{gateway.url}/calls", {"itemId": "AAMkVoice", "dialString": "+15551234567"}
    )
    assert placed.status == 201
    call_id = placed.json()["callId"]
    set_faults(simulator, {"kind": "latency", "ms": 200})
    give_up_at = time.monotonic() + 40
    clients = [
        LoadClient(port_of(gateway), "DELETE", "/calls/unknown", keep_alive, give_up_at)
        for keep_alive in (False, True, False)
    ] + [
        LoadClient(
            port_of(gateway), "GET", f"/calls/{quote(call_id, safe='')}", keep_alive, give_up_at
        )
        for keep_alive in (True, False, True)
    ]
    threads = [threading.Thread(target=client.run) for client in clients]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: sum(len(c.attempts) for c in clients) >= 12, "load to flow")
        sigterm_at = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=30) == 0
    finally:
        for thread in threads:
            thread.join(timeout=60)

    attempts = [attempt for client in clients for attempt in client.attempts]
    failed = [attempt for attempt in attempts if attempt.error is not None]
    assert not failed, f"accepted requests not answered in full: {failed}"
    for client in clients:
        for attempt in client.attempts:
            if client.method == "DELETE":
                assert attempt.status == 404
                assert attempt.body["ewsResponseCode"] == "ErrorInvalidPhoneCallId"
                assert attempt.body["requestId"] == attempt.request_id
            else:
                assert attempt.status == 200
                assert attempt.body["callId"] == call_id
    drained = [a for a in attempts if a.sent_at < sigterm_at < a.answered_at]
    assert drained, "no request was in flight at SIGTERM, so nothing proved the drain"
    assert all(client.refused for client in clients), "once stopped, the gateway refuses"


def test_readyz_turns_503_on_an_open_connection_while_a_slow_request_drains(
    gateways: Callable[..., Server], simulator: Server
) -> None:
    """After SIGTERM /readyz is 503 even on a kept-alive connection; new ones are refused."""
    gateway = gateways("gateway", GATEWAY_WORKERS="1", EWS_TIMEOUT_SECONDS="10")
    set_faults(simulator, {"kind": "latency", "ms": 3000, "count": 1})
    slow: dict[str, Response] = {}

    def hang_up_slowly() -> None:
        headers = {"X-Request-ID": "slow-request"}
        slow["answer"] = http("DELETE", f"{gateway.url}/calls/slow-call", headers=headers)

    slow_thread = threading.Thread(target=hang_up_slowly)
    probe = HTTPConnection("127.0.0.1", port_of(gateway), timeout=30)
    try:
        probe.request("GET", "/readyz")
        first = probe.getresponse()
        assert (first.status, first.read()) == (200, b'{"status":"ready"}\n')
        assert not first.will_close

        slow_thread.start()
        wait_until(
            lambda: reached_exchange(simulator, "slow-request"), "the call to reach Exchange"
        )
        gateway.process.send_signal(signal.SIGTERM)
        # A /readyz the worker was answering as the signal came may say 200 and close the
        # connection; the worker's log line says the signal has been handled.
        wait_until(lambda: "draining:" in gateway.log(), "the worker to log that it drains")

        def readyz_on_probe() -> HTTPResponse | None:
            probe.request("GET", "/readyz")
            answer = probe.getresponse()
            answer.read()
            return answer if answer.status == 503 else None

        not_ready = wait_until(readyz_on_probe, "/readyz to turn 503 on the open connection")
        assert not_ready.getheader("Content-Type") == PROBLEM_JSON
        wait_until(lambda: refuses_connections(port_of(gateway)), "new connections to be refused")
        assert slow_thread.is_alive(), "the slow request was still being answered meanwhile"
    finally:
        probe.close()
        slow_thread.join(timeout=30)
    assert slow["answer"].status == 404
    assert slow["answer"].json()["ewsResponseCode"] == "ErrorInvalidPhoneCallId"
    assert gateway.process.wait(timeout=30) == 0


def ask_readyz(connection: HTTPConnection, request_id: str) -> str | None:
    """GET /readyz on CONNECTION; return the request id echoed by a 200 answer."""
    connection.request("GET", "/readyz", headers={"X-Request-ID": request_id})
    answer = connection.getresponse()
    answer.read()
    return answer.getheader("X-Request-ID") if answer.status == 200 else None


def test_a_kept_alive_connection_is_served_whether_its_next_request_comes_at_once_or_later(
    gateways: Callable[..., Server],
) -> None:
    """The thread that answered may serve the next request itself; a later one takes the poller."""
    gateway = gateways("gateway", GATEWAY_WORKERS="1")
    connection = HTTPConnection("127.0.0.1", port_of(gateway), timeout=10)
    try:
        echoed = []
        for number, pause_s in enumerate([0, 0, 0.05, 0, 0, 0.3, 0]):
            time.sleep(pause_s)
            echoed.append(ask_readyz(connection, f"request-{number}"))
            if number == 0:
                first_socket = connection.sock
            assert connection.sock is first_socket, "the connection was kept alive throughout"
    finally:
        connection.close()
    assert echoed == [f"request-{number}" for number in range(7)]


def test_a_connection_with_requests_queued_up_does_not_keep_the_only_thread_from_others(
    gateways: Callable[..., Server],
) -> None:
    """With one thread, a new connection is answered while a busy one still has most to go."""
    gateway = gateways("gateway", GATEWAY_WORKERS="1", GATEWAY_THREADS="1")
    pipelined = 2000
    busy = socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=30)
    received = bytearray()

    def answers() -> int:
        return received.count(b"HTTP/1.1 200 ")

    def read_answers() -> None:
        while answers() < pipelined and (data := busy.recv(65536)):
            received.extend(data)

    # Every request is on the socket before most are answered: the thread never waits for one.
    request = b"GET /readyz HTTP/1.1\r\nHost: gateway\r\nX-Request-ID: busy\r\n\r\n"
    sender = threading.Thread(target=busy.sendall, args=(request * pipelined,))
    reader = threading.Thread(target=read_answers)
    sender.start()
    reader.start()
    other = HTTPConnection("127.0.0.1", port_of(gateway), timeout=30)
    try:
        wait_until(lambda: answers() >= 10, "the busy connection's first answers")
        assert ask_readyz(other, "other") == "other"
        assert answers() < pipelined / 2, "the busy connection had most of its requests to go"
        wait_until(lambda: answers() == pipelined, "every request of the busy connection")
    finally:
        other.close()
        sender.join(timeout=30)
        busy.shutdown(socket.SHUT_RDWR)
        reader.join(timeout=30)
        busy.close()


def test_serve_writes_json_lines_only_with_one_access_line_per_request(
    gateways: Callable[..., Server], tmp_path: Path
) -> None:
    """stderr holds only JSON objects: start-up, one access line per request, shutdown."""
    gateway = gateways("gateway")
    place = {"itemId": "AAMkVoice", "dialString": "+15551234567"}
    placed = http("POST", f"{gateway.url}/calls", place, headers={"X-Request-ID": "log-place"})
    call_path = f"/calls/{quote(placed.json()['callId'], safe='')}"
    sent = {"log-place": (placed, "POST", "/calls", "success")}
    for request_id, method, path, route, outcome in [
        ("log-get", "GET", call_path, CALL_ROUTE, "success"),
        ("log-unknown", "DELETE", "/calls/no-such-call", CALL_ROUTE, "ews_error"),
        ("log-bad-id", "DELETE", "/calls/bad%20id", CALL_ROUTE, None),
        ("log-livez", "GET", "/livez", "/livez", None),
        ("log-nowhere", "GET", "/nowhere", "<unmatched>", None),
    ]:
        answer = http(method, gateway.url + path, headers={"X-Request-ID": request_id})
        sent[request_id] = (answer, method, route, outcome)
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(timeout=30) == 0

    assert (tmp_path / "gateway.stdout").read_bytes() == b""
    records = []
    for line in gateway.log().splitlines():
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        records.append(record)
    access = [record for record in records if record["logger"] == "gateway.access"]
    for request_id, (answer, method, route, outcome) in sent.items():
        lines = [record for record in access if record["requestId"] == request_id]
        assert len(lines) == 1, f"{request_id}: {lines}"
        assert {k: lines[0][k] for k in ("method", "route", "status", "upstreamOutcome")} == {
            "method": method,
            "route": route,
            "status": answer.status,
            "upstreamOutcome": outcome,
        }
        assert lines[0]["ewsResponseCode"] == answer.json().get("ewsResponseCode")
        assert lines[0]["durationMs"] >= 0
    probes = [record for record in access if record["requestId"] not in sent]
    assert {(r["method"], r["route"]) for r in probes} == {("GET", "/readyz")}  # start()'s
    messages = [record["message"] for record in records]
    assert f"Listening at: {gateway.url}" in " ".join(messages)
    assert sum(message.startswith("Booting worker") for message in messages) == 2
    assert "Handling signal: term" in messages
    assert "Shutting down: Master" in messages


def installed(name: str) -> str | None:
    """Find NAME on PATH, or in sbin where Debian puts nginx (absent from some users' PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


NGINX, PROMETHEUS, PROMTOOL = installed("nginx"), installed("prometheus"), installed("promtool")


NGINX_CONF = """
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/nginx-access.log;
    client_body_temp_path {tmp}/client-body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # Keep the caller's request id, else give the request nginx's own.
    map $http_x_request_id $gateway_request_id {{
        "" $request_id;
        default $http_x_request_id;
    }}
    upstream gateway {{
        server 127.0.0.1:{first};
        server 127.0.0.1:{second};
        keepalive 16;
        keepalive_timeout 60s;  # below the gateway's 75 s keep-alive: nginx closes idle ones
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://gateway;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Request-ID $gateway_request_id;
            proxy_read_timeout 60s;  # above the gateway's 30 s worker timeout
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


@contextmanager
def running(command: list[str], log_path: Path, ready_url: str) -> Iterator[None]:
    """Run COMMAND until the block ends, once READY_URL answers 200."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"{command[0]} exited:\n{log_path.read_text()}")
        try:
            return http("GET", ready_url, timeout=1).status == 200
        except OSError:
            return False

    try:
        wait_until(ready, f"{command[0]} to start")
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def nginx_in_front(tmp_path: Path, first: Server, second: Server) -> tuple[list[str], int]:
    """Write an nginx config balancing FIRST and SECOND; return its command line and port."""
    port = free_port()
    conf = NGINX_CONF.format(tmp=tmp_path, first=port_of(first), second=port_of(second), port=port)
    (tmp_path / "nginx.conf").write_text(conf)
    command = [str(NGINX), "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    return [*command, "-e", str(tmp_path / "nginx-error.log"), "-g", "daemon off;"], port


def prometheus_scraping(tmp_path: Path, *servers: Server) -> tuple[list[str], int]:
    """Write a Prometheus config scraping SERVERS every second; return its command and port."""
    port = free_port()
    scrape = {
        "job_name": "ews-gateway",
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "static_configs": [{"targets": [f"127.0.0.1:{port_of(s)}" for s in servers]}],
    }
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({"scrape_configs": [scrape]}))  # JSON is YAML
    command = [
        str(PROMETHEUS),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return command, port


def prometheus_value(port: int, query: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?{urlencode({'query': query})}"
    result = http("GET", url).json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.mark.skipif(NGINX is None, reason="nginx not installed (.ci/run installs it)")
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (.ci/run installs it)")
@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (package prometheus)")
def test_behind_nginx_prometheus_counts_every_request_exactly_once(
    gateways: Callable[..., Server], tmp_path: Path
) -> None:
    """K requests through nginx to two instances: all answered, and Prometheus sums exactly K."""
    first, second = gateways("first"), gateways("second")
    nginx, nginx_port = nginx_in_front(tmp_path, first, second)
    prometheus, prometheus_port = prometheus_scraping(tmp_path, first, second)
    via_nginx = f"http://127.0.0.1:{nginx_port}"
    with ExitStack() as stack:
        stack.enter_context(running(nginx, tmp_path / "nginx.out", f"{via_nginx}/livez"))
        prometheus_url = f"http://127.0.0.1:{prometheus_port}/-/ready"
        stack.enter_context(running(prometheus, tmp_path / "prometheus.log", prometheus_url))

        place = {"itemId": "AAMkVoice", "dialString": "+15551234567"}
        placed = http("POST", f"{via_nginx}/calls", place)
        assert placed.status == 201
        call_path = f"/calls/{quote(placed.json()['callId'], safe='')}"
        own_ids = [f"via-nginx-{n}" for n in range(20)] + [""] * 20

        def get_call(request_id: str) -> Response:
            headers = {"X-Request-ID": request_id} if request_id else {}
            return http("GET", via_nginx + call_path, headers=headers)

        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(get_call, own_ids))
        assert [answer.status for answer in answers] == [200] * len(own_ids)
        assert {answer.json()["state"] for answer in answers} <= {
            "Connecting",
            "Alerted",
            "Connected",
        }
        ids = [answer.headers["X-Request-ID"] for answer in answers]
        assert ids[:20] == own_ids[:20]
        assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids[20:])  # nginx's $request_id
        assert len(set(ids)) == len(ids)
        logged = Counter(
            record["requestId"]
            for server in (first, second)
            for record in map(json.loads, server.log().splitlines())
            if record["logger"] == "gateway.access"
        )
        assert all(logged[i] == 1 for i in ids), "each id reached exactly one gateway"

        per_instance = [
            answered(scrape(s), method="GET", route=CALL_ROUTE, status="200")
            for s in (first, second)
        ]
        assert all(count > 0 for count in per_instance), "nginx balanced across both"
        assert sum(per_instance) == len(own_ids)

        query = f'sum({REQUESTS}{{route="{CALL_ROUTE}"}})'

        def counted_by_prometheus() -> float | None:
            value = prometheus_value(prometheus_port, query)
            return value if value is not None and value >= len(own_ids) else None

        assert wait_until(counted_by_prometheus, "Prometheus to scrape both", 30) == len(own_ids)

    exposition = http("GET", f"{first.url}/metrics").body
    lint = subprocess.run(
        [str(PROMTOOL), "check", "metrics"],
        input=exposition,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
