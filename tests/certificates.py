"""Self-signed certificates for the loopback Exchange, and the fixtures that make them."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Certificate:
    cert_path: Path
    key_path: Path


def self_signed_certificate(directory: Path, names: list[x509.GeneralName]) -> Certificate:
    """Write a self-signed certificate (its own CA) for the given names, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Exchange")])
    now = datetime.datetime.now(datetime.UTC)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    certificate = Certificate(directory / "exchange.pem", directory / "exchange.key")
    certificate.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certificate.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificate


@pytest.fixture(scope="module")
def exchange_certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
    ]
    return self_signed_certificate(tmp_path_factory.mktemp("exchange-tls"), names)


@pytest.fixture(scope="module")
def misnamed_certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    names: list[x509.GeneralName] = [x509.DNSName("exchange.example.test")]
    return self_signed_certificate(tmp_path_factory.mktemp("misnamed-tls"), names)
