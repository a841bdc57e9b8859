"""Soak: real `ews-gateway serve` under concurrent load while Exchange misbehaves now and then.

    .venv/bin/python -m tests.integration.soak --seconds 60

Client threads, each on its own keep-alive connection, GET, DELETE and now and then POST
calls through the gateway (two workers) to the witness simulator (tests/integration/witness.py),
which injects every fault kind of the contract's table at random, about 5 % of requests in
all. A caller cannot see which fault Exchange gave, so each request carries a unique
X-Request-ID and the witness writes, per request id, the rule that fired. Every answer is then
checked against the status (and Retry-After, ewsResponseCode, problem+json) the contract gives
that fault; a request that never reached Exchange must be a 503 `exchange-circuit-open`, and
none may be retried (every injected back-off is far above EWS_RETRY_MAX_BACKOFF_SECONDS).
After a warm-up each worker's resident memory is sampled; it may grow less than 10 % from the
first quarter of the samples to the last.
"""

from __future__ import annotations

import argparse
import json
import random
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from statistics import mean
from typing import Any
from urllib.parse import quote, urlsplit

from tests.integration.processes import Server, free_port, gateway_env, http, start, worker_pids
from tests.integration.witness import NO_FAULT, Attempt, read_witness, rule_label

PROBLEM_JSON = "application/problem+json"
PROBLEM_PREFIX = "urn:ews-gateway:problem:"
MAX_RSS_GROWTH = 0.10
# Any of these in the gateway's log is a finding: a worker killed mid-request, an unhandled error.
FATAL_LOG_MARKERS = ("WORKER TIMEOUT", "unexpected error", "Traceback")
VOICE_ITEM = "AAMkSoakVoiceMail"
DIAL_STRING = "+15551234567"
INITIAL_CALLS = 32
RECENT_CALLS = 256
CLIENT_TIMEOUT_S = 30.0
LONG_BACK_OFF_MS = 30_000
# Expected fires of a kind above which never seeing it is a finding: e**-20 is nil.
SURE_FIRES = 20
# An answer the simulator had ready later than this before the caller's deadline may not reach
# the gateway in time; on a starved machine the simulator itself can be seconds late.
# Requests the gateway sends once more when a reused connection fails before any answer.
IDEMPOTENT_METHODS = frozenset({"GET", "DELETE"})

LATE_MARGIN_S = 0.5


@dataclass(frozen=True)
class Expected:
    """What the contract gives a caller for one thing Exchange did."""

    status: int
    ews_code: str | None = None
    retry_after: str | None = None


@dataclass(frozen=True)
class FaultCase:
    """One simulator rule (without its rate) and what the caller must get when it fires."""

    rule: dict[str, Any]
    expected: Expected

    @property
    def label(self) -> str:
        return rule_label(self.rule["kind"], self.rule.get("code"))


def fault_cases(timeout_s: float) -> list[FaultCase]:
    """Every failure the soak injects, one row per line of the contract's table it exercises."""

    def ews_error(code: str, status: int) -> FaultCase:
        return FaultCase({"kind": "ews-error", "code": code}, Expected(status, ews_code=code))

    long_wait = str(LONG_BACK_OFF_MS // 1000)
    return [
        FaultCase(
            {"kind": "busy", "backOffMs": LONG_BACK_OFF_MS},
            Expected(503, ews_code="ErrorServerBusy", retry_after=long_wait),
        ),
        ews_error("ErrorAccessDenied", 403),
        ews_error("ErrorInvalidPhoneNumber", 422),
        ews_error("ErrorNonExistentMailbox", 404),
        ews_error("ErrorUMServerUnavailable", 503),
        ews_error("ErrorSomethingNew", 502),
        FaultCase(
            {"kind": "fault", "code": "ErrorInternalServerTransientError"},
            Expected(503, ews_code="ErrorInternalServerTransientError"),
        ),
        FaultCase({"kind": "http-401"}, Expected(502)),
        FaultCase(
            {"kind": "http-503", "retryAfter": LONG_BACK_OFF_MS // 1000},
            Expected(503, retry_after=long_wait),
        ),
        FaultCase({"kind": "html-500"}, Expected(503)),
        FaultCase({"kind": "redirect"}, Expected(502)),
        FaultCase({"kind": "malformed"}, Expected(502)),
        FaultCase({"kind": "not-soap"}, Expected(502)),
        FaultCase({"kind": "reset"}, Expected(502)),
        # Long enough to outlast the gateway's deadline, short enough to free simulator threads.
        FaultCase({"kind": "hang", "ms": int(timeout_s * 1000) + 1000}, Expected(504)),
    ]


LATE_ANSWER = Expected(504)
SUCCESS = {
    "GET": Expected(200, ews_code="NoError"),
    "DELETE": Expected(200, ews_code="NoError"),
    "POST": Expected(201, ews_code="NoError"),
}


@dataclass(frozen=True)
class SoakSettings:
    """How long and how hard to soak, and how the gateway is configured."""

    seconds: float = 60.0
    clients: int = 16
    max_requests: int = 1_000_000
    fault_share: float = 0.05
    timeout_s: float = 2.0
    workers: int = 2
    sample_every_s: float = 2.0
    # Load before memory is sampled: the first requests fill caches, thread stacks and
    # allocator arenas, growth that says nothing about a leak.
    warmup_s: float = 5.0
    seed: int = 20_240_601

    @property
    def threads(self) -> int:
        # Four above the client count: the bulkhead (threads - 4) never refuses a soak request.
        return self.clients + 4


@dataclass
class Exchange:
    """One request the soak sent and what came back (or how it failed)."""

    request_id: str
    method: str
    status: int = 0
    retry_after: str | None = None
    content_type: str = ""
    echoed_id: str | None = None
    body: Any = None
    sent_at: float = 0.0  # time.time(), comparable with the witness's answered_at
    seconds: float = 0.0
    error: str | None = None


@dataclass
class SoakReport:
    """Everything a soak run measured, and what it found wrong."""

    settings: SoakSettings
    exchanges: list[Exchange]
    load_seconds: float
    labels_seen: Counter[str]
    statuses: Counter[tuple[str, int]]
    rejected: int
    late: int
    reconnects: int
    rss_kb: dict[int, list[tuple[float, int]]]
    rss_growth: dict[int, float]
    service_pids: tuple[int, ...] = ()
    wrong_answers: list[str] = field(default_factory=list)
    faults_missing: list[str] = field(default_factory=list)
    memory_growth: list[str] = field(default_factory=list)
    log_findings: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.exchanges)

    @property
    def faults_injected(self) -> int:
        return sum(n for label, n in self.labels_seen.items() if label != NO_FAULT)

    @property
    def problems(self) -> list[str]:
        wrong = self.wrong_answers
        if len(wrong) > 20:
            wrong = [*wrong[:20], f"... and {len(wrong) - 20} more wrong answers"]
        return [*wrong, *self.faults_missing, *self.memory_growth, *self.log_findings]

    def summary(self) -> str:
        lines = [
            f"{self.requests} requests in {self.load_seconds:.1f} s "
            f"({self.requests / max(self.load_seconds, 1e-9):.0f}/s), "
            f"{self.settings.clients} clients, {self.settings.workers} workers",
            f"faults injected: {self.faults_injected}; "
            f"requests refused before Exchange (circuit open): {self.rejected}; "
            f"answers the simulator itself was late with (a starved machine): {self.late}; "
            f"client reconnects after idle closes: {self.reconnects}",
        ]
        for label, count in sorted(self.labels_seen.items()):
            by_status = {s: n for (lab, s), n in self.statuses.items() if lab == label}
            lines.append(f"  {label:<44} {count:>6}  statuses {dict(sorted(by_status.items()))}")
        for pid, samples in sorted(self.rss_kb.items()):
            growth = self.rss_growth.get(pid)
            shown = f"{growth:+.1%}" if growth is not None else "not measured (short-lived)"
            lines.append(
                f"  worker {pid}: RSS {samples[0][1] / 1024:.1f} -> {samples[-1][1] / 1024:.1f} "
                f"MiB over {len(samples)} samples; first to last quarter {shown}"
            )
        lines += [f"PROBLEM: {problem}" for problem in self.problems]
        return "\n".join(lines)


def run_soak(settings: SoakSettings, workdir: Path) -> SoakReport:
    """Start the witness simulator and `serve`, load them, and check every answer."""
    witness_path = workdir / "witness.tsv"
    with (
        _witness_simulator(workdir, witness_path) as simulator,
        _gateway(simulator, settings, workdir) as gateway,
    ):
        known_ids = _place_initial_calls(gateway)
        _inject_faults(simulator, settings)
        sampler = _RssSampler(gateway.process.pid, settings.sample_every_s)
        with sampler.running(after_s=settings.warmup_s):
            started = time.monotonic()
            exchanges, reconnects = _load(gateway, settings, known_ids)
            load_seconds = time.monotonic() - started
        http("DELETE", f"{simulator.url}/simulator/faults")  # releases any hanging answer
        log = gateway.log
        service_pids = (simulator.process.pid, gateway.process.pid)
    report = _check(settings, exchanges, witness_path, load_seconds, reconnects, sampler)
    report.service_pids = service_pids
    report.log_findings = [
        f"the gateway log shows {marker!r}" for marker in FATAL_LOG_MARKERS if marker in log()
    ]
    return report


@contextmanager
def _witness_simulator(workdir: Path, witness_path: Path) -> Iterator[Server]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "witness.log"
    command = [sys.executable, "-m", "tests.integration.witness"]
    args = ["--bind", f"127.0.0.1:{port}", "--witness", str(witness_path)]
    server = _start_module(command + args, url, "/simulator/health", log_path)
    try:
        yield server
    finally:
        server.stop()


def _start_module(command: list[str], url: str, health: str, log_path: Path) -> Server:
    repo_root = Path(__file__).resolve().parents[2]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=repo_root, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, url, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if http("GET", url + health, timeout=1).status == 200:
                return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise AssertionError(f"{command} did not start:\n{server.log()}")


@contextmanager
def _gateway(simulator: Server, settings: SoakSettings, workdir: Path) -> Iterator[Server]:
    port = free_port()
    env = gateway_env(
        simulator,
        port,
        GATEWAY_WORKERS=str(settings.workers),
        GATEWAY_THREADS=str(settings.threads),
        EWS_TIMEOUT_SECONDS=str(settings.timeout_s),
        GATEWAY_LOG_LEVEL="warning",  # a line per request would only slow the soak down
    )
    server = start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", workdir / "gateway.log")
    try:
        yield server
    finally:
        server.stop()


def _place_initial_calls(gateway: Server) -> list[str]:
    ids = []
    for _ in range(INITIAL_CALLS):
        answer = http(
            "POST", f"{gateway.url}/calls", {"itemId": VOICE_ITEM, "dialString": DIAL_STRING}
        )
        if answer.status != 201:
            raise AssertionError(f"placing a call before the soak failed: {answer.body!r}")
        ids.append(answer.json()["callId"])
    return ids


def _inject_faults(simulator: Server, settings: SoakSettings) -> None:
    cases = fault_cases(settings.timeout_s)
    rate = settings.fault_share / len(cases)
    rules = [{**case.rule, "rate": rate} for case in cases]
    answer = http("PUT", f"{simulator.url}/simulator/faults", {"faults": rules})
    if answer.status != 200:
        raise AssertionError(f"the simulator refused the soak's fault rules: {answer.body!r}")


class _CallIds:
    """Call ids the clients may GET and DELETE: the first ones placed, then the newest."""

    def __init__(self, initial: list[str]) -> None:
        self._ids = list(initial)
        self._lock = threading.Lock()

    def pick(self, rng: random.Random) -> str:
        with self._lock:
            return rng.choice(self._ids)

    def add(self, call_id: str) -> None:
        with self._lock:
            self._ids.append(call_id)
            del self._ids[:-RECENT_CALLS]


def _load(
    gateway: Server, settings: SoakSettings, initial_ids: list[str]
) -> tuple[list[Exchange], int]:
    """Run the clients until time or the request budget is up; return answers and reconnects."""
    ids = _CallIds(initial_ids)
    stop_at = time.monotonic() + settings.warmup_s + settings.seconds
    budget = threading.Semaphore(settings.max_requests)
    address = urlsplit(gateway.url)

    def client(number: int) -> tuple[list[Exchange], int]:
        rng = random.Random(settings.seed + number)
        connection = HTTPConnection(
            address.hostname or "127.0.0.1", address.port, timeout=CLIENT_TIMEOUT_S
        )
        exchanges: list[Exchange] = []
        reconnects = 0
        try:
            while time.monotonic() < stop_at and budget.acquire(blocking=False):
                if _dropped(connection):
                    reconnects += 1
                    connection.close()
                request_id = f"soak-{number}-{len(exchanges) + 1}"
                exchanges.append(_one_request(connection, rng, ids, request_id))
        finally:
            connection.close()
        return exchanges, reconnects

    with ThreadPoolExecutor(settings.clients, thread_name_prefix="soak-client") as pool:
        outcomes = [pool.submit(client, number) for number in range(settings.clients)]
        limit_s = settings.warmup_s + settings.seconds + CLIENT_TIMEOUT_S + 10
        done = [outcome.result(limit_s) for outcome in outcomes]
    return [exchange for exchanges, _ in done for exchange in exchanges], sum(n for _, n in done)


def _dropped(connection: HTTPConnection) -> bool:
    """Tell whether the server closed an idle keep-alive connection (readable means EOF)."""
    sock = connection.sock
    return sock is not None and bool(select.select([sock], [], [], 0)[0])


def _one_request(
    connection: HTTPConnection, rng: random.Random, ids: _CallIds, request_id: str
) -> Exchange:
    roll = rng.random()
    headers = {"X-Request-ID": request_id}
    body = None
    if roll < 0.1:
        method, path = "POST", "/calls"
        body = json.dumps({"itemId": VOICE_ITEM, "dialString": DIAL_STRING}).encode()
        headers["Content-Type"] = "application/json"
    else:
        method = "GET" if roll < 0.55 else "DELETE"
        path = "/calls/" + quote(ids.pick(rng), safe="")
    exchange = Exchange(request_id, method, sent_at=time.time())
    started = time.monotonic()
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
    except (OSError, HTTPException) as error:
        connection.close()
        exchange.error = f"{type(error).__name__}: {error}"
        return exchange
    exchange.seconds = time.monotonic() - started
    exchange.status = response.status
    exchange.retry_after = response.getheader("Retry-After")
    exchange.content_type = response.getheader("Content-Type", "")
    exchange.echoed_id = response.getheader("X-Request-ID")
    try:
        exchange.body = json.loads(payload)
    except ValueError:
        exchange.body = payload[:200].decode("utf-8", "replace")
    if method == "POST" and exchange.status == 201 and isinstance(exchange.body, dict):
        ids.add(exchange.body["callId"])
    return exchange


class _RssSampler:
    """Sample VmRSS of every worker (child of the gunicorn master) every few seconds."""

    def __init__(self, master_pid: int, every_s: float) -> None:
        self._master_pid = master_pid
        self._every_s = every_s
        self.samples: dict[int, list[tuple[float, int]]] = {}
        self._stop = threading.Event()

    @contextmanager
    def running(self, *, after_s: float) -> Iterator[None]:
        """Sample from `after_s` seconds on until the block ends."""
        thread = threading.Thread(
            target=self._run, args=(after_s,), name="soak-rss-sampler", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()

    def _run(self, after_s: float) -> None:
        if self._stop.wait(after_s):
            return
        while True:
            now = time.monotonic()
            for pid in worker_pids(self._master_pid):
                rss = _rss_kb(pid)
                if rss is not None:
                    self.samples.setdefault(pid, []).append((now, rss))
            if self._stop.wait(self._every_s):
                return

    def growth(self) -> dict[int, float]:
        """RSS growth from the first quarter's mean to the last quarter's, per worker.

        Each worker is measured over its own samples: the whole run, unless gunicorn recycled
        it meanwhile (max_requests), and then only if its life held enough samples.
        """
        growth = {}
        for pid, samples in self.samples.items():
            first_t, last_t = samples[0][0], samples[-1][0]
            quarter = (last_t - first_t) / 4
            if len(samples) < 8 or quarter <= 0:
                continue
            head = [kb for t, kb in samples if t <= first_t + quarter]
            tail = [kb for t, kb in samples if t >= last_t - quarter]
            growth[pid] = mean(tail) / mean(head) - 1
        return growth


def _rss_kb(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def _check(
    settings: SoakSettings,
    exchanges: list[Exchange],
    witness_path: Path,
    load_seconds: float,
    reconnects: int,
    sampler: _RssSampler,
) -> SoakReport:
    witnessed = read_witness(witness_path)
    expected_by_label = {case.label: case.expected for case in fault_cases(settings.timeout_s)}
    labels_seen: Counter[str] = Counter()
    # Every attempt's fault, counted before a resend hides the reset that caused it.
    faults_fired: Counter[str] = Counter()
    statuses: Counter[tuple[str, int]] = Counter()
    wrong_answers: list[str] = []
    rejected = late = 0
    for exchange in exchanges:
        attempts = witnessed.get(exchange.request_id, [])
        faults_fired.update(attempt.label for attempt in attempts)
        if _resent_after_reset(exchange, attempts):
            # A reused connection reset before any answer: GET and DELETE go once more on a
            # fresh one, and the caller gets what that second attempt met.
            attempts = attempts[1:]
        label = attempts[0].label if len(attempts) == 1 else f"{len(attempts)} attempts"
        labels_seen[label] += 1
        statuses[label, exchange.status] += 1
        if not attempts and _is_circuit_open(exchange):
            rejected += 1
            continue
        expected = SUCCESS[exchange.method] if label == NO_FAULT else expected_by_label.get(label)
        if (
            len(attempts) == 1
            and attempts[0].answered_at - exchange.sent_at > settings.timeout_s - LATE_MARGIN_S
        ):
            late += 1
            if exchange.status == 504:
                expected = LATE_ANSWER  # no answer within EWS_TIMEOUT_SECONDS: 504 is right
        wrong_answers += _mismatches(exchange, label, expected)
    growth = sampler.growth()
    report = SoakReport(
        settings,
        exchanges,
        load_seconds,
        labels_seen,
        statuses,
        rejected,
        late,
        reconnects,
        sampler.samples,
        growth,
    )
    report.wrong_answers = wrong_answers
    report.faults_missing = _faults_never_injected(settings, len(exchanges), faults_fired)
    report.memory_growth = _memory_problems(sampler.samples, growth)
    return report


def _resent_after_reset(exchange: Exchange, attempts: list[Attempt]) -> bool:
    return (
        exchange.method in IDEMPOTENT_METHODS
        and len(attempts) == 2
        and attempts[0].label == rule_label("reset")
    )


def _is_circuit_open(exchange: Exchange) -> bool:
    return (
        exchange.status == 503
        and isinstance(exchange.body, dict)
        and exchange.body.get("type") == PROBLEM_PREFIX + "exchange-circuit-open"
        and exchange.retry_after is not None
    )


def _mismatches(exchange: Exchange, label: str, expected: Expected | None) -> list[str]:
    """Say how an answer differs from what the contract gives for what Exchange did."""
    seen = f"{exchange.method} {exchange.request_id} ({label})"
    if exchange.error is not None:
        return [f"{seen}: no answer: {exchange.error}"]
    if expected is None:
        return [
            f"{seen}: answered {exchange.status} {exchange.body!r}; expected one attempt at "
            "Exchange (no injected back-off is short enough to retry), or none and a 503 "
            "exchange-circuit-open"
        ]
    body = exchange.body if isinstance(exchange.body, dict) else {}
    found = []
    if exchange.status != expected.status:
        found.append(f"status {exchange.status}, expected {expected.status}")
    if exchange.echoed_id != exchange.request_id:
        found.append(f"X-Request-ID {exchange.echoed_id!r}")
    if expected.ews_code is not None and body.get("ewsResponseCode") != expected.ews_code:
        found.append(f"ewsResponseCode {body.get('ewsResponseCode')!r}, not {expected.ews_code}")
    if expected.retry_after is not None and exchange.retry_after != expected.retry_after:
        found.append(f"Retry-After {exchange.retry_after!r}, not {expected.retry_after}")
    if expected.status >= 400:
        if exchange.content_type != PROBLEM_JSON:
            found.append(f"Content-Type {exchange.content_type!r}")
        if body.get("status") != exchange.status or body.get("requestId") != exchange.request_id:
            found.append(f"problem body {exchange.body!r}")
    return [f"{seen}: " + "; ".join(found)] if found else []


def _faults_never_injected(
    settings: SoakSettings, requests: int, faults_fired: Counter[str]
) -> list[str]:
    """Name the fault kinds that never fired although the run was long enough for them to.

    FAULTS_FIRED counts every witnessed attempt: a reset on a reused connection fired even
    when the gateway's resend answered the caller (idempotent calls go once more).
    """
    cases = fault_cases(settings.timeout_s)
    expected_each = requests * settings.fault_share / len(cases)
    if expected_each < SURE_FIRES:
        return []  # too short a run to be sure (a loaded CI machine); the full soak is
    return [
        f"{case.label} never fired in {requests} requests (about {expected_each:.0f} expected)"
        for case in cases
        if faults_fired[case.label] == 0
    ]


def _memory_problems(
    samples: dict[int, list[tuple[float, int]]], growth: dict[int, float]
) -> list[str]:
    if not growth:
        return [f"no worker lived long enough to measure its memory ({len(samples)} seen)"]
    return [
        f"worker {pid} grew {value:.1%} from the first quarter to the last"
        for pid, value in growth.items()
        if value >= MAX_RSS_GROWTH
    ]


def main(argv: list[str] | None = None) -> int:
    defaults = SoakSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--max-requests", type=int, default=defaults.max_requests)
    parser.add_argument("--fault-share", type=float, default=defaults.fault_share)
    parser.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout_s,
        help="EWS_TIMEOUT_SECONDS of the gateway under test",
    )
    parser.add_argument("--sample-every", type=float, default=defaults.sample_every_s)
    parser.add_argument(
        "--warmup",
        type=float,
        default=defaults.warmup_s,
        help="seconds of load before memory is sampled (checked like the rest)",
    )
    args = parser.parse_args(argv)
    settings = SoakSettings(
        seconds=args.seconds,
        clients=args.clients,
        max_requests=args.max_requests,
        fault_share=args.fault_share,
        timeout_s=args.timeout,
        sample_every_s=args.sample_every,
        warmup_s=args.warmup,
    )
    with tempfile.TemporaryDirectory(prefix="ews-gateway-soak-") as workdir:
        report = run_soak(settings, Path(workdir))
    print(report.summary())
    return 1 if report.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
