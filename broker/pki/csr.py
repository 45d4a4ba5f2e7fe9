"""Checking certificate signing requests from devices and apps.

Only the public key is ever taken from a CSR (I2); this module makes sure it is a key we accept and
that the requester holds its private half (the CSR's self-signature).

Accepted keys are exactly ECDSA P-256 (secp256r1) and P-384 (secp384r1), for devices and apps, at
enrollment and renewal. Whatever is certified must also work end to end: the key authenticates the
party in mutual TLS, and a camera signs the session handshake with it (ECDSA with SHA-256,
broker.protocol.e2e). Ed25519 cannot complete mutual TLS with grpc's TLS stack and RSA has no
handshake signature scheme, so both, and every other key type or curve, are refused here rather
than certified and left to fail later.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from broker.errors import InvalidArgument
from broker.protocol.keys import ACCEPTED_KEY_TYPES, is_accepted_key

MAX_CSR_PEM_BYTES = 16 * 1024

PublicKey = ec.EllipticCurvePublicKey


def public_key_from_csr(csr_pem: str) -> PublicKey:
    """Parse and check a PEM CSR; return its public key or raise InvalidArgument saying why."""
    if not csr_pem:
        raise InvalidArgument("csr_pem is empty: send a PEM-encoded PKCS#10 certificate request")
    if len(csr_pem) > MAX_CSR_PEM_BYTES:
        raise InvalidArgument(f"csr_pem is larger than {MAX_CSR_PEM_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise InvalidArgument(
            "csr_pem is not a PEM-encoded PKCS#10 request ('-----BEGIN CERTIFICATE REQUEST-----')"
        ) from None
    key = _accepted_key(csr)
    try:
        signature_ok = csr.is_signature_valid
    except Exception:  # unsupported signature algorithm inside the CSR
        signature_ok = False
    if not signature_ok:
        raise InvalidArgument("CSR signature does not verify: sign the request with its own key")
    return key


def unsupported_key_message(key_type: str) -> str:
    """The refusal for a CSR whose key is not one we certify (names the accepted types)."""
    return f"unsupported key type {key_type}: the CSR key must be {ACCEPTED_KEY_TYPES}"


def key_type_name(key: object) -> str:
    """How a refusal names a key: RSA-2048, DSA-2048, Ed25519, Ed448, ECDSA secp521r1, ..."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey | dsa.DSAPublicKey):
        algorithm = "RSA" if isinstance(key, rsa.RSAPublicKey) else "DSA"
        return f"{algorithm}-{key.key_size}"
    names = {
        ed25519.Ed25519PublicKey: "Ed25519",
        ed448.Ed448PublicKey: "Ed448",
        x25519.X25519PublicKey: "X25519",
        x448.X448PublicKey: "X448",
    }
    return next((name for cls, name in names.items() if isinstance(key, cls)), "(unrecognised)")


def _accepted_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    try:
        key: CertificatePublicKeyTypes = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidArgument(unsupported_key_message("(unrecognised)")) from None
    if isinstance(key, ec.EllipticCurvePublicKey) and is_accepted_key(key):
        return key
    raise InvalidArgument(unsupported_key_message(key_type_name(key)))


def spki_sha256(key: PublicKey) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo: how the store recognises a reused key."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()
