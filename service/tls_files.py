"""TLS files checked before gRPC is handed them: it takes any bytes, and then fails only the bind (a
server) or every handshake (a client, which retries UNAVAILABLE as if the server were down).

Each check says what is wrong with a file, or None; the caller puts the flag and the file in front.
The checks take what gRPC takes: OpenSSL's default security level would refuse 1024-bit keys and
SHA-1 signatures, which gRPC's own TLS still serves.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any

# What `pair_problem` says of a key that is not the certificate's, for the caller to name both files.
KEY_MISMATCH = "not the private key of the certificate"


def certificate_problem(path: Path, what: str, *, ca: bool = False) -> str | None:
    """What keeps `path` from being a PEM file of certificates (`what`: "certificate chain", ...). A
    CA may also be a TRUSTED CERTIFICATE, as OpenSSL's `x509 -trustout` writes one."""
    text, problem = _read(path, what)
    if text is None:
        return problem
    if b"-----BEGIN CERTIFICATE-----" in text or (ca and b"-----BEGIN TRUSTED CERTIFICATE-----" in text):
        return None
    return f"not a PEM {what} (no -----BEGIN CERTIFICATE----- block)"


def key_problem(path: Path) -> str | None:
    """What keeps `path` from being an unencrypted PEM private key."""
    text, problem = _read(path, "private key")
    if text is None:
        return problem
    # PKCS#1, SEC1 and PKCS#8 keys all end their BEGIN line so.
    if b"PRIVATE KEY-----" not in text:
        return "not a PEM private key (no -----BEGIN ... PRIVATE KEY----- block)"
    # PKCS#8 and the older OpenSSL format mark encryption so; gRPC has no way to ask for a passphrase.
    if b"ENCRYPTED PRIVATE KEY" in text or b"Proc-Type: 4,ENCRYPTED" in text:
        return "the private key is encrypted; gRPC needs it unencrypted"
    return None


def pair_problem(cert: Path, key: Path) -> str | None:
    """KEY_MISMATCH, or what OpenSSL finds wrong with a certificate and key whose PEM blocks are there."""
    try:
        # An empty passphrase: OpenSSL would otherwise prompt for one on the terminal.
        _context().load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as error:
        # The second: a key of another algorithm than the certificate's (an RSA key, an EC one).
        if error.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            return KEY_MISMATCH
        return f"not a readable PEM certificate chain and private key ({error})"
    return None


def validity_problem(cert: Path) -> str | None:
    """Whether the first certificate in `cert`, the server's own, is outside its dates: then every
    handshake fails ("certificate has expired"), while the server logs SERVING. None where it is
    within them, or where this Python cannot read them (CPython's decoder is not public API)."""
    decode: Any = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    try:
        fields = decode(str(cert))
        not_before, not_after = (ssl.cert_time_to_seconds(fields[name]) for name in ("notBefore", "notAfter"))
    except (TypeError, KeyError, ValueError, OSError):  # the first: no decoder; SSLError is an OSError
        return None
    now = time.time()
    if now > not_after:
        return f"the certificate expired on {fields['notAfter']}: renew it"
    if now < not_before:
        return f"the certificate is not valid before {fields['notBefore']} (is this machine's clock right?)"
    return None


def ca_problem(ca: Path, what: str) -> str | None:
    """What OpenSSL finds wrong with a CA file whose PEM blocks are there."""
    try:
        _context().load_verify_locations(cafile=ca)
    except ssl.SSLError as error:
        return f"not a readable PEM {what} ({error})"
    return None


def _read(path: Path, what: str) -> tuple[bytes | None, str | None]:
    try:
        return path.read_bytes(), None
    except OSError as error:
        return None, f"cannot read the {what} ({error.strerror or error})"


def _context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # gRPC's TLS sets no security level
    return context
