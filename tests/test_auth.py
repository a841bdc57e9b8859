"""EWS_AUTH end to end: the gateway against the simulator's authenticating front ends."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.exchange import auth
from gateway.simulator import SimulatorServer
from gateway.simulator.acceptor import Acceptor, BearerAcceptor, NtlmAcceptor
from gateway.simulator.server import TlsIdentity
from tests.certificates import Certificate, self_signed_certificate
from tests.in_process_gateway import Gateway, https_url, placed_calls

pytestmark = pytest.mark.network

DOMAIN, USER, PASSWORD = "CORP", "svc-gateway", "correct horse battery staple"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    return self_signed_certificate(tmp_path_factory.mktemp("tls"), names)


@pytest.fixture
def ntlm_accounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    users = tmp_path / "ntlm-users"
    users.write_text(f"{DOMAIN}:{USER}:{PASSWORD}\n", encoding="utf-8")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))


Simulators = Callable[[Acceptor, Certificate | None], SimulatorServer]


@pytest.fixture(autouse=True)
def _close_gateways() -> Iterator[None]:
    yield
    while Gateway.opened:
        Gateway.opened.pop().close()


@pytest.fixture
def simulators() -> Iterator[Simulators]:
    started: list[SimulatorServer] = []

    def start(acceptor: Acceptor, certificate: Certificate | None) -> SimulatorServer:
        tls = None
        if certificate is not None:
            tls = TlsIdentity(str(certificate.cert_path), str(certificate.key_path))
        started.append(SimulatorServer(acceptor=acceptor, tls=tls).start())
        return started[-1]

    yield start
    for simulator in started:
        simulator.stop()


def ntlm_gateway(simulator: SimulatorServer, certificate: Certificate, **extra: str) -> Gateway:
    return Gateway(
        {
            "EWS_URL": https_url(simulator),
            "EWS_CA_BUNDLE": str(certificate.cert_path),
            "EWS_AUTH": "ntlm",
            "EWS_USERNAME": f"{DOMAIN}\\{USER}",
            "EWS_PASSWORD": PASSWORD,
            **extra,
        }
    )


@pytest.mark.usefixtures("ntlm_accounts")
def test_ntlm_with_extended_protection_required_authenticates_once_per_connection(
    simulators: Simulators, certificate: Certificate
) -> None:
    acceptor = NtlmAcceptor()
    simulator = simulators(acceptor, certificate)
    gateway = ntlm_gateway(simulator, certificate)

    answers = [gateway.place_call() for _ in range(3)]

    assert [answer.status_code for answer in answers] == [201, 201, 201]
    # One handshake: the authenticated connection carried the next two calls.
    assert acceptor.users == [f"{DOMAIN}\\{USER}"]
    assert placed_calls(simulator) == 3


@pytest.mark.usefixtures("ntlm_accounts")
@pytest.mark.parametrize(
    "binding",
    [lambda _der: b"\x5a" * 32, None],
    ids=["for another certificate", "none"],
)
def test_ntlm_without_the_right_channel_binding_is_refused(
    simulators: Simulators,
    certificate: Certificate,
    monkeypatch: pytest.MonkeyPatch,
    binding: Callable[[bytes], bytes] | None,
) -> None:
    acceptor = NtlmAcceptor()
    simulator = simulators(acceptor, certificate)
    gateway = ntlm_gateway(simulator, certificate)
    if binding is None:
        # As a client without Extended Protection: no binding at all.
        monkeypatch.setattr(auth, "GssChannelBindings", lambda **_: None)
    else:
        # As when a TLS-intercepting proxy sits between the gateway and Exchange.
        monkeypatch.setattr(auth, "certificate_hash", binding)

    answer = gateway.place_call()

    assert answer.status_code == 502
    assert answer.json["type"].endswith("upstream-authentication-failed")
    assert (acceptor.users, placed_calls(simulator)) == ([], 0)
    assert gateway.upstream("http_error") == 1


@pytest.mark.usefixtures("ntlm_accounts")
def test_a_kept_connection_exchange_forgot_is_authenticated_again_and_the_call_placed_once(
    simulators: Simulators, certificate: Certificate
) -> None:
    acceptor = NtlmAcceptor()
    simulator = simulators(acceptor, certificate)
    gateway = ntlm_gateway(simulator, certificate)
    assert gateway.place_call().status_code == 201

    acceptor.forget_connections()
    assert gateway.place_call().status_code == 201
    acceptor.forget_connections()  # and again, later: each request may authenticate once more
    assert gateway.place_call().status_code == 201

    assert acceptor.users == [f"{DOMAIN}\\{USER}"] * 3
    assert placed_calls(simulator) == 3


@pytest.mark.usefixtures("ntlm_accounts")
def test_ntlm_with_a_wrong_password_is_upstream_authentication_failed_and_not_repeated(
    simulators: Simulators, certificate: Certificate
) -> None:
    acceptor = NtlmAcceptor()
    simulator = simulators(acceptor, certificate)
    gateway = ntlm_gateway(simulator, certificate, EWS_PASSWORD="wrong")

    answers = [gateway.place_call() for _ in range(3)]

    assert [answer.status_code for answer in answers] == [502, 502, 502]
    assert all(a.json["type"].endswith("upstream-authentication-failed") for a in answers)
    assert (acceptor.users, placed_calls(simulator)) == ([], 0)
    # Refused once; the next calls are not another failed logon toward the lockout.
    assert acceptor.ledger.refused == 1


@pytest.mark.usefixtures("ntlm_accounts")
@pytest.mark.parametrize(
    ("negotiate", "offers", "modes"),
    [(False, "NTLM", "ntlm"), (True, "Negotiate, NTLM", "ntlm or negotiate")],
    ids=["ntlm-only", "negotiate-and-ntlm"],
)
@pytest.mark.parametrize(
    ("environ", "sends"),
    [
        ({}, "EWS_AUTH=none sends no credentials"),
        (
            {"EWS_AUTH": "basic", "EWS_USERNAME": USER, "EWS_PASSWORD": PASSWORD},
            "EWS_AUTH=basic speaks Basic",
        ),
    ],
    ids=["none", "basic"],
)
def test_an_exchange_with_windows_authentication_only_names_its_schemes_and_the_mode_to_set(
    simulators: Simulators,
    negotiate: bool,
    offers: str,
    modes: str,
    environ: dict[str, str],
    sends: str,
) -> None:
    # Was "Exchange refused the gateway's credentials": none had been offered to it.
    acceptor = NtlmAcceptor(negotiate=negotiate)
    simulator = simulators(acceptor, None)
    gateway = Gateway({"EWS_URL": simulator.ews_url, **environ})

    answer = gateway.place_call()

    assert answer.status_code == 502
    assert answer.json["type"].endswith("upstream-authentication-failed")
    assert answer.json["detail"] == (
        f"Upstream authentication failed: Exchange offers {offers}, and {sends}; "
        f"set EWS_AUTH={modes}"
    )
    assert (acceptor.ledger.refused, placed_calls(simulator)) == (0, 0)


# Failure 2: Exchange answers the NTLM negotiate message without a challenge.


def answer_every_request(head: bytes) -> Callable[[socket.socket], None]:
    """Serve a connection by answering each request with the same head and no body."""

    def serve(connection: socket.socket) -> None:
        with connection:
            while request := connection.recv(65536):
                if b"\r\n\r\n" in request:
                    connection.sendall(head + b"Content-Length: 0\r\n\r\n")

    return serve


class OneAnswerServer:
    """A loopback server whose every connection gets the same bare answer."""

    def __init__(self, head: bytes) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._serve = answer_every_request(head)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/EWS/Exchange.asmx"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def close(self) -> None:
        self._listener.close()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: NTLM\r\n",
        b"HTTP/1.1 401 Unauthorized\r\n",
        b"HTTP/1.1 400 Bad Request\r\n",
    ],
    ids=["401-bare-ntlm", "401-no-challenge", "400-no-www-authenticate"],
)
def test_a_negotiate_answered_without_a_challenge_is_upstream_authentication_failed(
    head: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    server = OneAnswerServer(head)
    try:
        gateway = Gateway(
            {
                "EWS_URL": server.url,
                "EWS_AUTH": "ntlm",
                "EWS_USERNAME": f"{DOMAIN}\\{USER}",
                "EWS_PASSWORD": PASSWORD,
            }
        )
        with caplog.at_level(logging.INFO):
            answer = gateway.place_call()
    finally:
        server.close()

    assert answer.status_code == 502
    assert answer.json["type"].endswith("upstream-authentication-failed")
    assert gateway.upstream("http_error") == 1
    assert not [record for record in caplog.records if record.exc_info]


# Bearer tokens that expire, rotated in the token file.


def write_token(path: Path, token: str) -> None:
    # As a mounted secret is updated: a new file renamed over the old one.
    staged = path.with_suffix(".new")
    staged.write_text(token + "\n", encoding="utf-8")
    staged.replace(path)


def bearer_gateway(simulator: SimulatorServer, token_file: Path) -> Gateway:
    return Gateway(
        {
            "EWS_URL": simulator.ews_url,
            "EWS_AUTH": "bearer",
            "EWS_BEARER_TOKEN_FILE": str(token_file),
        }
    )


def test_a_rotated_bearer_token_file_is_used_from_the_next_call(
    simulators: Simulators, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checked on every call here; once a second in production.
    monkeypatch.setattr(auth.BearerToken, "CHECK_INTERVAL_S", 0.0)
    acceptor = BearerAcceptor(lifetime_s=3600)
    simulator = simulators(acceptor, None)
    token_file = tmp_path / "token"
    first = acceptor.issue()
    write_token(token_file, first)
    gateway = bearer_gateway(simulator, token_file)
    assert gateway.place_call().status_code == 201

    acceptor.expire(first)
    write_token(token_file, acceptor.issue())

    assert gateway.place_call().status_code == 201
    assert placed_calls(simulator) == 2


def test_after_a_401_the_token_file_is_read_again_once(
    simulators: Simulators, tmp_path: Path
) -> None:
    acceptor = BearerAcceptor(lifetime_s=3600)
    simulator = simulators(acceptor, None)
    token_file = tmp_path / "token"
    first = acceptor.issue()
    write_token(token_file, first)
    gateway = bearer_gateway(simulator, token_file)
    assert gateway.place_call().status_code == 201

    # Rewritten in place with a token of the same length and the old time stamp: the
    # file looks unchanged, so only the 401 can make the gateway read it.
    before = os.stat(token_file)
    second = acceptor.issue()
    assert len(second) == len(first)
    acceptor.expire(first)
    with token_file.open("r+", encoding="utf-8") as rewritten:
        rewritten.write(second + "\n")
    os.utime(token_file, ns=(before.st_atime_ns, before.st_mtime_ns))

    assert gateway.place_call().status_code == 201
    assert placed_calls(simulator) == 2
    assert acceptor.refused == 1


def test_an_expired_token_not_replaced_is_upstream_authentication_failed(
    simulators: Simulators, tmp_path: Path
) -> None:
    acceptor = BearerAcceptor(lifetime_s=3600)
    simulator = simulators(acceptor, None)
    token_file = tmp_path / "token"
    token = acceptor.issue()
    write_token(token_file, token)
    gateway = bearer_gateway(simulator, token_file)
    acceptor.expire(token)

    answer = gateway.place_call()

    assert answer.status_code == 502
    assert answer.json["type"].endswith("upstream-authentication-failed")
    assert placed_calls(simulator) == 0
    # The file was read again once after the 401; the same token was not sent twice more.
    assert acceptor.refused == 1


# RFC 5929 section 4.1: which hash tls-server-end-point takes of the certificate.


def certificate_signed_with(algorithm: hashes.HashAlgorithm) -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mail.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm)
    )
    return certificate.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("signature_hash", "expected"),
    [
        (hashes.SHA384(), hashlib.sha384),
        (hashes.SHA512(), hashlib.sha512),
        (hashes.SHA256(), hashlib.sha256),
    ],
    ids=["sha384", "sha512", "sha256"],
)
def test_the_channel_binding_hashes_the_certificate_as_its_signature_does(
    signature_hash: hashes.HashAlgorithm, expected: Callable[[bytes], Any]
) -> None:
    der = certificate_signed_with(signature_hash)

    assert auth.certificate_hash(der) == expected(der).digest()


def test_a_certificate_signed_with_sha1_is_bound_by_its_sha256() -> None:
    # cryptography no longer signs with SHA-1; this one was made with openssl req -sha1.
    pem = (FIXTURES / "certificate_signed_with_sha1.pem").read_text(encoding="ascii")
    der = ssl.PEM_cert_to_DER_cert(pem)
    assert x509.load_der_x509_certificate(der).signature_hash_algorithm.name == "sha1"

    assert auth.certificate_hash(der) == hashlib.sha256(der).digest()


@pytest.fixture
def no_kerberos_realm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A realm whose KDC is nowhere to be found: no Kerberos ticket can be had."""
    pytest.importorskip("gssapi", reason="GSSAPI (the kerberos extra) is not installed")
    krb5_conf = tmp_path / "krb5.conf"
    krb5_conf.write_text(
        "[libdefaults]\n default_realm = CORP.TEST\n dns_lookup_kdc = false\n", encoding="ascii"
    )
    monkeypatch.setenv("KRB5_CONFIG", str(krb5_conf))
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{tmp_path / 'ccache'}")


@pytest.mark.usefixtures("ntlm_accounts", "no_kerberos_realm")
def test_negotiate_without_a_kerberos_ticket_falls_back_to_ntlm_as_windows_does(
    simulators: Simulators, certificate: Certificate
) -> None:
    acceptor = NtlmAcceptor(negotiate=True)
    simulator = simulators(acceptor, certificate)
    gateway = ntlm_gateway(simulator, certificate, EWS_AUTH="negotiate")

    answers = [gateway.place_call() for _ in range(3)]

    assert [answer.status_code for answer in answers] == [201, 201, 201]
    assert acceptor.users == [f"{DOMAIN}\\{USER}"]
    assert placed_calls(simulator) == 3


@pytest.mark.usefixtures("ntlm_accounts", "no_kerberos_realm")
def test_ntlm_inside_negotiate_without_a_channel_binding_is_refused(
    simulators: Simulators, certificate: Certificate, monkeypatch: pytest.MonkeyPatch
) -> None:
    acceptor = NtlmAcceptor(negotiate=True)
    simulator = simulators(acceptor, certificate)
    gateway = ntlm_gateway(simulator, certificate, EWS_AUTH="negotiate")
    monkeypatch.setattr(auth, "GssChannelBindings", lambda **_: None)

    answer = gateway.place_call()

    assert answer.status_code == 502
    assert (acceptor.users, placed_calls(simulator)) == ([], 0)
