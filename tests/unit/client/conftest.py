"""Fixtures of the client's unit tests: TLS files, good and bad, made for the test session."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a CA certificate and its key, a client certificate it signed and the client's key,
    another key, and the client's key encrypted with a passphrase. Then files that gRPC takes though
    they are not the usual: the client's certificate followed by the CA's (a chain), two CAs in one
    file, the CA as OpenSSL's `x509 -trustout` writes it, and an old-style pair, a 1024-bit RSA key in
    its PKCS#1 form with its certificate."""

    ca: Path
    ca_key: Path
    client_cert: Path
    client_key: Path
    other_key: Path
    encrypted_key: Path
    chain: Path
    ca_bundle: Path
    trusted_ca: Path
    rsa_cert: Path
    rsa_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey, encryption: serialization.KeySerializationEncryption) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _certificate(
    subject: str,
    key: CertificateIssuerPrivateKeyTypes,
    issuer: str,
    signer: CertificateIssuerPrivateKeyTypes,
) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    directory = tmp_path_factory.mktemp("tls")
    # P-256 keys: generated in microseconds.
    ca_key, client_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    names = ["ca.pem", "ca.key", "client.pem", "client.key", "other.key", "encrypted.key"]
    names += ["chain.pem", "bundle.pem", "trusted.pem", "rsa.pem", "rsa.key"]
    files = TlsFiles(*(directory / name for name in names))
    ca = _certificate("test CA", ca_key, "test CA", ca_key)
    files.ca.write_bytes(ca)
    files.ca_key.write_bytes(_key_pem(ca_key, serialization.NoEncryption()))
    client = _certificate("client", client_key, "test CA", ca_key)
    files.client_cert.write_bytes(client)
    files.client_key.write_bytes(_key_pem(client_key, serialization.NoEncryption()))
    files.other_key.write_bytes(_key_pem(other_key, serialization.NoEncryption()))
    files.encrypted_key.write_bytes(_key_pem(client_key, serialization.BestAvailableEncryption(b"secret")))
    files.chain.write_bytes(client + ca)
    files.ca_bundle.write_bytes(ca + _certificate("other CA", other_key, "other CA", other_key))
    files.trusted_ca.write_bytes(ca.replace(b"CERTIFICATE-----", b"TRUSTED CERTIFICATE-----"))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    files.rsa_cert.write_bytes(_certificate("old client", rsa_key, "old client", rsa_key))
    files.rsa_key.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return files
