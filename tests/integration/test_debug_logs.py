"""At GATEWAY_LOG_LEVEL=debug the log holds no secret, whatever EWS_AUTH speaks to Exchange.

`serve` (gunicorn) places, reads and hangs up a call through the simulator, which asks for
the gateway's credentials as IIS does: Basic, NTLM, Kerberos/Negotiate against a throwaway
KDC, or a bearer token. Everything the gateway wrote (stdout and stderr) is then searched for
the password, the tokens, NTLM and Kerberos messages and the keys; once with the libraries'
debug lines asked for too (GATEWAY_LIBRARY_LOG_LEVEL=debug), which are scrubbed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.integration.processes import Server, free_port, http, simulator_requests, start
from tests.integration.realm import ThrowawayRealm, missing_kerberos_tool

# Distinctive and fresh per run, so a hit can only be a leak.
PASSWORD = "pw-" + secrets.token_urlsafe(24)
BEARER_TOKEN = "upstream-tok-" + secrets.token_urlsafe(32)
API_KEY = "key-" + secrets.token_urlsafe(24)
CALL_ID_KEY = "call-id-key-" + secrets.token_urlsafe(32)
DOMAIN, USER = "CORP", "svc-gateway"
REALM = "LOGS.TEST"
ACCOUNT = f"{USER}@{REALM}"
SERVICE = "HTTP/localhost"
CALL = {"itemId": "AAMkVoiceMail", "dialString": "+15551234567"}
# The start of an NTLM message in base64 ("NTLMSSP"), and of GSS-API/SPNEGO tokens: an
# initial token (0x60 0x82, "YII"), a NegTokenResp (0xa1 0x81/0x82, "oYG", "oYI").
NTLM_BASE64 = "TlRMTVNTUA"
GSS_TOKEN = re.compile(r"\b(?:YII|oY[GI])[A-Za-z0-9+/]{20,}")
KERBEROS_MODES = ("kerberos", "negotiate")


@dataclass
class Mode:
    """One EWS_AUTH mode: how the simulator asks, and what the gateway is given."""

    simulator_args: list[str] = field(default_factory=list)
    simulator_env: dict[str, str] = field(default_factory=dict)
    gateway_env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawayRealm]:
    """A KDC for the Kerberos modes, when this machine has what Kerberos needs."""
    missing = missing_kerberos_tool()
    if missing is not None:
        pytest.skip(f"EWS_AUTH=kerberos and negotiate need a KDC and GSSAPI: {missing}")
    started = ThrowawayRealm(
        tmp_path_factory.mktemp("realm"),
        realm=REALM,
        service=SERVICE,
        account=ACCOUNT,
        password=PASSWORD,
    )
    yield started
    started.stop()


def mode_for(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Mode:
    if name == "basic":
        accounts = tmp_path / "basic-accounts"
        accounts.write_text(f"{USER}:{PASSWORD}\n", encoding="utf-8")
        return Mode(
            ["--auth", "basic", "--accounts", str(accounts)],
            gateway_env={"EWS_USERNAME": USER, "EWS_PASSWORD": PASSWORD},
        )
    if name == "ntlm":
        accounts = tmp_path / "ntlm-users"
        accounts.write_text(f"{DOMAIN}:{USER}:{PASSWORD}\n", encoding="utf-8")
        return Mode(
            ["--auth", "ntlm"],
            {"NTLM_USER_FILE": str(accounts)},
            {"EWS_USERNAME": f"{DOMAIN}\\{USER}", "EWS_PASSWORD": PASSWORD},
        )
    if name == "bearer":
        # The simulator's command line issues no tokens: it takes the request as it comes.
        return Mode(gateway_env={"EWS_BEARER_TOKEN": BEARER_TOKEN})
    realm: ThrowawayRealm = request.getfixturevalue("realm")  # started for these modes only
    kerberos = realm.environ(tmp_path)
    return Mode(
        ["--auth", "kerberos", "--keytab", realm.service_keytab],
        kerberos,
        {**kerberos, "EWS_USERNAME": ACCOUNT, "EWS_PASSWORD": PASSWORD, "EWS_SPN": SERVICE},
    )


@dataclass
class Deployment:
    gateway: Server
    simulator: Server


@pytest.fixture(params=["basic", "ntlm", "bearer", *KERBEROS_MODES])
def ews_auth(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(params=[False, True], ids=["debug", "debug-with-libraries"])
def library_debug(request: pytest.FixtureRequest) -> bool:
    asked: bool = request.param
    return asked


@pytest.fixture
def deployment(
    ews_auth: str, library_debug: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Deployment]:
    mode = mode_for(ews_auth, tmp_path, request)
    simulator_port, gateway_port = free_port(), free_port()
    simulator = start(
        ["simulator", "--bind", f"127.0.0.1:{simulator_port}", *mode.simulator_args],
        mode.simulator_env,
        f"http://127.0.0.1:{simulator_port}",
        "/simulator/health",
        tmp_path / "simulator.log",
    )
    keys = tmp_path / "api-keys"
    keys.write_text(hashlib.sha256(API_KEY.encode()).hexdigest() + "\n", encoding="utf-8")
    env = {
        "EWS_URL": f"{simulator.url}/EWS/Exchange.asmx",
        "EWS_AUTH": ews_auth,
        "GATEWAY_AUTH": "apikey",
        "GATEWAY_API_KEYS_FILE": str(keys),
        "GATEWAY_CALL_ID_KEY": CALL_ID_KEY,
        "GATEWAY_DIAL_ALLOW": "*",
        "GATEWAY_BIND": f"127.0.0.1:{gateway_port}",
        "GATEWAY_WORKERS": "1",
        "GATEWAY_THREADS": "8",
        "GATEWAY_LOG_LEVEL": "debug",
        **({"GATEWAY_LIBRARY_LOG_LEVEL": "debug"} if library_debug else {}),
        **mode.gateway_env,
    }
    try:
        gateway = start(
            ["serve"], env, f"http://127.0.0.1:{gateway_port}", "/readyz", tmp_path / "gw.log"
        )
    except BaseException:
        simulator.stop()
        raise
    yield Deployment(gateway, simulator)
    gateway.stop()
    simulator.stop()


def use_a_call(gateway: Server) -> None:
    """Place a call, read it and hang it up, as a caller with an API key."""
    key = {"X-API-Key": API_KEY}
    placed = http("POST", f"{gateway.url}/calls", CALL, key)
    assert placed.status == 201, placed.body
    call = f"{gateway.url}/calls/{quote(placed.json()['callId'], safe='')}"
    assert http("GET", call, headers=key).status == 200
    assert http("DELETE", call, headers=key).status == 200


def secrets_sent(simulator: Server) -> dict[str, str]:
    """Every secret the gateway holds or sent: its keys, password and Authorization values."""
    found = {
        "EWS_PASSWORD": PASSWORD,
        "the Basic credentials": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
        "EWS_BEARER_TOKEN": BEARER_TOKEN,
        "the caller's API key": API_KEY,
        "GATEWAY_CALL_ID_KEY": CALL_ID_KEY,
        "an NTLM message": NTLM_BASE64,
    }
    for number, request in enumerate(simulator_requests(simulator)):
        scheme, _, token = (request.get("authorization") or "").partition(" ")
        if token:
            # Also its start: a log line may carry a token cut short.
            found[f"the {scheme} token of request {number}"] = token[:24]
    return found


def test_the_debug_log_holds_no_password_token_authentication_message_or_key(
    deployment: Deployment, ews_auth: str, library_debug: bool
) -> None:
    use_a_call(deployment.gateway)
    sent = secrets_sent(deployment.simulator)
    deployment.gateway.stop()
    log = deployment.gateway.log()

    for name, secret in sent.items():
        assert secret not in log, f"{name} is in the log (EWS_AUTH={ews_auth})"
    assert GSS_TOKEN.search(log) is None, f"a Kerberos/SPNEGO token is in the log: {ews_auth}"
    assert "NTLMSSP" not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    library_debug_lines = [
        line
        for line in lines
        if line["level"] == "DEBUG" and not line["logger"].startswith("gateway")
    ]
    if not library_debug:
        assert library_debug_lines == []
        return
    # Asked for, the libraries' debug lines are there, their tokens scrubbed.
    assert library_debug_lines
    if ews_auth in ("ntlm", *KERBEROS_MODES):
        steps = [line["message"] for line in library_debug_lines if "step" in line["message"]]
        assert steps, f"no pyspnego step line with EWS_AUTH={ews_auth}"
        assert any("[REDACTED]" in step for step in steps)
