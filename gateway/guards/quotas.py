"""Per-caller rate limits (GATEWAY_RATE_LIMIT_CALLS, GATEWAY_RATE_LIMIT_REQUESTS).

Fixed windows counted by the limits library in its storage: Redis when GATEWAY_REDIS_URL is
set (one Lua INCRBY+EXPIRE round trip per charge, shared by every replica); else, under
`serve`, the instance's embedded store (gateway.guards.embeddedstore: one SQLite transaction
per charge, shared by the instance's workers); else this process's memory (a single process,
such as the tests'). The answer carries the IETF httpapi draft's fields
(draft-ietf-httpapi-ratelimit-headers-10): `RateLimit-Policy: "calls";q=10;w=60` and
`RateLimit: "calls";r=7`, plus `;t=` seconds to reset and `Retry-After` once refused.

Leases. A round trip to Redis costs more CPU than the rest of a request (benchmarks/RESULTS.md),
so against shared storage each process takes a caller's units in leases: one INCRBY counts a
block of units, which this process then spends without asking again. A lease is sized to cover
about LEASE_TARGET_S of the caller's own recent requests on this process, at most double the
last one and at most LEASE_MAX_SHARE of the quota, so a quota under 200 per window is counted
a unit at a time. Units are counted before they are spent, so the replicas together never
admit more than the quota in a window; unspent units of a lease are dropped after LEASE_TTL_S
and stay counted, so a caller may get up to one lease per process fewer. A lease taken just
before its window resets can be spent up to LEASE_TTL_S into the next one. Envoy's rate limit
quota service (RLQS) hands quota to its clients the same way. The embedded store needs no
leases: a charge there costs 16 to 50 µs, a few hundredths of a request's CPU at most and
less than a Redis round trip, so every unit is counted as it is spent and the instance's
quota holds exactly.

Once a caller is refused, the refusal is remembered until the window resets: an abusive
caller costs neither Redis nor this process a round trip per request.

Storage failing (Redis unreachable, the embedded store's disk full): limits fail OPEN. The
request goes on unlimited, a warning is logged (at most every 10 s per process) and
`on_storage_error` is called (for Redis, `ews_gateway_redis_errors_total{feature="rate_limit"}`
counts every failure); the dial policy still holds. A request storage has already counted past
the quota is refused even if reading the window's reset then fails. Each command to Redis is
sent once more on a fresh connection after a failover or a stale connection
(gateway.guards.sharedstate); a count sent again after its connection failed with no answer
may have been counted already, so a caller may lose a unit, never get one more.

The reset is read in milliseconds (PTTL, not TTL's seconds, which Redis rounds to the nearest)
and `Retry-After` and `t=` round it up, so a caller that waits as told finds the window reset.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import limits
import redis
from limits.errors import StorageError
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.typing import RedisClient

from gateway.errors import RateLimited
from gateway.guards.embeddedstore import EmbeddedStore, SqliteStorage
from gateway.guards.sharedstate import FreshConnectionRetry, failure_reason

LOG = logging.getLogger("gateway")
KEY_PREFIX = "ews-gateway:limits"
CALLS = "calls"
REQUESTS = "requests"
WARN_EVERY_S = 10.0
# A lease covers about this long of a caller's requests on one process (shared storage only).
LEASE_TARGET_S = 0.1
# ... is at most this share of the quota, so small quotas are counted exactly ...
LEASE_MAX_SHARE = 0.01
# ... and its unspent units are dropped this long after it was taken.
LEASE_TTL_S = 1.0


@dataclass(frozen=True)
class Charge:
    """What one charge against a quota left: the draft's RateLimit-Policy and RateLimit items."""

    policy: str
    remaining: str


@dataclass
class Lease:
    """Units of one caller's quota counted in storage and not yet spent by this process."""

    left: int
    size: int
    taken_at: float  # time.monotonic() seconds
    remaining: int  # what storage had left for every replica once this lease was counted


class Quotas:
    """Count each caller's requests and placed calls against the configured limits."""

    def __init__(
        self,
        storage: Storage,
        *,
        calls: str | None,
        requests: str | None,
        lease_target_s: float = 0.0,
        on_storage_error: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._storage = storage
        self._items = {
            name: limits.parse(text)
            for name, text in ((CALLS, calls), (REQUESTS, requests))
            if text is not None
        }
        self._lease_target_s = lease_target_s
        self._on_storage_error = on_storage_error
        self._clock = clock
        self._warned_at = float("-inf")
        self._lock = threading.Lock()
        self._leases: dict[tuple[str, str], Lease] = {}
        self._refused_until: dict[tuple[str, str], float] = {}
        self._next_sweep = float("-inf")

    def limits(self, quota: str) -> bool:
        """Whether QUOTA (`calls` or `requests`) is limited at all."""
        return quota in self._items

    def charge(self, quota: str, owner: str) -> Charge | None:
        """Count one against OWNER's QUOTA; raise RateLimited once it is spent.

        Returns None when the quota is off or its storage cannot be reached (fail open).
        """
        item = self._items.get(quota)
        if item is None:
            return None
        window_s = item.get_expiry()
        policy = f'"{quota}";q={item.amount};w={window_s}'
        slot = (quota, owner)
        now = self._clock()
        with self._lock:
            remaining = self._spend_leased(slot, now)
            refused_until = self._refused_until.get(slot, now)
            size = self._lease_size(item.amount, self._leases.get(slot), now)
        if remaining is not None:
            return Charge(policy, f'"{quota}";r={remaining}')
        if now < refused_until:
            raise _refusal(quota, item.amount, window_s, policy, refused_until - now)
        key = item.key_for(quota, owner)
        try:
            count = self._storage.incr(key, window_s, amount=size)
            granted = min(size, item.amount - (count - size))
        except StorageError as error:
            self._restart_lease(slot, now)
            self._storage_failed(quota, error)
            return None
        if granted >= 1:
            remaining = self._keep_lease(slot, granted, max(0, item.amount - count), now)
            return Charge(policy, f'"{quota}";r={remaining}')
        reset_s = self._reset_after_refusal(quota, key, count)
        with self._lock:
            self._sweep(now)
            self._refused_until[slot] = now + reset_s
        raise _refusal(quota, item.amount, window_s, policy, reset_s)

    def _reset_after_refusal(self, quota: str, key: str, count: int) -> float:
        """Seconds to remember a refusal at COUNT: until the window resets, 0 when unsure."""
        try:
            # Remembered until the window resets, even within a second (Retry-After says 1 s).
            reset_s = self._storage.get_expiry(key) - time.time()
            # Read after the reset: a count below ours means that window has gone meanwhile,
            # and the reset read may be the next one's. (Counts only grow within a window.)
            if self._storage.get(key) < count:
                return 0.0
        except StorageError as error:
            # Storage counted the quota spent: refuse, but remember nothing without the reset.
            self._storage_failed(quota, error)
            return 0.0
        return reset_s

    def _spend_leased(self, slot: tuple[str, str], now: float) -> int | None:
        """Spend one unit of SLOT's lease; return what is left to report, None with no lease."""
        lease = self._leases.get(slot)
        if lease is None or lease.left == 0 or now - lease.taken_at >= LEASE_TTL_S:
            return None
        lease.left -= 1
        return lease.remaining + lease.left

    def _lease_size(self, amount: int, last: Lease | None, now: float) -> int:
        """Units to count in storage at once: the caller's recent rate here times the target."""
        if last is None or self._lease_target_s == 0:
            return 1
        spent = last.size - last.left
        elapsed = max(now - last.taken_at, 1e-6)
        wanted = math.ceil(spent / elapsed * self._lease_target_s)
        return max(1, min(wanted, 2 * last.size, int(amount * LEASE_MAX_SHARE)))

    def _restart_lease(self, slot: tuple[str, str], now: float) -> None:
        """Lease SLOT's units from one again after a failed count.

        A timeout may come after storage counted the lease, and the request then goes through
        uncounted (fail open): leasing one unit at a time until storage answers again, a
        brownout strands at most one unit per request it lets through, not a lease each.
        """
        with self._lock:
            lease = self._leases.get(slot)
            if lease is not None and (lease.left == 0 or now - lease.taken_at >= LEASE_TTL_S):
                del self._leases[slot]

    def _keep_lease(self, slot: tuple[str, str], granted: int, remaining: int, now: float) -> int:
        """Keep GRANTED units less the one spent now; return what is left to report."""
        if self._lease_target_s == 0:
            return remaining  # counted a unit at a time: nothing to keep
        with self._lock:
            self._sweep(now)
            lease = Lease(granted - 1, granted, now, remaining)
            other = self._leases.get(slot)
            if other is not None and other.left > 0 and now - other.taken_at < LEASE_TTL_S:
                # Another thread's lease, taken meanwhile: its units are counted, keep them too.
                lease.left += other.left
                lease.size += other.size
            self._leases[slot] = lease
            return remaining + lease.left

    def _sweep(self, now: float) -> None:
        """Forget expired leases and refusals, at most once per LEASE_TTL_S."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + LEASE_TTL_S
        self._leases = {
            slot: lease
            for slot, lease in self._leases.items()
            if now - lease.taken_at < 2 * LEASE_TTL_S
        }
        self._refused_until = {
            slot: until for slot, until in self._refused_until.items() if until > now
        }

    def _storage_failed(self, quota: str, error: StorageError) -> None:
        self._on_storage_error()
        now = time.monotonic()
        # Every failure is counted; the warning, at most every WARN_EVERY_S, not per request.
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            LOG.warning(
                "rate limit storage unreachable; letting requests through unlimited",
                extra={
                    "quota": quota,
                    "error": type(error.storage_error).__name__,
                    "reason": failure_reason(error.storage_error),
                },
            )


def _refusal(quota: str, amount: int, window_s: int, policy: str, reset_s: float) -> RateLimited:
    """The 429 for a spent quota that resets in RESET_S seconds (rounded up, at least 1)."""
    seconds = max(1, math.ceil(reset_s))
    return RateLimited(
        f"this caller's {quota} limit ({amount} per {window_s} s) is spent; retry in {seconds} s",
        retry_after_s=seconds,
        headers={"RateLimit-Policy": policy, "RateLimit": f'"{quota}";r=0;t={seconds}'},
    )


def build_storage(
    client: redis.Redis | None,
    on_error: Callable[[], None],
    embedded: EmbeddedStore | None = None,
) -> Storage:
    """Return storage on the gateway's Redis client; without Redis, the embedded store's
    counters if there is one, else memory."""
    if client is None:
        if embedded is not None:
            return SqliteStorage(store=embedded, wrap_exceptions=True)
        return MemoryStorage(wrap_exceptions=True)
    return SharedRedisStorage(client, FreshConnectionRetry("rate_limit", on_error))


class SharedRedisStorage(RedisStorage):
    """The limits library's Redis storage on the gateway's client (its pool, timeouts and
    failover handling), each command through RETRY, the reset read in milliseconds."""

    def __init__(self, client: redis.Redis, retry: FreshConnectionRetry) -> None:
        self._client = client
        self._retry = retry
        # The URL only names the kind of storage: every command goes through get_connection.
        super().__init__(
            "redis://",
            connection_pool=client.connection_pool,
            key_prefix=KEY_PREFIX,
            wrap_exceptions=True,
        )

    def get_connection(self, readonly: bool = False) -> RedisClient:
        return cast(RedisClient, self._client)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        name = self.prefixed_key(key)
        return int(self._retry(lambda: self.lua_incr_expire([name], [expiry, amount])))

    def get(self, key: str) -> int:
        name = self.prefixed_key(key)
        return int(cast(bytes | None, self._retry(lambda: self._client.get(name))) or 0)

    def get_expiry(self, key: str) -> float:
        """When KEY's window resets (time.time() seconds): Redis drops a key the millisecond
        after its PTTL reaches 0. A key without one (gone, or no expiry) resets now."""
        name = self.prefixed_key(key)
        left_ms = cast(int, self._retry(lambda: self._client.pttl(name)))
        return time.time() + (left_ms + 1) / 1000 if left_ms >= 0 else time.time()
