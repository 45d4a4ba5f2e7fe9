"""Ending sessions in the store with one audit entry each, in the caller's transaction (I12)."""

from __future__ import annotations

from broker.audit.chain import AuditEvent
from broker.store import Transaction


def end_sessions_audited(
    tx: Transaction, session_ids: list[str], at: int, at_ms: int, reason: str, actor: str
) -> list[str]:
    """Mark open sessions ended and audit each; returns the ids that were still open."""
    ended = tx.end_sessions(session_ids, at, reason)
    for session_id in ended:
        record = tx.get_session(session_id)
        if record is None:  # pragma: no cover - just updated in this transaction
            continue
        tx.append_audit(
            AuditEvent(
                actor,
                "session.ended",
                record.device_id,
                {
                    "session_id": session_id,
                    "reason": reason,
                    "user_id": record.user_id,
                    "app_id": record.app_id,
                },
            ),
            at_ms,
        )
    return ended
