"""Idempotent call creation: `POST /calls` with an `Idempotency-Key` (draft-ietf-httpapi-
idempotency-key-header-06).

A key belongs to its caller and lives 24 hours. The first request with a key claims it and
dials; the same key with the same body later gets the first answer again (no second
PlayOnPhone); while the first is still running, duplicates wait for its answer and get `409`
if it takes longer than Exchange's deadline, or at once when every slot of the worker's
bulkhead is taken (a waiting duplicate holds one); the same key with another body is `422`.

Outcomes: a call placed (201) is kept and replayed. A failure that proves no call was placed
(Exchange said an error, the gateway refused before dialing, Exchange could not be reached
before the request was sent: no name, a refused connection or TLS handshake) frees the key,
so a retry with it dials afresh. A failure whose outcome is unknown (timeout after the
request was sent, a broken or unreadable answer, an HTTP 500 error page, a crash) may have
placed a call: the key then answers `409` (`idempotency-outcome-unknown`) for its 24 hours
and is never replayed as a success; the client checks the phone and, to dial again, sends a
new key.

Storage is Redis with GATEWAY_REDIS_URL (every replica); else, under `serve`, the instance's
embedded store (gateway.guards.embeddedstore: every worker of the instance); else this
process's memory. Either store unavailable: requests with a key fail CLOSED with `503`
(dialing without the key's protection could dial twice); requests without one never touch it.
A claim whose answer Redis lost is taken back at once if Redis answers that, so the key is
free for the retry.

After a failover or on a stale connection each Redis command is sent once more on a fresh one
(gateway.guards.sharedstate), so it may run twice; every command here allows that. A claim's
record carries a random token of its request, so a claim that finds its own record there knows
its first try stored it, and dials; a key is freed only by compare and delete of that record,
never by a plain DEL that a second run could aim at another request's claim.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from gateway.errors import (
    ExchangeAuthFailed,
    ExchangeBadAnswer,
    ExchangeTimeout,
    ExchangeUnreachable,
    GatewayError,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    IdempotencyOutcomeUnknown,
    InvalidRequest,
    SharedStateUnavailable,
)
from gateway.guards.sharedstate import FreshConnectionRetry

KEY_TTL_S = 24 * 3600
MAX_KEY_CHARS = 255
POLL_S = 0.05
KEY_PREFIX = "ews-gateway:idempotency:"
# Failures after which Exchange may have placed the call although the gateway cannot tell.
OUTCOME_UNKNOWN = (ExchangeTimeout, ExchangeBadAnswer, ExchangeUnreachable)
PENDING, DONE, UNKNOWN = "pending", "done", "unknown"
# RFC 8941 §3.3.3: a string is quoted; inside, '"' and '\' come only escaped.
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_SF_ESCAPE = re.compile(r'\\(["\\])')


@dataclass(frozen=True)
class StoredAnswer:
    """The first answer to a key: status, JSON body, Location; `replayed` on later requests."""

    status: int
    body: dict[str, Any]
    location: str
    replayed: bool = False


class KeyStore(Protocol):
    """Where claimed keys live; every method may raise SharedStateUnavailable."""

    def claim(self, key: str, record: str, ttl_s: int) -> str | None:
        """Store RECORD under KEY if it is free and return None, else return what is there."""

    def get(self, key: str) -> str | None:
        """Return the record under KEY, if any."""

    def put(self, key: str, record: str, ttl_s: int) -> None:
        """Store RECORD under KEY, replacing what is there."""

    def release_own(self, key: str, record: str) -> None:
        """Forget KEY if it still holds RECORD (compare and delete)."""


def parse_key(header: str) -> str:
    """Return the key of an Idempotency-Key header: a structured-field string (`"abc"`, with
    `\\"` and `\\\\` escapes, RFC 8941 §3.3.3); a bare value is accepted too. Raises
    InvalidRequest unless the key is 1 to 255 printable ASCII characters without spaces."""
    value = header.strip()
    quoted = _SF_STRING.fullmatch(value)
    if quoted:
        value = _SF_ESCAPE.sub(r"\1", quoted[1])
    elif '"' in value or "\\" in value:
        raise InvalidRequest('Idempotency-Key must be a structured-field string: "key"')
    if not 1 <= len(value) <= MAX_KEY_CHARS or not all(" " < c <= "~" for c in value):
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable ASCII characters"
        )
    return value


class IdempotentCalls:
    """Run `place` at most once per (caller, key) and answer duplicates from its result."""

    def __init__(
        self,
        store: KeyStore,
        *,
        wait_s: float,
        wait_slot: Callable[[], contextlib.AbstractContextManager[bool]] = lambda: (
            contextlib.nullcontext(True)
        ),
    ) -> None:
        self._store = store
        self._wait_s = wait_s
        # A duplicate waits holding a slot of the worker's bulkhead, as the call it waits on
        # does: waiting duplicates cannot take the threads kept for probes.
        self._wait_slot = wait_slot

    def place(
        self, owner: str, key: str, fingerprint: str, place: Callable[[], StoredAnswer]
    ) -> StoredAnswer:
        """StoredAnswer the request with KEY from OWNER whose body hashes to FINGERPRINT."""
        store_key = KEY_PREFIX + hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()
        # The random claim makes this request's record its own, to free it after a lost answer.
        pending = json.dumps(
            {
                "state": PENDING,
                "fingerprint": fingerprint,
                "startedAt": time.time(),
                "claim": secrets.token_hex(8),
            }
        )
        deadline = time.monotonic() + self._wait_s
        while True:
            existing = self._claim(store_key, pending)
            if existing is None:
                return self._first(store_key, pending, fingerprint, place)
            record = self._wait(store_key, existing, deadline)
            if record is not None:
                return _answer_from(record, fingerprint, stale_after_s=self._wait_s)

    def _claim(self, store_key: str, pending: str) -> str | None:
        try:
            return self._store.claim(store_key, pending, KEY_TTL_S)
        except SharedStateUnavailable:
            # The claim may have been stored with only its answer lost (a Redis timeout): free
            # it if it is this request's, or the key would look in use, then its outcome
            # unknown, for 24 hours although nothing was dialled.
            with contextlib.suppress(SharedStateUnavailable):
                self._store.release_own(store_key, pending)
            raise

    def _first(
        self, store_key: str, pending: str, fingerprint: str, place: Callable[[], StoredAnswer]
    ) -> StoredAnswer:
        try:
            answer = place()
        except GatewayError as error:
            if may_have_dialled(error):
                self._keep(store_key, {"state": UNKNOWN, "fingerprint": fingerprint})
            else:
                # Nothing was dialled: a retry with this key may dial.
                self._forget(store_key, pending)
            raise
        except Exception:
            self._keep(store_key, {"state": UNKNOWN, "fingerprint": fingerprint})
            raise
        record = {"state": DONE, "fingerprint": fingerprint, **answer.__dict__}
        self._keep(store_key, record)
        return answer

    def _wait(self, store_key: str, existing: str, deadline: float) -> dict[str, Any] | None:
        """Wait for the first request on a free slot; with none, its pending record (a 409)."""
        with self._wait_slot() as held:
            if held:
                return self._settled(store_key, existing, deadline)
        record: dict[str, Any] = json.loads(existing)
        return record

    def _settled(self, store_key: str, existing: str, deadline: float) -> dict[str, Any] | None:
        """Wait while the first request runs; None once its key was freed (claim again)."""
        record: dict[str, Any] = json.loads(existing)
        while record["state"] == PENDING:
            if time.monotonic() >= deadline:
                return record
            time.sleep(POLL_S)
            current = self._store.get(store_key)
            if current is None:
                return None
            record = json.loads(current)
        return record

    def _keep(self, store_key: str, record: dict[str, Any]) -> None:
        # A failure here leaves the key pending: duplicates then get 409, never a second call.
        with contextlib.suppress(SharedStateUnavailable):
            self._store.put(store_key, json.dumps(record), KEY_TTL_S)

    def _forget(self, store_key: str, pending: str) -> None:
        with contextlib.suppress(SharedStateUnavailable):
            self._store.release_own(store_key, pending)


def may_have_dialled(error: GatewayError) -> bool:
    """Whether PlayOnPhone may have placed a call although it ended in ERROR.

    Yes after a timeout, a cut or unreadable answer, an HTTP 500 without a SOAP answer (an
    IIS error page can follow whatever EWS did), or a final answer whose authentication the
    gateway refused (EWS had run); no when the request was never sent, or when
    Exchange or a front end said no in a way that comes before dialling (an EWS error code,
    401, 429, 503).
    """
    if error.before_sending:
        return False
    if isinstance(error, OUTCOME_UNKNOWN):
        return True
    if isinstance(error, ExchangeAuthFailed) and error.upstream_status is None:
        return True  # not a 401 but a refusal of Exchange's final answer (mutual auth): EWS ran
    return error.outcome == "http_error" and error.upstream_status == 500


def _answer_from(record: dict[str, Any], fingerprint: str, *, stale_after_s: float) -> StoredAnswer:
    if record["fingerprint"] != fingerprint:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was first used with another body; use a new key"
        )
    # Pending far past Exchange's deadline: the process that dialled died mid-call.
    stale = record["state"] == PENDING and time.time() - record["startedAt"] > 2 * stale_after_s
    if record["state"] == UNKNOWN or stale:
        raise IdempotencyOutcomeUnknown(
            "the first request with this Idempotency-Key failed after reaching Exchange, so "
            "a call may have been placed; check before dialling again with a new key"
        )
    if record["state"] == PENDING:
        raise IdempotencyKeyInUse(
            "the first request with this Idempotency-Key has not finished; retry later",
            retry_after_s=1,
        )
    return StoredAnswer(record["status"], record["body"], record["location"], replayed=True)


def fingerprint(fields: dict[str, Any]) -> str:
    """Hash a request's meaning (its validated fields), not its bytes or key order."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class MemoryKeys:
    """Keys in this process's memory (a single process, outside `serve`): duplicates sent to
    another process are not recognised."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._records: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def claim(self, key: str, record: str, ttl_s: int) -> str | None:
        with self._lock:
            current = self._live(key)
            if current is not None:
                return current
            self._records[key] = (record, self._clock() + ttl_s)
            return None

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._live(key)

    def put(self, key: str, record: str, ttl_s: int) -> None:
        with self._lock:
            self._records[key] = (record, self._clock() + ttl_s)

    def release_own(self, key: str, record: str) -> None:
        with self._lock:
            if self._live(key) == record:
                del self._records[key]

    def _live(self, key: str) -> str | None:
        now = self._clock()
        if len(self._records) > 10_000:  # bounded memory: drop what has expired
            self._records = {k: v for k, v in self._records.items() if v[1] > now}
        entry = self._records.get(key)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]


class RedisKeys:
    """Keys in Redis, shared by every replica: SET NX claims, so one request dials."""

    def __init__(self, client: redis.Redis, on_error: Callable[[], None]) -> None:
        self._client = client
        self._on_error = on_error
        self._retry = FreshConnectionRetry("idempotency", on_error)
        # Compare and delete in one step, as Redis's own lock-release pattern does.
        self._delete_if_equal = client.register_script(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end"
            " return 0"
        )

    def claim(self, key: str, record: str, ttl_s: int) -> str | None:
        if self._call(lambda: self._client.set(key, record, nx=True, ex=ttl_s)):
            return None
        existing = self.get(key)
        if existing == record:
            return None  # stored by a first try whose answer was lost: this claim is ours
        return existing or self.claim(key, record, ttl_s)

    def get(self, key: str) -> str | None:
        value = self._call(lambda: self._client.get(key))
        return None if value is None else bytes(value).decode()

    def put(self, key: str, record: str, ttl_s: int) -> None:
        self._call(lambda: self._client.set(key, record, ex=ttl_s))

    def release_own(self, key: str, record: str) -> None:
        self._call(lambda: self._delete_if_equal(keys=[key], args=[record]))

    def _call(self, command: Callable[[], Any]) -> Any:
        try:
            return self._retry(command)
        except redis.RedisError as error:
            self._on_error()
            self._retry.warn("idempotency keys unreachable; answering 503", error)
            raise SharedStateUnavailable(
                "idempotency keys cannot be checked right now; retry shortly",
                retry_after_s=1,
            ) from None
