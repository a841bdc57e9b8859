"""Caller authentication: GATEWAY_AUTH=apikey, jwt (static key or JWKS) and none."""

from __future__ import annotations

import base64
import hashlib
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry
from werkzeug.test import TestResponse

from gateway.app import create_app
from gateway.config import Config
from gateway.errors import ConfigError, KeysUnavailable, Unauthenticated
from gateway.exchange.client import Disconnected
from gateway.guards import callers
from gateway.guards.callers import ApiKeys, JwksKeys, JwtBearer
from tests.identity import (
    AUDIENCE,
    BEARER_CHALLENGE,
    CALL_ID_KEY,
    FAR_S,
    HOLD_LIMIT_S,
    ISSUER,
    PROBLEM_JSON,
    Clock,
    JwksEndpoint,
    KeySetSource,
    RecordingExchange,
    SigningKey,
    bearer,
    call_path,
    claims,
    client_for,
    ec_key,
    hs256_token,
    jwks,
    jwt_environ,
    rsa_key,
    unsigned_token,
)

KEY = "s3cret-key-for-tests"
# Who an API key caller is: "apikey:" and the first 16 hex digits of the key's SHA-256.
KEY_SUBJECT = "apikey:" + hashlib.sha256(KEY.encode()).hexdigest()[:16]


class FakeEws:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def disconnect_call(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> Disconnected:
        self.calls.append(call_id)
        return Disconnected(ews_code="NoError")


def keys_file(tmp_path: Path, *keys: str) -> Path:
    path = tmp_path / "keys"
    lines = ["# one SHA-256 digest per line", ""]
    lines += [hashlib.sha256(key.encode()).hexdigest() for key in keys]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def fake() -> FakeEws:
    return FakeEws()


@pytest.fixture
def client(tmp_path: Path, fake: FakeEws) -> FlaskClient:
    config = Config(
        ews_url="http://exchange.invalid/EWS/Exchange.asmx",
        gateway_auth="apikey",
        api_keys_file=str(keys_file(tmp_path, "other-key", KEY)),
        call_id_key=CALL_ID_KEY.encode(),
    )
    app = create_app(config, ews=fake, registry=CollectorRegistry())  # type: ignore[arg-type]
    return app.test_client()


def test_a_request_without_a_key_is_401_with_a_challenge_and_exchange_is_not_contacted(
    client: FlaskClient, fake: FakeEws
) -> None:
    answer = client.delete("/calls/abc")
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == 'APIKey header="X-API-Key"'
    assert answer.mimetype == "application/problem+json"
    assert fake.calls == []


def test_a_wrong_key_is_401(client: FlaskClient, fake: FakeEws) -> None:
    answer = client.delete("/calls/abc", headers={"X-API-Key": "guess"})
    assert answer.status_code == 401
    assert fake.calls == []


def test_a_listed_key_is_let_through(client: FlaskClient, fake: FakeEws) -> None:
    answer = client.delete(call_path(subject=KEY_SUBJECT), headers={"X-API-Key": KEY})
    assert answer.status_code == 200
    assert fake.calls == ["abc"]


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/metrics", "/openapi.yaml"])
def test_probes_metrics_and_the_spec_need_no_key(client: FlaskClient, path: str) -> None:
    assert client.get(path).status_code == 200


def test_the_keys_file_must_hold_digests_not_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("plain-text-key\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="GATEWAY_API_KEYS_FILE line 1"):
        ApiKeys.from_file(str(path))


def test_an_empty_keys_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# nobody yet\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no key digests"):
        ApiKeys.from_file(str(path))


def accepts(keys: ApiKeys, key: str) -> bool:
    try:
        keys.authenticate({"X-API-Key": key})  # type: ignore[arg-type]
    except Unauthenticated:
        return False
    return True


@pytest.fixture
def moment(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The keys file's check interval runs on this clock, starting at 1000 s."""
    clock = Clock()
    monkeypatch.setattr(callers, "time", clock)
    return clock


def test_a_key_added_to_the_file_is_accepted_and_a_removed_one_refused_a_second_later(
    tmp_path: Path, moment: Clock
) -> None:
    keys = ApiKeys.from_file(str(keys_file(tmp_path, KEY)))
    # Another size too: file times can be as coarse as the kernel's tick.
    keys_file(tmp_path, "new-key", "other-key")

    assert accepts(keys, KEY)  # checked at most once a second
    moment.advance(1.0)
    assert accepts(keys, "new-key")
    assert not accepts(keys, KEY)


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda path: path.write_text("# emptied while a new list is written\n"),
        lambda path: path.write_text("plain-text-key\n"),
        lambda path: path.write_bytes(b"\xff\xfe not text"),
        lambda path: path.unlink(),
    ],
    ids=["empty", "not a digest", "not text", "removed"],
)
def test_a_keys_file_that_cannot_be_used_keeps_the_keys_read_before(
    tmp_path: Path,
    moment: Clock,
    rewrite: Callable[[Path], object],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = keys_file(tmp_path, KEY)
    keys = ApiKeys.from_file(str(path))
    rewrite(path)
    moment.advance(1.0)

    assert accepts(keys, KEY)
    if path.exists():
        assert "keeping the keys read before" in caplog.text
        assert KEY not in caplog.text

    keys_file(tmp_path, "new-key", "other-key", "third-key")
    moment.advance(1.0)
    assert accepts(keys, "new-key")


# GATEWAY_AUTH=jwt with a static public key (GATEWAY_JWT_PUBLIC_KEY)


@pytest.fixture(scope="module")
def rsa_signer() -> SigningKey:
    return rsa_key()


@pytest.fixture(scope="module")
def ec_signer() -> SigningKey:
    return ec_key()


@pytest.fixture(scope="module")
def stranger() -> SigningKey:
    """A key pair the gateway was never told about."""
    return rsa_key()


@pytest.fixture
def exchange() -> RecordingExchange:
    return RecordingExchange()


@pytest.fixture
def rsa_client(rsa_signer: SigningKey, exchange: RecordingExchange) -> FlaskClient:
    return client_for(jwt_environ(GATEWAY_JWT_PUBLIC_KEY=rsa_signer.public_pem()), exchange)


def assert_unauthenticated(answer: TestResponse) -> dict[str, Any]:
    """Check the answer is a 401 problem with the Bearer challenge; return the problem."""
    assert answer.status_code == 401, answer.text
    assert answer.headers["WWW-Authenticate"] == BEARER_CHALLENGE
    assert answer.mimetype == PROBLEM_JSON
    problem: dict[str, Any] = answer.get_json()
    assert problem["status"] == 401
    assert problem["requestId"] == answer.headers["X-Request-ID"]
    return problem


def now() -> int:
    return int(time.time())


def _tampered(token: str) -> str:
    header, _, signature = token.split(".")
    forged_payload = hs256_token(claims(sub="admin"), b"unused").split(".")[1]
    return f"{header}.{forged_payload}.{signature}"


# Each entry builds the request headers from the configured RSA key and a stranger's key.
REJECTED_CREDENTIALS: dict[str, Callable[[SigningKey, SigningKey], dict[str, str]]] = {
    "no Authorization header": lambda key, _: {},
    "Basic scheme": lambda key, _: {"Authorization": "Basic c3ZjOnBhc3N3b3Jk"},
    "a token without a scheme": lambda key, _: {"Authorization": key.token(claims())},
    "Bearer without a token": lambda key, _: {"Authorization": "Bearer "},
    "a token in X-API-Key": lambda key, _: {"X-API-Key": key.token(claims())},
    "garbage token": lambda key, _: bearer("not-a-jwt"),
    "three garbage segments": lambda key, _: bearer("a.b.c"),
    "expired beyond the leeway": lambda key, _: bearer(key.token(claims(exp=now() - 60))),
    "not valid yet": lambda key, _: bearer(key.token(claims(nbf=now() + FAR_S))),
    "wrong issuer": lambda key, _: bearer(key.token(claims(iss="https://evil.example.com/"))),
    "wrong audience": lambda key, _: bearer(key.token(claims(aud="api://another-service"))),
    "no exp": lambda key, _: bearer(key.token(claims(without=["exp"]))),
    "no iss": lambda key, _: bearer(key.token(claims(without=["iss"]))),
    "no aud": lambda key, _: bearer(key.token(claims(without=["aud"]))),
    "signed by another key": lambda _, other: bearer(other.token(claims())),
    "payload swapped after signing": lambda key, _: bearer(_tampered(key.token(claims()))),
    "alg=none": lambda key, _: bearer(unsigned_token(claims())),
    "HS256 keyed with the public PEM": lambda key, _: bearer(
        hs256_token(claims(), key.public_pem().encode("ascii"))
    ),
    "ES256 against an RSA key": lambda key, _: bearer(ec_key().token(claims())),
}


@pytest.mark.parametrize("signer_name", ["rsa_signer", "ec_signer"])
def test_a_valid_token_signed_by_the_configured_key_is_let_through(
    signer_name: str, request: pytest.FixtureRequest, exchange: RecordingExchange
) -> None:
    signer: SigningKey = request.getfixturevalue(signer_name)
    client = client_for(jwt_environ(GATEWAY_JWT_PUBLIC_KEY=signer.public_pem()), exchange)

    answer = client.delete(call_path(), headers=bearer(signer.token(claims())))

    assert answer.status_code == 200
    assert exchange.calls == [("disconnect_call", "abc", None)]


@pytest.mark.parametrize("case", list(REJECTED_CREDENTIALS))
def test_missing_or_invalid_bearer_credentials_are_401_and_exchange_is_not_contacted(
    case: str,
    rsa_client: FlaskClient,
    rsa_signer: SigningKey,
    stranger: SigningKey,
    exchange: RecordingExchange,
) -> None:
    headers = REJECTED_CREDENTIALS[case](rsa_signer, stranger)

    assert_unauthenticated(rsa_client.delete("/calls/abc", headers=headers))
    assert exchange.calls == []


def test_an_rs256_token_against_an_ec_key_is_401(
    ec_signer: SigningKey, rsa_signer: SigningKey, exchange: RecordingExchange
) -> None:
    client = client_for(jwt_environ(GATEWAY_JWT_PUBLIC_KEY=ec_signer.public_pem()), exchange)

    assert_unauthenticated(client.get(call_path(), headers=bearer(rsa_signer.token(claims()))))
    assert exchange.calls == []


def test_a_token_expired_within_the_clock_skew_leeway_is_still_accepted(
    rsa_client: FlaskClient, rsa_signer: SigningKey
) -> None:
    token = rsa_signer.token(claims(exp=now() - 5))

    assert rsa_client.delete(call_path(), headers=bearer(token)).status_code == 200


def test_the_bearer_scheme_is_matched_case_insensitively(
    rsa_client: FlaskClient, rsa_signer: SigningKey
) -> None:
    headers = {"Authorization": "bearer " + rsa_signer.token(claims())}

    assert rsa_client.delete(call_path(), headers=headers).status_code == 200


def test_a_rejected_token_is_never_echoed_in_the_problem(
    rsa_client: FlaskClient, rsa_signer: SigningKey
) -> None:
    token = rsa_signer.token(claims(exp=now() - FAR_S))

    answer = rsa_client.delete(call_path(), headers=bearer(token))

    assert_unauthenticated(answer)
    assert token not in answer.text
    assert token.split(".")[2] not in answer.text


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/metrics", "/openapi.yaml"])
def test_probes_metrics_and_the_spec_need_no_token(rsa_client: FlaskClient, path: str) -> None:
    assert rsa_client.get(path).status_code == 200


# GATEWAY_AUTH=jwt with keys from a JWKS URL (GATEWAY_JWT_JWKS_URL)


@pytest.fixture(scope="module")
def key_a() -> SigningKey:
    return rsa_key(kid="a")


@pytest.fixture(scope="module")
def key_b() -> SigningKey:
    return ec_key(kid="b")


@pytest.fixture
def idp(key_a: SigningKey, key_b: SigningKey) -> Iterator[JwksEndpoint]:
    """The identity provider's JWKS endpoint, publishing keys a and b."""
    with JwksEndpoint(jwks(key_a, key_b)) as endpoint:
        yield endpoint


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Drive the JWKS cache's notion of time by hand."""
    clock = Clock()
    monkeypatch.setattr(callers, "time", clock)
    return clock


def jwks_client(url: str, exchange: RecordingExchange) -> FlaskClient:
    return client_for(jwt_environ(GATEWAY_JWT_JWKS_URL=url), exchange)


def bearer_checker(url: str, *, ttl_s: float = 300, min_refresh_s: float = 60) -> JwtBearer:
    keys = JwksKeys(url, ttl_s=ttl_s, min_refresh_s=min_refresh_s)
    return JwtBearer(keys, issuer=ISSUER, audience=AUDIENCE)


@pytest.mark.network
@pytest.mark.parametrize("key_name", ["key_a", "key_b"])
def test_a_token_signed_by_any_key_in_the_jwks_is_let_through(
    key_name: str, request: pytest.FixtureRequest, idp: JwksEndpoint, exchange: RecordingExchange
) -> None:
    key: SigningKey = request.getfixturevalue(key_name)

    answer = jwks_client(idp.url, exchange).delete(call_path(), headers=bearer(key.token(claims())))

    assert answer.status_code == 200
    assert exchange.calls == [("disconnect_call", "abc", None)]


@pytest.mark.network
def test_a_token_naming_a_kid_the_jwks_does_not_hold_is_401(
    idp: JwksEndpoint, key_a: SigningKey, exchange: RecordingExchange
) -> None:
    token = key_a.token(claims(), kid="c")

    assert_unauthenticated(
        jwks_client(idp.url, exchange).delete(call_path(), headers=bearer(token))
    )
    assert exchange.calls == []


@pytest.mark.network
def test_a_token_whose_kid_names_the_other_key_is_401(
    idp: JwksEndpoint, key_a: SigningKey, exchange: RecordingExchange
) -> None:
    token = key_a.token(claims(), kid="b")

    assert_unauthenticated(
        jwks_client(idp.url, exchange).delete(call_path(), headers=bearer(token))
    )


@pytest.mark.network
def test_the_jwks_is_fetched_once_for_many_requests(
    idp: JwksEndpoint, key_a: SigningKey, key_b: SigningKey, exchange: RecordingExchange
) -> None:
    client = jwks_client(idp.url, exchange)

    statuses = [
        client.delete(call_path(), headers=bearer(key.token(claims()))).status_code
        for key in [key_a, key_b] * 10
    ]

    assert statuses == [200] * 20
    assert idp.hits == 1


@pytest.mark.network
def test_forged_kids_cause_no_refetch_within_the_min_refresh_interval(
    idp: JwksEndpoint, key_a: SigningKey, clock: Clock
) -> None:
    checker = bearer_checker(idp.url, min_refresh_s=60)
    checker.authenticate(bearer(key_a.token(claims())))
    clock.advance(59)

    for number in range(20):
        with pytest.raises(Unauthenticated):
            checker.authenticate(bearer(key_a.token(claims(), kid=f"forged-{number}")))

    assert idp.hits == 1


@pytest.mark.network
def test_an_unknown_kid_after_the_min_refresh_interval_refetches_once_and_finds_a_rotated_key(
    idp: JwksEndpoint, key_a: SigningKey, clock: Clock
) -> None:
    checker = bearer_checker(idp.url, min_refresh_s=60)
    checker.authenticate(bearer(key_a.token(claims())))
    rotated = rsa_key(kid="c")
    idp.document = jwks(key_a, rotated)
    clock.advance(61)

    caller = checker.authenticate(bearer(rotated.token(claims(sub="rotated-user"))))
    for number in range(5):
        with pytest.raises(Unauthenticated):
            checker.authenticate(bearer(key_a.token(claims(), kid=f"forged-{number}")))

    assert caller.subject == "rotated-user"
    assert idp.hits == 2


@pytest.mark.network
def test_the_jwks_is_fetched_again_once_its_ttl_has_passed(
    idp: JwksEndpoint, key_a: SigningKey, clock: Clock
) -> None:
    checker = bearer_checker(idp.url, ttl_s=300)
    checker.authenticate(bearer(key_a.token(claims())))
    clock.advance(299)
    checker.authenticate(bearer(key_a.token(claims())))
    assert idp.hits == 1

    clock.advance(2)
    checker.authenticate(bearer(key_a.token(claims())))

    assert idp.wait_for_hits(2) == 2


@pytest.mark.network
def test_cached_keys_keep_working_while_the_jwks_endpoint_fails(
    idp: JwksEndpoint, key_a: SigningKey, clock: Clock
) -> None:
    checker = bearer_checker(idp.url, ttl_s=300)
    checker.authenticate(bearer(key_a.token(claims())))
    idp.status = 500
    clock.advance(301)

    caller = checker.authenticate(bearer(key_a.token(claims())))

    assert caller.subject == "user-1"
    assert idp.wait_for_hits(2) == 2


@pytest.mark.network
def test_a_jwks_endpoint_that_is_down_at_first_use_is_a_503_problem(
    key_a: SigningKey, exchange: RecordingExchange
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    client = jwks_client(f"http://127.0.0.1:{closed_port}/jwks.json", exchange)

    answer = client.delete(call_path(), headers=bearer(key_a.token(claims())))

    assert answer.status_code == 503
    assert answer.mimetype == PROBLEM_JSON
    assert answer.get_json()["type"] == f"urn:ews-gateway:problem:{KeysUnavailable.slug}"
    assert exchange.calls == []


@pytest.mark.network
@pytest.mark.parametrize(
    ("document", "status"),
    [
        (b'{"error": "temporarily unavailable"}', 503),
        (b"<html><body>Bad gateway</body></html>", 200),
        (b'{"keys": []}', 200),
        (b'{"keys": [{"kty": "unknown-type"}]}', 200),
        (b"[]", 200),
    ],
    ids=["http-503", "html-page", "empty-key-set", "no-usable-key", "json-array"],
)
def test_a_jwks_endpoint_answering_no_usable_keys_at_first_use_is_a_503_problem(
    document: bytes, status: int, key_a: SigningKey, exchange: RecordingExchange
) -> None:
    with JwksEndpoint(document) as broken_idp:
        broken_idp.status = status
        client = jwks_client(broken_idp.url, exchange)

        answer = client.delete(call_path(), headers=bearer(key_a.token(claims())))

    assert answer.status_code == 503, answer.text
    assert answer.mimetype == PROBLEM_JSON
    assert exchange.calls == []


@pytest.mark.network
@pytest.mark.parametrize("with_alg", [True, False], ids=["alg-HS256", "no-alg"])
def test_a_symmetric_key_in_the_jwks_is_never_used(
    with_alg: bool, key_a: SigningKey, exchange: RecordingExchange
) -> None:
    secret = b"shared-secret-that-the-idp-should-never-publish"
    oct_key: dict[str, Any] = {"kty": "oct", "kid": "h", "use": "sig", "k": _b64url(secret)}
    if with_alg:
        oct_key["alg"] = "HS256"
    with JwksEndpoint(jwks(key_a, extra=[oct_key])) as idp_with_secret:
        client = jwks_client(idp_with_secret.url, exchange)

        named = client.delete(call_path(), headers=bearer(hs256_token(claims(), secret, "h")))
        unnamed = client.delete(call_path(), headers=bearer(hs256_token(claims(), secret)))
        genuine = client.delete(call_path(), headers=bearer(key_a.token(claims())))

    assert_unauthenticated(named)
    assert_unauthenticated(unnamed)
    assert genuine.status_code == 200
    assert exchange.calls == [("disconnect_call", "abc", None)]


# The JWKS refreshed off the request path, against a key source the test holds and releases.

JWKS_URL = "https://login.example.com/tenant/discovery/v2.0/keys"


@pytest.fixture
def key_source(key_a: SigningKey) -> KeySetSource:
    return KeySetSource(jwks(key_a))


def primed_checker(source: KeySetSource, key: SigningKey, **settings: float) -> JwtBearer:
    """A JWT checker whose keys come from SOURCE, once it has fetched them for KEY's token."""
    checker = JwtBearer(
        JwksKeys(JWKS_URL, fetch=source, **settings), issuer=ISSUER, audience=AUDIENCE
    )
    checker.authenticate(bearer(key.token(claims())))
    return checker


def test_a_cached_key_is_used_at_once_while_a_refresh_for_an_unknown_kid_hangs(
    key_source: KeySetSource, key_a: SigningKey, clock: Clock
) -> None:
    # The cached key is stale as well; a wait would outlast the held fetch.
    checker = primed_checker(
        key_source, key_a, ttl_s=60, min_refresh_s=60, timeout_s=2 * HOLD_LIMIT_S
    )
    rotated = rsa_key(kid="c")
    key_source.document = jwks(key_a, rotated)
    key_source.hold()
    clock.advance(61)

    with ThreadPoolExecutor(1) as pool:
        needs_the_new_key = pool.submit(
            checker.authenticate, bearer(rotated.token(claims(sub="rotated-user")))
        )
        assert key_source.fetching.wait(HOLD_LIMIT_S)
        cached = checker.authenticate(bearer(key_a.token(claims())))
        refresh_still_hanging = not key_source.answered.is_set()
        key_source.release()

        assert cached.subject == "user-1"
        assert refresh_still_hanging
        assert needs_the_new_key.result(HOLD_LIMIT_S).subject == "rotated-user"
    assert key_source.fetches == 2


def test_concurrent_requests_for_an_unknown_kid_share_one_fetch(
    key_source: KeySetSource, key_a: SigningKey
) -> None:
    # No interval between fetches: only sharing the one in flight keeps them to one.
    checker = primed_checker(key_source, key_a, min_refresh_s=0)
    rotated = rsa_key(kid="c")
    key_source.document = jwks(key_a, rotated)
    key_source.hold()

    with ThreadPoolExecutor(8) as pool:
        token = bearer(rotated.token(claims(sub="rotated-user")))
        waiting = [pool.submit(checker.authenticate, token) for _ in range(8)]
        assert key_source.fetching.wait(HOLD_LIMIT_S)
        key_source.release()

        subjects = [future.result(HOLD_LIMIT_S).subject for future in waiting]
    assert subjects == ["rotated-user"] * 8
    assert key_source.fetches == 2


def test_unknown_kids_fetch_at_most_once_per_interval_and_wait_for_nothing_in_between(
    key_source: KeySetSource, key_a: SigningKey, clock: Clock
) -> None:
    checker = primed_checker(key_source, key_a, min_refresh_s=60)
    key_source.hold()  # a fetch now would hang until the test's limit, then fail it
    clock.advance(59)

    for number in range(20):
        with pytest.raises(Unauthenticated):
            checker.authenticate(bearer(key_a.token(claims(), kid=f"forged-{number}")))
    assert key_source.fetches == 1

    key_source.release()
    clock.advance(2)
    for number in range(20):
        with pytest.raises(Unauthenticated):
            checker.authenticate(bearer(key_a.token(claims(), kid=f"forged-again-{number}")))
    assert key_source.fetches == 2


def test_a_refresh_that_fails_keeps_the_keys_there_were(
    key_source: KeySetSource, key_a: SigningKey, clock: Clock
) -> None:
    checker = primed_checker(key_source, key_a, ttl_s=300, min_refresh_s=60)
    key_source.failure = jwt.PyJWKClientConnectionError("Fail to fetch data from the url")
    clock.advance(301)

    assert checker.authenticate(bearer(key_a.token(claims()))).subject == "user-1"
    with pytest.raises(Unauthenticated):
        # A new kid waits for the failing refresh, or finds it over: 401, not 503.
        checker.authenticate(bearer(rsa_key(kid="c").token(claims())))

    assert checker.authenticate(bearer(key_a.token(claims()))).subject == "user-1"
    assert key_source.fetches == 2


def test_a_refresh_finding_no_asymmetric_key_keeps_the_keys_there_were(
    key_source: KeySetSource, key_a: SigningKey, clock: Clock
) -> None:
    checker = primed_checker(key_source, key_a, min_refresh_s=60)
    key_source.document = {"keys": [{"kty": "oct", "kid": "h", "k": _b64url(b"s" * 32)}]}
    clock.advance(61)

    with pytest.raises(Unauthenticated):
        checker.authenticate(bearer(key_a.token(claims(), kid="h")))

    assert checker.authenticate(bearer(key_a.token(claims()))).subject == "user-1"
    assert key_source.fetches == 2


def test_a_stale_key_set_is_replaced_behind_the_requests_that_still_use_it(
    key_source: KeySetSource, key_a: SigningKey, key_b: SigningKey, clock: Clock
) -> None:
    checker = primed_checker(key_source, key_a, ttl_s=300, min_refresh_s=60)
    key_source.document = jwks(key_b)
    key_source.hold()
    clock.advance(301)

    assert checker.authenticate(bearer(key_a.token(claims()))).subject == "user-1"
    assert key_source.fetching.wait(HOLD_LIMIT_S)
    key_source.release()

    # key_b's kid is new: its request waits for the refresh in flight or finds it done.
    assert checker.authenticate(bearer(key_b.token(claims(sub="b")))).subject == "b"
    with pytest.raises(Unauthenticated):
        checker.authenticate(bearer(key_a.token(claims())))  # gone from the new key set
    assert key_source.fetches == 2


@pytest.mark.parametrize("primed", [False, True], ids=["first-use", "unknown-kid"])
def test_a_request_waiting_for_keys_gives_up_after_the_timeout(
    primed: bool, key_source: KeySetSource, key_a: SigningKey, clock: Clock
) -> None:
    """With no keys yet it is a 503 (keys-unavailable), with some a 401 for the unknown kid."""
    keys = JwksKeys(JWKS_URL, fetch=key_source, timeout_s=0.05)
    checker = JwtBearer(keys, issuer=ISSUER, audience=AUDIENCE)
    if primed:
        checker.authenticate(bearer(key_a.token(claims())))
        clock.advance(31)
    key_source.hold()

    expected = Unauthenticated if primed else KeysUnavailable
    with pytest.raises(expected):
        checker.authenticate(bearer(key_a.token(claims(), kid="c")))

    assert not key_source.answered.is_set()
    key_source.release()
    assert key_source.answered.wait(HOLD_LIMIT_S)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# Configuration of GATEWAY_AUTH=jwt and EWS_IMPERSONATION


@pytest.mark.parametrize("variable", ["GATEWAY_JWT_ISSUER", "GATEWAY_JWT_AUDIENCE"])
def test_jwt_without_issuer_or_audience_is_a_config_error_naming_it(
    variable: str, rsa_signer: SigningKey
) -> None:
    environ = jwt_environ(GATEWAY_JWT_PUBLIC_KEY=rsa_signer.public_pem())
    del environ[variable]

    with pytest.raises(ConfigError, match=variable):
        Config.from_env(environ)


@pytest.mark.parametrize("sources", ["both", "neither"])
def test_jwt_needs_exactly_one_key_source(sources: str, rsa_signer: SigningKey) -> None:
    environ = jwt_environ()
    if sources == "both":
        environ["GATEWAY_JWT_PUBLIC_KEY"] = rsa_signer.public_pem()
        environ["GATEWAY_JWT_JWKS_URL"] = "https://login.example.com/keys"

    with pytest.raises(ConfigError, match="GATEWAY_JWT_JWKS_URL or GATEWAY_JWT_PUBLIC_KEY"):
        Config.from_env(environ)


@pytest.mark.parametrize("gateway_auth", ["none", "apikey"])
def test_impersonation_from_the_token_without_jwt_is_a_config_error(
    gateway_auth: str, tmp_path: Path
) -> None:
    environ = {
        "EWS_URL": "http://exchange.invalid/EWS/Exchange.asmx",
        "GATEWAY_AUTH": gateway_auth,
        "GATEWAY_API_KEYS_FILE": str(keys_file(tmp_path, KEY)),
        "EWS_IMPERSONATION": "token",
    }

    with pytest.raises(ConfigError, match="EWS_IMPERSONATION"):
        Config.from_env(environ)


def test_the_public_key_can_be_read_from_a_file(
    tmp_path: Path, rsa_signer: SigningKey, exchange: RecordingExchange
) -> None:
    pem_file = tmp_path / "idp.pem"
    pem_file.write_text(rsa_signer.public_pem(), encoding="ascii")
    client = client_for(jwt_environ(GATEWAY_JWT_PUBLIC_KEY_FILE=str(pem_file)), exchange)

    answer = client.delete(call_path(), headers=bearer(rsa_signer.token(claims())))

    assert answer.status_code == 200


def test_a_private_key_in_place_of_the_public_key_is_a_config_error_that_does_not_echo_it(
    rsa_signer: SigningKey, exchange: RecordingExchange
) -> None:
    private_pem = rsa_signer.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    environ = jwt_environ(GATEWAY_JWT_PUBLIC_KEY=private_pem)

    with pytest.raises(ConfigError, match="GATEWAY_JWT_PUBLIC_KEY") as raised:
        client_for(environ, exchange)

    body_line = private_pem.splitlines()[1]
    assert body_line not in str(raised.value)
