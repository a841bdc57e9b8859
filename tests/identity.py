"""Signing keys, tokens, a JWKS endpoint and a recording Exchange for caller-identity tests.

Not a test module: test_callers, test_impersonation and test_cors import from here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import quote

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from flask.testing import FlaskClient
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.config import Config
from gateway.exchange.client import CallInformation, Disconnected, EwsClient, PlacedCall
from gateway.guards.callers import Caller
from gateway.guards.ownership import CallIds

ISSUER = "https://login.example.com/tenant/v2.0"
AUDIENCE = "api://ews-call-gateway"
EXCHANGE_URL = "http://exchange.invalid/EWS/Exchange.asmx"
PROBLEM_JSON = "application/problem+json"
BEARER_CHALLENGE = 'Bearer realm="ews-gateway"'
# Far outside the gateway's 30 s clock-skew leeway, so no test depends on how fast it runs.
FAR_S = 600
# The call id key of every test gateway built from jwt_environ (32 bytes or more).
CALL_ID_KEY = "test-call-id-key-0123456789abcdef"
# How long a held key fetch or a wait for a refresh lasts before the test fails rather than hang.
HOLD_LIMIT_S = 10.0


@dataclass(frozen=True)
class SigningKey:
    """An identity provider's private key, the algorithm it signs with and its `kid`."""

    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    algorithm: str
    kid: str | None = None

    def public_pem(self) -> str:
        """Return the public key as GATEWAY_JWT_PUBLIC_KEY expects it."""
        return (
            self.private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )

    def public_jwk(self) -> dict[str, Any]:
        """Return the public key as a JWKS entry."""
        public_key = self.private_key.public_key()
        if isinstance(public_key, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public_key, as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
        jwk.update(alg=self.algorithm, use="sig")
        if self.kid is not None:
            jwk["kid"] = self.kid
        return jwk

    def token(self, claims: dict[str, Any], *, kid: str | None = None) -> str:
        """Sign the claims; `kid` overrides the key's own id in the header."""
        headers = {"kid": kid or self.kid} if (kid or self.kid) else None
        return jwt.encode(claims, self.private_key, algorithm=self.algorithm, headers=headers)


def rsa_key(kid: str | None = None) -> SigningKey:
    """Return a fresh RSA-2048 key that signs RS256."""
    return SigningKey(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256", kid)


def ec_key(kid: str | None = None) -> SigningKey:
    """Return a fresh P-256 key that signs ES256."""
    return SigningKey(ec.generate_private_key(ec.SECP256R1()), "ES256", kid)


def claims(*, without: Iterable[str] = (), **overrides: Any) -> dict[str, Any]:
    """Return valid claims for the gateway, minus `without`, with `overrides` applied."""
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "iat": now,
        "nbf": now - 5,
        "exp": now + FAR_S,
    }
    base.update(overrides)
    for name in without:
        base.pop(name, None)
    return base


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())


def unsigned_token(payload: dict[str, Any]) -> str:
    """Return an `alg=none` token with an empty signature."""
    return _segments({"alg": "none", "typ": "JWT"}, payload) + "."


def hs256_token(payload: dict[str, Any], secret: bytes, kid: str | None = None) -> str:
    """Sign with HMAC-SHA256 by hand (PyJWT refuses PEM bytes as a secret, an attacker need not)."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = _segments(header, payload)
    signature = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


def bearer(token: str) -> dict[str, str]:
    """Return the Authorization header carrying the token."""
    return {"Authorization": f"Bearer {token}"}


@dataclass
class RecordingExchange:
    """Stands in for EwsClient: records each operation with the mailbox it ran as."""

    calls: list[tuple[str, str, str | None]] = field(default_factory=list)

    def disconnect_call(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> Disconnected:
        self.calls.append(("disconnect_call", call_id, mailbox))
        return Disconnected(ews_code="NoError")

    def play_on_phone(
        self,
        item_id: str,
        dial_string: str,
        *,
        request_id: str,
        change_key: str | None = None,
        mailbox: str | None = None,
    ) -> PlacedCall:
        self.calls.append(("play_on_phone", item_id, mailbox))
        return PlacedCall(call_id="call-1", ews_code="NoError")

    def get_call_information(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> CallInformation:
        self.calls.append(("get_call_information", call_id, mailbox))
        return CallInformation(
            state="Connected",
            connection_failure_cause="None",
            sip_response_code=None,
            sip_response_text=None,
            ews_code="NoError",
        )

    @property
    def mailboxes(self) -> list[str | None]:
        return [mailbox for _, _, mailbox in self.calls]


def call_path(ews_id: str = "abc", subject: str | None = "user-1") -> str:
    """Return the path of the call EWS_ID as the gateway (keyed with CALL_ID_KEY) issued it to
    SUBJECT: callers may act only on calls issued to them (gateway.guards.ownership)."""
    call_id = CallIds(CALL_ID_KEY.encode()).issue(ews_id, Caller(subject=subject))
    return "/calls/" + quote(call_id, safe="")


def jwt_environ(**extra: str) -> dict[str, str]:
    """Return the environment of a gateway checking JWTs from ISSUER for AUDIENCE."""
    return {
        "EWS_URL": EXCHANGE_URL,
        "GATEWAY_AUTH": "jwt",
        "GATEWAY_JWT_ISSUER": ISSUER,
        "GATEWAY_JWT_AUDIENCE": AUDIENCE,
        "GATEWAY_CALL_ID_KEY": CALL_ID_KEY,
        **extra,
    }


def build_app(config: Config, exchange: RecordingExchange) -> Flask:
    """Build the gateway with the recording Exchange and a fresh registry."""
    return create_app(config, ews=cast(EwsClient, exchange), registry=CollectorRegistry())


def client_for(environ: dict[str, str], exchange: RecordingExchange) -> FlaskClient:
    """Build the gateway from an environment and return its test client."""
    return build_app(Config.from_env(environ), exchange).test_client()


class JwksEndpoint:
    """An identity provider's JWKS URL on loopback, counting how often it is fetched."""

    def __init__(self, document: dict[str, Any] | bytes) -> None:
        self.document = document
        self.status = 200
        self._hits = 0
        self._lock = threading.Condition()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body, status = endpoint._answer()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                """Stay quiet."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,))

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/.well-known/jwks.json"

    @property
    def hits(self) -> int:
        with self._lock:
            return self._hits

    def wait_for_hits(self, hits: int) -> int:
        """Wait until the endpoint was fetched HITS times (a refresh runs on its own thread);
        return the count, which is lower only if that never happened within HOLD_LIMIT_S."""
        with self._lock:
            self._lock.wait_for(lambda: self._hits >= hits, HOLD_LIMIT_S)
            return self._hits

    def _answer(self) -> tuple[bytes, int]:
        with self._lock:
            self._hits += 1
            self._lock.notify_all()
            document, status = self.document, self.status
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        return body, status

    def __enter__(self) -> JwksEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class KeySetSource:
    """Stands in for fetching the JWKS URL: answers `document` (or raises `failure`), at once
    or, after hold(), only once released; counts its fetches."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.failure: Exception | None = None
        self.fetches = 0
        self.fetching = threading.Event()
        self.answered = threading.Event()
        self._released = threading.Event()
        self._released.set()
        self._lock = threading.Lock()

    def hold(self) -> None:
        """Make the next fetches hang, as an identity provider that stopped answering."""
        self._released.clear()
        self.fetching.clear()
        self.answered.clear()

    def release(self) -> None:
        self._released.set()

    def __call__(self) -> jwt.PyJWKSet:
        with self._lock:
            self.fetches += 1
        self.fetching.set()
        try:
            if not self._released.wait(HOLD_LIMIT_S):
                raise TimeoutError("the test never released the fetch")
            if self.failure is not None:
                raise self.failure
            return jwt.PyJWKSet.from_dict(self.document)
        finally:
            self.answered.set()


def jwks(*keys: SigningKey, extra: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """Return a JWKS document holding the public halves of the keys, then `extra` entries."""
    return {"keys": [key.public_jwk() for key in keys] + list(extra)}


@dataclass
class Clock:
    """A monotonic clock a test moves by hand (stands in for gateway.guards.callers' `time`)."""

    now: float = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def close_upstream(app: Flask) -> None:
    """Close the pooled connections of the EWS client create_app built, so no socket outlives
    the test (the client has no public close; its transport does)."""
    transport = getattr(app.extensions["gateway"].ews, "_transport", None)
    close = getattr(transport, "close", None)
    if callable(close):
        close()


def access_control_headers(headers: Iterable[tuple[str, str]]) -> Iterator[str]:
    """Yield the names of the CORS response headers among these."""
    return (name for name, _ in headers if name.lower().startswith("access-control-"))
