"""Shared state on Redis (GATEWAY_REDIS_URL): the one client every replica's features use.

Every command is bounded by short timeouts and never retried: a slow or absent Redis must
cost a request milliseconds, not seconds. What each feature does while Redis is unreachable
is its own decision (gateway.guards.quotas fails open, gateway.guards.idempotency fails closed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

# Loopback or a nearby Redis answers in well under a millisecond; these bound the bad case.
CONNECT_TIMEOUT_S = 0.25
COMMAND_TIMEOUT_S = 0.25


@dataclass(frozen=True)
class RedisSettings:
    """Where shared state lives: GATEWAY_REDIS_URL and its secret and CA bundle."""

    url: str | None
    password: str | None = None
    ca_bundle: str | None = None


def connect(config: RedisSettings) -> redis.Redis | None:
    """Return a client for GATEWAY_REDIS_URL, or None when unset.

    `rediss://` speaks TLS and checks Redis's certificate against the system CAs, or
    GATEWAY_REDIS_CA_BUNDLE.

    Nothing is sent yet: the first command opens the connection, so a gateway starts and
    serves (as documented per feature) while Redis is down.
    """
    if config.url is None:
        return None
    tls: dict[str, Any] = {}
    if config.url.startswith("rediss:") and config.ca_bundle:
        tls["ssl_ca_certs"] = config.ca_bundle
    client: redis.Redis = redis.Redis.from_url(
        config.url,
        password=config.password or None,
        **tls,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=COMMAND_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )
    return client
