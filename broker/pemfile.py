"""Reading and writing PEM files; private keys are created 0600 and never overwritten."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.errors import ConfigurationError

PRIVATE_MODE = 0o600


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM of key (files holding it are always 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write key as unencrypted PKCS#8 PEM, mode 0600; refuse to replace an existing file."""
    data = private_key_pem(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def read_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load an EC private key; refuse a key file that others can read."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigurationError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError(f"{path} is not an EC private key")
    return key


def replace_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Atomically replace a key file (rotation, renewal), mode 0600."""
    write_atomic(path, private_key_pem(key), mode=PRIVATE_MODE)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace path with data atomically (write to a temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def cert_pem(cert: x509.Certificate) -> bytes:
    """PEM bytes of one certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def read_certificates(path: Path) -> list[x509.Certificate]:
    """All certificates in a PEM file, in order."""
    return x509.load_pem_x509_certificates(path.read_bytes())
