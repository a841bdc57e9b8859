"""The front door under real gunicorn: requests refused before the app are the gateway's answers.

Raw sockets send what no HTTP client library would: oversized and malformed heads, broken
chunked bodies, heads trickled in byte by byte, pipelined requests.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.processes import (
    Server,
    free_port,
    gateway_env,
    http,
    set_faults,
    simulator_requests,
    start,
    worker_pids,
)

APP_ORIGIN = "https://app.example.com"
READ_TIMEOUT_S = 1.5
PROBLEM_JSON = "application/problem+json"


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("frontdoor") / "simulator.log"
    server = start(
        ["simulator", "--bind", f"127.0.0.1:{port}"],
        {},
        f"http://127.0.0.1:{port}",
        "/simulator/health",
        log,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(simulator: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One worker with two threads, so a held thread shows at once."""
    port = free_port()
    env = gateway_env(
        simulator,
        port,
        GATEWAY_WORKERS="1",
        GATEWAY_THREADS="2",
        GATEWAY_CORS_ORIGINS=APP_ORIGIN,
        GATEWAY_READ_TIMEOUT_SECONDS=str(READ_TIMEOUT_S),
    )
    log = tmp_path_factory.mktemp("frontdoor") / "gateway.log"
    server = start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", log)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_faults(simulator: Server) -> Iterator[None]:
    set_faults(simulator)
    http("DELETE", f"{simulator.url}/simulator/requests")
    yield
    set_faults(simulator)


class Answer:
    """One HTTP/1.1 answer read off a raw socket."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def problem(self, status: int) -> dict[str, Any]:
        assert self.status == status, (self.status, self.body[:300])
        assert self.headers["content-type"] == PROBLEM_JSON
        problem: dict[str, Any] = json.loads(self.body)
        assert problem["status"] == status
        assert problem["requestId"] == self.headers["x-request-id"]
        assert problem["type"].startswith("urn:ews-gateway:problem:")
        return problem


def connect(gateway: Server, timeout: float = 30.0) -> socket.socket:
    port = int(gateway.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_answers(sock: socket.socket, count: int = 1) -> list[Answer]:
    """Read COUNT answers framed by Content-Length off SOCK."""
    data = b""
    answers = []
    while len(answers) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            head = data[:head_end].decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(data) >= head_end + 4 + length:
                body = data[head_end + 4 : head_end + 4 + length]
                answers.append(Answer(int(head[0].split()[1]), headers, body))
                data = data[head_end + 4 + length :]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed after {len(answers)} answers: {data!r}")
        data += chunk
    return answers


def exchange(gateway: Server, raw: bytes) -> Answer:
    with connect(gateway) as sock:
        sock.sendall(raw)
        return read_answers(sock)[0]


def head(request_line: str, *headers: str) -> bytes:
    lines = [request_line, "Host: gateway", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def counted(gateway: Server, method: str, route: str, status: int) -> float:
    text = http("GET", f"{gateway.url}/metrics").body.decode()
    series = (
        f'ews_gateway_http_requests_total{{method="{method}",route="{route}",status="{status}"}}'
    )
    match = re.search(re.escape(series) + r" ([0-9.e+]+)", text)
    return float(match.group(1)) if match else 0.0


def access_lines(gateway: Server, request_id: str) -> list[dict[str, Any]]:
    lines = []
    # Complete lines only: the gateway may be writing the last one as it is read.
    for line in gateway.log().split("\n")[:-1]:
        if request_id in line and line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == "gateway.access":
                lines.append(record)
    return lines


def wait_for_access_line(gateway: Server, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = access_lines(gateway, request_id)
        if lines:
            [line] = lines
            return line
        time.sleep(0.05)
    raise AssertionError(f"no access line for {request_id}:\n{gateway.log()[-3000:]}")


# Heads gunicorn refuses: the gateway's answer, request id, CORS, metric and log line


REFUSED_HEADS = {
    "a header over 16 KiB": (
        head("GET /calls/abc HTTP/1.1", "X-Padding: " + "a" * 20 * 1024),
        431,
        "request-header-fields-too-large",
    ),
    "101 header lines": (
        head("GET /calls/abc HTTP/1.1", *(f"X-Extra-{n}: {n}" for n in range(101))),
        431,
        "request-header-fields-too-large",
    ),
    "a URL over 8,190 bytes": (
        head("GET /calls/" + "a" * 9000 + " HTTP/1.1"),
        414,
        "uri-too-long",
    ),
    "a malformed request line": (head("GET /calls/abc HTTP/1.1 extra"), 400, "malformed-request"),
    "a header without a colon": (
        head("GET /calls/abc HTTP/1.1", "no colon here"),
        400,
        "malformed-request",
    ),
    "an unknown transfer coding": (
        head("POST /calls HTTP/1.1", "Transfer-Encoding: zstd"),
        501,
        "not-implemented",
    ),
    "gzip under the chunking, which gunicorn would pass on undecoded": (
        head("POST /calls HTTP/1.1", "Transfer-Encoding: gzip, chunked"),
        501,
        "not-implemented",
    ),
}


@pytest.mark.parametrize("case", REFUSED_HEADS, ids=str)
def test_a_head_gunicorn_refuses_is_the_gateways_problem_with_id_cors_metric_and_log(
    gateway: Server, case: str
) -> None:
    raw, status, slug = REFUSED_HEADS[case]
    request_id = f"refused-{slug}-{status}-{time.monotonic_ns()}"
    extra = f"Origin: {APP_ORIGIN}\r\nX-Request-ID: {request_id}\r\n".encode()
    raw = raw[:-2] + extra + b"\r\n"
    before = counted(gateway, "GET" if raw.startswith(b"GET") else "POST", "<unmatched>", status)

    answer = exchange(gateway, raw)

    problem = answer.problem(status)
    assert problem["type"] == f"urn:ews-gateway:problem:{slug}"
    assert answer.headers["x-request-id"] == request_id
    assert answer.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "X-Request-ID" in answer.headers["access-control-expose-headers"]
    assert answer.headers["connection"] == "close"
    assert b"<html" not in answer.body
    line = wait_for_access_line(gateway, request_id)
    assert line["status"] == status
    assert line["route"] == "<unmatched>"
    assert line["level"] == "INFO"
    after = counted(gateway, "GET" if raw.startswith(b"GET") else "POST", "<unmatched>", status)
    assert after == before + 1


def test_a_refused_head_from_an_unlisted_origin_gets_no_cors_headers(gateway: Server) -> None:
    raw = head(
        "GET /calls/abc HTTP/1.1", "Origin: https://evil.example.com", "X-Padding: " + "a" * 20000
    )

    answer = exchange(gateway, raw)

    answer.problem(431)
    assert not [name for name in answer.headers if name.startswith("access-control-")]


def test_a_refused_head_without_a_sane_request_id_gets_a_new_one(gateway: Server) -> None:
    answer = exchange(gateway, head("GET /calls/abc HTTP/1.1 extra", "X-Request-ID: not sane!"))

    answer.problem(400)
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])


def test_a_twelve_kilobyte_bearer_token_reaches_the_gateway(gateway: Server) -> None:
    token = "eyJ" + "a" * 12 * 1024
    answer = exchange(gateway, head("GET /livez HTTP/1.1", f"Authorization: Bearer {token}"))

    assert answer.status == 200


def test_a_malformed_chunked_body_is_a_400_problem_not_a_500(
    gateway: Server, simulator: Server
) -> None:
    request_id = f"bad-chunks-{time.monotonic_ns()}"
    raw = (
        head(
            "POST /calls HTTP/1.1",
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
            f"X-Request-ID: {request_id}",
        )
        + b"zz\r\n{}\r\n0\r\n\r\n"
    )

    answer = exchange(gateway, raw)

    problem = answer.problem(400)
    assert problem["detail"] == "the chunked body is malformed"
    assert answer.headers["connection"] == "close"
    assert simulator_requests(simulator) == []
    line = wait_for_access_line(gateway, request_id)
    assert line["level"] == "INFO"
    assert line["route"] == "/calls"
    assert "Traceback" not in gateway.log()
    levels = [json.loads(line)["level"] for line in gateway.log().splitlines() if line[:1] == "{"]
    assert levels
    assert "ERROR" not in levels


def test_a_well_formed_chunked_body_is_served(gateway: Server) -> None:
    body = b'{"itemId": "AAMkADemo", "dialString": "100"}'
    raw = (
        head("POST /calls HTTP/1.1", "Content-Type: application/json", "Transfer-Encoding: chunked")
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )

    assert exchange(gateway, raw).status == 201


def chunked(body: bytes, size: int) -> bytes:
    """BODY framed as chunks of SIZE bytes, then the last chunk."""
    pieces = [body[start : start + size] for start in range(0, len(body), size)]
    return b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for piece in pieces) + (
        b"0\r\n\r\n"
    )


@pytest.mark.parametrize("chunk_size", [20 * 1024, 4096], ids=["one-chunk", "many-chunks"])
def test_a_chunked_body_over_16_kib_is_413_and_exchange_is_not_contacted(
    gateway: Server, simulator: Server, chunk_size: int
) -> None:
    # Was 201 with a call placed: the first 16 KiB, a valid call, were read as the whole body.
    call = b'{"itemId": "AAMkADemo", "dialString": "100"}'
    body = call + b" " * (16 * 1024 - len(call)) + b"not json" * 500
    raw = head(
        "POST /calls HTTP/1.1", "Content-Type: application/json", "Transfer-Encoding: chunked"
    ) + chunked(body, chunk_size)

    answer = exchange(gateway, raw)

    problem = answer.problem(413)
    assert problem["type"] == "urn:ews-gateway:problem:request-entity-too-large"
    assert simulator_requests(simulator) == []  # no PlayOnPhone, nor any other request


def test_a_gzip_body_is_415_naming_content_encoding(gateway: Server, simulator: Server) -> None:
    # Was 400 "'utf-8' codec can't decode byte 0x8b".
    body = gzip.compress(b'{"itemId": "AAMkADemo", "dialString": "100"}')
    raw = (
        head(
            "POST /calls HTTP/1.1",
            "Content-Type: application/json",
            "Content-Encoding: gzip",
            f"Content-Length: {len(body)}",
        )
        + body
    )

    answer = exchange(gateway, raw)

    problem = answer.problem(415)
    assert problem["type"] == "urn:ews-gateway:problem:unsupported-media-type"
    assert "Content-Encoding" in problem["detail"]
    assert answer.headers["accept-encoding"] == "identity"
    assert simulator_requests(simulator) == []


# Slow clients


def trickle(sock: socket.socket, data: bytes, stop: threading.Event) -> None:
    for byte in data:
        if stop.wait(0.2):
            return
        try:
            sock.send(bytes([byte]))
        except OSError:
            return


def test_a_client_trickling_its_head_gets_408_and_frees_its_thread(gateway: Server) -> None:
    """Both threads held by trickling clients: each gets 408, then a normal request is served."""
    stop = threading.Event()
    slow = [connect(gateway) for _ in range(2)]
    raw = head("GET /livez HTTP/1.1", "X-Request-ID: slow-head", "X-Padding: " + "a" * 200)
    at_once = raw.index(b"X-Padding")
    for sock in slow:
        sock.sendall(raw[:at_once])
    trickers = [threading.Thread(target=trickle, args=(sock, raw[at_once:], stop)) for sock in slow]
    try:
        for thread in trickers:
            thread.start()
        answers = [read_answers(sock)[0] for sock in slow]
        assert http("GET", f"{gateway.url}/livez", timeout=READ_TIMEOUT_S * 4).status == 200
    finally:
        stop.set()
        for sock in slow:
            sock.close()
        for thread in trickers:
            thread.join()
    for answer in answers:
        problem = answer.problem(408)
        assert problem["type"] == "urn:ews-gateway:problem:request-timeout"
        assert answer.headers["x-request-id"] == "slow-head"


@pytest.fixture(scope="module")
def patient_gateway(
    simulator: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One worker with two threads that gives each request a minute to arrive."""
    port = free_port()
    env = gateway_env(
        simulator, port, GATEWAY_WORKERS="1", GATEWAY_THREADS="2", GATEWAY_READ_TIMEOUT_SECONDS="60"
    )
    log = tmp_path_factory.mktemp("frontdoor") / "patient-gateway.log"
    server = start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", log)
    yield server
    server.stop()


def test_clients_trickling_their_requests_hold_no_thread(
    patient_gateway: Server, simulator: Server
) -> None:
    """Three times as many clients as threads, each still sending its head or its body (framed
    by Content-Length or chunked): other clients are answered meanwhile, and each slow request
    is served whole once its last bytes arrive."""
    body = b'{"itemId": "AAMkADemo", "dialString": "100"}'
    post = ("POST /calls HTTP/1.1", "Content-Type: application/json")
    slow_requests = [
        head("GET /livez HTTP/1.1", "X-Request-ID: slow-head", "X-Padding: " + "a" * 100),
        head(*post, f"Content-Length: {len(body)}") + body,
        head(*post, "Transfer-Encoding: chunked") + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
    ] * 2
    last_bytes = 8
    slow = [connect(patient_gateway) for _ in slow_requests]
    try:
        for sock, raw in zip(slow, slow_requests, strict=True):
            sock.sendall(raw[:-last_bytes])
        time.sleep(0.5)  # time for the worker to take them up (before, each held a thread)

        for path in ("/livez", "/readyz", "/livez"):
            assert http("GET", f"{patient_gateway.url}{path}", timeout=10).status == 200
        for sock in slow:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # no answer yet: each request is still arriving
            sock.setblocking(True)

        for sock, raw in zip(slow, slow_requests, strict=True):
            for byte in raw[-last_bytes:]:
                sock.send(bytes([byte]))
                time.sleep(0.02)
        answers = [read_answers(sock)[0] for sock in slow]
    finally:
        for sock in slow:
            sock.close()

    assert [answer.status for answer in answers] == [200, 201, 201] * 2
    operations = [request["operation"] for request in simulator_requests(simulator)]
    assert operations == ["PlayOnPhone"] * 4


@pytest.mark.parametrize(
    ("first_bytes", "status"),
    [
        (b"G@T /livez HTTP/1.1\r\nX-Request-ID: early-1\r\n", 400),
        (b"GET /livez HTTP/1.1\nX-Request-ID: early-2\n", 400),
        (b"GET /" + b"a" * 9000, 414),
        (head("POST /calls HTTP/1.1", "Expect: 200-ok", "Content-Length: 45"), 417),
        (head("POST /calls HTTP/1.1", "Transfer-Encoding: gzip, chunked"), 501),
        (head("POST /calls HTTP/1.0", "Transfer-Encoding: chunked"), 400),
    ],
)
def test_a_request_refused_by_its_first_bytes_is_answered_before_the_rest_comes(
    patient_gateway: Server, first_bytes: bytes, status: int
) -> None:
    """The rest never comes: the answer does not wait for the read timeout (a minute)."""
    with connect(patient_gateway, timeout=20) as sock:
        sock.sendall(first_bytes)
        answer = read_answers(sock)[0]

    answer.problem(status)


def test_a_body_declared_over_the_limit_is_refused_and_the_connection_closed(
    patient_gateway: Server,
) -> None:
    """Its client may still be sending it: it is not drained (by a thread) for the next request."""
    with connect(patient_gateway, timeout=20) as sock:
        sock.sendall(
            head("POST /calls HTTP/1.1", "Content-Type: application/json", "Content-Length: 20000")
            + b"{" * 100
        )
        answer = read_answers(sock)[0]

    answer.problem(413)
    assert answer.headers["connection"] == "close"


def test_a_request_handed_to_a_thread_before_it_is_whole_keeps_one_deadline(
    gateway: Server, simulator: Server
) -> None:
    """The time its head took to arrive counts: its body, sent within the read timeout of its
    head's end but past the read timeout from the request's first byte, is too late."""
    body = b'{"itemId": "AAMkADemo", "dialString": "100"}'
    raw = head(
        "POST /calls HTTP/1.1",
        "Content-Type: application/json",
        "Expect: 100-continue",
        f"Content-Length: {len(body)}",
    )
    with connect(gateway) as sock:
        sock.sendall(raw[:-1])
        time.sleep(READ_TIMEOUT_S * 0.8)
        sock.sendall(raw[-1:])
        time.sleep(READ_TIMEOUT_S * 0.4)
        sock.sendall(body)
        told_to_continue, answer = read_answers(sock, 2)

    assert told_to_continue.status == 100
    answer.problem(408)
    assert simulator_requests(simulator) == []


def test_a_body_left_unread_and_still_arriving_holds_no_thread(patient_gateway: Server) -> None:
    """Answered without its body (a method llhttp does not know goes to a thread with its head),
    the rest of the body is not waited for by a thread: the connection closes instead."""
    raw = head("FOO /livez HTTP/1.1", "Content-Length: 10")
    slow = [connect(patient_gateway) for _ in range(2)]  # one for each of its threads
    try:
        for sock in slow:
            sock.sendall(raw + b"12")
        assert [read_answers(sock)[0].status for sock in slow] == [405] * 2

        assert http("GET", f"{patient_gateway.url}/livez", timeout=3).status == 200
        for sock in slow:
            assert sock.recv(100) == b""  # closed, not kept waiting for the body
    finally:
        for sock in slow:
            sock.close()


def test_an_answer_given_before_the_body_arrived_says_the_connection_closes(
    patient_gateway: Server,
) -> None:
    """Told 100 Continue, the client sends its body a round trip later, after the answer
    (405): the answer must not promise a connection that the gateway then closes."""
    raw = head("POST /livez HTTP/1.1", "Expect: 100-continue", "Content-Length: 20")
    with connect(patient_gateway, timeout=20) as sock:
        sock.sendall(raw)
        told_to_continue, answer = read_answers(sock, 2)
        sock.sendall(b"a" * 20)

    assert told_to_continue.status == 100
    answer.problem(405)
    assert answer.headers["connection"] == "close"


def test_a_body_left_unread_that_has_all_arrived_keeps_the_connection(
    patient_gateway: Server,
) -> None:
    raw = head("POST /livez HTTP/1.1", "Content-Length: 20") + b"a" * 20
    with connect(patient_gateway, timeout=20) as sock:
        sock.sendall(raw + head("GET /livez HTTP/1.1"))
        refused, served = read_answers(sock, 2)

    refused.problem(405)
    assert refused.headers["connection"] == "keep-alive"
    assert served.status == 200


def test_a_client_trickling_its_body_gets_408(gateway: Server, simulator: Server) -> None:
    request_id = f"slow-body-{time.monotonic_ns()}"
    body = b'{"itemId": "AAMkADemo", "dialString": "100"}'
    stop = threading.Event()
    with connect(gateway) as sock:
        sock.sendall(
            head(
                "POST /calls HTTP/1.1",
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
                f"Origin: {APP_ORIGIN}",
                f"X-Request-ID: {request_id}",
            )
        )
        sender = threading.Thread(target=trickle, args=(sock, body, stop))
        sender.start()
        try:
            answer = read_answers(sock)[0]
        finally:
            stop.set()
            sender.join()

    answer.problem(408)
    assert answer.headers["access-control-allow-origin"] == APP_ORIGIN
    assert answer.headers["connection"] == "close"
    assert simulator_requests(simulator) == []
    assert wait_for_access_line(gateway, request_id)["status"] == 408


# Kept-alive and pipelined connections


def test_pipelined_requests_are_all_answered_in_order(gateway: Server) -> None:
    requests = b"".join(
        head("GET /livez HTTP/1.1", f"X-Request-ID: pipelined-{n}") for n in range(20)
    )
    with connect(gateway) as sock:
        sock.sendall(requests)
        answers = read_answers(sock, 20)

    assert [a.headers["x-request-id"] for a in answers] == [f"pipelined-{n}" for n in range(20)]
    assert all(a.status == 200 for a in answers)


def test_an_answer_finished_while_the_worker_stops_says_connection_close(
    simulator: Server, tmp_path: Path
) -> None:
    port = free_port()
    env = gateway_env(simulator, port, GATEWAY_WORKERS="1", EWS_TIMEOUT_SECONDS="10")
    server = start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", tmp_path / "gw.log")
    try:
        set_faults(simulator, {"kind": "latency", "ms": 1500})
        with connect(server) as sock:
            sock.sendall(head("GET /calls/abc HTTP/1.1"))
            time.sleep(0.5)  # the request is waiting on Exchange
            [worker] = worker_pids(server.process.pid)
            os.kill(worker, signal.SIGTERM)
            answer = read_answers(sock)[0]
    finally:
        server.stop()

    assert answer.status == 404  # Exchange's answer for an unknown call, after the delay
    assert answer.headers["connection"] == "close"


def test_a_body_cut_short_is_a_400_saying_so(gateway: Server, simulator: Server) -> None:
    with connect(gateway) as sock:
        sock.sendall(
            head("POST /calls HTTP/1.1", "Content-Type: application/json", "Content-Length: 100")
            + b'{"itemId": "AAMkADemo"'
        )
        sock.shutdown(socket.SHUT_WR)
        answer = read_answers(sock)[0]

    problem = answer.problem(400)
    assert problem["detail"] == "the request body ended before its announced length"
    assert simulator_requests(simulator) == []
