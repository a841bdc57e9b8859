"""The app factory: the only place where the gateway's parts are wired together."""

from __future__ import annotations

import re
import secrets
from importlib import resources
from urllib.parse import urlsplit

import redis
from flask import Flask
from flask_cors import CORS

from gateway import __version__
from gateway.api import callscreen, rendering, routes
from gateway.api.services import EXTENSION, Services, ServiceState
from gateway.api.streams import EventStreams
from gateway.config import Config
from gateway.exchange import auth
from gateway.exchange.check import CheckTarget, ExchangeCheck
from gateway.exchange.client import EwsClient, PhoneCalls, Transport
from gateway.exchange.resilience import Bulkhead, CircuitBreaker, ExchangePolicy
from gateway.exchange.transport import ConnectTrace, ExchangeTransport
from gateway.guards import sharedstate
from gateway.guards.audit import AuditTrail
from gateway.guards.callers import (
    ApiKeys,
    CallerAuthenticator,
    JwksKeys,
    JwtBearer,
    KeySource,
    OpenGateway,
    StaticKey,
)
from gateway.guards.dialing import ALLOW_ALL, DialPolicy
from gateway.guards.embeddedstore import EmbeddedStore, SqliteKeys
from gateway.guards.idempotency import IdempotentCalls, KeyStore, MemoryKeys, RedisKeys
from gateway.guards.ownership import CallIds
from gateway.guards.quotas import LEASE_TARGET_S, Quotas, build_storage
from gateway.guards.sharedstate import RedisSettings
from gateway.telemetry.exchange_calls import ExchangeTelemetry
from gateway.telemetry.metrics import Metrics, Registry

# POST /calls bodies are a few hundred bytes; refuse anything far larger unread.
MAX_BODY_BYTES = 16 * 1024


def create_app(
    config: Config,
    *,
    ews: PhoneCalls | None = None,
    registry: Registry | None = None,
    state: ServiceState | None = None,
) -> Flask:
    """Build the gateway's Flask app from validated configuration."""
    app = Flask("gateway")
    app.json = rendering.JsonProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    # An EWS id may contain "//"; merging slashes would change the id.
    app.url_map.merge_slashes = False
    metrics = Metrics(__version__, registry, multiprocess_dir=config.metrics_dir)
    # Calls to Exchange and duplicates waiting on one share a worker's slots, so neither can
    # take the threads kept for probes and /metrics.
    bulkhead = Bulkhead(config.upstream_slots)
    if ews is None:
        ews = EwsClient(
            build_transport(config),
            server_version=config.ews_server_version,
            anchor_mailbox=config.anchor_mailbox,
            impersonation_id=config.ews_impersonation_id,
            observer=ExchangeTelemetry(metrics),
            policy=build_policy(config, metrics, bulkhead),
        )
    state = state or ServiceState()
    state.streams = EventStreams(
        ews,
        poll_interval_s=config.events_poll_s,
        max_streams=config.events_max_streams,
        max_streams_per_caller=config.events_max_streams_per_caller,
        poll_threads=config.poll_threads,
        # The next poll is due within an interval; then Exchange has its deadline.
        first_state_wait_s=config.events_poll_s + config.ews_timeout_s + 1,
        observer=metrics,
    )
    app.extensions[EXTENSION] = build_services(
        config,
        metrics,
        bulkhead,
        ews=ews,
        state=state,
        openapi=resources.files("gateway").joinpath("openapi.yaml").read_bytes(),
    )
    routes.register(app)
    if config.demo_page:
        callscreen.register(app)
    if config.cors_origins:
        allow_browsers(app, config.cors_origins)
    return app


def allow_browsers(app: Flask, origins: tuple[str, ...]) -> None:
    """Answer CORS preflights and add CORS headers for exactly these origins."""
    CORS(
        app,
        # Compiled patterns are matched whole; a plain string may be taken for a regex.
        origins=[re.compile(re.escape(origin) + r"\Z", re.IGNORECASE) for origin in origins],
        methods=list(rendering.CORS_METHODS),
        allow_headers=list(rendering.CORS_ALLOWED_HEADERS),
        expose_headers=list(rendering.CORS_EXPOSED_HEADERS),
        max_age=rendering.CORS_MAX_AGE_S,
        vary_header=True,
    )


def build_services(
    config: Config,
    metrics: Metrics,
    bulkhead: Bulkhead,
    *,
    ews: PhoneCalls,
    state: ServiceState,
    openapi: bytes,
) -> Services:
    """Build the guards (call ownership, the dial policy, rate limits, idempotency, the audit
    trail) and hold them with the rest of what requests use."""
    assert state.streams is not None  # the factory starts them first
    client = sharedstate.connect(
        RedisSettings(
            config.redis_url,
            config.redis_password or None,
            config.redis_ca_bundle,
            config.redis_sentinel_password or None,
        )
    )
    # Without Redis, serve's workers share the embedded store it made for the instance; a
    # single process (tests, the Flask test client) keeps keys and counts in its memory.
    embedded = EmbeddedStore(config.state_dir) if client is None and config.state_dir else None
    return Services(
        ews=ews,
        metrics=metrics,
        state=state,
        streams=state.streams,
        callers=caller_authenticator(config),
        # Without a configured key (tests, single processes) ids hold for this app only;
        # serve makes one before its workers fork so they agree.
        call_ids=CallIds(config.call_id_key or secrets.token_bytes(32)),
        # No policy only outside serve, which refuses to start without one.
        dial_policy=DialPolicy(config.dial_allow or (ALLOW_ALL,)),
        quotas=Quotas(
            build_storage(
                client, on_error=lambda: metrics.redis_failed("rate_limit"), embedded=embedded
            ),
            calls=config.rate_limit_calls,
            requests=config.rate_limit_requests,
            # Leases save a Redis round trip per request; a count in the embedded store (16 to
            # 50 µs) or in memory is cheap enough to make for every unit.
            lease_target_s=LEASE_TARGET_S if client else 0.0,
            # Counted only for Redis; the embedded store's failures show in the warning.
            on_storage_error=(lambda: metrics.redis_failed("rate_limit")) if client else _no_op,
        ),
        # Duplicates wait as long as the first request may take (deadline plus a retry's wait).
        idempotency=IdempotentCalls(
            key_store(client, embedded, metrics),
            wait_s=config.ews_timeout_s + config.retry_max_back_off_s + 1,
            wait_slot=bulkhead.held,
        ),
        audit=AuditTrail(config.audit_dial_digits),
        openapi=openapi,
    )


def _no_op() -> None:
    """Report nothing."""


def key_store(
    client: redis.Redis | None, embedded: EmbeddedStore | None, metrics: Metrics
) -> KeyStore:
    """Return where idempotency keys live: Redis, else the embedded store, else memory."""
    if client is not None:
        return RedisKeys(client, on_error=lambda: metrics.redis_failed("idempotency"))
    if embedded is not None:
        return SqliteKeys(embedded)
    return MemoryKeys()


def build_policy(config: Config, metrics: Metrics, bulkhead: Bulkhead) -> ExchangePolicy:
    """Bound calls to Exchange: deadline, one retry, circuit breaker, bulkhead."""
    return ExchangePolicy(
        timeout_s=config.ews_timeout_s,
        max_retry_back_off_s=config.retry_max_back_off_s,
        breaker=CircuitBreaker(
            config.breaker_failures, config.breaker_cooldown_s, on_change=metrics.circuit_changed
        ),
        bulkhead=bulkhead,
    )


def build_transport(
    config: Config, *, authenticated: bool = True, trace: ConnectTrace | None = None
) -> ExchangeTransport:
    """Build the HTTP transport to Exchange with the configured credentials (or none)."""
    host = urlsplit(config.ews_url).hostname or ""
    credentials = auth.ExchangeCredentials()
    if authenticated:
        credentials = auth.ExchangeCredentials(
            mode=config.ews_auth,
            username=config.ews_username,
            password=config.ews_password,
            bearer_token=config.ews_bearer_token,
            bearer_token_file=config.ews_bearer_token_file,
            keytab=config.ews_keytab,
            spn=config.ews_spn,
        )
    return ExchangeTransport(
        config.ews_url,
        timeout_s=config.ews_timeout_s,
        verify_tls=config.ews_verify_tls,
        ca_bundle=config.ews_ca_bundle,
        authorization=auth.static_authorization(credentials),
        # Unauthenticated (the check asking which schemes Exchange offers): no authenticator,
        # so a 401 comes back as Exchange's answer rather than as a refusal.
        authenticator=auth.build_exchange_authenticator(credentials, host)
        if authenticated
        else None,
        pool_size=config.upstream_slots,
        idle_s=config.connection_idle_s,
        proxy=config.ews_proxy,
        trace=trace,
    )


def build_check(config: Config) -> ExchangeCheck:
    """Build `ews-gateway check`: the transport and EWS client serve builds, tried step by step."""
    target = CheckTarget(
        url=config.ews_url,
        auth_mode=config.ews_auth,
        server_version=config.ews_server_version,
        timeout_s=config.ews_timeout_s,
        verify_tls=config.ews_verify_tls,
        proxy=config.ews_proxy,
    )

    def transport_for(*, authenticated: bool, trace: ConnectTrace | None) -> ExchangeTransport:
        return build_transport(config, authenticated=authenticated, trace=trace)

    def client_for(transport: Transport) -> PhoneCalls:
        # No breaker and no bulkhead: the check asks once, and says what each failure was.
        return EwsClient(
            transport,
            server_version=config.ews_server_version,
            anchor_mailbox=config.anchor_mailbox,
            impersonation_id=config.ews_impersonation_id,
            policy=ExchangePolicy(
                timeout_s=config.ews_timeout_s, max_retry_back_off_s=config.retry_max_back_off_s
            ),
        )

    return ExchangeCheck(target, transport_for=transport_for, client_for=client_for)


def caller_authenticator(config: Config) -> CallerAuthenticator:
    """Return the caller authenticator GATEWAY_AUTH asks for (ConfigError: a bad key file)."""
    if config.gateway_auth == "apikey":
        assert config.api_keys_file is not None
        return ApiKeys.from_file(config.api_keys_file)
    if config.gateway_auth == "jwt":
        assert config.jwt_issuer is not None
        assert config.jwt_audience is not None
        keys: KeySource = (
            JwksKeys(config.jwt_jwks_url)
            if config.jwt_jwks_url
            else StaticKey(config.jwt_public_key or "")
        )
        mailbox_claim = config.jwt_mailbox_claim if config.ews_impersonation == "token" else None
        return JwtBearer(
            keys,
            issuer=config.jwt_issuer,
            audience=config.jwt_audience,
            mailbox_claim=mailbox_claim,
            impersonation_id=config.ews_impersonation_id,
            operator_claim=config.operator_claim,
        )
    return OpenGateway()
