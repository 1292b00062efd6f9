"""vae-serve over TLS and mutual TLS, with a throwaway CA made for the test session.

Every refusal is the TLS handshake's: the client sees UNAVAILABLE and the server keeps serving.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from client import cli, healthcheck
from client.client import RetryPolicy, TlsOptions, VaeClient, VaeClientError
from service.settings import Settings
from tests.conftest import ServerThread

StartServer = Callable[..., ServerThread]
# One attempt: a refused handshake is UNAVAILABLE, which the client would otherwise retry with backoff.
ONCE = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for localhost and 127.0.0.1, a client certificate it
    signed, and a client certificate from another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


class _Authority:
    """A self-signed CA that issues short-lived leaf certificates (P-256 keys: generated in microseconds)."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = self._builder(self.name, self.key.public_key(), is_ca=True).sign(
            self.key, hashes.SHA256()
        )

    def _builder(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, *, is_ca: bool
    ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        )

    def issue(
        self, directory: Path, name: str, usage: x509.ObjectIdentifier, alt_names: list[x509.GeneralName]
    ) -> tuple[Path, Path]:
        """A certificate and its key for `name`, written as name.pem and name.key."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = self._builder(subject, key.public_key(), is_ca=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(
            builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        )
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    authority, stranger = _Authority("vae-serving test CA"), _Authority("another CA")
    ca = directory / "ca.pem"
    ca.write_bytes(authority.certificate.public_bytes(serialization.Encoding.PEM))
    localhost = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
    server_cert, server_key = authority.issue(directory, "server", ExtendedKeyUsageOID.SERVER_AUTH, localhost)
    client_cert, client_key = authority.issue(directory, "client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    stranger_cert, stranger_key = stranger.issue(directory, "stranger", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return Pki(ca, server_cert, server_key, client_cert, client_key, stranger_cert, stranger_key)


@pytest.fixture(scope="module")
def tls_server(vae_bundle: Path, pki: Pki) -> Iterator[ServerThread]:
    server = ServerThread(vae_bundle, tls_cert=pki.server_cert, tls_key=pki.server_key)
    yield server
    server.stop(grace_s=0)


@pytest.fixture(scope="module")
def mutual_tls_server(vae_bundle: Path, pki: Pki) -> Iterator[ServerThread]:
    server = ServerThread(vae_bundle, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    yield server
    server.stop(grace_s=0)


def model_name(target: str, tls: TlsOptions | None) -> str:
    with VaeClient(target, tls=tls, retry=ONCE, timeout_s=10) as client:
        return client.model_info().name


def refusal(target: str, tls: TlsOptions | None) -> VaeClientError:
    with pytest.raises(VaeClientError) as refused:
        model_name(target, tls)
    return refused.value


def test_a_client_that_trusts_the_ca_is_served_over_tls(tls_server: ServerThread, pki: Pki) -> None:
    assert model_name(tls_server.target, TlsOptions(root_certificates=pki.ca)) == "tiny-vae"
    # The certificate names localhost too, so the name the client checks may differ from the target.
    tls = TlsOptions(root_certificates=pki.ca, server_name_override="localhost")
    assert model_name(tls_server.target, tls) == "tiny-vae"


def test_vae_client_info_with_ca_cert_works_over_tls(
    tls_server: ServerThread, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["info", "--target", tls_server.target, "--ca-cert", str(pki.ca), "--attempts", "1"])
    assert status == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tiny-vae"


# gRPC's own words for these refusals ("Socket closed", "WRONG_VERSION_NUMBER") name no setting: the
# client's error says which to change.
def test_a_plaintext_client_is_refused_by_the_tls_port_and_told_of_tls(
    tls_server: ServerThread, pki: Pki
) -> None:
    refused = refusal(tls_server.target, None)
    assert refused.code == grpc.StatusCode.UNAVAILABLE
    assert str(refused).endswith(
        "; if the server takes TLS only, connect with TLS (--tls or --ca-cert, TlsOptions)"
    )
    assert model_name(tls_server.target, TlsOptions(root_certificates=pki.ca)) == "tiny-vae"  # up


@pytest.mark.parametrize("wait", [[], ["--wait", "1"]])
def test_vae_healthcheck_in_plaintext_against_the_tls_port_exits_1_and_is_told_of_tls(
    tls_server: ServerThread, capsys: pytest.CaptureFixture[str], wait: list[str]
) -> None:
    """With --wait too, which waits out the refused connections and then tries once more."""
    assert healthcheck.main(["--target", tls_server.target, *wait]) == 1
    assert capsys.readouterr().err.endswith(
        "Socket closed; if the server takes TLS only, connect with TLS (--tls or --ca-cert, TlsOptions)\n"
    )


def test_a_tls_client_of_a_plaintext_port_is_told_that_the_server_takes_no_tls(
    vae_server: ServerThread, pki: Pki
) -> None:
    refused = refusal(vae_server.target, TlsOptions(root_certificates=pki.ca))
    assert refused.code == grpc.StatusCode.UNAVAILABLE
    assert str(refused).endswith(
        "; the server does not seem to take TLS: connect without it (none of the TLS flags, tls=None)"
    )


def test_a_client_that_does_not_trust_the_ca_is_refused_and_told_to_pass_it(
    tls_server: ServerThread, pki: Pki
) -> None:
    refused = refusal(tls_server.target, TlsOptions())  # system roots only
    assert refused.code == grpc.StatusCode.UNAVAILABLE
    assert str(refused).endswith(
        "; the server's certificate is not from a CA this client trusts: pass the CA that signed it "
        "(--ca-cert, TlsOptions.root_certificates)"
    )
    assert model_name(tls_server.target, TlsOptions(root_certificates=pki.ca)) == "tiny-vae"


def test_mutual_tls_serves_only_clients_with_a_certificate_from_the_ca(
    mutual_tls_server: ServerThread, pki: Pki
) -> None:
    target = mutual_tls_server.target
    without_certificate = TlsOptions(root_certificates=pki.ca)
    from_the_ca = TlsOptions(pki.ca, certificate_chain=pki.client_cert, private_key=pki.client_key)
    from_another_ca = TlsOptions(pki.ca, certificate_chain=pki.stranger_cert, private_key=pki.stranger_key)
    for refused in (refusal(target, without_certificate), refusal(target, from_another_ca)):
        assert refused.code == grpc.StatusCode.UNAVAILABLE
        assert str(refused).endswith(
            "; if the server takes only clients with a certificate (mutual TLS), pass one its CA signed "
            "(--client-cert and --client-key, TlsOptions.certificate_chain and private_key)"
        )
    assert refusal(target, None).code == grpc.StatusCode.UNAVAILABLE
    assert model_name(target, from_the_ca) == "tiny-vae"


def test_vae_client_with_a_client_certificate_works_over_mutual_tls(
    mutual_tls_server: ServerThread, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--ca-cert", str(pki.ca), "--client-cert", str(pki.client_cert)]
    flags += ["--client-key", str(pki.client_key), "--attempts", "1"]
    assert cli.main(["info", "--target", mutual_tls_server.target, *flags]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "vae"


@pytest.mark.parametrize(
    ("files", "mode"),
    [
        ((), "plaintext"),
        (("tls_cert", "tls_key"), "TLS"),
        (("tls_cert", "tls_key", "tls_client_ca"), "mutual TLS"),
    ],
)
def test_the_start_log_says_how_the_port_is_secured(
    vae_bundle: Path,
    pki: Pki,
    start_server_thread: StartServer,
    caplog: pytest.LogCaptureFixture,
    files: tuple[str, ...],
    mode: str,
) -> None:
    paths = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca}
    with caplog.at_level(logging.INFO, logger="service.server"):
        server = start_server_thread(vae_bundle, load=False, **{name: paths[name] for name in files})
    assert server.settings.tls_mode == mode
    assert f"gRPC ({mode}) on 127.0.0.1:{server.server.port}" in caplog.text
    assert "metrics (plain HTTP)" in caplog.text


def test_a_key_that_does_not_match_the_certificate_is_refused_naming_both(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not the private key of the certificate") as refused:
        Settings(model_dir=tmp_path, tls_cert=pki.server_cert, tls_key=pki.client_key)
    assert f"--tls-key {pki.client_key}" in str(refused.value)
    assert f"--tls-cert {pki.server_cert}" in str(refused.value)


def test_files_swapped_or_misused_are_refused_naming_the_flag_and_file(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as swapped:
        Settings(model_dir=tmp_path, tls_cert=pki.server_key, tls_key=pki.server_cert)
    assert f"--tls-cert {pki.server_key}: not a PEM certificate chain" in str(swapped.value)
    assert f"--tls-key {pki.server_cert}: not a PEM private key" in str(swapped.value)
    with pytest.raises(ValueError, match=f"--tls-client-ca {pki.client_key}: not a PEM CA bundle"):
        Settings(
            model_dir=tmp_path, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.client_key
        )


def test_an_encrypted_key_is_refused_as_such(pki: Pki, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ValueError, match=f"--tls-key {encrypted}: the private key is encrypted"):
        Settings(model_dir=tmp_path, tls_cert=pki.server_cert, tls_key=encrypted)
