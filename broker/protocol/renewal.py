"""Renewal after expiry: the transcript a camera or app signs with its expired certificate's key.

Shared by the broker (which verifies it) and the SDKs (which build and sign it); no transport here.
The encoding is the one of the end-to-end handshake (broker.protocol.e2e): every field is
``u32be(len(field)) || field``. The label makes a signature over this transcript useless anywhere
else (and a handshake signature useless here); the hashes bind the exact expired leaf and the exact
CSR; the nonce (single-use at the broker) and the timestamp (within a skew window) stop replays.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from broker.protocol.keys import is_accepted_key

LABEL = b"broker.v1 renew-expired"
MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64
MAX_SKEW_SECONDS = 300


@dataclass(frozen=True, slots=True)
class RenewalTranscript:
    """What a renew-after-expiry signature covers (DER bytes, not PEM: PEM has many spellings)."""

    leaf_der: bytes
    csr_der: bytes
    nonce: bytes
    timestamp: int

    def fields(self) -> tuple[bytes, ...]:
        """The five fields in transcript order, before length-prefixing."""
        return (
            LABEL,
            hashlib.sha256(self.leaf_der).digest(),
            hashlib.sha256(self.csr_der).digest(),
            self.nonce,
            struct.pack(">Q", self.timestamp),
        )

    def encode(self) -> bytes:
        """The transcript bytes: each field as u32be(length) || field (as in e2e.transcript)."""
        if not 0 <= self.timestamp < 2**64:
            raise ValueError("timestamp must be a non-negative Unix time")
        return b"".join(struct.pack(">I", len(f)) + f for f in self.fields())


def sign_renewal(key: ec.EllipticCurvePrivateKey, transcript: RenewalTranscript) -> bytes:
    """The client's proof of possession: ECDSA with SHA-256 by the expired certificate's key,
    DER-encoded (RFC 3279 Ecdsa-Sig-Value), over the transcript bytes."""
    return key.sign(transcript.encode(), ec.ECDSA(hashes.SHA256()))


def renewal_signature_valid(key: object, transcript: RenewalTranscript, signature: bytes) -> bool:
    """Whether signature is a valid DER ECDSA-SHA-256 signature over transcript by key (a P-256
    or P-384 public key; any other key type never verifies)."""
    if not isinstance(key, ec.EllipticCurvePublicKey) or not is_accepted_key(key):
        return False
    try:
        key.verify(signature, transcript.encode(), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True
