"""What both backends share: the column lists of each record and turning a row into a record.

The schema is the same on SQLite and PostgreSQL (``schema.py`` and ``postgres/schema.py`` keep the
same versions), so a row has the same column order on either.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from broker.identity.spiffe import Kind
from broker.store.base import (
    AppRecord,
    AppState,
    AttachmentRecord,
    CertificateRecord,
    CertStatus,
    DeviceRecord,
    DeviceState,
    EventRecord,
    GrantRecord,
    ReplicaRecord,
    Role,
    SessionOutcome,
    SessionRecord,
)

DEVICE_COLUMNS = (
    "device_id, state, created_at, enrolled_via, claim_code_hash, revoked_at, last_seen_at, "
    "trust_bundle_version"
)
CERT_COLUMNS = (
    "serial, spiffe_id, kind, subject, spki_sha256, fingerprint, not_before, not_after, status, "
    "issued_at, superseded_by, superseded_at, revoked_at, revocation_reason, issuer_ski"
)
USER_COLUMNS = "user_id, username, password_hash, created_at"
APP_COLUMNS = "app_id, user_id, label, state, created_at, revoked_at"
GRANT_COLUMNS = "device_id, user_id, role, granted_by, created_at, expires_at"
SESSION_COLUMNS = (
    "session_id, device_id, user_id, app_id, opened_at, expires_at, outcome, reason, "
    "cnf_thumbprint, ended_at, bytes, replica"
)
REPLICA_COLUMNS = "name, internal_address, started_at, heartbeat_at"
ATTACHMENT_COLUMNS = "device_id, replica, epoch, attached_at, lease_expires_at"
EVENT_COLUMNS = "seq, kind, payload, origin, at_ms"
TOKEN_COLUMNS = "token_hash, device_id, created_at, expires_at, created_by, used_at"  # noqa: S105


def device_row(row: Sequence[Any]) -> DeviceRecord:
    return DeviceRecord(row[0], DeviceState(row[1]), *row[2:])


def cert_row(row: Sequence[Any]) -> CertificateRecord:
    values = list(row)
    values[2] = Kind(values[2])
    values[8] = CertStatus(values[8])
    return CertificateRecord(*values)


def app_row(row: Sequence[Any]) -> AppRecord:
    return AppRecord(row[0], row[1], row[2], AppState(row[3]), row[4], row[5])


def grant_row(row: Sequence[Any]) -> GrantRecord:
    return GrantRecord(row[0], row[1], Role(row[2]), row[3], row[4], row[5])


def session_row(row: Sequence[Any]) -> SessionRecord:
    values = list(row)
    values[6] = SessionOutcome(values[6])
    return SessionRecord(*values)


def replica_row(row: Sequence[Any]) -> ReplicaRecord:
    return ReplicaRecord(str(row[0]), str(row[1]), int(row[2]), int(row[3]))


def attachment_row(row: Sequence[Any]) -> AttachmentRecord:
    return AttachmentRecord(str(row[0]), str(row[1]), int(row[2]), int(row[3]), int(row[4]))


def event_payload(payload: dict[str, Any]) -> str:
    """The stored form of an event payload: canonical JSON of an object."""
    if not isinstance(payload, dict):
        raise TypeError("an event payload must be a JSON object (dict)")
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def event_row(row: Sequence[Any]) -> EventRecord:
    payload = json.loads(row[2])
    return EventRecord(int(row[0]), str(row[1]), payload, str(row[3]), int(row[4]))
