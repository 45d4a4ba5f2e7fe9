"""Checking certificate signing requests from devices and apps.

Only the public key is ever taken from a CSR (I2); this module makes sure it is a key we accept and
that the requester holds its private half (the CSR's self-signature).
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.errors import InvalidArgument

MAX_CSR_PEM_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


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


def _accepted_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    try:
        key = csr.public_key()
    except (ValueError, TypeError):
        raise InvalidArgument("CSR public key type is not supported") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ACCEPTED_CURVES):
            raise InvalidArgument(
                f"CSR key curve {key.curve.name} not accepted: use P-256, P-384, Ed25519 or RSA >= 2048"
            )
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise InvalidArgument(
                f"CSR RSA key has {key.key_size} bits: use {MIN_RSA_BITS}-{MAX_RSA_BITS} bits, "
                "or better P-256"
            )
        return key
    raise InvalidArgument("CSR key type not accepted: use P-256, P-384, Ed25519 or RSA >= 2048")


def spki_sha256(key: PublicKey) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo: how the store recognises a reused key."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()
