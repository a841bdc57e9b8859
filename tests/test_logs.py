"""Log lines: libraries' debug lines stay out unless asked for, and never carry a secret."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.telemetry.logs import (
    REDACTED,
    LevelGate,
    LineHandler,
    LogLevels,
    SecretScrubber,
    json_formatter,
    scrub,
)

DEBUG, INFO, WARNING, ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR
NTLM_CHALLENGE = base64.b64encode(b"NTLMSSP\x00\x02\x00\x00\x00" + bytes(range(40))).decode()
SPNEGO_TOKEN = "oYHRMIHOoAMKAQGhDAYKKwYBBAGCNwICCqKBuASBtU5UTE1TU1AAAgAAABQAFAA4AAAA"
JWT = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJzdmMifQ.c2lnbmF0dXJlLWJ5dGVzLTAxMjM0NTY3"


def record(name: str, level: int, message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, args, None)


@pytest.mark.parametrize(
    ("level", "library_level", "expected"),
    [
        ("info", None, LogLevels(INFO, WARNING, INFO)),
        ("debug", None, LogLevels(DEBUG, WARNING, INFO)),
        ("error", None, LogLevels(ERROR, ERROR, ERROR)),
        ("debug", "debug", LogLevels(DEBUG, DEBUG, DEBUG)),
        ("warning", "info", LogLevels(WARNING, INFO, INFO)),
    ],
)
def test_libraries_log_warnings_unless_asked_and_gunicorn_its_lifecycle(
    level: str, library_level: str | None, expected: LogLevels
) -> None:
    assert LogLevels.named(level, library_level) == expected


@pytest.mark.parametrize(
    ("logger", "level", "passes"),
    [
        ("gateway", DEBUG, True),
        ("gateway.transport", DEBUG, True),
        ("gateway_extras", DEBUG, False),  # a library whose name only starts like the gateway's
        ("spnego._ntlm", DEBUG, False),
        ("spnego._ntlm", WARNING, True),
        ("urllib3.connectionpool", DEBUG, False),
        ("opentelemetry.exporter", INFO, False),
        ("gunicorn.error", DEBUG, False),
        ("gunicorn.error", INFO, True),
        ("root", DEBUG, False),
    ],
)
def test_at_debug_only_the_gateways_own_debug_lines_pass(
    logger: str, level: int, passes: bool
) -> None:
    gate = LevelGate(**vars(LogLevels.named("debug")))
    assert gate.filter(record(logger, level, "a line")) is passes


def test_library_debug_lines_pass_when_asked_for() -> None:
    gate = LevelGate(**vars(LogLevels.named("debug", "debug")))
    assert gate.filter(record("spnego._ntlm", DEBUG, "NTLM step output: %s", "x"))


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"NTLM step output: {NTLM_CHALLENGE}", NTLM_CHALLENGE),
        (f"NTLM step input: {NTLM_CHALLENGE[:20]}", NTLM_CHALLENGE[:20]),
        (f"SPNEGO step input: {SPNEGO_TOKEN}", SPNEGO_TOKEN),
        (f"send: b'POST /EWS HTTP/1.1\\r\\nAuthorization: NTLM {NTLM_CHALLENGE}\\r\\n'", "NTLM"),
        ("header: Authorization: Basic c3ZjOmh1bnRlcjI=", "c3ZjOmh1bnRlcjI="),
        ("headers {'authorization': 'Bearer short-token', 'Host': 'x'}", "short-token"),
        ("WWW-Authenticate: Negotiate oRQwEqADCgEA", "oRQwEqADCgEA"),
        ("Proxy-Authorization: Basic cDpx", "cDpx"),
        ("X-API-Key: key-123", "key-123"),
        (f"token {JWT} accepted", JWT),
        ("url https://svc:hunter2@proxy.example.com:3128/", "hunter2"),
        ("password=hunter2 user=svc", "hunter2"),
        ('{"client_secret": "s3cr3t value"}', "s3cr3t"),
        ("key 00112233445566778899aabbccddeeff00112233", "00112233445566778899"),
        ("dump 4e 54 4c 4d 53 53 50 00 01 00 00 00 07 82 08 a2 00 end", "4e 54 4c 4d 53"),
        ("raw b'NTLMSSP\\x00\\x03\\x00\\x00\\x00\\x18\\x00'", "NTLMSSP"),
        ("raw NTLMSSP\x00\x01rest", "NTLMSSP"),
    ],
)
def test_scrubbing_blanks_credentials_tokens_and_byte_dumps(text: str, secret: str) -> None:
    scrubbed = scrub(text)
    assert secret not in scrubbed
    assert REDACTED in scrubbed


def test_a_json_web_token_is_blanked_whole_claims_included() -> None:
    assert scrub(f"token {JWT} accepted") == f"token {REDACTED} accepted"


@pytest.mark.parametrize(
    "text",
    [
        "NTLM step input: ",
        "Starting new HTTPS connection (1): mail.example.com:443",
        'File "/usr/lib/python3.11/site-packages/spnego/_ntlm.py", line 390, in step',
        "request 3f2a9c1e-7b4d-4e0a-9f61-0c5d2b8e4a17 took 12 ms",
        "Skipping credential as it does not support required mech type",
    ],
)
def test_scrubbing_leaves_ordinary_text_alone(text: str) -> None:
    assert scrub(text) == text


def test_a_library_line_quoting_bytes_keeps_their_length_only() -> None:
    line = record("spnego._gss", DEBUG, "step output %s then %r", b"\x60\x82" + bytes(60), 3)
    SecretScrubber().filter(line)
    assert line.getMessage() == "step output <62 bytes> then 3"


def test_the_gateways_fixed_lines_are_left_as_written_and_its_quotes_scrubbed() -> None:
    fixed = record("gateway.access", INFO, "request")
    quoting = record("gateway.upstream_auth", WARNING, "failed: %s", f"Negotiate {SPNEGO_TOKEN}")
    scrubber = SecretScrubber()
    assert scrubber.filter(fixed)
    assert scrubber.filter(quoting)
    assert (fixed.msg, fixed.args) == ("request", ())
    assert SPNEGO_TOKEN not in quoting.getMessage()


def test_an_exception_quoting_a_token_is_scrubbed_in_the_traceback() -> None:
    try:
        raise ValueError(f"cannot read token {NTLM_CHALLENGE}")
    except ValueError:
        line = logging.LogRecord("spnego", ERROR, __file__, 1, "failed", (), sys.exc_info(), None)
    SecretScrubber().filter(line)
    assert line.exc_info is None
    assert line.exc_text is not None
    assert "ValueError: cannot read token" in line.exc_text
    assert NTLM_CHALLENGE not in line.exc_text


# pyspnego itself, through the gateway's logging configuration, in a process of its own.
HANDSHAKE = """
import logging, sys, spnego
from gateway.telemetry.logs import LogLevels, configure_logging
# A library's own handler (as PYSPNEGO_LOG_CFG would give it) must not bypass the filters.
logging.getLogger("spnego").addHandler(logging.StreamHandler(sys.stderr))
configure_logging(LogLevels.named("debug", sys.argv[1] or None))
client = spnego.client("CORP\\\\svc", "Password-Of-The-Service-1", protocol="ntlm")
server = spnego.server(protocol="ntlm")
token = client.step()
while not client.complete:
    token = client.step(server.step(token))
logging.getLogger("gateway.test").debug("handshake done")
"""


def handshake_log(library_level: str, accounts: Path) -> list[dict[str, str]]:
    accounts.write_text("CORP:svc:Password-Of-The-Service-1\n", encoding="utf-8")
    run = subprocess.run(
        [sys.executable, "-c", HANDSHAKE, library_level],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "NTLM_USER_FILE": str(accounts)},
    )
    assert "Password-Of-The-Service-1" not in run.stderr
    assert "TlRMTVNTUA" not in run.stderr
    assert "NTLMSSP" not in run.stderr
    return [json.loads(line) for line in run.stderr.splitlines()]


@pytest.mark.parametrize("library_level", ["", "debug"])
def test_a_whole_ntlm_handshake_at_debug_logs_no_ntlm_message(
    library_level: str, tmp_path: Path
) -> None:
    lines = handshake_log(library_level, tmp_path / "ntlm-users")
    messages = [line["message"] for line in lines]
    assert "handshake done" in messages
    library = [line for line in lines if line["logger"].startswith("spnego")]
    if library_level:
        assert "NTLM step output: [REDACTED]" in [line["message"] for line in library]
    else:
        assert library == []


def test_a_field_holding_half_a_surrogate_pair_is_written_escaped_in_one_json_line(
    tmp_path: Path,
) -> None:
    """JSON (and orjson) cannot carry a lone surrogate; the line is kept, the value escaped."""
    path = tmp_path / "log"
    with path.open("w") as stream:
        handler = LineHandler(stream)
        handler.setFormatter(json_formatter())
        line = logging.makeLogRecord(
            {"name": "gateway.audit", "levelno": INFO, "levelname": "INFO", "msg": "call-control"}
        )
        line.subject = "caller-\ud800"
        handler.handle(line)

    written = path.read_text().splitlines()
    assert len(written) == 1
    assert json.loads(written[0])["subject"] == "caller-\\ud800"
