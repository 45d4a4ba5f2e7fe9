"""Appending audit events inside the caller's store transaction (I12), stamped by one clock."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.audit.chain import AuditEntry, AuditEvent
from broker.clock import Clock, now_ms

if TYPE_CHECKING:
    from broker.store.base import Transaction


class AuditRecorder:
    """Writes audit events in the same transaction as the change they describe."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def append(self, tx: Transaction, event: AuditEvent) -> AuditEntry:
        """Append event to the hash chain; it commits (or rolls back) with tx."""
        return tx.append_audit(event, now_ms(self._clock))
