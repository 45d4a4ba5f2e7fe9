"""The key types the protocol accepts for devices and apps (PROTOCOL.md, "Accepted key types").

A certified key authenticates its party in mutual TLS, and a camera also signs the session
handshake with it (ECDSA with SHA-256, DER), so only keys that can do both are accepted.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

# Short name (as SDKs and docs spell it) -> curve class; the only keys a CSR may carry.
ACCEPTED_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
}
ACCEPTED_KEY_TYPES = "ECDSA P-256 (secp256r1) or P-384 (secp384r1)"


def is_accepted_key(key: object) -> bool:
    """Whether key is an ECDSA public key on one of the accepted curves."""
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(
        key.curve, tuple(ACCEPTED_CURVES.values())
    )
