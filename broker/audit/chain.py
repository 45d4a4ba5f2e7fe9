"""The hash-chained audit log (I12): entry hashing and chain verification. No storage here."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

GENESIS = "0" * 64


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """Something that happened, before it is placed in the chain."""

    actor: str
    action: str
    subject: str
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """A chained entry as stored: hash = SHA-256(prev_hash, canonical fields)."""

    seq: int
    at_ms: int
    actor: str
    action: str
    subject: str
    detail: Mapping[str, Any]
    prev_hash: str
    hash: str


def canonical_detail(detail: Mapping[str, Any]) -> str:
    """The one JSON spelling of a detail mapping that is hashed and stored."""
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(
    prev_hash: str, seq: int, at_ms: int, actor: str, action: str, subject: str, detail_json: str
) -> str:
    """Hash of one entry, chained to the previous entry's hash."""
    body = json.dumps(
        [prev_hash, seq, at_ms, actor, action, subject, detail_json],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(body.encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of walking the chain; ``first_bad_seq`` is set when it is broken."""

    entries: int
    ok: bool
    first_bad_seq: int | None = None
    reason: str = ""
    head_hash: str = GENESIS


def verify_chain(entries: Iterable[AuditEntry]) -> VerifyResult:
    """Check that every entry's hash is right and links to its predecessor, in seq order."""
    prev_hash = GENESIS
    expected_seq = 1
    count = 0
    for entry in entries:
        count += 1
        if entry.seq != expected_seq:
            return VerifyResult(count, False, entry.seq, f"expected seq {expected_seq}", prev_hash)
        if entry.prev_hash != prev_hash:
            return VerifyResult(count, False, entry.seq, "prev_hash does not link", prev_hash)
        recomputed = entry_hash(
            prev_hash,
            entry.seq,
            entry.at_ms,
            entry.actor,
            entry.action,
            entry.subject,
            canonical_detail(entry.detail),
        )
        if recomputed != entry.hash:
            return VerifyResult(
                count, False, entry.seq, "entry content does not match its hash", prev_hash
            )
        prev_hash = entry.hash
        expected_seq += 1
    return VerifyResult(count, True, None, "", prev_hash)
