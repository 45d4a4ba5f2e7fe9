"""Single-use secrets (enrollment tokens, claim codes): generated here, stored only as hashes (I11)."""

from __future__ import annotations

import hashlib
import secrets

ENROLLMENT_TOKEN_PREFIX = "bet_"  # noqa: S105 (a prefix, not a secret)
# Claim codes are typed by people: Crockford-style alphabet without 0/O/1/I/L/U.
CLAIM_ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"
CLAIM_GROUPS = 3
CLAIM_GROUP_LEN = 4


def new_enrollment_token() -> str:
    """A 256-bit random enrollment token."""
    return ENROLLMENT_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_claim_code() -> str:
    """A human-typeable claim code, e.g. ``7KQM-P3XD-W9TR`` (about 59 bits)."""
    groups = (
        "".join(secrets.choice(CLAIM_ALPHABET) for _ in range(CLAIM_GROUP_LEN))
        for _ in range(CLAIM_GROUPS)
    )
    return "-".join(groups)


def normalize_claim_code(code: str) -> str:
    """Upper-case and strip separators so ``7kqm p3xd-w9tr`` and ``7KQM-P3XD-W9TR`` match."""
    return "".join(ch for ch in code.upper() if ch.isalnum())


def secret_hash(secret: str) -> str:
    """SHA-256 hex of a high-entropy secret; the only form in which secrets are stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def claim_code_hash(code: str) -> str:
    """Claim codes are stored hashed in normalised form, so typing variants still match."""
    return secret_hash(normalize_claim_code(code))
