"""EWS_AUTH=kerberos and negotiate against a real MIT KDC and a Kerberos-only Exchange.

The suite starts krb5kdc with a throwaway realm (k5test) on a free loopback
port; the gateway gets its tickets there and authenticates, over TLS with the
channel binding required, to the simulator's Negotiate acceptor, which reads
its keys from a keytab. The realm's krb5.conf keeps MIT's defaults, host name
canonicalisation through DNS (dns_canonicalize_hostname, rdns) included, which
the gateway must not need turned off.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509

from gateway.exchange import auth
from gateway.exchange.tickets import TicketCache
from gateway.simulator import SimulatorServer
from gateway.simulator.acceptor import KerberosAcceptor
from gateway.simulator.server import TlsIdentity
from tests.certificates import Certificate, self_signed_certificate
from tests.in_process_gateway import CALL, Gateway, https_url, placed_calls
from tests.integration.kdc import kdc_sockets
from tests.integration.processes import free_port, http, start

pytest.importorskip(
    "krb5", reason="python-krb5 is not installed: pip install '.[kerberos]' (needs libkrb5-dev, cc)"
)
k5test = pytest.importorskip("k5test", reason="k5test (the dev extra) is not installed")
pytest.importorskip(
    "gssapi", reason="GSSAPI is not installed: pip install '.[kerberos]' (needs libkrb5-dev, cc)"
)

if shutil.which("krb5kdc") is None and not Path("/usr/sbin/krb5kdc").exists():
    pytest.skip("krb5kdc (Debian krb5-kdc) is not installed", allow_module_level=True)

REALM = "GATEWAY.TEST"
SERVICE = f"HTTP/localhost@{REALM}"
# Exchange by the name a deployment gives it; its address reverse-resolves to another name.
EXCHANGE_HOST = "mail.corp.test"
EXCHANGE_SERVICE = f"HTTP/{EXCHANGE_HOST}@{REALM}"
ACCOUNT, PASSWORD = f"svc-gateway@{REALM}", "Kerberos-Password-1"
KEYTAB_ACCOUNT = f"svc-keytab@{REALM}"


class Realm:
    """A running KDC and what the gateway and the acceptor need from it."""

    def __init__(self, tmp: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.k5 = k5test.K5Realm(
            realm=REALM,
            portbase=port,
            create_host=False,
            get_creds=False,
        )
        self.service_keytab = str(tmp / "http.keytab")
        self.client_keytab = str(tmp / "svc-keytab.keytab")
        for service in (SERVICE, EXCHANGE_SERVICE):
            self.k5.addprinc(service)
            self.k5.extract_keytab(service, self.service_keytab)
        self.k5.addprinc(ACCOUNT, PASSWORD)
        self.k5.addprinc(KEYTAB_ACCOUNT)
        self.k5.extract_keytab(KEYTAB_ACCOUNT, self.client_keytab)

    def tickets_issued_to(self, principal: str) -> Counter[str]:
        """Count the KDC's AS_REQ and TGS_REQ log lines that issued principal a ticket."""
        log = Path(self.k5.tmpdir, "kdc.log").read_text(encoding="utf-8", errors="replace")
        issued = Counter[str]()
        for line in log.splitlines():
            if "ISSUE" in line and f"{principal} for" in line:
                issued["AS_REQ" if "AS_REQ" in line else "TGS_REQ"] += 1
        return issued

    def services_asked_for_by(self, principal: str) -> list[str]:
        """Return the service principals the KDC's log says principal asked tickets for."""
        log = Path(self.k5.tmpdir, "kdc.log").read_text(encoding="utf-8", errors="replace")
        asked = re.compile(rf"TGS_REQ .* {re.escape(principal)} for ([^\s,]+)")
        return [match[1] for match in map(asked.search, log.splitlines()) if match]

    def ticket_requests_of(self, principal: str) -> int:
        """Count the KDC's log lines of AS requests for principal, answered or refused."""
        log = Path(self.k5.tmpdir, "kdc.log").read_text(encoding="utf-8", errors="replace")
        asked = f"{principal} for krbtgt/"
        return sum(1 for line in log.splitlines() if "AS_REQ" in line and asked in line)

    def stop(self) -> None:
        self.k5.stop()
        shutil.rmtree(self.k5.tmpdir, ignore_errors=True)


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realm]:
    started = Realm(tmp_path_factory.mktemp("realm"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(EXCHANGE_HOST)]
    return self_signed_certificate(tmp_path_factory.mktemp("tls"), names)


@pytest.fixture
def kerberos_env(realm: Realm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the process's Kerberos library at the test realm, with an empty ticket cache."""
    monkeypatch.setenv("KRB5_CONFIG", realm.k5.env["KRB5_CONFIG"])
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{tmp_path / 'ccache'}")
    monkeypatch.setenv("KRB5RCACHEDIR", str(tmp_path))
    monkeypatch.delenv("KRB5_KTNAME", raising=False)
    monkeypatch.delenv("KRB5_CLIENT_KTNAME", raising=False)


@pytest.fixture
def exchange(
    realm: Realm, certificate: Certificate, kerberos_env: None
) -> Iterator[tuple[SimulatorServer, KerberosAcceptor]]:
    acceptor = KerberosAcceptor(realm.service_keytab)
    tls = TlsIdentity(str(certificate.cert_path), str(certificate.key_path))
    simulator = SimulatorServer(acceptor=acceptor, tls=tls).start()
    yield simulator, acceptor
    simulator.stop()


@pytest.fixture(autouse=True)
def _close_gateways() -> Iterator[None]:
    yield
    while Gateway.opened:
        Gateway.opened.pop().close()


def kerberos_gateway(
    simulator: SimulatorServer, certificate: Certificate, **environ: str
) -> Gateway:
    return Gateway(
        {
            "EWS_URL": https_url(simulator),
            "EWS_CA_BUNDLE": str(certificate.cert_path),
            "EWS_AUTH": "kerberos",
            **environ,
        }
    )


def test_a_password_gets_a_ticket_and_one_handshake_serves_later_calls(
    exchange: tuple[SimulatorServer, KerberosAcceptor], certificate: Certificate
) -> None:
    simulator, acceptor = exchange
    gateway = kerberos_gateway(simulator, certificate, EWS_USERNAME=ACCOUNT, EWS_PASSWORD=PASSWORD)

    answers = [gateway.place_call() for _ in range(3)]

    assert [answer.status_code for answer in answers] == [201, 201, 201]
    assert acceptor.users == [ACCOUNT]
    assert placed_calls(simulator) == 3


def test_new_connections_share_one_ticket_granting_ticket(
    exchange: tuple[SimulatorServer, KerberosAcceptor], certificate: Certificate, realm: Realm
) -> None:
    simulator, acceptor = exchange
    gateway = kerberos_gateway(simulator, certificate, EWS_USERNAME=ACCOUNT, EWS_PASSWORD=PASSWORD)
    tickets_before = realm.tickets_issued_to(ACCOUNT)
    # A closed pool keeps no connection: every call opens and authenticates a new one.
    gateway.close()

    answers = [gateway.place_call() for _ in range(3)]

    assert [answer.status_code for answer in answers] == [201, 201, 201]
    assert acceptor.users == [ACCOUNT] * 3
    assert realm.tickets_issued_to(ACCOUNT) - tickets_before == {"AS_REQ": 1, "TGS_REQ": 1}


def test_a_ticket_near_its_end_is_asked_for_again(
    exchange: tuple[SimulatorServer, KerberosAcceptor],
    certificate: Certificate,
    realm: Realm,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    simulator, _acceptor = exchange
    # Every ticket the KDC issues (10 h here) is "near its end" for this test.
    monkeypatch.setattr(TicketCache, "RENEW_BEFORE_S", 10 * 24 * 3600)
    gateway = kerberos_gateway(simulator, certificate, EWS_USERNAME=ACCOUNT, EWS_PASSWORD=PASSWORD)
    tickets_before = realm.tickets_issued_to(ACCOUNT)
    gateway.close()

    answers = [gateway.place_call() for _ in range(2)]

    assert [answer.status_code for answer in answers] == [201, 201]
    assert (realm.tickets_issued_to(ACCOUNT) - tickets_before)["AS_REQ"] == 2


def test_negotiate_with_a_keytab_authenticates_with_kerberos(
    exchange: tuple[SimulatorServer, KerberosAcceptor], certificate: Certificate, realm: Realm
) -> None:
    simulator, acceptor = exchange
    gateway = kerberos_gateway(
        simulator,
        certificate,
        EWS_AUTH="negotiate",
        EWS_KEYTAB=realm.client_keytab,
        EWS_USERNAME=KEYTAB_ACCOUNT,
    )

    assert gateway.place_call().status_code == 201
    assert acceptor.users == [KEYTAB_ACCOUNT]


def test_without_password_or_keytab_mit_fills_the_ticket_cache_from_the_client_keytab(
    exchange: tuple[SimulatorServer, KerberosAcceptor],
    certificate: Certificate,
    realm: Realm,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    simulator, acceptor = exchange
    # MIT's own way: an empty ticket cache, filled from KRB5_CLIENT_KTNAME when needed.
    monkeypatch.setenv("KRB5_CLIENT_KTNAME", realm.client_keytab)
    gateway = kerberos_gateway(simulator, certificate, EWS_USERNAME=KEYTAB_ACCOUNT)

    assert gateway.place_call().status_code == 201
    assert acceptor.users == [KEYTAB_ACCOUNT]


def test_a_configured_spn_names_the_service_ticket(
    exchange: tuple[SimulatorServer, KerberosAcceptor], certificate: Certificate
) -> None:
    simulator, acceptor = exchange
    gateway = kerberos_gateway(
        simulator,
        certificate,
        EWS_USERNAME=ACCOUNT,
        EWS_PASSWORD=PASSWORD,
        EWS_SPN="HTTP/cas.unknown.test",
    )

    answer = gateway.place_call()

    # The KDC knows no such service: the configured name, not the URL's host, was asked for.
    assert answer.status_code == 502
    assert answer.json["type"].endswith("upstream-authentication-failed")
    assert acceptor.users == []


@pytest.fixture(scope="module")
def private_hosts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A command prefix that runs a command with its own /etc/hosts (a private mount
    namespace): EXCHANGE_HOST is 127.0.0.1 there, and 127.0.0.1 reverse-resolves to
    localhost, as a balanced name or a DNS alias reverse-resolves to some other name."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed: no private /etc/hosts")
    hosts = tmp_path_factory.mktemp("hosts") / "hosts"
    system = Path("/etc/hosts").read_text(encoding="utf-8")
    hosts.write_text(f"127.0.0.1 localhost\n{system}\n127.0.0.1 {EXCHANGE_HOST}\n")
    wrapper = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"']
    wrapper.append(str(hosts))
    lookups = (
        "import socket, sys; address = socket.gethostbyname(sys.argv[1]); "
        "print(address, socket.getnameinfo((address, 0), socket.NI_NAMEREQD)[0])"
    )
    probe = subprocess.run(
        [*wrapper, sys.executable, "-c", lookups, EXCHANGE_HOST], capture_output=True, check=False
    )
    if probe.returncode != 0:
        reason = probe.stderr.decode(errors="replace").strip().splitlines()[-1:]
        pytest.skip(f"unshare --mount cannot give a process its own /etc/hosts (root?): {reason}")
    assert probe.stdout.decode().split() == ["127.0.0.1", "localhost"]
    return wrapper


@pytest.mark.parametrize(
    ("mode", "spn"),
    [
        ("kerberos", f"HTTP/{EXCHANGE_HOST}"),
        ("kerberos", None),
        ("negotiate", f"HTTP/{EXCHANGE_HOST}"),
    ],
    ids=["kerberos-EWS_SPN", "kerberos-host-of-EWS_URL", "negotiate-EWS_SPN"],
)
def test_the_service_ticket_is_for_the_name_given_not_the_one_dns_reverse_resolves(
    exchange: tuple[SimulatorServer, KerberosAcceptor],
    certificate: Certificate,
    realm: Realm,
    private_hosts: list[str],
    tmp_path: Path,
    mode: str,
    spn: str | None,
) -> None:
    """At MIT's defaults krb5 turns a host-based name into HTTP/<the name its address
    reverse-resolves to>: here HTTP/localhost, and every call was 502."""
    simulator, acceptor = exchange
    port = free_port()
    env = {
        "EWS_URL": https_url(simulator).replace("localhost", EXCHANGE_HOST),
        "EWS_CA_BUNDLE": str(certificate.cert_path),
        "EWS_AUTH": mode,
        "EWS_USERNAME": ACCOUNT,
        "EWS_PASSWORD": PASSWORD,
        "GATEWAY_AUTH": "none",
        "GATEWAY_DIAL_ALLOW": "*",
        "GATEWAY_BIND": f"127.0.0.1:{port}",
        "GATEWAY_WORKERS": "1",
        "GATEWAY_THREADS": "2",
        **({"EWS_SPN": spn} if spn else {}),
    }
    asked_before = len(realm.services_asked_for_by(ACCOUNT))
    url = f"http://127.0.0.1:{port}"
    gateway = start(["serve"], env, url, "/readyz", tmp_path / "gw.log", wrapper=private_hosts)
    try:
        answer = http("POST", f"{url}/calls", CALL)
    finally:
        gateway.stop()

    assert realm.services_asked_for_by(ACCOUNT)[asked_before:] == [EXCHANGE_SERVICE]
    assert answer.status == 201, answer.body
    assert acceptor.users == [ACCOUNT]
    assert placed_calls(simulator) == 1


@pytest.mark.parametrize(
    ("username", "password"),
    [(ACCOUNT, "wrong-password"), (f"nobody@{REALM}", PASSWORD)],
    ids=["wrong-password", "unknown-principal"],
)
def test_credentials_the_kdc_refuses_are_upstream_authentication_failed(
    exchange: tuple[SimulatorServer, KerberosAcceptor],
    certificate: Certificate,
    username: str,
    password: str,
) -> None:
    simulator, acceptor = exchange
    gateway = kerberos_gateway(simulator, certificate, EWS_USERNAME=username, EWS_PASSWORD=password)

    answer = gateway.place_call()

    assert answer.status_code == 502
    assert answer.json["type"].endswith("upstream-authentication-failed")
    assert gateway.upstream("http_error") == 1
    assert (acceptor.users, placed_calls(simulator)) == ([], 0)


@pytest.mark.parametrize(
    "binding",
    [lambda _der: b"\x5a" * 32, None],
    ids=["for another certificate", "none"],
)
def test_without_the_right_channel_binding_the_ticket_is_refused(
    exchange: tuple[SimulatorServer, KerberosAcceptor],
    certificate: Certificate,
    monkeypatch: pytest.MonkeyPatch,
    binding: Callable[[bytes], bytes] | None,
) -> None:
    simulator, acceptor = exchange
    gateway = kerberos_gateway(simulator, certificate, EWS_USERNAME=ACCOUNT, EWS_PASSWORD=PASSWORD)
    if binding is None:
        monkeypatch.setattr(auth, "GssChannelBindings", lambda **_: None)
    else:
        monkeypatch.setattr(auth, "certificate_hash", binding)

    answer = gateway.place_call()

    assert answer.status_code == 502
    assert answer.json["type"].endswith("upstream-authentication-failed")
    assert (acceptor.users, placed_calls(simulator)) == ([], 0)


def test_a_kept_connection_exchange_forgot_gets_a_new_handshake(
    exchange: tuple[SimulatorServer, KerberosAcceptor], certificate: Certificate
) -> None:
    simulator, acceptor = exchange
    gateway = kerberos_gateway(simulator, certificate, EWS_USERNAME=ACCOUNT, EWS_PASSWORD=PASSWORD)
    assert gateway.place_call().status_code == 201

    acceptor.forget_connections()

    assert gateway.place_call().status_code == 201
    assert acceptor.users == [ACCOUNT, ACCOUNT]
    assert placed_calls(simulator) == 2


def test_a_refused_password_is_not_sent_to_the_kdc_again_for_a_while(
    exchange: tuple[SimulatorServer, KerberosAcceptor], certificate: Certificate, realm: Realm
) -> None:
    simulator, _acceptor = exchange
    gateway = kerberos_gateway(
        simulator, certificate, EWS_USERNAME=ACCOUNT, EWS_PASSWORD="another-wrong-password"
    )
    requests_before = realm.ticket_requests_of(ACCOUNT)

    answers = [gateway.place_call() for _ in range(3)]

    assert [answer.status_code for answer in answers] == [502, 502, 502]
    # One try at the KDC: the next calls get its refusal, and the account is not locked out.
    assert realm.ticket_requests_of(ACCOUNT) - requests_before == 1


class TicketGrantingOnlyKdc:
    """The realm's KDC behind a relay that answers AS requests and drops TGS requests, as a
    KDC that stops answering between the two does: the ticket-granting ticket comes, a
    service ticket never does."""

    AS_REQ = b"\x6a"  # ASN.1 [APPLICATION 10] (RFC 4120 5.4.1); a TGS-REQ is [APPLICATION 12]

    def __init__(self, kdc_port: int) -> None:
        self._kdc = ("127.0.0.1", kdc_port)
        # TCP is taken and never answered; UDP carries the requests (all small here).
        self._datagrams, self._stream = kdc_sockets()
        self.port = self._datagrams.getsockname()[1]
        self.dropped = 0
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self) -> None:
        while True:
            try:
                request, client = self._datagrams.recvfrom(65535)
            except OSError:
                return  # closed
            if request[:1] != self.AS_REQ:
                self.dropped += 1
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as kdc:
                kdc.settimeout(5)
                kdc.sendto(request, self._kdc)
                self._datagrams.sendto(kdc.recv(65535), client)

    def close(self) -> None:
        self._datagrams.close()
        self._stream.close()


@pytest.fixture
def tgs_silent(
    realm: Realm, kerberos_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TicketGrantingOnlyKdc]:
    kdc = TicketGrantingOnlyKdc(realm.k5.portbase)
    config = Path(realm.k5.env["KRB5_CONFIG"]).read_text(encoding="utf-8")
    relayed = config.replace(f"localhost:{realm.k5.portbase}", f"127.0.0.1:{kdc.port}")
    assert relayed != config
    (tmp_path / "krb5.conf").write_text(relayed, encoding="utf-8")
    monkeypatch.setenv("KRB5_CONFIG", str(tmp_path / "krb5.conf"))
    yield kdc
    kdc.close()


def test_a_service_ticket_the_kdc_never_sends_is_a_timeout_by_the_deadline(
    exchange: tuple[SimulatorServer, KerberosAcceptor],
    certificate: Certificate,
    tgs_silent: TicketGrantingOnlyKdc,
) -> None:
    simulator, acceptor = exchange
    gateway = kerberos_gateway(
        simulator,
        certificate,
        EWS_USERNAME=ACCOUNT,
        EWS_PASSWORD=PASSWORD,
        EWS_TIMEOUT_SECONDS="1",
    )

    started = time.monotonic()
    answer = gateway.place_call()
    took_s = time.monotonic() - started

    assert answer.status_code == 504
    assert answer.get_json()["detail"] == "The Kerberos KDC did not answer in time"
    assert took_s < 1 + 1.0  # krb5 alone would wait for this KDC far longer
    assert tgs_silent.dropped >= 1  # the ticket-granting ticket came; the service ticket not
    assert acceptor.users == []
    assert placed_calls(simulator) == 0


def test_while_the_kdc_is_silent_new_connections_wait_for_the_one_service_ticket_request(
    exchange: tuple[SimulatorServer, KerberosAcceptor],
    certificate: Certificate,
    tgs_silent: TicketGrantingOnlyKdc,
) -> None:
    simulator, _ = exchange
    gateway = kerberos_gateway(
        simulator,
        certificate,
        EWS_USERNAME=ACCOUNT,
        EWS_PASSWORD=PASSWORD,
        EWS_TIMEOUT_SECONDS="0.5",
    )
    before = set(threading.enumerate())

    answers = [gateway.place_call() for _ in range(4)]

    assert [answer.status_code for answer in answers] == [504] * 4
    # krb5 keeps each request going for about 27 s: one thread, not one per connection.
    asking = [t for t in threading.enumerate() if t.name == "ews-kdc" and t not in before]
    assert len(asking) == 1


def test_negotiate_falls_back_to_ntlm_when_the_service_ticket_does_not_come_in_time(
    exchange: tuple[SimulatorServer, KerberosAcceptor],
    certificate: Certificate,
    tgs_silent: TicketGrantingOnlyKdc,
    caplog: pytest.LogCaptureFixture,
) -> None:
    simulator, acceptor = exchange
    gateway = kerberos_gateway(
        simulator,
        certificate,
        EWS_AUTH="negotiate",
        EWS_USERNAME=ACCOUNT,
        EWS_PASSWORD=PASSWORD,
        EWS_TIMEOUT_SECONDS="1",
    )

    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="gateway.upstream_auth"):
        answer = gateway.place_call()
    took_s = time.monotonic() - started

    # As Windows clients do, within the deadline; this Exchange takes Kerberos only.
    assert any("no Kerberos service ticket" in r.getMessage() for r in caplog.records)
    assert answer.status_code == 502
    assert answer.get_json()["title"] == "The gateway could not authenticate to Exchange"
    assert took_s < 1 + 1.0
    assert acceptor.users == []
