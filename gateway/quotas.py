"""Per-caller rate limits (GATEWAY_RATE_LIMIT_CALLS, GATEWAY_RATE_LIMIT_REQUESTS).

Fixed windows counted by the limits library in its storage: Redis when GATEWAY_REDIS_URL is
set (one Lua INCR+EXPIRE round trip per charge, shared by every replica), else this
process's memory. The answer carries the IETF httpapi draft's fields
(draft-ietf-httpapi-ratelimit-headers-10): `RateLimit-Policy: "calls";q=10;w=60` and
`RateLimit: "calls";r=7`, plus `;t=` seconds to reset and `Retry-After` once refused.

Redis unreachable: limits fail OPEN. The request goes on unlimited, a warning is logged (at
most every 10 s per process) and `ews_gateway_redis_errors_total{feature="rate_limit"}`
counts every failure; the dial policy still holds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import limits
from limits.errors import StorageError
from limits.storage import MemoryStorage, RedisStorage, Storage
from redis import ConnectionPool

from gateway.errors import RateLimited

LOG = logging.getLogger("gateway")
KEY_PREFIX = "ews-gateway:limits"
CALLS = "calls"
REQUESTS = "requests"
WARN_EVERY_S = 10.0


@dataclass(frozen=True)
class Charge:
    """What one charge against a quota left: the draft's RateLimit-Policy and RateLimit items."""

    policy: str
    remaining: str


class Quotas:
    """Count each caller's requests and placed calls against the configured limits."""

    def __init__(
        self,
        storage: Storage,
        *,
        calls: str | None,
        requests: str | None,
        on_storage_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._storage = storage
        self._items = {
            name: limits.parse(text)
            for name, text in ((CALLS, calls), (REQUESTS, requests))
            if text is not None
        }
        self._on_storage_error = on_storage_error
        self._warned_at = float("-inf")

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
        key = item.key_for(quota, owner)
        window_s = item.get_expiry()
        policy = f'"{quota}";q={item.amount};w={window_s}'
        try:
            count = self._storage.incr(key, window_s)
            if count <= item.amount:
                return Charge(policy, f'"{quota}";r={item.amount - count}')
            reset_s = max(1, math.ceil(self._storage.get_expiry(key) - time.time()))
        except StorageError as error:
            self._storage_failed(quota, error)
            return None
        raise RateLimited(
            f"this caller's {quota} limit ({item.amount} per {window_s} s) is spent; "
            f"retry in {reset_s} s",
            retry_after_s=reset_s,
            headers={"RateLimit-Policy": policy, "RateLimit": f'"{quota}";r=0;t={reset_s}'},
        )

    def _storage_failed(self, quota: str, error: StorageError) -> None:
        self._on_storage_error()
        now = time.monotonic()
        # Every failure is counted; the warning, at most every WARN_EVERY_S, not per request.
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            LOG.warning(
                "rate limit storage unreachable; letting requests through unlimited",
                extra={"quota": quota, "error": type(error.storage_error).__name__},
            )


def build_storage(redis_url: str | None, pool: ConnectionPool | None) -> Storage:
    """Return Redis storage sharing the gateway's connection pool, or memory without Redis."""
    if redis_url is None or pool is None:
        return MemoryStorage(wrap_exceptions=True)
    return RedisStorage(
        redis_url, connection_pool=pool, key_prefix=KEY_PREFIX, wrap_exceptions=True
    )
