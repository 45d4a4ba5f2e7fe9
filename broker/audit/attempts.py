"""Revoked identities still trying to connect: counted in the store, audited once an hour.

TLS lets a revoked certificate complete the handshake (grpcio has no CRL hook); the interceptor's
per-call check refuses it. Each refusal is counted in the shared ``failures`` table under its own
scope (so every replica sees the same numbers and a restart forgets nothing), and the first
refusal of a certificate in each clock hour appends one ``identity.revoked.attempt`` audit entry
carrying the previous hour's count: a camera retrying every second costs one audit entry an hour,
not 3,600.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.audit.chain import AuditEvent
from broker.clock import Clock, now_ms

if TYPE_CHECKING:
    from broker.store.base import Store, Transaction

SCOPE = "revoked.attempt"
ACTION = "identity.revoked.attempt"
HOUR_MS = 3_600_000
# Rows kept per certificate and hour: past this, refusals are still refused but no longer counted
# (the count then reads "at least"), so a hammering client cannot grow the table without bound.
MAX_COUNTED_PER_HOUR = 1_000
RETENTION_MS = 31 * 24 * HOUR_MS  # the longest window a fleet audit may ask for


def record_revoked_attempt(
    store: Store, clock: Clock, spiffe_id: str, subject: str, serial: str
) -> None:
    """Count one refused call by a revoked certificate (serial, of spiffe_id; subject is the
    device or user id the audit log files it under); audit the first one of each hour."""
    at = now_ms(clock)
    hour = at - at % HOUR_MS

    def unit(tx: Transaction) -> None:
        this_hour, _ = tx.count_failures(SCOPE, serial, hour - 1)  # at_ms > hour - 1
        if this_hour >= MAX_COUNTED_PER_HOUR:
            return
        if this_hour == 0:
            previous, _ = tx.count_failures(SCOPE, serial, hour - HOUR_MS - 1)
            tx.append_audit(
                AuditEvent(
                    spiffe_id,
                    ACTION,
                    subject,
                    {
                        "serial": serial,
                        "hour_start_ms": hour,
                        "attempts_previous_hour": previous,
                    },
                ),
                at,
            )
        tx.record_failure(SCOPE, serial, at, at - RETENTION_MS)

    store.run(unit)
