"""SQLite store (the embedded default): WAL, synchronous=FULL, serialized writers.

Writers take the database lock up front (BEGIN IMMEDIATE), so every read-check-write in a
transaction is atomic across threads and processes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from broker.audit.chain import GENESIS, AuditEntry, AuditEvent, canonical_detail, entry_hash
from broker.errors import ConfigurationError
from broker.store.base import (
    AppRecord,
    AttachmentRecord,
    CertificateRecord,
    DeviceRecord,
    DuplicateKey,
    EnrollmentTokenRecord,
    EventRecord,
    FailureCount,
    GrantRecord,
    MissingReference,
    RenewalNonceRecord,
    ReplicaRecord,
    RunObserver,
    SchemaTooNew,
    SessionRecord,
    Transaction,
    UserRecord,
)
from broker.store.rows import (
    APP_COLUMNS,
    ATTACHMENT_COLUMNS,
    CERT_COLUMNS,
    DEVICE_COLUMNS,
    EVENT_COLUMNS,
    GRANT_COLUMNS,
    REPLICA_COLUMNS,
    SESSION_COLUMNS,
    TOKEN_COLUMNS,
    USER_COLUMNS,
    app_row,
    attachment_row,
    cert_row,
    device_row,
    event_payload,
    event_row,
    grant_row,
    replica_row,
    session_row,
)
from broker.store.schema import LATEST_VERSION, MIGRATIONS

T = TypeVar("T")


# SQLite's "UNIQUE constraint failed: <columns>" text -> the backend-neutral constraint name.
_UNIQUE_COLUMNS = {
    "devices.device_id": "devices.device_id",
    "certificates.serial": "certificates.serial",
    "certificates.fingerprint": "certificates.fingerprint",
    "enrollment_tokens.token_hash": "enrollment_tokens.token_hash",
    "users.user_id": "users.user_id",
    "users.username": "users.username",
    "app_instances.app_id": "app_instances.app_id",
    "grants.device_id, grants.user_id": "grants.device_user",
    "grants.device_id": "grants.one_owner",  # the partial index grants_one_owner
    "sessions.session_id": "sessions.session_id",
    "renewal_nonces.nonce_hash": "renewal_nonces.nonce_hash",
}


SYNCHRONOUS_MODES = ("FULL", "NORMAL", "OFF")


class SqliteTransaction:
    """Transaction over one SQLite connection; see ``broker.store.base.Transaction``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def _one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._conn.execute(sql, args).fetchone()
        return row

    def _insert(self, table: str, sql: str, args: tuple[Any, ...]) -> None:
        """INSERT, with a broken constraint raised as the backend-neutral typed error."""
        try:
            self._conn.execute(sql, args)
        except sqlite3.IntegrityError as error:
            text = str(error)
            if text.startswith("UNIQUE constraint failed: "):
                columns = text.removeprefix("UNIQUE constraint failed: ")
                if columns in _UNIQUE_COLUMNS:
                    raise DuplicateKey(_UNIQUE_COLUMNS[columns]) from error
            if text.startswith("FOREIGN KEY constraint failed"):
                raise MissingReference(table) from error
            raise

    # devices
    def get_device(self, device_id: str) -> DeviceRecord | None:
        row = self._one(f"SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,))
        return device_row(row) if row else None

    def insert_device(self, device: DeviceRecord) -> None:
        self._insert(
            "devices",
            f"INSERT INTO devices ({DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                device.device_id,
                device.state.value,
                device.created_at,
                device.enrolled_via,
                device.claim_code_hash,
                device.revoked_at,
                device.last_seen_at,
                device.trust_bundle_version,
            ),
        )

    def set_claim_code_hash(self, device_id: str, claim_code_hash: str | None) -> None:
        self._conn.execute(
            "UPDATE devices SET claim_code_hash = ? WHERE device_id = ?",
            (claim_code_hash, device_id),
        )

    def revoke_device(self, device_id: str, at: int) -> None:
        self._conn.execute(
            "UPDATE devices SET state = 'revoked', revoked_at = ?, claim_code_hash = NULL "
            "WHERE device_id = ?",
            (at, device_id),
        )

    def list_devices(self) -> list[DeviceRecord]:
        rows = self._conn.execute(f"SELECT {DEVICE_COLUMNS} FROM devices ORDER BY device_id")
        return [device_row(r) for r in rows]

    def record_presence(self, device_id: str, at: int, trust_bundle_version: str) -> None:
        self._conn.execute(
            "UPDATE devices SET last_seen_at = ?, trust_bundle_version = ? WHERE device_id = ?",
            (at, trust_bundle_version, device_id),
        )

    # certificates
    def insert_certificate(self, cert: CertificateRecord) -> None:
        # One identity per public key: atomic here because writers are serialized (BEGIN IMMEDIATE).
        if self._one(
            "SELECT 1 FROM certificates WHERE spki_sha256 = ? AND subject != ? LIMIT 1",
            (cert.spki_sha256, cert.subject),
        ):
            raise DuplicateKey("certificates.spki_sha256")
        self._insert(
            "certificates",
            f"INSERT INTO certificates ({CERT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                cert.serial,
                cert.spiffe_id,
                cert.kind.value,
                cert.subject,
                cert.spki_sha256,
                cert.fingerprint,
                cert.not_before,
                cert.not_after,
                cert.status.value,
                cert.issued_at,
                cert.superseded_by,
                cert.superseded_at,
                cert.revoked_at,
                cert.revocation_reason,
                cert.issuer_ski,
            ),
        )

    def get_certificate(self, serial: str) -> CertificateRecord | None:
        row = self._one(f"SELECT {CERT_COLUMNS} FROM certificates WHERE serial = ?", (serial,))
        return cert_row(row) if row else None

    def certificates_of(self, subject: str) -> list[CertificateRecord]:
        rows = self._conn.execute(
            f"SELECT {CERT_COLUMNS} FROM certificates WHERE subject = ? ORDER BY issued_at, serial",
            (subject,),
        )
        return [cert_row(r) for r in rows]

    def subjects_with_key(self, spki_sha256: str) -> set[str]:
        rows = self._conn.execute(
            "SELECT DISTINCT subject FROM certificates WHERE spki_sha256 = ?", (spki_sha256,)
        )
        return {r[0] for r in rows}

    def supersede_certificates(self, subject: str, by_serial: str, at: int) -> list[str]:
        rows = self._conn.execute(
            "UPDATE certificates SET status = 'superseded', superseded_by = ?, superseded_at = ? "
            "WHERE subject = ? AND status = 'active' AND serial != ? RETURNING serial",
            (by_serial, at, subject, by_serial),
        ).fetchall()
        return sorted(r[0] for r in rows)

    def revoke_certificates(self, subject: str, at: int, reason: str) -> list[str]:
        rows = self._conn.execute(
            "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? "
            "WHERE subject = ? AND status != 'revoked' RETURNING serial",
            (at, reason, subject),
        ).fetchall()
        return sorted(r[0] for r in rows)

    def revoked_unexpired(self, now: int) -> list[CertificateRecord]:
        rows = self._conn.execute(
            f"SELECT {CERT_COLUMNS} FROM certificates WHERE status = 'revoked' AND not_after > ? "
            "ORDER BY serial",
            (now,),
        )
        return [cert_row(r) for r in rows]

    def active_certificates_issued_by(self, issuer_skis: set[str]) -> list[CertificateRecord]:
        if not issuer_skis:
            return []
        marks = ", ".join("?" for _ in issuer_skis)
        rows = self._conn.execute(
            f"SELECT {CERT_COLUMNS} FROM certificates WHERE status = 'active' "
            f"AND issuer_ski IN ({marks}) ORDER BY serial",
            tuple(sorted(issuer_skis)),
        )
        return [cert_row(r) for r in rows]

    # enrollment tokens
    def insert_enrollment_token(self, token: EnrollmentTokenRecord) -> None:
        self._insert(
            "enrollment_tokens",
            f"INSERT INTO enrollment_tokens ({TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (
                token.token_hash,
                token.device_id,
                token.created_at,
                token.expires_at,
                token.created_by,
                token.used_at,
            ),
        )

    def get_enrollment_token(self, token_hash: str) -> EnrollmentTokenRecord | None:
        row = self._one(
            f"SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE token_hash = ?", (token_hash,)
        )
        return EnrollmentTokenRecord(*row) if row else None

    def consume_enrollment_token(self, token_hash: str, now: int) -> EnrollmentTokenRecord | None:
        row = self._one(
            "UPDATE enrollment_tokens SET used_at = ? "
            "WHERE token_hash = ? AND used_at IS NULL AND expires_at > ? "
            f"RETURNING {TOKEN_COLUMNS}",
            (now, token_hash, now),
        )
        return EnrollmentTokenRecord(*row) if row else None

    def cancel_enrollment_tokens(self, device_id: str, now: int) -> int:
        cursor = self._conn.execute(
            "UPDATE enrollment_tokens SET used_at = ? WHERE device_id = ? AND used_at IS NULL",
            (now, device_id),
        )
        return cursor.rowcount

    # renew-after-expiry nonces
    def use_renewal_nonce(self, nonce_hash: str, subject: str, at: int) -> None:
        self._insert(
            "renewal_nonces",
            "INSERT INTO renewal_nonces (nonce_hash, subject, used_at) VALUES (?, ?, ?)",
            (nonce_hash, subject, at),
        )

    def get_renewal_nonce(self, nonce_hash: str) -> RenewalNonceRecord | None:
        row = self._one(
            "SELECT nonce_hash, subject, used_at FROM renewal_nonces WHERE nonce_hash = ?",
            (nonce_hash,),
        )
        return RenewalNonceRecord(row[0], row[1], int(row[2])) if row else None

    def forget_renewal_nonces(self, used_before: int) -> int:
        cursor = self._conn.execute("DELETE FROM renewal_nonces WHERE used_at < ?", (used_before,))
        return cursor.rowcount

    # users and app instances
    def insert_user(self, user: UserRecord) -> None:
        self._insert(
            "users",
            f"INSERT INTO users ({USER_COLUMNS}) VALUES (?, ?, ?, ?)",
            (user.user_id, user.username, user.password_hash, user.created_at),
        )

    def get_user(self, user_id: str) -> UserRecord | None:
        row = self._one(f"SELECT {USER_COLUMNS} FROM users WHERE user_id = ?", (user_id,))
        return UserRecord(*row) if row else None

    def get_user_by_username(self, username: str) -> UserRecord | None:
        row = self._one(f"SELECT {USER_COLUMNS} FROM users WHERE username = ?", (username,))
        return UserRecord(*row) if row else None

    def insert_app(self, app: AppRecord) -> None:
        self._insert(
            "app_instances",
            f"INSERT INTO app_instances ({APP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (app.app_id, app.user_id, app.label, app.state.value, app.created_at, app.revoked_at),
        )

    def get_app(self, app_id: str) -> AppRecord | None:
        row = self._one(f"SELECT {APP_COLUMNS} FROM app_instances WHERE app_id = ?", (app_id,))
        return app_row(row) if row else None

    def revoke_app(self, app_id: str, at: int) -> None:
        self._conn.execute(
            "UPDATE app_instances SET state = 'revoked', revoked_at = ? WHERE app_id = ?",
            (at, app_id),
        )

    # ownership and shares
    def claim_device(self, device_id: str, claim_code_hash: str) -> bool:
        cursor = self._conn.execute(
            "UPDATE devices SET claim_code_hash = NULL "
            "WHERE device_id = ? AND claim_code_hash = ? AND state = 'active'",
            (device_id, claim_code_hash),
        )
        return cursor.rowcount == 1

    def get_grant(self, device_id: str, user_id: str) -> GrantRecord | None:
        row = self._one(
            f"SELECT {GRANT_COLUMNS} FROM grants WHERE device_id = ? AND user_id = ?",
            (device_id, user_id),
        )
        return grant_row(row) if row else None

    def insert_grant(self, grant: GrantRecord) -> None:
        self._insert(
            "grants",
            f"INSERT INTO grants ({GRANT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (
                grant.device_id,
                grant.user_id,
                grant.role.value,
                grant.granted_by,
                grant.created_at,
                grant.expires_at,
            ),
        )

    def delete_grant(self, device_id: str, user_id: str) -> bool:
        cursor = self._conn.execute(
            "DELETE FROM grants WHERE device_id = ? AND user_id = ?", (device_id, user_id)
        )
        return cursor.rowcount == 1

    def count_failures(self, scope: str, key: str, since_ms: int) -> tuple[int, int | None]:
        row = self._conn.execute(
            "SELECT COUNT(*), MIN(at_ms) FROM failures WHERE scope = ? AND key = ? AND at_ms > ?",
            (scope, key, since_ms),
        ).fetchone()
        return int(row[0]), row[1]

    def record_failure(self, scope: str, key: str, at_ms: int, forget_before_ms: int) -> None:
        self._conn.execute(
            "DELETE FROM failures WHERE scope = ? AND at_ms <= ?", (scope, forget_before_ms)
        )
        self._conn.execute(
            "INSERT INTO failures (scope, key, at_ms) VALUES (?, ?, ?)", (scope, key, at_ms)
        )

    def clear_failures(self, scope: str, key: str) -> None:
        self._conn.execute("DELETE FROM failures WHERE scope = ? AND key = ?", (scope, key))

    def delete_grants(self, device_id: str) -> list[GrantRecord]:
        rows = self._conn.execute(
            f"DELETE FROM grants WHERE device_id = ? RETURNING {GRANT_COLUMNS}", (device_id,)
        ).fetchall()
        return [grant_row(r) for r in rows]

    def grants_of_user(self, user_id: str) -> list[GrantRecord]:
        rows = self._conn.execute(
            f"SELECT {GRANT_COLUMNS} FROM grants WHERE user_id = ? ORDER BY device_id", (user_id,)
        )
        return [grant_row(r) for r in rows]

    # sessions
    def insert_session(self, session: SessionRecord) -> None:
        self._insert(
            "sessions",
            f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                session.session_id,
                session.device_id,
                session.user_id,
                session.app_id,
                session.opened_at,
                session.expires_at,
                session.outcome.value,
                session.reason,
                session.cnf_thumbprint,
                session.ended_at,
                session.bytes,
                session.replica,
            ),
        )

    def get_session(self, session_id: str) -> SessionRecord | None:
        row = self._one(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
        )
        return session_row(row) if row else None

    def end_sessions(self, session_ids: list[str], at: int, reason: str) -> list[str]:
        ended = []
        for session_id in session_ids:
            row = self._one(
                "UPDATE sessions SET outcome = 'ended', ended_at = ?, reason = ? "
                "WHERE session_id = ? AND outcome = 'opened' RETURNING session_id",
                (at, reason, session_id),
            )
            if row:
                ended.append(row[0])
        return ended

    def open_sessions(
        self, *, device_id: str = "", user_id: str = "", app_id: str = ""
    ) -> list[SessionRecord]:
        clauses, args = ["outcome = 'opened'"], []
        for column, value in (("device_id", device_id), ("user_id", user_id), ("app_id", app_id)):
            if value:
                clauses.append(f"{column} = ?")
                args.append(value)
        rows = self._conn.execute(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {' AND '.join(clauses)}", tuple(args)
        )
        return [session_row(r) for r in rows]

    def sessions_of_device(self, device_id: str) -> list[SessionRecord]:
        rows = self._conn.execute(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE device_id = ? ORDER BY opened_at, session_id",
            (device_id,),
        )
        return [session_row(r) for r in rows]

    def close_session(self, session_id: str, at: int, reason: str, byte_count: int) -> bool:
        cursor = self._conn.execute(
            "UPDATE sessions SET bytes = ?, ended_at = COALESCE(ended_at, ?), "
            "reason = CASE WHEN outcome = 'opened' THEN ? ELSE reason END, outcome = 'ended' "
            "WHERE session_id = ? AND outcome != 'denied'",
            (byte_count, at, reason, session_id),
        )
        return cursor.rowcount == 1

    def end_all_open_sessions(self, at: int, reason: str, replica: str | None = None) -> list[str]:
        if replica is None:
            rows = self._conn.execute(
                "UPDATE sessions SET outcome = 'ended', ended_at = ?, reason = ? "
                "WHERE outcome = 'opened' RETURNING session_id",
                (at, reason),
            ).fetchall()
        else:
            rows = self._conn.execute(
                "UPDATE sessions SET outcome = 'ended', ended_at = ?, reason = ? "
                "WHERE outcome = 'opened' AND replica = ? RETURNING session_id",
                (at, reason, replica),
            ).fetchall()
        return sorted(r[0] for r in rows)

    def set_session_replica(self, session_id: str, replica: str) -> None:
        self._conn.execute(
            "UPDATE sessions SET replica = ? WHERE session_id = ?", (replica, session_id)
        )

    # replicas
    def upsert_replica(self, name: str, internal_address: str, now: int) -> None:
        self._conn.execute(
            f"INSERT INTO replicas ({REPLICA_COLUMNS}) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET internal_address = excluded.internal_address, "
            "started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at",
            (name, internal_address, now, now),
        )

    def heartbeat_replica(self, name: str, now: int) -> None:
        self._conn.execute("UPDATE replicas SET heartbeat_at = ? WHERE name = ?", (now, name))

    def get_replica(self, name: str) -> ReplicaRecord | None:
        row = self._one(f"SELECT {REPLICA_COLUMNS} FROM replicas WHERE name = ?", (name,))
        return replica_row(row) if row else None

    # attachments: writers are serialized (BEGIN IMMEDIATE), so read-then-upsert is atomic
    def attach_device(
        self, device_id: str, replica: str, now: int, lease_expires_at: int
    ) -> tuple[AttachmentRecord, AttachmentRecord | None]:
        previous = self.get_attachment(device_id)
        row = self._one(
            f"INSERT INTO attachments ({ATTACHMENT_COLUMNS}) VALUES (?, ?, 1, ?, ?) "
            "ON CONFLICT (device_id) DO UPDATE SET replica = excluded.replica, "
            "epoch = attachments.epoch + 1, attached_at = excluded.attached_at, "
            f"lease_expires_at = excluded.lease_expires_at RETURNING {ATTACHMENT_COLUMNS}",
            (device_id, replica, now, lease_expires_at),
        )
        assert row is not None
        return attachment_row(row), previous

    def renew_attachment(self, device_id: str, epoch: int, lease_expires_at: int) -> bool:
        cursor = self._conn.execute(
            "UPDATE attachments SET lease_expires_at = ? "
            "WHERE device_id = ? AND epoch = ? AND replica != ''",
            (lease_expires_at, device_id, epoch),
        )
        return cursor.rowcount == 1

    def release_attachment(self, device_id: str, epoch: int) -> bool:
        cursor = self._conn.execute(
            "UPDATE attachments SET replica = '', lease_expires_at = 0 "
            "WHERE device_id = ? AND epoch = ? AND replica != ''",
            (device_id, epoch),
        )
        return cursor.rowcount == 1

    def get_attachment(self, device_id: str) -> AttachmentRecord | None:
        row = self._one(
            f"SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE device_id = ?", (device_id,)
        )
        return attachment_row(row) if row else None

    def release_attachments_of(self, replica: str) -> list[str]:
        if not replica:
            return []
        rows = self._conn.execute(
            "UPDATE attachments SET replica = '', lease_expires_at = 0 "
            "WHERE replica = ? RETURNING device_id",
            (replica,),
        ).fetchall()
        return sorted(r[0] for r in rows)

    # events: writers are serialized, so seqs (AUTOINCREMENT, never reused) commit in order
    def append_event(self, kind: str, payload: dict[str, Any], origin: str, at_ms: int) -> int:
        row = self._one(
            "INSERT INTO events (kind, payload, origin, at_ms) VALUES (?, ?, ?, ?) RETURNING seq",
            (kind, event_payload(payload), origin, at_ms),
        )
        assert row is not None
        return int(row[0])

    def events_after(self, seq: int, limit: int = 500) -> list[EventRecord]:
        rows = self._conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()
        return [event_row(r) for r in rows]

    def last_event_seq(self) -> int:
        row = self._one("SELECT MAX(seq) FROM events", ())
        return int(row[0]) if row and row[0] is not None else 0

    # audit
    def audit_entries_for(self, subject: str, action_prefix: str) -> list[AuditEntry]:
        rows = self._conn.execute(
            "SELECT seq, at_ms, actor, action, subject, detail, prev_hash, hash FROM audit_log "
            "WHERE subject = ? AND action LIKE ? ORDER BY seq",
            (subject, action_prefix.replace("%", "") + "%"),
        ).fetchall()
        return [
            AuditEntry(seq, at_ms, actor, action, subj, json.loads(detail), prev, digest)
            for seq, at_ms, actor, action, subj, detail, prev, digest in rows
        ]

    # fleet audit
    def audit_entries_since(self, since_ms: int, actions: tuple[str, ...]) -> list[AuditEntry]:
        if not actions:
            return []
        marks = ", ".join("?" for _ in actions)
        rows = self._conn.execute(
            "SELECT seq, at_ms, actor, action, subject, detail, prev_hash, hash FROM audit_log "
            f"WHERE at_ms >= ? AND action IN ({marks}) ORDER BY seq",
            (since_ms, *actions),
        ).fetchall()
        return [
            AuditEntry(seq, at_ms, actor, action, subj, json.loads(detail), prev, digest)
            for seq, at_ms, actor, action, subj, detail, prev, digest in rows
        ]

    def failure_counts(self, scope: str, since_ms: int) -> list[FailureCount]:
        rows = self._conn.execute(
            "SELECT key, COUNT(*), MIN(at_ms), MAX(at_ms) FROM failures "
            "WHERE scope = ? AND at_ms >= ? GROUP BY key ORDER BY key",
            (scope, since_ms),
        ).fetchall()
        return [FailureCount(key, int(n), int(first), int(last)) for key, n, first, last in rows]

    def device_certificates_expiring(self, after: int, before: int) -> list[CertificateRecord]:
        rows = self._conn.execute(
            f"SELECT {CERT_COLUMNS} FROM certificates WHERE kind = 'device' AND status = 'active' "
            "AND not_after > ? AND not_after <= ? ORDER BY not_after, serial",
            (after, before),
        )
        return [cert_row(r) for r in rows]

    def fanout_sessions(self, since: int, min_devices: int) -> list[SessionRecord]:
        rows = self._conn.execute(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE opened_at >= ? AND user_id IN ("
            "SELECT user_id FROM sessions WHERE opened_at >= ? GROUP BY user_id "
            "HAVING COUNT(DISTINCT device_id) >= ?) ORDER BY user_id, opened_at, session_id",
            (since, since, min_devices),
        )
        return [session_row(r) for r in rows]

    def append_audit(self, event: AuditEvent, at_ms: int) -> AuditEntry:
        last = self._one("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1", ())
        seq, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS)
        detail_json = canonical_detail(event.detail)
        digest = entry_hash(
            prev_hash, seq, at_ms, event.actor, event.action, event.subject, detail_json
        )
        self._conn.execute(
            "INSERT INTO audit_log (seq, at_ms, actor, action, subject, detail, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, at_ms, event.actor, event.action, event.subject, detail_json, prev_hash, digest),
        )
        return AuditEntry(
            seq,
            at_ms,
            event.actor,
            event.action,
            event.subject,
            dict(event.detail),
            prev_hash,
            digest,
        )


class SqliteStore:
    """The default store: one SQLite file, safe to share between threads and processes."""

    def __init__(self, path: Path, *, migrate: bool = True, synchronous: str = "FULL") -> None:
        if synchronous not in SYNCHRONOUS_MODES:
            raise ConfigurationError(f"sqlite synchronous must be one of {SYNCHRONOUS_MODES}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._lock = threading.RLock()
        self.on_run: RunObserver | None = None  # see Store.on_run (metrics)
        self._batch = threading.local()
        self._savepoints = 0
        for pragma in (
            "PRAGMA journal_mode = WAL",
            f"PRAGMA synchronous = {synchronous}",
            "PRAGMA foreign_keys = ON",
            "PRAGMA busy_timeout = 30000",
        ):
            self._conn.execute(pragma)
        if migrate:
            try:
                self.migrate()
            except BaseException:
                self._conn.close()
                raise

    def core_executor(self) -> Executor:
        """One core thread with group commit (one fsync per batch of calls)."""
        from broker.store.groupcommit import GroupCommitExecutor

        return GroupCommitExecutor(self)

    def schema_version(self) -> int:
        with self._lock:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            row = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            return int(row[0] or 0)

    def migrate(self, target: int = LATEST_VERSION) -> int:
        """Apply pending migrations up to target, each in its own transaction; return the version."""
        with self._lock:
            current = self.schema_version()
            if current > LATEST_VERSION:
                raise SchemaTooNew(current, LATEST_VERSION, "SQLite")
            for version in range(current + 1, target + 1):
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    if self.schema_version() >= version:  # another process got there first
                        self._conn.execute("ROLLBACK")
                        continue
                    for statement in MIGRATIONS[version - 1]:
                        self._conn.execute(statement)
                    self._conn.execute(
                        "INSERT INTO schema_version (version) VALUES (?)", (version,)
                    )
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            return self.schema_version()

    def _in_batch(self) -> bool:
        return bool(getattr(self._batch, "active", False))

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group commit: every transaction() this thread opens inside the block is a SAVEPOINT of
        one BEGIN IMMEDIATE ... COMMIT, so a batch costs one fsync. Callers must not hand out any
        result of the batch before the block has exited (committed)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._batch.active = True
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
            finally:
                self._batch.active = False

    @contextmanager
    def transaction(self) -> Iterator[SqliteTransaction]:
        """A serializable write transaction: commit on success, roll back on any exception.
        Inside batch() it is a savepoint: rolled back alone, committed with the batch."""
        with self._lock:
            if self._in_batch():
                self._savepoints += 1
                name = f"sp{self._savepoints}"
                self._conn.execute(f"SAVEPOINT {name}")
                try:
                    yield SqliteTransaction(self._conn)
                except BaseException:
                    self._conn.execute(f"ROLLBACK TO {name}")
                    self._conn.execute(f"RELEASE {name}")
                    raise
                self._conn.execute(f"RELEASE {name}")
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteTransaction(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def run(self, unit: Callable[[Transaction], T]) -> T:
        """Run unit in one transaction. SQLite serializes writers (BEGIN IMMEDIATE), so there is
        no serialization failure to retry; a busy database waits up to busy_timeout. Inside
        batch() the time told to on_run excludes the batch's shared COMMIT (group commit)."""
        observer = self.on_run
        if observer is None:
            with self.transaction() as tx:
                return unit(tx)
        started = time.perf_counter()
        try:
            with self.transaction() as tx:
                return unit(tx)
        finally:
            observer(time.perf_counter() - started, 0)

    @contextmanager
    def read(self) -> Iterator[SqliteTransaction]:
        """A read-only snapshot (deferred transaction); inside batch() it reads the batch."""
        with self._lock:
            if self._in_batch():
                yield SqliteTransaction(self._conn)
                return
            self._conn.execute("BEGIN")
            try:
                yield SqliteTransaction(self._conn)
            finally:
                self._conn.execute("ROLLBACK")

    def audit_entries(self) -> Iterator[AuditEntry]:
        """All audit entries in seq order."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, at_ms, actor, action, subject, detail, prev_hash, hash "
                "FROM audit_log ORDER BY seq"
            ).fetchall()
        for seq, at_ms, actor, action, subject, detail, prev_hash, digest in rows:
            yield AuditEntry(
                seq, at_ms, actor, action, subject, json.loads(detail), prev_hash, digest
            )

    def wait_for_events(self, timeout: float) -> bool:
        """SQLite has no notifications: sleep for timeout and say none arrived (replicas on
        SQLite poll ``events_after``)."""
        time.sleep(max(0.0, timeout))
        return False

    def close(self) -> None:
        with self._lock:
            self._conn.close()
