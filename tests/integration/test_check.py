"""`ews-gateway check` as a real process against the simulator (NTLM, over TLS or not),
tinyproxy and `serve`: one line a step, the exact sentence of each failure, the exit status,
and never the password."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.certificates import Certificate, exchange_certificate, misnamed_certificate
from tests.integration.processes import Server, free_port, http, start
from tests.integration.tinyproxy import Tinyproxy, requires_tinyproxy, tinyproxies

__all__ = ["exchange_certificate", "misnamed_certificate", "tinyproxies"]  # fixtures

DOMAIN, USER, PASSWORD = "EXAMPLE", "svc-gateway", "Ntlm-Pa55word-for-check"
EWS_PATH = "/EWS/Exchange.asmx"
START_TIMEOUT_S = 20.0
# What every run shares: serve's configuration, NTLM with the simulator's account.
BASE = {
    "GATEWAY_AUTH": "none",
    "GATEWAY_DIAL_ALLOW": "+1555*",
    "EWS_AUTH": "ntlm",
    "EWS_USERNAME": f"{DOMAIN}\\{USER}",
    "EWS_PASSWORD": PASSWORD,
    "EWS_TIMEOUT_SECONDS": "5",
}


@pytest.fixture(scope="module")
def ntlm_users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ntlm") / "users"
    path.write_text(f"{DOMAIN}:{USER}:{PASSWORD}\n", encoding="utf-8")
    return path


def start_simulator(
    directory: Path, users: Path, certificate: Certificate | None = None
) -> Iterator[str]:
    """Start an NTLM-only simulator (over TLS with a certificate); yield its EWS_URL."""
    port = free_port()
    args = ["simulator", "--bind", f"127.0.0.1:{port}", "--auth", "ntlm"]
    if certificate is not None:
        args += ["--tls-cert", str(certificate.cert_path), "--tls-key", str(certificate.key_path)]
    log_path = directory / "simulator.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            env={**os.environ, "NTLM_USER_FILE": str(users)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, process, log_path)
        scheme = "https" if certificate else "http"
        yield f"{scheme}://127.0.0.1:{port}{EWS_PATH}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_for_port(port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text(errors="replace")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"the simulator did not listen:\n{log_path.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def plain_ews(tmp_path_factory: pytest.TempPathFactory, ntlm_users: Path) -> Iterator[str]:
    yield from start_simulator(tmp_path_factory.mktemp("plain"), ntlm_users)


@pytest.fixture(scope="module")
def tls_ews(
    tmp_path_factory: pytest.TempPathFactory,
    ntlm_users: Path,
    exchange_certificate: Certificate,
) -> Iterator[str]:
    yield from start_simulator(tmp_path_factory.mktemp("tls"), ntlm_users, exchange_certificate)


@pytest.fixture(scope="module")
def misnamed_ews(
    tmp_path_factory: pytest.TempPathFactory,
    ntlm_users: Path,
    misnamed_certificate: Certificate,
) -> Iterator[str]:
    yield from start_simulator(
        tmp_path_factory.mktemp("misnamed"), ntlm_users, misnamed_certificate
    )


class Checked:
    """One `ews-gateway check` run: its exit status and its lines."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        self.status = result.returncode
        self.stdout = result.stdout
        self.output = result.stdout + result.stderr

    @property
    def steps(self) -> list[tuple[str, str]]:
        """(ok or FAIL, step) for each step line."""
        return [
            (line[:4].strip(), line[5:14].strip())
            for line in self.stdout.splitlines()
            if line.startswith(("ok ", "FAIL "))
        ]

    @property
    def failure(self) -> str:
        """The sentence of the failed step (its only FAIL line)."""
        failed = [line[14:] for line in self.stdout.splitlines() if line.startswith("FAIL ")]
        assert len(failed) == 1, self.output
        return failed[0]


def check(**environ: str) -> Checked:
    """Run `python -m gateway check` with only serve's configuration (and PATH, PYTHONPATH)."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check"],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            **BASE,
            **environ,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    checked = Checked(result)
    assert PASSWORD not in checked.output
    assert environ.get("EWS_PASSWORD", PASSWORD) not in checked.output
    return checked


def test_a_check_that_passes_prints_one_ok_line_a_step_and_exits_0(
    tls_ews: str, exchange_certificate: Certificate
) -> None:
    checked = check(EWS_URL=tls_ews, EWS_CA_BUNDLE=str(exchange_certificate.cert_path))

    assert checked.status == 0, checked.output
    assert checked.steps == [
        ("ok", "resolve"),
        ("ok", "connect"),
        ("ok", "tls"),
        ("ok", "schemes"),
        ("ok", "auth"),
        ("ok", "ews"),
    ]
    assert f"ewsUrl={tls_ews} ewsAuth=ntlm" in checked.stdout.splitlines()[0]
    assert "ok   schemes  Exchange offers NTLM; EWS_AUTH=ntlm fits\n" in checked.stdout
    assert "ok   auth     Exchange accepted the account in EWS_USERNAME\n" in checked.stdout


def test_a_wrong_path_is_found_once_authenticated(
    tls_ews: str, exchange_certificate: Certificate
) -> None:
    checked = check(
        EWS_URL=tls_ews.replace(EWS_PATH, "/EWS/Exchange.asmxx"),
        EWS_CA_BUNDLE=str(exchange_certificate.cert_path),
    )

    assert checked.status == 1
    assert checked.steps[-2:] == [("ok", "schemes"), ("FAIL", "auth")]
    assert checked.failure == "EWS_URL's path answered 404: EWS is usually at /EWS/Exchange.asmx"


def test_a_port_nothing_listens_on_is_refused() -> None:
    port = free_port()

    checked = check(EWS_URL=f"http://127.0.0.1:{port}{EWS_PATH}")

    assert checked.status == 1
    assert checked.steps == [("ok", "resolve"), ("FAIL", "connect")]
    assert checked.failure == (
        f"Nothing listens at 127.0.0.1:{port} (connection refused); check the host and port "
        "in EWS_URL"
    )


def test_https_to_a_plain_http_port_says_the_port_does_not_speak_tls(plain_ews: str) -> None:
    checked = check(EWS_URL=plain_ews.replace("http://", "https://"))

    assert checked.status == 1
    assert checked.steps[-1] == ("FAIL", "tls")
    assert checked.failure == (
        "TLS: EWS_URL's port does not speak TLS; if it serves plain HTTP, start EWS_URL "
        "with http://"
    )


def test_http_to_a_tls_port_suggests_https(tls_ews: str) -> None:
    checked = check(EWS_URL=tls_ews.replace("https://", "http://"))

    assert checked.status == 1
    assert checked.steps[-1] == ("FAIL", "schemes")
    assert checked.failure == (
        "EWS_URL's port gave no HTTP answer; if it serves TLS, start EWS_URL with https://"
    )


def test_basic_against_an_ntlm_only_exchange_names_the_scheme_it_offers(plain_ews: str) -> None:
    checked = check(EWS_URL=plain_ews, EWS_AUTH="basic")

    assert checked.status == 1
    assert checked.steps[-1] == ("FAIL", "schemes")
    assert checked.failure == "Exchange offers NTLM; set EWS_AUTH=ntlm"
    # Basic over http:// is warned, and the password never reached Exchange.
    assert "EWS_AUTH=basic over http:// sends the password to Exchange in clear text" in (
        checked.stdout
    )


def test_a_wrong_password_is_refused_naming_the_account_variable(plain_ews: str) -> None:
    checked = check(EWS_URL=plain_ews, EWS_PASSWORD="Wr0ng-Pa55word-for-check")

    assert checked.status == 1
    assert checked.steps[-2:] == [("ok", "schemes"), ("FAIL", "auth")]
    assert checked.failure == "Exchange refused the account in EWS_USERNAME"


def test_a_certificate_no_trusted_ca_signed_names_ews_ca_bundle(tls_ews: str) -> None:
    checked = check(EWS_URL=tls_ews)

    assert checked.status == 1
    assert checked.steps == [("ok", "resolve"), ("ok", "connect"), ("FAIL", "tls")]
    assert checked.failure == (
        "TLS: Exchange's certificate is not signed by a CA the gateway trusts; set EWS_CA_BUNDLE"
    )


def test_a_certificate_for_another_name_says_which_name_it_lacks(
    misnamed_ews: str, misnamed_certificate: Certificate
) -> None:
    checked = check(EWS_URL=misnamed_ews, EWS_CA_BUNDLE=str(misnamed_certificate.cert_path))

    assert checked.status == 1
    assert checked.steps[-1] == ("FAIL", "tls")
    assert checked.failure == (
        "TLS: Exchange's certificate does not name 127.0.0.1; set EWS_URL's host to a name the "
        "certificate holds"
    )


def test_a_configuration_error_is_one_line_and_status_2() -> None:
    checked = check(EWS_URL="https://mail.example.com/EWS/Exchange.asmx", EWS_AUTH="nltm")

    assert checked.status == 2
    assert checked.output.strip() == (
        "ews-gateway: configuration error: EWS_AUTH must be one of none, basic, ntlm, kerberos, "
        "negotiate, bearer, got 'nltm'"
    )


@requires_tinyproxy
def test_through_a_proxy_the_tunnel_is_a_step_and_its_credentials_are_not_printed(
    tls_ews: str, exchange_certificate: Certificate, tinyproxies: Callable[..., Tinyproxy]
) -> None:
    proxy = tinyproxies()

    checked = check(
        EWS_URL=tls_ews,
        EWS_CA_BUNDLE=str(exchange_certificate.cert_path),
        HTTPS_PROXY=proxy.url("user:pr0xy-secret@"),
    )

    assert checked.status == 0, checked.output
    assert [step for _, step in checked.steps] == [
        "resolve",
        "connect",
        "proxy",
        "tls",
        "schemes",
        "auth",
        "ews",
    ]
    assert f"ok   connect  connected to the proxy at 127.0.0.1:{proxy.port}\n" in checked.stdout
    assert "pr0xy-secret" not in checked.output


def serve_environ(ews_url: str, port: int, **extra: str) -> dict[str, str]:
    return {
        **BASE,
        "EWS_URL": ews_url,
        "GATEWAY_BIND": f"127.0.0.1:{port}",
        "GATEWAY_WORKERS": "1",
        "GATEWAY_THREADS": "8",
        "GATEWAY_CALL_ID_KEY": "integration-tests-shared-call-id-key-0123456789",
        "GATEWAY_CHECK_AT_START": "true",
        **extra,
    }


def test_serve_checking_at_start_refuses_to_start_when_the_check_fails(
    plain_ews: str, tmp_path: Path
) -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env={**os.environ, **serve_environ(plain_ews, port, EWS_PASSWORD="Wr0ng-Pa55word")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert "check failed: Exchange refused the account in EWS_USERNAME" in result.stderr
    assert "the check of Exchange failed; not starting" in result.stderr
    assert "Wr0ng-Pa55word" not in result.stderr + result.stdout
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


def test_serve_logs_its_summary_and_warnings_then_checks_and_becomes_ready(
    plain_ews: str, tmp_path: Path
) -> None:
    port = free_port()
    environ = serve_environ(plain_ews, port, GATEWAY_DIAL_ALOW="+1*")
    server: Server = start(
        ["serve"], environ, f"http://127.0.0.1:{port}", "/readyz", tmp_path / "serve.log"
    )
    try:
        assert http("GET", f"http://127.0.0.1:{port}/readyz").status == 200
        log = server.log()
    finally:
        server.stop()

    starting = next(line for line in log.splitlines() if "ews-gateway starting" in line)
    assert f'"ewsUrl":"{plain_ews}"' in starting
    assert '"ewsAuth":"ntlm"' in starting
    assert '"sharedState":"embedded"' in starting
    assert '"dialPatterns":1' in starting
    assert "did you mean GATEWAY_DIAL_ALLOW?" in log
    assert "check: GetPhoneCallInformation answered ErrorInvalidPhoneCallId" in log
    assert PASSWORD not in log
