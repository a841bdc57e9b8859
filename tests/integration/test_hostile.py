"""Hostile input through the real stack: `serve` (gunicorn, one worker) and the simulator.

Hostile answers from "Exchange" (entity bombs, external entities, huge bodies) and hostile
requests from callers (oversized, malformed, XML-breaking ids) end as 4xx/502 problems,
never as a crash, a 500, an outbound connection or unbounded memory.
"""

from __future__ import annotations

import select
import socket
import threading
import uuid
from collections.abc import Iterator, Mapping
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from lxml import etree

from gateway import wire
from tests.ews_schema import SCHEMA_DIR, schema_available
from tests.integration.processes import (
    Response,
    Server,
    free_port,
    gateway_env,
    http,
    set_faults,
    simulator_requests,
    start,
    worker_pids,
)

PROBLEM_JSON = "application/problem+json"
# Generous bounds: the request must finish at all, not finish fast.
UPSTREAM_BOUND_S = 20.0
HUGE_MEGABYTES = 50
MEMORY_BOUND_KIB = 30 * 1024


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    args = ["simulator", "--bind", f"127.0.0.1:{port}", "--step-seconds", "0.2"]
    if schema_available():
        args += ["--schema-dir", str(SCHEMA_DIR)]
    log = tmp_path_factory.mktemp("hostile") / "simulator.log"
    server = start(args, {}, f"http://127.0.0.1:{port}", "/simulator/health", log)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(simulator: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One worker, so its memory can be read and every request lands on it."""
    port = free_port()
    env = gateway_env(
        simulator,
        port,
        GATEWAY_WORKERS="1",
        GATEWAY_THREADS="8",
        EWS_TIMEOUT_SECONDS="10",
        # Hostile answers are upstream failures; keep the circuit closed so each one is read.
        EWS_BREAKER_FAILURES="256",
    )
    log = tmp_path_factory.mktemp("hostile") / "gateway.log"
    server = start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", log)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def well_behaved_exchange(simulator: Server) -> Iterator[None]:
    """Start and end each test with no fault rules and an empty request journal."""
    set_faults(simulator)
    http("DELETE", f"{simulator.url}/simulator/requests")
    yield
    set_faults(simulator)


def assert_problem(answer: Response, status: int) -> dict[str, Any]:
    assert answer.status == status, answer.body[:500]
    assert answer.headers["Content-Type"] == PROBLEM_JSON
    problem: dict[str, Any] = answer.json()
    assert problem["status"] == status
    assert "Traceback" not in answer.body.decode()
    return problem


def raw_request(
    server: Server,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """Send the path exactly as given (no re-encoding) and return whatever comes back."""
    parts = urlsplit(server.url)
    connection = HTTPConnection(parts.hostname, parts.port, timeout=UPSTREAM_BOUND_S)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        answer = connection.getresponse()
        return Response(answer.status, answer.headers, answer.read())
    finally:
        connection.close()


def still_serving(gateway: Server) -> bool:
    return http("GET", f"{gateway.url}/livez").status == 200


# Hostile answers from Exchange


def test_a_billion_laughs_answer_is_a_502_problem_and_the_worker_keeps_serving(
    gateway: Server, simulator: Server
) -> None:
    set_faults(simulator, {"kind": "billion-laughs"})

    answer = http("DELETE", f"{gateway.url}/calls/some-call", timeout=UPSTREAM_BOUND_S)

    assert_problem(answer, 502)
    assert "lol" not in answer.body.decode()
    set_faults(simulator)
    assert still_serving(gateway)
    assert http("DELETE", f"{gateway.url}/calls/some-call").status == 404


class TcpListener:
    """A loopback port that records every connection made to it."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(16)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._connections = 0
        self._thread = threading.Thread(target=self._accept_until_stopped)

    @property
    def port(self) -> int:
        port: int = self._socket.getsockname()[1]
        return port

    def _accept_until_stopped(self) -> None:
        while not self._stop.is_set():
            self._accept_pending(wait_s=0.05)

    def _accept_pending(self, wait_s: float) -> None:
        while select.select([self._socket], [], [], wait_s)[0]:
            connection, _ = self._socket.accept()
            connection.close()
            with self._lock:
                self._connections += 1
            wait_s = 0

    def connections(self) -> int:
        """Count connections so far, including any still waiting in the backlog."""
        self._accept_pending(wait_s=0)
        with self._lock:
            return self._connections

    def __enter__(self) -> TcpListener:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


@pytest.fixture
def listener() -> Iterator[TcpListener]:
    with TcpListener() as tcp:
        yield tcp


def test_an_external_entity_answer_is_a_502_and_the_gateway_never_fetches_it(
    gateway: Server, simulator: Server, listener: TcpListener
) -> None:
    set_faults(
        simulator, {"kind": "external-entity", "url": f"http://127.0.0.1:{listener.port}/secret"}
    )

    answer = http("DELETE", f"{gateway.url}/calls/some-call", timeout=UPSTREAM_BOUND_S)

    assert_problem(answer, 502)
    assert listener.connections() == 0


def test_an_external_entity_naming_a_local_file_is_a_502_without_its_content(
    gateway: Server, simulator: Server
) -> None:
    set_faults(simulator, {"kind": "external-entity", "url": "file:///etc/passwd"})

    answer = http("GET", f"{gateway.url}/calls/some-call", timeout=UPSTREAM_BOUND_S)

    assert_problem(answer, 502)
    assert "root:" not in answer.body.decode()


def peak_rss_kib(pid: int) -> int:
    """Return the process's peak resident set size (VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_a_huge_answer_is_a_502_and_the_worker_never_holds_it_in_memory(
    gateway: Server, simulator: Server
) -> None:
    (worker,) = worker_pids(gateway.process.pid)
    set_faults(simulator, {"kind": "not-soap"})
    for _ in range(3):  # Warm up the same path: read an answer, refuse it, answer 502.
        assert http("DELETE", f"{gateway.url}/calls/warm-up").status == 502
    peak_before = peak_rss_kib(worker)
    set_faults(simulator, {"kind": "huge", "megabytes": HUGE_MEGABYTES})

    answers = [
        http("DELETE", f"{gateway.url}/calls/some-call", timeout=UPSTREAM_BOUND_S) for _ in range(3)
    ]

    for answer in answers:
        assert_problem(answer, 502)
    growth_kib = peak_rss_kib(worker) - peak_before
    assert growth_kib < MEMORY_BOUND_KIB, f"the worker's peak RSS grew by {growth_kib} KiB"
    assert worker_pids(gateway.process.pid) == [worker]
    assert still_serving(gateway)


# Hostile requests from callers


def test_a_one_megabyte_body_is_a_413_problem(gateway: Server, simulator: Server) -> None:
    body = b'{"itemId": "' + b"A" * (1024 * 1024) + b'", "dialString": "100"}'

    answer = raw_request(gateway, "POST", "/calls", body, {"Content-Type": "application/json"})

    assert_problem(answer, 413)
    assert simulator_requests(simulator) == []


def test_a_twenty_kilobyte_header_is_refused_by_the_server_without_harm(gateway: Server) -> None:
    answer = raw_request(gateway, "GET", "/calls/abc", headers={"X-Padding": "a" * 20 * 1024})

    assert 400 <= answer.status < 500
    assert still_serving(gateway)


def test_a_body_that_is_not_json_is_a_400_problem(gateway: Server, simulator: Server) -> None:
    answer = raw_request(
        gateway, "POST", "/calls", b"{itemId: nope", {"Content-Type": "application/json"}
    )

    assert_problem(answer, 400)
    assert simulator_requests(simulator) == []


@pytest.mark.parametrize("depth", [10_000, 2_000])
def test_deeply_nested_json_is_refused_as_a_client_error(
    depth: int, gateway: Server, simulator: Server
) -> None:
    body = b"[" * depth + b"]" * depth

    answer = raw_request(gateway, "POST", "/calls", body, {"Content-Type": "application/json"})

    # 10,000 levels exceed the 16 KiB body limit (413); 2,000 fit and must not crash the parser.
    assert_problem(answer, 413 if len(body) > 16 * 1024 else 400)
    assert simulator_requests(simulator) == []
    assert still_serving(gateway)


@pytest.mark.parametrize(
    "encoded_id",
    ["a%00b", "a%0Ab", "a%0D%0AX-Injected:%201", "a%E2%80%AEb", "a%7Fb", "a%20b", "%C0%AF"],
)
def test_a_call_id_outside_printable_ascii_is_a_400_and_exchange_is_not_contacted(
    encoded_id: str, gateway: Server, simulator: Server
) -> None:
    answer = raw_request(gateway, "DELETE", f"/calls/{encoded_id}")

    assert_problem(answer, 400)
    assert simulator_requests(simulator) == []


def sent_phone_call_id(simulator: Server, request_id: str) -> str | None:
    """Return the PhoneCallId/@Id the simulator received in the request with this id."""
    (request,) = [r for r in simulator_requests(simulator) if r["requestId"] == request_id]
    root = etree.fromstring(request["body"].encode(), etree.XMLParser(resolve_entities=False))
    element = root.find(f".//{{{wire.MESSAGES_NS}}}PhoneCallId")
    assert element is not None
    return element.get("Id")


@pytest.mark.parametrize(
    "call_id",
    ['"><x/>', "]]>", "&lol;", "<!--", "'", "&amp;", "a\"b'c<d>e&f", "../../etc/passwd"],
)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_an_xml_breaking_call_id_reaches_exchange_byte_for_byte_in_the_id_attribute(
    call_id: str, method: str, gateway: Server, simulator: Server
) -> None:
    request_id = uuid.uuid4().hex

    answer = raw_request(
        gateway, method, "/calls/" + quote(call_id, safe=""), headers={"X-Request-ID": request_id}
    )

    assert answer.status == 404, answer.body
    assert answer.json()["ewsResponseCode"] == "ErrorInvalidPhoneCallId"
    assert sent_phone_call_id(simulator, request_id) == call_id


def test_a_caller_on_the_same_host_cannot_move_the_path_with_script_name_headers(
    gateway: Server,
) -> None:
    """gunicorn trusts 127.0.0.1, where a sidecar proxy would connect from, with SCRIPT_NAME
    and PATH_INFO headers: they would route `/calls/metrics` to `/metrics` past a proxy that
    only lets `/calls` through, or answer 500 to a SCRIPT_NAME the path does not start with."""
    moved = raw_request(
        gateway, "GET", "/calls/metrics", headers={"SCRIPT_NAME": "/calls", "PATH_INFO": "/metrics"}
    )
    elsewhere = raw_request(gateway, "GET", "/livez", headers={"SCRIPT_NAME": "/elsewhere"})

    assert_problem(moved, 404)  # the call id "metrics", not the metrics page
    assert elsewhere.status == 200


@pytest.mark.parametrize(("method", "status"), [("GET", 200), ("POST", 405)])
def test_a_websocket_handshake_gets_the_plain_answer_through_the_server(
    gateway: Server, method: str, status: int
) -> None:
    handshake = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }

    answer = raw_request(gateway, method, "/livez", headers=handshake)

    assert answer.status == status
    assert still_serving(gateway)


def test_a_percent_encoded_path_traversal_is_just_an_unknown_call_id(
    gateway: Server, simulator: Server
) -> None:
    request_id = uuid.uuid4().hex

    answer = raw_request(
        gateway, "GET", "/calls/..%2F..%2Fetc%2Fpasswd", headers={"X-Request-ID": request_id}
    )

    assert_problem(answer, 404)
    assert sent_phone_call_id(simulator, request_id) == "../../etc/passwd"
