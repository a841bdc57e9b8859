"""Configuration: the only module that reads the environment.

`Config.from_env(os.environ)` validates everything once at start-up and
raises `ConfigError` with one line naming the variable at fault; what is
valid but likely a mistake (an unknown EWS_* or GATEWAY_* name, a password
sent in clear text) becomes one warning each in `Config.warnings`, which
`serve` logs and `check` prints. VARIABLES is the one list of the variables
read here, with their defaults as `serve --help` and `check --help` show them.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import limits

from gateway.errors import ConfigError
from gateway.exchange import http1
from gateway.exchange.auth import BEARER_TOKEN
from gateway.exchange.proxy import Proxy, proxy_for
from gateway.guards import sharedstate
from gateway.guards.dialing import never_matches
from gateway.wire import EXCHANGE_VERSIONS

# The proxy variables curl reads for each scheme of EWS_URL, the lower-case name first.
PROXY_VARIABLES = {
    "https": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
    "http": ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"),
}
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")
# An SMTP address in printable ASCII, as a header value can carry it.
ANCHOR_MAILBOX = re.compile(r"[!-~]{1,254}")
# RFC 6750's b64token: what an Authorization: Bearer header can carry.

EWS_AUTH_MODES = ("none", "basic", "ntlm", "kerberos", "negotiate", "bearer")
# The modes that need GSSAPI (the kerberos extra), and what to install for it.
GSSAPI_MODES = ("kerberos", "negotiate")
GSSAPI_INSTALL = "pip install 'ews-call-gateway[kerberos]' (builds against libkrb5-dev)"
# An SPN as EWS_SPN takes it: SERVICE/host; the realm comes from krb5.conf.
SERVICE_PRINCIPAL = re.compile(r"[A-Za-z0-9._-]+/[A-Za-z0-9.-]+")
GATEWAY_AUTH_MODES = ("none", "apikey", "jwt")
IMPERSONATION_MODES = ("none", "token")
# How an impersonated mailbox is named to Exchange (EWS_IMPERSONATION_ID): any of its SMTP
# addresses, the account's user principal name, or its security identifier.
IMPERSONATION_IDS = ("smtp", "upn", "sid")
# Mailbox claims whose value is a UPN or an SID, so the id type follows them unless set:
# Entra ID and AD FS name them so (AD FS by URI). OpenID Connect's own `sid` is a session
# id: it fails the SID check (gateway.guards.callers), so such tokens are 403, never sent.
UPN_CLAIMS = frozenset({"upn", "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/upn"})
SID_CLAIMS = frozenset(
    {
        "sid",
        "onprem_sid",
        "primarysid",
        "http://schemas.microsoft.com/ws/2008/06/identity/claims/primarysid",
    }
)
LOG_LEVELS = ("debug", "info", "warning", "error")
# Threads per gunicorn worker, and how many of them never wait on Exchange.
DEFAULT_THREADS = 64
RESERVED_THREADS = 4
# What the audit trail keeps of a dial string by default (GATEWAY_AUDIT_DIAL_DIGITS).
DIAL_DIGITS_SHOWN = 4
# A signing key shorter than this is guessable offline from one call id.
MIN_KEY_BYTES = 32
# The example key in deploy/kubernetes/secret.yaml (tests hold the two equal): a deployment
# applied unedited would share it with everyone who read the example.
PLACEHOLDER_CALL_ID_KEY = "CHANGE-ME-to-48-random-bytes-shared-by-every-replica"
MAKE_A_KEY = "python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"
# Modes whose credentials travel as they are, readable on a plain http:// connection.
CLEAR_TEXT_MODES = {"basic": "password", "bearer": "token"}
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Variable:
    """An environment variable the gateway reads, as `serve --help` and `check --help` list it."""

    name: str
    default: str
    meaning: str
    required: bool = False
    # Also read from the file NAME_FILE names (a mounted secret).
    from_file: bool = False
    # Other names read for the same setting (curl's lower-case proxy variables).
    aliases: tuple[str, ...] = ()


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "EWS_URL", "", "Exchange's EWS endpoint: https://mail.example.com/EWS/Exchange.asmx", True
    ),
    Variable("GATEWAY_AUTH", "", "how callers authenticate: jwt, apikey or none", True),
    Variable("GATEWAY_DIAL_ALLOW", "", "patterns dial strings must match: +1555*,4???", True),
    Variable(
        "EWS_AUTH", "none", "the gateway's credentials at Exchange: " + ", ".join(EWS_AUTH_MODES)
    ),
    Variable("EWS_USERNAME", "", "DOMAIN\\user (basic, ntlm) or user@REALM (kerberos, negotiate)"),
    Variable("EWS_PASSWORD", "", "the account's password", from_file=True),
    Variable("EWS_KEYTAB", "", "kerberos, negotiate: the account's keytab, instead of a password"),
    Variable("EWS_SPN", "HTTP/<host of EWS_URL>", "kerberos, negotiate: Exchange's principal"),
    Variable(
        "EWS_BEARER_TOKEN", "", "bearer: an OAuth access token (its file re-read)", from_file=True
    ),
    Variable("EWS_SERVER_VERSION", "Exchange2010", "RequestServerVersion, an ExchangeVersionType"),
    Variable("EWS_TIMEOUT_SECONDS", "10", "the deadline of each call to Exchange"),
    Variable("EWS_VERIFY_TLS", "true", "verify Exchange's certificate and name"),
    Variable("EWS_CA_BUNDLE", "system CAs", "a PEM file of the CAs to trust for Exchange"),
    Variable("EWS_ANCHOR_MAILBOX", "", "X-AnchorMailbox for calls that impersonate nobody"),
    Variable("EWS_CONNECTION_IDLE_SECONDS", "30", "a connection idle longer is closed, not reused"),
    Variable("EWS_IMPERSONATION", "none", "token: each call acts as the caller's own mailbox"),
    Variable("EWS_IMPERSONATION_ID", "follows the mailbox claim", "smtp, upn or sid"),
    Variable("EWS_MAX_IN_FLIGHT", "GATEWAY_THREADS - 4", "calls to Exchange in flight per worker"),
    Variable("EWS_BREAKER_FAILURES", "5", "failures in a row that open the circuit breaker"),
    Variable("EWS_BREAKER_COOLDOWN_SECONDS", "30", "how long an open circuit breaker answers 503"),
    Variable("EWS_RETRY_MAX_BACKOFF_SECONDS", "2", "the longest back-off of Exchange's waited out"),
    Variable("HTTPS_PROXY", "", "proxy to an https EWS_URL", aliases=("https_proxy",)),
    Variable("HTTP_PROXY", "", "proxy to an http EWS_URL", aliases=("http_proxy",)),
    Variable("ALL_PROXY", "", "proxy for either scheme", aliases=("all_proxy",)),
    Variable("NO_PROXY", "", "hosts reached without the proxy", aliases=("no_proxy",)),
    Variable("GATEWAY_API_KEYS_FILE", "", "apikey: SHA-256 digests of callers' keys, re-read"),
    Variable("GATEWAY_JWT_JWKS_URL", "", "jwt: the identity provider's JWKS URL"),
    Variable("GATEWAY_JWT_PUBLIC_KEY", "", "jwt: one PEM public key instead", from_file=True),
    Variable("GATEWAY_JWT_ISSUER", "", "jwt: the required iss"),
    Variable("GATEWAY_JWT_AUDIENCE", "", "jwt: the required aud"),
    Variable("GATEWAY_JWT_MAILBOX_CLAIM", "email", "the claim naming the caller's mailbox"),
    Variable("GATEWAY_OPERATOR_CLAIM", "", "claim=value: its callers may act on any call"),
    Variable("GATEWAY_CORS_ORIGINS", "", "exact browser origins allowed, comma-separated"),
    Variable("GATEWAY_BIND", "0.0.0.0:8080", "where serve listens: HOST:PORT"),
    Variable("GATEWAY_READ_TIMEOUT_SECONDS", "10", "time a client has to send a request"),
    Variable("GATEWAY_MAX_CONNECTIONS", "1000", "open client connections per worker"),
    Variable("GATEWAY_MAX_CONNECTIONS_PER_CLIENT", "256", "of those, from one client address"),
    Variable("GATEWAY_WORKERS", "one per core, at least 2", "gunicorn worker processes"),
    Variable("GATEWAY_THREADS", str(DEFAULT_THREADS), "threads per worker"),
    Variable("GATEWAY_LOG_LEVEL", "info", ", ".join(LOG_LEVELS)),
    Variable(
        "GATEWAY_LIBRARY_LOG_LEVEL",
        "warning",
        "third-party libraries' lines, scrubbed of secrets",
    ),
    Variable("GATEWAY_MAX_REQUESTS", "250000", "requests before a worker is recycled; 0: never"),
    Variable("GATEWAY_RATE_LIMIT_CALLS", "10/minute", "calls each caller may place, or off"),
    Variable("GATEWAY_RATE_LIMIT_REQUESTS", "off", "requests each caller may send"),
    Variable(
        "GATEWAY_REDIS_URL",
        "an embedded store",
        "redis://, rediss:// or redis+sentinel://, shared by replicas",
    ),
    Variable("GATEWAY_REDIS_PASSWORD", "", "Redis's AUTH password", from_file=True),
    Variable("GATEWAY_REDIS_SENTINEL_PASSWORD", "", "the Sentinels' own password", from_file=True),
    Variable("GATEWAY_REDIS_CA_BUNDLE", "system CAs", "a PEM file of the CAs to trust for Redis"),
    Variable(
        "GATEWAY_CALL_ID_KEY",
        "a random key per instance",
        f"{MIN_KEY_BYTES} bytes or more, the same on every replica",
        from_file=True,
    ),
    Variable("GATEWAY_AUDIT_DIAL_DIGITS", str(DIAL_DIGITS_SHOWN), "dial string digits audited"),
    Variable("GATEWAY_EVENTS_POLL_SECONDS", "1", "how often a watched call's state is read"),
    Variable("GATEWAY_EVENTS_MAX_STREAMS", "1000", "event streams open per worker"),
    Variable("GATEWAY_EVENTS_MAX_STREAMS_PER_CALLER", "20", "of those, one caller's"),
    Variable(
        "GATEWAY_STATE_DIR", "the system's temporary directory", "where the embedded store lives"
    ),
    Variable("GATEWAY_CHECK_AT_START", "false", "serve runs `ews-gateway check` first"),
    Variable("PROMETHEUS_MULTIPROC_DIR", "a fresh directory", "where workers share metrics"),
    Variable("OTEL_EXPORTER_OTLP_ENDPOINT", "no tracing", "an OTLP/HTTP collector: tracing on"),
    Variable("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "", "the same, for traces only"),
    Variable("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf", "the only protocol spoken"),
    Variable("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf", "the same, for traces only"),
    Variable("OTEL_TRACES_EXPORTER", "otlp", "otlp, or none: no tracing"),
    Variable("OTEL_SDK_DISABLED", "false", "true: no tracing"),
    Variable("OTEL_SERVICE_NAME", "ews-gateway", "the service name on spans"),
)
# The prefixes whose unknown names are warned; names of the project's tools that share them.
OWN_PREFIXES = ("EWS_", "GATEWAY_")
TOOL_VARIABLES = frozenset({"EWS_SCHEMA_DIR"})


def known_variables() -> frozenset[str]:
    """Return every name the gateway reads: VARIABLES, their aliases and their _FILE forms."""
    names = set(TOOL_VARIABLES)
    for variable in VARIABLES:
        names.add(variable.name)
        names.update(variable.aliases)
        if variable.from_file:
            names.add(f"{variable.name}_FILE")
    return frozenset(names)


def variables_help() -> str:
    """Return the variables as `--help` lists them: the required ones first, with defaults."""
    lines = ["environment variables (required first; (_FILE): also NAME_FILE, a file to read):"]
    for variable in sorted(VARIABLES, key=lambda variable: not variable.required):
        label = variable.name + (" (_FILE)" if variable.from_file else "")
        if variable.required:
            label += "  required"
        elif variable.default:
            label += f"  default: {variable.default}"
        lines += [f"  {label}", f"      {variable.meaning}"]
    return "\n".join(lines)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Warn of each EWS_* or GATEWAY_* name the gateway does not read, naming the closest one."""
    known = known_variables()
    warnings = []
    for name in sorted(environ):
        if not name.startswith(OWN_PREFIXES) or name in known:
            continue
        # Above difflib's 0.6: the shared prefix alone makes any two names 0.6 alike.
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else " (serve --help lists them)"
        warnings.append(f"{name} is not a variable the gateway reads{hint}")
    return warnings


@dataclass(frozen=True)
class Config:
    """Validated gateway settings."""

    ews_url: str
    gateway_auth: str
    ews_server_version: str = "Exchange2010"
    ews_timeout_s: float = 10.0
    ews_auth: str = "none"
    ews_username: str = ""
    ews_password: str = field(default="", repr=False)
    ews_bearer_token: str = field(default="", repr=False)
    ews_bearer_token_file: str | None = None
    ews_keytab: str | None = None
    ews_spn: str | None = None
    ews_verify_tls: bool = True
    ews_ca_bundle: str | None = None
    api_keys_file: str | None = None
    jwt_jwks_url: str | None = None
    jwt_public_key: str | None = field(default=None, repr=False)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_mailbox_claim: str = "email"
    ews_impersonation: str = "none"
    # from_env follows the mailbox claim when EWS_IMPERSONATION_ID is unset (impersonation_id_for).
    ews_impersonation_id: str = "smtp"
    cors_origins: tuple[str, ...] = ()
    bind: str = "0.0.0.0:8080"
    read_timeout_s: float = 10.0
    max_connections: int = 1000  # open client connections a worker keeps
    max_connections_per_client: int = 256  # of them from one client address
    workers: int | None = None
    threads: int | None = None
    log_level: str = "info"
    # None: libraries log warnings and errors only (never their debug lines, which hold tokens).
    library_log_level: str | None = None
    metrics_dir: str | None = None
    # GATEWAY_STATE_DIR: where serve makes each instance's private state directory (None: the
    # system's temporary directory).
    state_root: str | None = None
    # Set by serve only (never from the environment): the instance's embedded store, shared by
    # its workers; None keeps idempotency keys and quota counts in the process's memory.
    state_dir: str | None = None
    # None: serving's default (about 250,000, with jitter); 0: never recycle.
    max_requests: int | None = None
    # OpenTelemetry: on when an OTLP endpoint is set; the SDK reads the other OTEL_* itself.
    tracing: bool = False
    trace_service_name: str = "ews-gateway"
    max_in_flight: int | None = None
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    retry_max_back_off_s: float = 2.0
    # None: no policy given; `serve` refuses to start (see gateway.guards.dialing).
    dial_allow: tuple[str, ...] | None = None
    rate_limit_calls: str | None = "10/minute"
    rate_limit_requests: str | None = None
    redis_url: str | None = field(default=None, repr=False)
    redis_password: str = field(default="", repr=False)
    redis_ca_bundle: str | None = None
    redis_sentinel_password: str = field(default="", repr=False)
    call_id_key: bytes = field(default=b"", repr=False)
    operator_claim: tuple[str, str] | None = None
    audit_dial_digits: int = 4
    connection_idle_s: float = 30.0
    anchor_mailbox: str | None = None
    # The outbound proxy to Exchange (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), if any.
    ews_proxy: Proxy | None = None
    events_poll_s: float = 1.0
    events_max_streams: int = 1000
    # Of a worker's streams, those one caller may hold: a browser tab per call, a few tabs.
    events_max_streams_per_caller: int = 20
    # Set by `ews-gateway demo` only (never from the environment): serve the call screen.
    demo_page: bool = False
    # serve runs `ews-gateway check` before it starts, and refuses to start if it fails.
    check_at_start: bool = False
    # Settings that are valid but likely mistakes: one sentence each, logged at start.
    warnings: tuple[str, ...] = ()

    @property
    def threads_per_worker(self) -> int:
        return self.threads or DEFAULT_THREADS

    @property
    def upstream_slots(self) -> int:
        """Calls to Exchange one worker may have in flight; the rest answer 503 at once."""
        # Keep threads free for probes and /metrics even when every call hangs.
        return self.max_in_flight or max(1, self.threads_per_worker - RESERVED_THREADS)

    @property
    def poll_threads(self) -> int:
        """Threads one worker polls watched calls on: half the bulkhead, the rest for requests."""
        return max(1, self.upstream_slots // 2)

    def summary(self) -> dict[str, str | int]:
        """Say where Exchange is and how the gateway is set up, without a secret (start-up)."""
        parts = urlsplit(self.ews_url)
        return {
            # The URL carries no credentials (refused at start); its query could carry anything.
            "ewsUrl": urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")),
            "ewsAuth": self.ews_auth,
            "ewsProxy": self.ews_proxy.address if self.ews_proxy else "none",
            "sharedState": "redis" if self.redis_url else "embedded",
            "dialPatterns": len(self.dial_allow or ()),
        }

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Config:
        """Build and validate a Config from environment variables."""
        env = _Env(environ)
        mailbox_claim = env.text("GATEWAY_JWT_MAILBOX_CLAIM") or "email"
        config = cls(
            ews_url=env.url("EWS_URL"),
            gateway_auth=env.choice("GATEWAY_AUTH", GATEWAY_AUTH_MODES, default=None),
            ews_server_version=env.choice(
                "EWS_SERVER_VERSION", sorted(EXCHANGE_VERSIONS), default="Exchange2010"
            ),
            ews_timeout_s=env.number("EWS_TIMEOUT_SECONDS", default=10.0, low=0.1, high=300.0),
            ews_auth=env.choice("EWS_AUTH", EWS_AUTH_MODES, default="none"),
            ews_username=env.text("EWS_USERNAME"),
            ews_password=env.secret("EWS_PASSWORD"),
            ews_bearer_token=env.secret("EWS_BEARER_TOKEN"),
            ews_bearer_token_file=env.text("EWS_BEARER_TOKEN_FILE") or None,
            ews_keytab=env.path("EWS_KEYTAB"),
            ews_spn=env.text("EWS_SPN") or None,
            ews_verify_tls=env.flag("EWS_VERIFY_TLS", default=True),
            ews_ca_bundle=env.path("EWS_CA_BUNDLE"),
            api_keys_file=env.path("GATEWAY_API_KEYS_FILE"),
            jwt_jwks_url=env.url("GATEWAY_JWT_JWKS_URL", required=False) or None,
            jwt_public_key=env.secret("GATEWAY_JWT_PUBLIC_KEY") or None,
            jwt_issuer=env.text("GATEWAY_JWT_ISSUER") or None,
            jwt_audience=env.text("GATEWAY_JWT_AUDIENCE") or None,
            jwt_mailbox_claim=mailbox_claim,
            ews_impersonation=env.choice("EWS_IMPERSONATION", IMPERSONATION_MODES, default="none"),
            ews_impersonation_id=env.choice(
                "EWS_IMPERSONATION_ID",
                IMPERSONATION_IDS,
                default=impersonation_id_for(mailbox_claim),
            ),
            cors_origins=env.origins("GATEWAY_CORS_ORIGINS"),
            bind=env.bind("GATEWAY_BIND", default=cls.bind),
            read_timeout_s=env.number(
                "GATEWAY_READ_TIMEOUT_SECONDS", default=10.0, low=0.5, high=300.0
            ),
            max_connections=env.count_in(
                "GATEWAY_MAX_CONNECTIONS", default=1000, low=1, high=100_000
            ),
            max_connections_per_client=env.count_in(
                "GATEWAY_MAX_CONNECTIONS_PER_CLIENT", default=256, low=1, high=100_000
            ),
            workers=env.count("GATEWAY_WORKERS"),
            threads=env.count("GATEWAY_THREADS"),
            log_level=env.choice("GATEWAY_LOG_LEVEL", LOG_LEVELS, default="info"),
            library_log_level=env.optional_choice("GATEWAY_LIBRARY_LOG_LEVEL", LOG_LEVELS),
            metrics_dir=env.text("PROMETHEUS_MULTIPROC_DIR") or None,
            state_root=env.directory("GATEWAY_STATE_DIR"),
            max_requests=env.whole("GATEWAY_MAX_REQUESTS", high=1_000_000_000),
            tracing=env.tracing(),
            trace_service_name=env.text("OTEL_SERVICE_NAME") or "ews-gateway",
            max_in_flight=env.count("EWS_MAX_IN_FLIGHT"),
            breaker_failures=env.count("EWS_BREAKER_FAILURES") or 5,
            breaker_cooldown_s=env.number(
                "EWS_BREAKER_COOLDOWN_SECONDS", default=30.0, low=1.0, high=3600.0
            ),
            retry_max_back_off_s=env.number(
                "EWS_RETRY_MAX_BACKOFF_SECONDS", default=2.0, low=0.0, high=60.0
            ),
            dial_allow=env.dial_patterns("GATEWAY_DIAL_ALLOW"),
            rate_limit_calls=env.rate_limit("GATEWAY_RATE_LIMIT_CALLS", default="10/minute"),
            rate_limit_requests=env.rate_limit("GATEWAY_RATE_LIMIT_REQUESTS", default=None),
            redis_url=env.redis_url("GATEWAY_REDIS_URL"),
            redis_password=env.secret("GATEWAY_REDIS_PASSWORD"),
            redis_ca_bundle=env.path("GATEWAY_REDIS_CA_BUNDLE"),
            redis_sentinel_password=env.secret("GATEWAY_REDIS_SENTINEL_PASSWORD"),
            call_id_key=env.key("GATEWAY_CALL_ID_KEY"),
            operator_claim=env.claim("GATEWAY_OPERATOR_CLAIM"),
            audit_dial_digits=_or_default(
                env.whole("GATEWAY_AUDIT_DIAL_DIGITS", high=32), DIAL_DIGITS_SHOWN
            ),
            connection_idle_s=env.number(
                "EWS_CONNECTION_IDLE_SECONDS", default=30.0, low=0.1, high=3600.0
            ),
            anchor_mailbox=env.mailbox("EWS_ANCHOR_MAILBOX"),
            ews_proxy=env.proxy(),
            events_poll_s=env.number(
                "GATEWAY_EVENTS_POLL_SECONDS", default=1.0, low=0.1, high=60.0
            ),
            events_max_streams=env.count_in(
                "GATEWAY_EVENTS_MAX_STREAMS", default=1000, low=1, high=100_000
            ),
            events_max_streams_per_caller=env.count_in(
                "GATEWAY_EVENTS_MAX_STREAMS_PER_CALLER", default=20, low=1, high=100_000
            ),
            check_at_start=env.flag("GATEWAY_CHECK_AT_START", default=False),
        )
        config.check_consistency()
        return replace(config, warnings=(*unknown_variables(environ), *config.likely_mistakes()))

    def likely_mistakes(self) -> list[str]:
        """Return a sentence for each valid setting that is likely a mistake."""
        mistakes = []
        secret = CLEAR_TEXT_MODES.get(self.ews_auth)
        if secret and urlsplit(self.ews_url).scheme == "http":
            mistakes.append(
                f"EWS_AUTH={self.ews_auth} over http:// sends the {secret} to Exchange in clear "
                "text; start EWS_URL with https://"
            )
        return mistakes

    def check_consistency(self) -> None:
        """Reject combinations of settings that cannot work together."""
        if self.ews_auth == "basic" and not (self.ews_username and self.ews_password):
            raise ConfigError("EWS_AUTH=basic needs EWS_USERNAME and EWS_PASSWORD")
        if self.ews_auth == "bearer" and not self.ews_bearer_token:
            raise ConfigError("EWS_AUTH=bearer needs EWS_BEARER_TOKEN (or EWS_BEARER_TOKEN_FILE)")
        if self.ews_auth == "bearer" and BEARER_TOKEN.fullmatch(self.ews_bearer_token) is None:
            # The value itself never goes into the message: it is a credential.
            raise ConfigError("EWS_BEARER_TOKEN holds characters a bearer token cannot have")
        if self.ews_auth == "ntlm" and not (self.ews_username and self.ews_password):
            raise ConfigError("EWS_AUTH=ntlm needs EWS_USERNAME and EWS_PASSWORD")
        if self.ews_auth in GSSAPI_MODES:
            self._check_kerberos()
        if self.gateway_auth == "apikey" and not self.api_keys_file:
            raise ConfigError("GATEWAY_AUTH=apikey needs GATEWAY_API_KEYS_FILE")
        if self.gateway_auth == "jwt":
            self._check_jwt()
        if self.max_in_flight is not None and self.max_in_flight >= self.threads_per_worker:
            raise ConfigError(
                "EWS_MAX_IN_FLIGHT must be below GATEWAY_THREADS so probes always find a thread"
            )
        if self.operator_claim is not None and self.gateway_auth != "jwt":
            raise ConfigError("GATEWAY_OPERATOR_CLAIM needs GATEWAY_AUTH=jwt (it names a claim)")
        if self.ews_impersonation == "token" and self.gateway_auth != "jwt":
            raise ConfigError(
                "EWS_IMPERSONATION=token needs GATEWAY_AUTH=jwt (the mailbox comes from the token)"
            )
        self._check_sentinel()

    def _check_sentinel(self) -> None:
        sentinel = (self.redis_url or "").startswith(sharedstate.SENTINEL_SCHEME + ":")
        if self.redis_sentinel_password and not sentinel:
            raise ConfigError(
                "GATEWAY_REDIS_SENTINEL_PASSWORD needs a redis+sentinel:// GATEWAY_REDIS_URL"
            )
        if sentinel and self.redis_ca_bundle:
            raise ConfigError(
                "GATEWAY_REDIS_CA_BUNDLE is for rediss://; redis+sentinel:// speaks plain TCP"
            )

    def _check_kerberos(self) -> None:
        if importlib.util.find_spec("gssapi") is None:
            raise ConfigError(f"EWS_AUTH={self.ews_auth} needs GSSAPI: {GSSAPI_INSTALL}")
        if self.ews_password and self.ews_keytab:
            raise ConfigError(f"EWS_AUTH={self.ews_auth}: set EWS_PASSWORD or EWS_KEYTAB, not both")
        if (self.ews_password or self.ews_keytab) and not self.ews_username:
            raise ConfigError(
                f"EWS_AUTH={self.ews_auth} with EWS_PASSWORD or EWS_KEYTAB needs EWS_USERNAME "
                "(user@REALM)"
            )
        if self.ews_spn and SERVICE_PRINCIPAL.fullmatch(self.ews_spn) is None:
            raise ConfigError("EWS_SPN must be SERVICE/host, e.g. HTTP/mail.corp.example.com")

    def _check_jwt(self) -> None:
        if bool(self.jwt_jwks_url) == bool(self.jwt_public_key):
            raise ConfigError(
                "GATEWAY_AUTH=jwt needs exactly one of GATEWAY_JWT_JWKS_URL or "
                "GATEWAY_JWT_PUBLIC_KEY (or GATEWAY_JWT_PUBLIC_KEY_FILE)"
            )
        if not self.jwt_issuer:
            raise ConfigError("GATEWAY_AUTH=jwt needs GATEWAY_JWT_ISSUER")
        if not self.jwt_audience:
            raise ConfigError("GATEWAY_AUTH=jwt needs GATEWAY_JWT_AUDIENCE")


class _Env:
    """Typed readers over an environment mapping; each error names its variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str) -> str:
        return self._environ.get(name, "").strip()

    def url(self, name: str, *, required: bool = True) -> str:
        value = self.text(name)
        if not value and not required:
            return ""
        if not value:
            raise ConfigError(
                f"{name} is required, e.g. https://mail.example.com/EWS/Exchange.asmx"
            )
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # The value is not repeated: a mistyped URL may carry a password.
            raise ConfigError(f"{name} must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise ConfigError(f"{name} must not carry credentials; use EWS_USERNAME/EWS_PASSWORD")
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port is not None and not 1 <= port <= 65535:
            raise ConfigError(f"{name} has a port outside 1-65535")
        try:
            http1.ascii_host(parts.hostname)
        except ValueError as error:
            raise ConfigError(f"{name}: {error}") from None
        return value

    def mailbox(self, name: str) -> str | None:
        """Read an SMTP address as an HTTP header can carry it (X-AnchorMailbox)."""
        value = self.text(name)
        if value and (value.count("@") != 1 or not ANCHOR_MAILBOX.fullmatch(value)):
            raise ConfigError(f"{name} must be one SMTP address, e.g. svc-ews@example.com")
        return value or None

    def proxy(self) -> Proxy | None:
        """Read the outbound proxy to EWS_URL as curl would choose it."""
        url = self.text("EWS_URL")
        if not url:
            return None
        names = PROXY_VARIABLES[urlsplit(url).scheme]
        variable = next((name for name in names if self.text(name)), "")
        no_proxy = next((self._environ[n] for n in NO_PROXY_VARIABLES if n in self._environ), "")
        try:
            return proxy_for(url, self.text(variable) if variable else "", variable, no_proxy)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def choice(self, name: str, options: Sequence[str], *, default: str | None) -> str:
        value = self.text(name) or default
        if value is None:
            raise ConfigError(f"{name} is required: one of {', '.join(options)}")
        if value not in options:
            raise ConfigError(f"{name} must be one of {', '.join(options)}, got {value!r}")
        return value

    def optional_choice(self, name: str, options: Sequence[str]) -> str | None:
        """Read one of OPTIONS, or None when the variable is unset or blank."""
        return self.choice(name, options, default=None) if self.text(name) else None

    def number(self, name: str, *, default: float, low: float, high: float) -> float:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {raw!r}")
        return value

    def bind(self, name: str, *, default: str) -> str:
        """Read a listen address: HOST:PORT, or [IPv6]:PORT, with a port from 1 to 65535."""
        value = self.text(name) or default
        check_bind(value, name)
        return value

    def count(self, name: str) -> int | None:
        raw = self.text(name)
        if not raw:
            return None
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 256:
            raise ConfigError(f"{name} must be a whole number from 1 to 256, got {raw!r}")
        return int(raw)

    def whole(self, name: str, *, high: int) -> int | None:
        raw = self.text(name)
        if not raw:
            return None
        if not (raw.isascii() and raw.isdigit()) or int(raw) > high:
            raise ConfigError(f"{name} must be a whole number from 0 to {high:,}, got {raw!r}")
        return int(raw)

    def tracing(self) -> bool:
        """Whether to export traces: OpenTelemetry's variables, over OTLP/HTTP only."""
        endpoint = self.text("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or self.text(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        exporter = self.text("OTEL_TRACES_EXPORTER") or "otlp"
        if exporter not in ("otlp", "none"):
            raise ConfigError(f"OTEL_TRACES_EXPORTER must be otlp or none, got {exporter!r}")
        if not endpoint or exporter == "none" or self.flag("OTEL_SDK_DISABLED", default=False):
            return False
        for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            if self.text(name) not in ("", "http/protobuf"):
                raise ConfigError(f"{name} must be http/protobuf, got {self.text(name)!r}")
        self.url(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
            if self.text("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            else "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return True

    def count_in(self, name: str, *, default: int, low: int, high: int) -> int:
        raw = self.text(name)
        if not raw:
            return default
        if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
            raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {raw!r}")
        return int(raw)

    def flag(self, name: str, *, default: bool) -> bool:
        raw = self.text(name).lower()
        if not raw:
            return default
        if raw in TRUE_WORDS:
            return True
        if raw in FALSE_WORDS:
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def path(self, name: str) -> str | None:
        value = self.text(name)
        if value and not Path(value).is_file():
            raise ConfigError(f"{name} names {value!r}, which is not a readable file")
        return value or None

    def directory(self, name: str) -> str | None:
        """Read an existing directory the gateway may create files in, made absolute."""
        value = self.text(name)
        if not value:
            return None
        path = Path(value)
        if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{name} names {value!r}, which is not a directory the gateway can write"
            )
        return str(path.absolute())

    def dial_patterns(self, name: str) -> tuple[str, ...] | None:
        """Read comma-separated dial patterns (None when unset); refuse one no dial string fits."""
        raw = self.text(name)
        if not raw:
            return None
        patterns = tuple(item.strip() for item in raw.split(","))
        if not all(patterns):
            raise ConfigError(f"{name} holds an empty pattern (two commas in a row?)")
        for pattern in patterns:
            reason = never_matches(pattern)
            if reason is not None:
                raise ConfigError(f"{name}: {pattern!r} can never match a dial string: {reason}")
        return patterns

    def rate_limit(self, name: str, *, default: str | None) -> str | None:
        """Read a limit in the limits library's notation (`10/minute`), or `off`."""
        raw = self.text(name) or default
        if raw is None or raw.lower() == "off":
            return None
        try:
            items = limits.parse_many(raw)
        except ValueError:
            raise ConfigError(f"{name} must be like 10/minute (or off), got {raw!r}") from None
        if len(items) != 1:
            raise ConfigError(f"{name} takes one limit like 10/minute, got {raw!r}")
        return raw

    def redis_url(self, name: str) -> str | None:
        """Read a redis://, rediss:// or redis+sentinel:// URL without a password."""
        value = self.text(name)
        if not value:
            return None
        if value.startswith(sharedstate.SENTINEL_SCHEME + ":"):
            try:
                sharedstate.sentinel_address(value)
            except ValueError as error:
                raise ConfigError(f"{name} {error}") from None
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ConfigError(
                f"{name} must be a redis://, rediss:// or redis+sentinel:// URL with a host"
            )
        if parts.password:
            raise ConfigError(f"{name} must not carry a password; use GATEWAY_REDIS_PASSWORD_FILE")
        return value

    def key(self, name: str) -> bytes:
        """Read a shared signing key (NAME or NAME_FILE) of at least 32 bytes, no placeholder."""
        value = self.secret(name)
        if value == PLACEHOLDER_CALL_ID_KEY:
            raise ConfigError(
                f"{name} is the example placeholder of deploy/kubernetes/secret.yaml; set a random "
                f"key the same on every replica: {MAKE_A_KEY}"
            )
        if value and len(value.encode("utf-8")) < MIN_KEY_BYTES:
            raise ConfigError(f"{name} must be at least {MIN_KEY_BYTES} bytes long")
        if len(set(value)) == 1:
            raise ConfigError(f"{name} is one character repeated; set a random key: {MAKE_A_KEY}")
        return value.encode("utf-8")

    def claim(self, name: str) -> tuple[str, str] | None:
        """Read `claim=value`, e.g. `roles=call-operator`."""
        raw = self.text(name)
        if not raw:
            return None
        claim, sep, value = (part.strip() for part in raw.partition("="))
        if not (sep and claim and value):
            raise ConfigError(f"{name} must be claim=value, e.g. roles=call-operator")
        return claim, value

    def origins(self, name: str) -> tuple[str, ...]:
        """Read a comma-separated list of exact origins such as https://app.example.com."""
        origins = tuple(item.strip() for item in self.text(name).split(",") if item.strip())
        for origin in origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
                raise ConfigError(
                    f"{name}: {origin!r} is not an origin like https://app.example.com"
                )
        return origins

    def secret(self, name: str) -> str:
        """Read NAME, or the file named by NAME_FILE (the usual way to mount secrets)."""
        file_name = self.text(f"{name}_FILE")
        if self._environ.get(name) and file_name:
            raise ConfigError(f"set {name} or {name}_FILE, not both")
        if not file_name:
            return self._environ.get(name, "")
        try:
            return Path(file_name).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{name}_FILE: cannot read {file_name!r} ({exc.strerror})") from None


def impersonation_id_for(mailbox_claim: str) -> str:
    """Return the EWS_IMPERSONATION_ID a mailbox claim implies: upn, sid, else smtp."""
    if mailbox_claim in UPN_CLAIMS:
        return "upn"
    if mailbox_claim in SID_CLAIMS:
        return "sid"
    return "smtp"


def _or_default(value: int | None, default: int) -> int:
    # Not `value or default`: 0 is a setting (show no digit at all).
    return default if value is None else value


def check_bind(value: str, name: str) -> None:
    """Raise ConfigError naming NAME unless VALUE is HOST:PORT or [IPv6]:PORT."""
    host, colon, port = value.rpartition(":")
    example = "e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080"
    if not colon or not host:
        raise ConfigError(f"{name} must be HOST:PORT ({example}), got {value!r}")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{name}: the port must be a number from 1 to 65535, got {value!r}")
    if host.startswith("["):
        if not host.endswith("]") or not _is_ipv6(host[1:-1]):
            raise ConfigError(f"{name}: {host!r} is not a bracketed IPv6 address ({example})")
    elif ":" in host or not _HOST.fullmatch(host):
        raise ConfigError(f"{name}: {host!r} is not a host name or address ({example})")


_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def load() -> Config:
    """Build the Config from this process's environment."""
    return Config.from_env(os.environ)
