"""Two `serve` instances sharing one real Redis in front of the simulator: calls bound to
their caller, quotas, idempotency keys and a Redis outage, as a balancer would spread them."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import pytest
import redis
from cryptography import x509

from gateway.errors import SharedStateUnavailable
from gateway.guards.idempotency import IdempotentCalls, RedisKeys, StoredAnswer
from tests.certificates import self_signed_certificate
from tests.identity import SigningKey, claims, rsa_key
from tests.integration.processes import (
    Response,
    Server,
    free_port,
    gateway_env,
    http,
    run_serve,
    set_faults,
    simulator_requests,
    start,
)
from tests.redis_servers import RedisServer, redis_installed

pytestmark = pytest.mark.skipif(
    not redis_installed(), reason="redis-server is not installed (Debian: redis-server)"
)
ISSUER, AUDIENCE = "https://login.example.com/", "ews-call-gateway"
CALL_ID_KEY = "shared-call-id-key-of-every-replica-0123456789"
PLACE = {"itemId": "AAMkVoiceMail", "dialString": "+15551234567"}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(free_port(), workdir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return rsa_key()


@pytest.fixture
def slow_simulator(tmp_path: Path) -> Iterator[Server]:
    """The simulator taking 300 ms per answer, so duplicate POSTs overlap the first."""
    port = free_port()
    args = ["simulator", "--bind", f"127.0.0.1:{port}", "--latency-ms", "300"]
    server = start(args, {}, f"http://127.0.0.1:{port}", "/simulator/health", tmp_path / "s.log")
    yield server
    server.stop()


StartPair = Callable[..., tuple[Server, Server]]


@pytest.fixture
def replicas(tmp_path: Path, signer: SigningKey, redis_server: RedisServer) -> Iterator[StartPair]:
    """Start two `serve` instances against SIMULATOR sharing Redis and the call id key."""
    started: list[Server] = []
    pem = tmp_path / "idp-public.pem"
    pem.write_text(signer.public_pem(), encoding="ascii")

    def start_pair(simulator: Server, **settings: str) -> tuple[Server, Server]:
        for name in ("one", "two"):
            port = free_port()
            env = gateway_env(
                simulator,
                port,
                GATEWAY_AUTH="jwt",
                GATEWAY_JWT_PUBLIC_KEY_FILE=str(pem),
                GATEWAY_JWT_ISSUER=ISSUER,
                GATEWAY_JWT_AUDIENCE=AUDIENCE,
                GATEWAY_OPERATOR_CLAIM="roles=call-operator",
                GATEWAY_CALL_ID_KEY=CALL_ID_KEY,
                GATEWAY_REDIS_URL=redis_server.url,
                GATEWAY_DIAL_ALLOW="+1555*",
                PROMETHEUS_MULTIPROC_DIR=str(tmp_path / f"{name}-metrics"),
                **settings,
            )
            log = tmp_path / f"{name}.log"
            started.append(start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", log))
        return started[-2], started[-1]

    yield start_pair
    for server in started:
        server.stop()


def as_caller(signer: SigningKey, subject: str, **extra: Any) -> dict[str, str]:
    token = signer.token(claims(iss=ISSUER, aud=AUDIENCE, sub=subject, **extra))
    return {"Authorization": f"Bearer {token}"}


def call_url(gateway: Server, call_id: str) -> str:
    return f"{gateway.url}/calls/{quote(call_id, safe='')}"


def operations(simulator: Server) -> list[str]:
    return [request["operation"] for request in simulator_requests(simulator)]


def audit_entries(*gateways: Server) -> list[dict[str, Any]]:
    entries = []
    for gateway in gateways:
        for line in gateway.log().splitlines():
            if line.startswith("{") and '"gateway.audit"' in line:
                entries.append(json.loads(line))
    return entries


def test_caller_b_gets_404_for_caller_as_call_through_either_instance_and_an_operator_acts(
    replicas: StartPair, simulator: Server, signer: SigningKey
) -> None:
    one, two = replicas(simulator)
    alice, bob = as_caller(signer, "alice"), as_caller(signer, "bob")
    operator = as_caller(signer, "ops", roles=["call-operator"])
    placed = http("POST", f"{one.url}/calls", PLACE, headers=alice)
    assert placed.status == 201, placed.body
    call_id = placed.json()["callId"]
    unknown = "gw1.AAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA.never-placed"

    refused = [
        http(method, call_url(gateway, some_id) + suffix, headers=bob)
        for gateway in (one, two)
        for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/events"))
        for some_id in (call_id, unknown)
    ]
    assert [answer.status for answer in refused] == [404] * 12
    bodies = {json.dumps({**a.json(), "requestId": None}, sort_keys=True) for a in refused}
    assert len(bodies) == 1  # the same problem for another caller's call and for no call
    assert operations(simulator) == ["PlayOnPhone"]  # Bob never reached Exchange

    assert http("GET", call_url(two, call_id), headers=alice).status == 200
    assert http("GET", call_url(two, call_id), headers=operator).status == 200
    assert http("DELETE", call_url(one, call_id), headers=operator).status == 200
    assert operations(simulator) == [
        "PlayOnPhone",
        "GetPhoneCallInformation",
        "GetPhoneCallInformation",
        "DisconnectPhoneCall",
    ]
    # Alice watches her call through the other instance: it streams, and ends hung up.
    watched = http("GET", call_url(two, call_id) + "/events", headers=alice)
    assert watched.status == 200
    assert watched.headers["Content-Type"].startswith("text/event-stream")
    states = [
        json.loads(line.removeprefix(b"data:"))["state"]
        for line in watched.body.splitlines()
        if line.startswith(b"data:")
    ]
    assert states == ["Disconnected"]

    entries = audit_entries(one, two)
    # One line per action: the POST, Bob's twelve refusals, the operator's DELETE.
    assert len(entries) == 14
    assert sum(e["outcome"] == "refused-ownership" for e in entries) == 12
    assert {e["subject"] for e in entries} == {"alice", "bob", "ops"}
    logs = one.log() + two.log()
    for header in (alice, bob, operator):
        assert header["Authorization"].split()[1] not in logs
    assert CALL_ID_KEY not in logs


def test_a_callers_posts_through_both_instances_are_cut_at_the_quota(
    replicas: StartPair, simulator: Server, signer: SigningKey
) -> None:
    one, two = replicas(simulator, GATEWAY_RATE_LIMIT_CALLS="5/minute")
    carol = as_caller(signer, "carol")

    answers = [
        http("POST", f"{(one, two)[n % 2].url}/calls", PLACE, headers=carol) for n in range(7)
    ]

    assert [answer.status for answer in answers] == [201] * 5 + [429] * 2
    assert all(1 <= int(answer.headers["Retry-After"]) <= 60 for answer in answers[5:])
    assert answers[6].headers["RateLimit-Policy"] == '"calls";q=5;w=60'
    assert operations(simulator).count("PlayOnPhone") == 5
    # Another caller has its own quota.
    assert http("POST", f"{two.url}/calls", PLACE, headers=as_caller(signer, "dave")).status == 201


def test_a_callers_requests_through_both_instances_never_pass_the_request_quota(
    replicas: StartPair, simulator: Server, signer: SigningKey, redis_server: RedisServer
) -> None:
    one, two = replicas(simulator, GATEWAY_RATE_LIMIT_REQUESTS="600/minute")
    hana = as_caller(signer, "hana")
    unknown = "gw1.AAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA.never-placed"

    def get(n: int) -> int:
        return http("GET", call_url((one, two)[n % 2], unknown), headers=hana).status

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(get, range(800)))

    answered = statuses.count(404)
    assert answered + statuses.count(429) == 800
    # Each worker takes units in leases of at most 1 % of the quota (6), counted in Redis
    # before they are spent: never more than the quota, and at most a lease per worker less.
    assert 600 - 2 * 2 * 6 <= answered <= 600
    [key] = redis_server.client().keys("ews-gateway:limits*requests*hana*")
    assert answered <= int(redis_server.client().get(key) or 0)
    assert http("GET", call_url(one, unknown), headers=as_caller(signer, "ivan")).status == 404


def test_twenty_concurrent_posts_with_one_key_over_both_instances_dial_once(
    replicas: StartPair, slow_simulator: Server, signer: SigningKey
) -> None:
    # A waiting duplicate holds a bulkhead slot: 12 a worker (16 threads), so all 20 can wait.
    one, two = replicas(slow_simulator, GATEWAY_THREADS="16")
    erin = {**as_caller(signer, "erin"), "Idempotency-Key": '"a1b2c3d4-order-42"'}

    def post(n: int) -> Response:
        return http("POST", f"{(one, two)[n % 2].url}/calls", PLACE, headers=erin)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(post, range(20)))

    assert [answer.status for answer in answers] == [201] * 20, [a.body for a in answers]
    assert len({answer.json()["callId"] for answer in answers}) == 1
    assert operations(slow_simulator).count("PlayOnPhone") == 1
    replays = sum(metric(gateway, "ews_gateway_idempotent_replays_total") for gateway in (one, two))
    assert replays == 19


def metric(gateway: Server, series: str) -> float:
    for line in http("GET", f"{gateway.url}/metrics").body.decode().splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_with_redis_killed_each_feature_behaves_as_documented_and_recovers(
    replicas: StartPair, simulator: Server, signer: SigningKey, redis_server: RedisServer
) -> None:
    one, two = replicas(simulator, GATEWAY_RATE_LIMIT_CALLS="3/minute")
    frank = as_caller(signer, "frank")
    keyed = {**frank, "Idempotency-Key": '"during-outage"'}
    placed = http("POST", f"{one.url}/calls", PLACE, headers=frank)
    assert placed.status == 201
    call_id = placed.json()["callId"]

    redis_server.stop()
    # Limits fail open: more calls than the quota go through, counted as Redis errors.
    outage = [http("POST", f"{two.url}/calls", PLACE, headers=frank) for _ in range(4)]
    assert [answer.status for answer in outage] == [201] * 4
    # An idempotent POST fails closed: nothing is dialled.
    dialled = operations(simulator).count("PlayOnPhone")
    refused = http("POST", f"{one.url}/calls", PLACE, headers=keyed)
    assert refused.status == 503
    assert refused.json()["type"] == "urn:ews-gateway:problem:shared-state-unavailable"
    assert refused.headers["Retry-After"] == "1"
    assert operations(simulator).count("PlayOnPhone") == dialled
    # Ownership needs no Redis.
    assert http("GET", call_url(two, call_id), headers=frank).status == 200
    assert http("GET", call_url(two, call_id), headers=as_caller(signer, "bob")).status == 404
    assert metric(two, 'ews_gateway_redis_errors_total{feature="rate_limit"}') >= 4
    assert metric(one, 'ews_gateway_redis_errors_total{feature="idempotency"}') >= 1
    assert any("rate limit storage unreachable" in line for line in two.log().splitlines())

    redis_server.start()
    # The idempotent POST works again, and replays.
    first = http("POST", f"{one.url}/calls", PLACE, headers=keyed)
    assert first.status == 201, first.body
    again = http("POST", f"{two.url}/calls", PLACE, headers=keyed)
    assert again.json()["callId"] == first.json()["callId"]
    # The quota holds again (Redis came back empty: the first POST above counted one).
    after = [http("POST", f"{(one, two)[n % 2].url}/calls", PLACE, headers=frank) for n in range(3)]
    assert [answer.status for answer in after] == [201, 201, 429]


def test_serve_refuses_to_start_without_a_dial_policy() -> None:
    result = run_serve(
        {"EWS_URL": "https://mail.example.com/EWS/Exchange.asmx", "GATEWAY_AUTH": "none"}
    )

    assert result.returncode == 2
    assert "GATEWAY_DIAL_ALLOW" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_redis_over_tls_with_a_password_from_a_file_holds_the_shared_state(
    tmp_path: Path, simulator: Server, signer: SigningKey
) -> None:
    workdir = tmp_path / "tls-redis"
    workdir.mkdir()
    certificate = self_signed_certificate(
        workdir, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    secure = RedisServer(free_port(), workdir, password="redis-pass-0123", certificate=certificate)
    secure.start()
    password_file = tmp_path / "redis-password"
    password_file.write_text("redis-pass-0123\n")
    pem = tmp_path / "idp.pem"
    pem.write_text(signer.public_pem(), encoding="ascii")
    port = free_port()
    env = gateway_env(
        simulator,
        port,
        GATEWAY_AUTH="jwt",
        GATEWAY_JWT_PUBLIC_KEY_FILE=str(pem),
        GATEWAY_JWT_ISSUER=ISSUER,
        GATEWAY_JWT_AUDIENCE=AUDIENCE,
        GATEWAY_REDIS_URL=secure.url,
        GATEWAY_REDIS_PASSWORD_FILE=str(password_file),
        GATEWAY_REDIS_CA_BUNDLE=str(certificate.cert_path),
        GATEWAY_RATE_LIMIT_CALLS="5/minute",
    )
    gateway = start(["serve"], env, f"http://127.0.0.1:{port}", "/readyz", tmp_path / "gw.log")
    try:
        keyed = {**as_caller(signer, "gina"), "Idempotency-Key": '"over-tls"'}
        answer = http("POST", f"{gateway.url}/calls", PLACE, headers=keyed)
        assert answer.status == 201, answer.body
        stored = secure.client()
        assert len(stored.keys("ews-gateway:idempotency:*")) == 1
        assert len(stored.keys("ews-gateway:limits*")) == 1
        assert metric(gateway, 'ews_gateway_redis_errors_total{feature="idempotency"}') == 0
        assert "redis-pass-0123" not in gateway.log()
    finally:
        gateway.stop()
        secure.stop()


class LateRedis:
    """A real Redis client whose first SET NX is stored but answers too late (a timeout)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.lost = 0

    def set(self, *args: Any, **kwargs: Any) -> Any:
        stored = self.client.set(*args, **kwargs)
        if kwargs.get("nx") and not self.lost:
            self.lost += 1
            raise redis.TimeoutError("Timeout reading from socket")
        return stored

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_a_claim_whose_answer_redis_lost_is_taken_back_so_the_retry_dials_once(
    redis_server: RedisServer,
) -> None:
    late = LateRedis(redis_server.client())
    errors: list[int] = []
    calls = IdempotentCalls(
        RedisKeys(cast(redis.Redis, late), on_error=lambda: errors.append(1)), wait_s=1
    )
    dialled: list[str] = []

    def dial() -> StoredAnswer:
        dialled.append("PlayOnPhone")
        return StoredAnswer(201, {"callId": "c1", "ewsResponseCode": "NoError"}, "/calls/c1")

    with pytest.raises(SharedStateUnavailable):
        calls.place("gina", "order-9", "fp", dial)
    assert (late.lost, errors, dialled) == (1, [1], [])

    retry = calls.place("gina", "order-9", "fp", dial)  # not 409 in-use, then outcome-unknown

    assert (retry.status, retry.replayed, dialled) == (201, False, ["PlayOnPhone"])
    assert calls.place("gina", "order-9", "fp", dial).replayed
    assert dialled == ["PlayOnPhone"]


# How a first POST with a key fails, and what its retry with the same key then gets: the
# key is freed (201, dialled afresh) only when the failure proves nothing was dialled.
FIRST_POST_FAILURES = [
    ({"kind": "ews-error", "code": "ErrorInvalidPhoneNumber"}, 201),  # Exchange said no
    ({"kind": "html-500"}, 409),  # an IIS error page can follow whatever EWS did
    ({"kind": "fault", "code": "ErrorInvalidRequest"}, 201),
    ({"kind": "reset"}, 409),  # cut off after the request was read
    ({"kind": "http-503"}, 201),  # a front end refused before EWS ran
    ({"kind": "malformed"}, 409),
    ({"kind": "busy", "backOffMs": 60000}, 201),
    ({"kind": "redirect"}, 409),
    ({"kind": "http-401"}, 201),
    ({"kind": "hang", "ms": 3000}, 409),  # EWS_TIMEOUT_SECONDS is 2
]


def test_a_failed_first_post_frees_its_key_only_when_nothing_can_have_been_dialled(
    replicas: StartPair, simulator: Server, signer: SigningKey
) -> None:
    one, two = replicas(simulator, GATEWAY_RATE_LIMIT_CALLS="100/minute")
    retries = {}
    for n, (fault, _) in enumerate(FIRST_POST_FAILURES):
        keyed = {**as_caller(signer, "hana"), "Idempotency-Key": f'"first-fails-{n}"'}
        set_faults(simulator, {**fault, "operation": "PlayOnPhone", "count": 1})
        first = http("POST", f"{one.url}/calls", PLACE, headers=keyed)
        set_faults(simulator)
        assert first.status >= 400, (fault, first.body)
        retry = http("POST", f"{two.url}/calls", PLACE, headers=keyed)
        retries[fault["kind"]] = (retry.status, retry.json()["type"] if retry.status == 409 else "")

    unknown = "urn:ews-gateway:problem:idempotency-outcome-unknown"
    assert retries == {
        fault["kind"]: (status, unknown if status == 409 else "")
        for fault, status in FIRST_POST_FAILURES
    }
