"""Shared state on Redis (GATEWAY_REDIS_URL): the one client every replica's features use.

Every command is bounded by short timeouts. What each feature does while Redis is unreachable
is its own decision (gateway.guards.quotas fails open, gateway.guards.idempotency fails closed).

Pooled connections outlive what they were opened to. After a failover behind the same address
(managed Redis, a Kubernetes Service or a DNS name moved to the promoted replica) the demoted
primary stays up and answers every write `-READONLY`; a node still reading its data answers
`-LOADING`, a replica cut off from its primary `-MASTERDOWN`; none of them ran the command. And
a NAT or load balancer may forget an idle flow, silently or with a reset. So connections use
TCP keepalive (middleboxes keep the flow, a vanished peer is noticed), a connection idle longer
than HEALTH_CHECK_INTERVAL_S is PINGed before reuse, and each feature sends its commands
through a FreshConnectionRetry: after one of those three answers, or a failure of a reused
connection (one that has answered before) with no answer, every connection opened until then is
closed before its next use and the command is sent once more, on a fresh connection. A fresh
connection's failure is final: Redis itself is away. Each try is bounded by the timeouts, so a
command takes at most three of them.

A command sent again after a reused connection failed with no answer may have run once
already; the features send only commands for which that changes nothing, or errs on the safe
side (a quota unit counted twice).

With `redis+sentinel://host:port[,host:port...]/service[/db]`, Sentinel names the primary:
every new connection asks it, and a pooled one is reused only while the primary Sentinel names
(asked at most every SENTINEL_CHECK_S) is still the one it leads to. Sentinel demotes an old
primary that stayed up only when it next looks at it, up to 10 s after the switch, and drops
what was written to it meanwhile; the gateway stops writing there within SENTINEL_CHECK_S.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import AbstractConnection
from redis.exceptions import AuthorizationError, MasterDownError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

T = TypeVar("T")
LOG = logging.getLogger("gateway")
# Loopback or a nearby Redis answers in well under a millisecond; these bound the bad case.
CONNECT_TIMEOUT_S = 0.25
COMMAND_TIMEOUT_S = 0.25
# A connection idle this long is PINGed before it carries a command: well below the idle
# timeouts of NATs and load balancers (minutes), so a forgotten flow fails a PING, not a write.
HEALTH_CHECK_INTERVAL_S = 10
# TCP keepalive: the first probe after 30 s idle keeps a middlebox's flow; 3 unanswered probes
# 10 s apart close a connection whose peer vanished, so its next use fails at once.
KEEPALIVE_OPTIONS = {
    option: value
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if (option := getattr(socket, name, None)) is not None
}
SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
# How often a worker asks Sentinel whether the primary moved, before reusing a connection.
SENTINEL_CHECK_S = 1.0
# One warning per feature, reason and process this often; every failure is counted.
WARN_EVERY_S = 10.0
# Answers of a node that is not (or not yet) a usable primary: the command did not run.
NOT_PRIMARY = (
    (redis.ReadOnlyError, "readonly"),
    (redis.BusyLoadingError, "loading"),
    (MasterDownError, "masterdown"),
)
STALE_CONNECTION = "stale_connection"


@dataclass(frozen=True)
class RedisSettings:
    """Where shared state lives: GATEWAY_REDIS_URL, its secrets and CA bundle."""

    url: str | None
    password: str | None = None
    ca_bundle: str | None = None
    sentinel_password: str | None = None


@dataclass(frozen=True)
class SentinelAddress:
    """A `redis+sentinel://` URL: the Sentinels to ask, the service they watch, the database."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None


class StaleConnection(redis.ConnectionError):
    """A connection that no longer leads to a usable primary; a fresh one may."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"stale Redis connection ({reason})")
        self.reason = reason


def connect(config: RedisSettings) -> redis.Redis | None:
    """Return a client for GATEWAY_REDIS_URL, or None when unset.

    `rediss://` speaks TLS and checks Redis's certificate against the system CAs, or
    GATEWAY_REDIS_CA_BUNDLE.

    Nothing is sent yet: the first command opens the connection, so a gateway starts and
    serves (as documented per feature) while Redis is down.
    """
    if config.url is None:
        return None
    options: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": COMMAND_TIMEOUT_S,
        "socket_keepalive": True,
        "socket_keepalive_options": KEEPALIVE_OPTIONS,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        # redis-py retries nothing itself: FreshConnectionRetry decides, per feature.
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        "generation": _Generation(),
        "password": config.password or None,
    }
    if config.url.startswith(SENTINEL_SCHEME + ":"):
        return _sentinel_client(sentinel_address(config.url), config, options)
    if config.url.startswith("rediss:"):
        options["connection_class"] = _TlsConnection
        if config.ca_bundle:
            options["ssl_ca_certs"] = config.ca_bundle
    else:
        options["connection_class"] = _TcpConnection
    client: redis.Redis = redis.Redis.from_url(config.url, **options)
    return client


def _sentinel_client(
    address: SentinelAddress, config: RedisSettings, options: dict[str, Any]
) -> redis.Redis:
    asking = {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": COMMAND_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 0),
        "password": config.sentinel_password or None,
    }
    sentinel = Sentinel(
        list(address.sentinels),
        sentinel_kwargs=asking,
        connection_class=_SentinelConnection,
        primary_check=_Every(SENTINEL_CHECK_S),
        db=address.db,
        username=address.username,
        **options,
    )
    client: redis.Redis = sentinel.master_for(address.service)
    return client


def sentinel_address(url: str) -> SentinelAddress:
    """Read `redis+sentinel://[user@]host[:port][,host[:port]...]/service[/db]`.

    Raises ValueError saying what is wrong (never repeating a password).
    """
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    if ":" in userinfo:
        raise ValueError("must not carry a password; use GATEWAY_REDIS_PASSWORD_FILE")
    path = [segment for segment in parts.path.split("/") if segment]
    if parts.scheme != SENTINEL_SCHEME or not hosts or not 1 <= len(path) <= 2:
        raise ValueError("must be like redis+sentinel://sentinel-1:26379,sentinel-2:26379/mymaster")
    if len(path) == 2 and not (path[1].isascii() and path[1].isdigit()):
        raise ValueError(f"names database {path[1]!r}; a database is a number")
    if parts.query or parts.fragment:
        raise ValueError("takes no query or fragment")
    return SentinelAddress(
        tuple(_sentinel_host(item) for item in hosts.split(",")),
        unquote(path[0]),
        int(path[1]) if len(path) == 2 else 0,
        unquote(userinfo) or None,
    )


def _sentinel_host(item: str) -> tuple[str, int]:
    where = urlsplit(f"//{item}")
    try:
        port = where.port or SENTINEL_PORT
    except ValueError:
        raise ValueError(f"names a Sentinel with a bad port: {item!r}") from None
    if not where.hostname:
        raise ValueError(f"names a Sentinel without a host: {item!r}")
    return where.hostname, port


class FreshConnectionRetry:
    """Send one feature's commands, each once more on a fresh connection after it failed on a
    StaleConnection; count that failure (ON_ERROR) and log it, once per reason every
    WARN_EVERY_S. Any other failure, and the second try's, is the caller's to report."""

    def __init__(self, feature: str, on_error: Callable[[], None]) -> None:
        self._feature = feature
        self._on_error = on_error
        self._warned_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, command: Callable[[], T]) -> T:
        try:
            return command()
        except StaleConnection as failure:
            self._on_error()
            self.warn("Redis connection no longer usable; sent the command again", failure)
        return command()

    def warn(self, message: str, error: BaseException) -> None:
        """Log MESSAGE with the reason of ERROR, unless it was logged less than WARN_EVERY_S ago."""
        reason = failure_reason(error)
        now = time.monotonic()
        with self._lock:
            if now - self._warned_at.get(message + reason, -WARN_EVERY_S) < WARN_EVERY_S:
                return
            self._warned_at[message + reason] = now
        LOG.warning(message, extra={"feature": self._feature, "reason": reason})


def failure_reason(error: BaseException) -> str:
    """A word for why a Redis command failed, for the log (never a message from the wire)."""
    if isinstance(error, StaleConnection):
        return error.reason
    not_primary = _not_primary(error)
    if not_primary is not None:
        return not_primary
    if isinstance(error, redis.AuthenticationError | AuthorizationError):
        return "authentication"
    if isinstance(error, redis.TimeoutError):
        return "timeout"
    if isinstance(error, redis.ConnectionError):
        return "unreachable"
    return "error"


def _not_primary(error: BaseException) -> str | None:
    """The reason when ERROR (or the error it replaced) says the node is not a usable primary."""
    # redis-py's Sentinel connection turns READONLY into a ConnectionError raised while
    # handling it.
    for seen in (error, error.__context__):
        for kind, reason in NOT_PRIMARY:
            if isinstance(seen, kind):
                return reason
    return None


class _Generation:
    """Counts the signs that a pool's connections lead nowhere useful: a connection opened
    before the latest one is closed before its next use, idle or in use when it came."""

    def __init__(self) -> None:
        self.value = 0

    def advance(self) -> None:
        self.value += 1  # a lost increment under a race still moves it past every reader's


class _Recovering(AbstractConnection):
    """What the gateway adds to redis-py's connection classes: a failure that a fresh
    connection may not repeat becomes a StaleConnection, and every connection opened before it
    is replaced at its next use."""

    def __init__(self, *, generation: _Generation, **kwargs: Any) -> None:
        self._generation = generation
        self._opened_in = generation.value
        self._answered = False  # since its handshake: a reused connection
        self._handshaking = False
        super().__init__(**kwargs)

    def connect(self) -> None:
        if self._sock is not None and self._opened_in != self._generation.value:
            self.disconnect()
        super().connect()

    def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self._sock is not None:
            return
        self._opened_in = self._generation.value
        self._answered = False
        self._handshaking = True
        try:
            super().connect_check_health(check_health, retry_socket_connect)
        finally:
            self._handshaking = False

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            super().send_packed_command(command, check_health)
        except (redis.ConnectionError, redis.TimeoutError) as error:
            self._give_up_if_stale(error)
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            response = super().read_response(*args, **kwargs)
        except redis.ResponseError as error:
            self._give_up_if_stale(error)
            self._answered = not self._handshaking
            raise
        except (redis.ConnectionError, redis.TimeoutError) as error:
            self._give_up_if_stale(error)
            raise
        self._answered = not self._handshaking
        return response

    def _give_up_if_stale(self, error: redis.RedisError) -> None:
        """Raise StaleConnection for ERROR if a fresh connection may succeed where this failed."""
        if isinstance(error, StaleConnection):
            return  # the health check's PING failed, already said
        reason = _not_primary(error)
        if reason is None and self._answered and not isinstance(error, redis.ResponseError):
            reason = STALE_CONNECTION
        if reason is None:
            return
        self._generation.advance()
        self.disconnect()
        raise StaleConnection(reason) from error


class _TcpConnection(_Recovering, redis.Connection):
    pass


class _TlsConnection(_Recovering, redis.SSLConnection):
    pass


class _SentinelConnection(_Recovering, SentinelManagedConnection):
    """A connection to the primary Sentinel names, replaced once Sentinel names another."""

    def __init__(self, *, primary_check: _Every, **kwargs: Any) -> None:
        self._primary_check = primary_check
        super().__init__(**kwargs)

    def connect(self) -> None:
        if self._sock is not None and self._primary_check.due():
            try:
                primary = self.connection_pool.get_master_address()
            except redis.ConnectionError:
                primary = None  # no Sentinel answers: keep to the primary this leads to
            if primary is not None and primary != (self.host, self.port):
                self._generation.advance()
        super().connect()


class _Every:
    """Says when something done at most every INTERVAL_S seconds is due again."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._last = float("-inf")

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self._interval_s:
            return False
        self._last = now  # two threads may both find it due: one more question, no harm
        return True
