"""PostgreSQL store (the fleet's store of record): psycopg 3, a connection pool, plain SQL.

Isolation and the audit chain
-----------------------------
Write transactions run at SERIALIZABLE with ``synchronous_commit = on`` (a reply only after its
commit is durable). Each one starts with ``LOCK TABLE audit_head IN EXCLUSIVE MODE`` before its
first query: nearly every write appends to the one hash chain, whose next entry needs the previous
entry's hash, so audited commits are serial whatever we do. Taking the chain lock *before* the
snapshot (PostgreSQL fixes a SERIALIZABLE snapshot at the first query; ``LOCK`` is not a query)
means each writer sees every earlier writer's commit: writers are serialized fleet-wide exactly as
SQLite's ``BEGIN IMMEDIATE`` serializes them, every check-then-act in the core behaves as it does
on SQLite, and the chain cannot fork. Readers (``read()``) never wait for it: they take a
REPEATABLE READ READ ONLY snapshot, which, because writers commit one at a time, is always the
state after some prefix of the serial order.

The constraints stay behind the lock as a second line: unique keys, ``certificate_keys``,
``audit_head`` locked ``FOR UPDATE`` and a unique ``prev_hash``. A store opened with
``writer_lock=False`` skips the up-front lock (writers then run concurrently and conflicting ones
fail with a serialization failure); ``run()`` re-runs those, taking the lock on every re-run.

Errors
------
- an insert that breaks a uniqueness rule: ``DuplicateKey`` (same as SQLite), transaction usable;
- serialization failure (40001) or deadlock (40P01): ``run()`` re-runs the unit up to
  ``attempts`` times with jittered backoff, then raises ``broker.errors.Contention`` (UNAVAILABLE,
  retry info); ``transaction()`` cannot re-run a with-block, so it raises ``Contention`` at once;
- lock or pool timeouts and a lost connection: ``broker.errors.Unavailable`` (fail closed).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

from broker.audit.chain import AuditEntry, AuditEvent, canonical_detail, entry_hash
from broker.errors import Contention, Unavailable
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
from broker.store.postgres.schema import BASELINE, BASELINE_VERSION, LATEST_VERSION, STEPS
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

T = TypeVar("T")

AUDIT_COLUMNS = "seq, at_ms, actor, action, subject, detail, prev_hash, hash"

RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
MIGRATION_LOCK = 0x62726F6B65720001  # pg_advisory_xact_lock key: "broker" + 1
BEGIN_WRITE = "BEGIN ISOLATION LEVEL SERIALIZABLE"
LOCK_CHAIN = "LOCK TABLE audit_head IN EXCLUSIVE MODE"
READ_HEAD = "SELECT seq, hash FROM audit_head WHERE id = 1"
EVENTS_CHANNEL = "broker_events"


class SerializationFailure(Contention):
    """One attempt lost a serialization conflict (SQLSTATE 40001 or 40P01); safe to re-run."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(
            "the store could not serialize this change with a concurrent one; retry",
            retry_after_seconds=1.0,
        )
        self.sqlstate = sqlstate


def _audit_entry(row: tuple[Any, ...]) -> AuditEntry:
    seq, at_ms, actor, action, subject, detail, prev_hash, digest = row
    return AuditEntry(seq, at_ms, actor, action, subject, json.loads(detail), prev_hash, digest)


def _translate(error: psycopg.Error) -> Exception:
    """The typed error for a database failure that is not the caller's doing."""
    if error.sqlstate in RETRYABLE_SQLSTATES:
        return SerializationFailure(error.sqlstate)
    if isinstance(error, pg_errors.LockNotAvailable | pg_errors.QueryCanceled):
        return Contention("the store is busy (a lock or statement timed out); retry")
    if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError):
        return Unavailable("the store of record is unreachable")
    return error


class PostgresTransaction:
    """Transaction over one PostgreSQL connection; see ``broker.store.base.Transaction``."""

    def __init__(
        self, conn: psycopg.Connection[Any], chain_head: tuple[int, str] | None = None
    ) -> None:
        self._conn = conn
        # (seq, hash) of the chain head when this transaction holds the chain lock; else None.
        self._head = chain_head

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._conn.execute(sql, args).fetchone()
        return row

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, args).fetchall()

    def _rowcount(self, sql: str, args: tuple[Any, ...]) -> int:
        return self._conn.execute(sql, args).rowcount

    def _insert(
        self, table: str, sql: str, args: tuple[Any, ...], which: Callable[[], str]
    ) -> None:
        """INSERT ... ON CONFLICT DO NOTHING: a broken uniqueness rule raises DuplicateKey and
        leaves the transaction usable, as on SQLite; ``which`` names the rule that was broken."""
        try:
            inserted = self._one(f"{sql} ON CONFLICT DO NOTHING RETURNING 1", args)
        except pg_errors.ForeignKeyViolation as error:
            raise MissingReference(table) from error
        if inserted is None:
            raise DuplicateKey(which())

    # devices
    def get_device(self, device_id: str) -> DeviceRecord | None:
        row = self._one(f"SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = %s", (device_id,))
        return device_row(row) if row else None

    def insert_device(self, device: DeviceRecord) -> None:
        self._insert(
            "devices",
            f"INSERT INTO devices ({DEVICE_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
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
            lambda: "devices.device_id",
        )

    def set_claim_code_hash(self, device_id: str, claim_code_hash: str | None) -> None:
        self._conn.execute(
            "UPDATE devices SET claim_code_hash = %s WHERE device_id = %s",
            (claim_code_hash, device_id),
        )

    def revoke_device(self, device_id: str, at: int) -> None:
        self._conn.execute(
            "UPDATE devices SET state = 'revoked', revoked_at = %s, claim_code_hash = NULL "
            "WHERE device_id = %s",
            (at, device_id),
        )

    def list_devices(self) -> list[DeviceRecord]:
        rows = self._all(f"SELECT {DEVICE_COLUMNS} FROM devices ORDER BY device_id")
        return [device_row(r) for r in rows]

    def record_presence(self, device_id: str, at: int, trust_bundle_version: str) -> None:
        self._conn.execute(
            "UPDATE devices SET last_seen_at = %s, trust_bundle_version = %s WHERE device_id = %s",
            (at, trust_bundle_version, device_id),
        )

    # certificates
    def insert_certificate(self, cert: CertificateRecord) -> None:
        holder = self._one(
            "SELECT subject FROM certificate_keys WHERE spki_sha256 = %s", (cert.spki_sha256,)
        )
        if holder is not None and holder[0] != cert.subject:
            raise DuplicateKey("certificates.spki_sha256")
        args = (
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
        )
        try:
            # The certificate and its key binding in one statement; the binding's primary key
            # is the constraint (a concurrent writer binding the key first makes this fail).
            row = self._one(
                f"WITH c AS (INSERT INTO certificates ({CERT_COLUMNS}) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING RETURNING spki_sha256, subject), "
                "k AS (INSERT INTO certificate_keys (spki_sha256, subject) "
                "SELECT spki_sha256, subject FROM c ON CONFLICT DO NOTHING) "
                "SELECT COUNT(*) FROM c",
                args,
            )
        except pg_errors.ForeignKeyViolation as error:
            raise MissingReference("certificates") from error
        if row is None or row[0] == 0:
            taken = self._one("SELECT 1 FROM certificates WHERE serial = %s", (cert.serial,))
            raise DuplicateKey("certificates.serial" if taken else "certificates.fingerprint")

    def get_certificate(self, serial: str) -> CertificateRecord | None:
        row = self._one(f"SELECT {CERT_COLUMNS} FROM certificates WHERE serial = %s", (serial,))
        return cert_row(row) if row else None

    def certificates_of(self, subject: str) -> list[CertificateRecord]:
        rows = self._all(
            f"SELECT {CERT_COLUMNS} FROM certificates WHERE subject = %s "
            "ORDER BY issued_at, serial",
            (subject,),
        )
        return [cert_row(r) for r in rows]

    def subjects_with_key(self, spki_sha256: str) -> set[str]:
        rows = self._all(
            "SELECT DISTINCT subject FROM certificates WHERE spki_sha256 = %s", (spki_sha256,)
        )
        return {r[0] for r in rows}

    def supersede_certificates(self, subject: str, by_serial: str, at: int) -> list[str]:
        rows = self._all(
            "UPDATE certificates SET status = 'superseded', superseded_by = %s, superseded_at = %s "
            "WHERE subject = %s AND status = 'active' AND serial != %s RETURNING serial",
            (by_serial, at, subject, by_serial),
        )
        return sorted(r[0] for r in rows)

    def revoke_certificates(self, subject: str, at: int, reason: str) -> list[str]:
        rows = self._all(
            "UPDATE certificates SET status = 'revoked', revoked_at = %s, revocation_reason = %s "
            "WHERE subject = %s AND status != 'revoked' RETURNING serial",
            (at, reason, subject),
        )
        return sorted(r[0] for r in rows)

    def revoked_unexpired(self, now: int) -> list[CertificateRecord]:
        rows = self._all(
            f"SELECT {CERT_COLUMNS} FROM certificates WHERE status = 'revoked' AND not_after > %s "
            "ORDER BY serial",
            (now,),
        )
        return [cert_row(r) for r in rows]

    def active_certificates_issued_by(self, issuer_skis: set[str]) -> list[CertificateRecord]:
        if not issuer_skis:
            return []
        rows = self._all(
            f"SELECT {CERT_COLUMNS} FROM certificates WHERE status = 'active' "
            "AND issuer_ski = ANY(%s) ORDER BY serial",
            (sorted(issuer_skis),),
        )
        return [cert_row(r) for r in rows]

    # enrollment tokens
    def insert_enrollment_token(self, token: EnrollmentTokenRecord) -> None:
        self._insert(
            "enrollment_tokens",
            f"INSERT INTO enrollment_tokens ({TOKEN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)",
            (
                token.token_hash,
                token.device_id,
                token.created_at,
                token.expires_at,
                token.created_by,
                token.used_at,
            ),
            lambda: "enrollment_tokens.token_hash",
        )

    def get_enrollment_token(self, token_hash: str) -> EnrollmentTokenRecord | None:
        row = self._one(
            f"SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE token_hash = %s", (token_hash,)
        )
        return EnrollmentTokenRecord(*row) if row else None

    def consume_enrollment_token(self, token_hash: str, now: int) -> EnrollmentTokenRecord | None:
        row = self._one(
            "UPDATE enrollment_tokens SET used_at = %s "
            "WHERE token_hash = %s AND used_at IS NULL AND expires_at > %s "
            f"RETURNING {TOKEN_COLUMNS}",
            (now, token_hash, now),
        )
        return EnrollmentTokenRecord(*row) if row else None

    def cancel_enrollment_tokens(self, device_id: str, now: int) -> int:
        return self._rowcount(
            "UPDATE enrollment_tokens SET used_at = %s WHERE device_id = %s AND used_at IS NULL",
            (now, device_id),
        )

    # renew-after-expiry nonces
    def use_renewal_nonce(self, nonce_hash: str, subject: str, at: int) -> None:
        self._insert(
            "renewal_nonces",
            "INSERT INTO renewal_nonces (nonce_hash, subject, used_at) VALUES (%s, %s, %s)",
            (nonce_hash, subject, at),
            lambda: "renewal_nonces.nonce_hash",
        )

    def get_renewal_nonce(self, nonce_hash: str) -> RenewalNonceRecord | None:
        row = self._one(
            "SELECT nonce_hash, subject, used_at FROM renewal_nonces WHERE nonce_hash = %s",
            (nonce_hash,),
        )
        return RenewalNonceRecord(str(row[0]), str(row[1]), int(row[2])) if row else None

    def forget_renewal_nonces(self, used_before: int) -> int:
        return self._rowcount("DELETE FROM renewal_nonces WHERE used_at < %s", (used_before,))

    # users and app instances
    def insert_user(self, user: UserRecord) -> None:
        def which() -> str:
            taken = self._one("SELECT 1 FROM users WHERE username = %s", (user.username,))
            return "users.username" if taken else "users.user_id"

        self._insert(
            "users",
            f"INSERT INTO users ({USER_COLUMNS}) VALUES (%s, %s, %s, %s)",
            (user.user_id, user.username, user.password_hash, user.created_at),
            which,
        )

    def get_user(self, user_id: str) -> UserRecord | None:
        row = self._one(f"SELECT {USER_COLUMNS} FROM users WHERE user_id = %s", (user_id,))
        return UserRecord(*row) if row else None

    def get_user_by_username(self, username: str) -> UserRecord | None:
        row = self._one(f"SELECT {USER_COLUMNS} FROM users WHERE username = %s", (username,))
        return UserRecord(*row) if row else None

    def insert_app(self, app: AppRecord) -> None:
        self._insert(
            "app_instances",
            f"INSERT INTO app_instances ({APP_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)",
            (app.app_id, app.user_id, app.label, app.state.value, app.created_at, app.revoked_at),
            lambda: "app_instances.app_id",
        )

    def get_app(self, app_id: str) -> AppRecord | None:
        row = self._one(f"SELECT {APP_COLUMNS} FROM app_instances WHERE app_id = %s", (app_id,))
        return app_row(row) if row else None

    def revoke_app(self, app_id: str, at: int) -> None:
        self._conn.execute(
            "UPDATE app_instances SET state = 'revoked', revoked_at = %s WHERE app_id = %s",
            (at, app_id),
        )

    # ownership and shares
    def claim_device(self, device_id: str, claim_code_hash: str) -> bool:
        row = self._one(
            "UPDATE devices SET claim_code_hash = NULL "
            "WHERE device_id = %s AND claim_code_hash = %s AND state = 'active' "
            "RETURNING device_id",
            (device_id, claim_code_hash),
        )
        return row is not None

    def get_grant(self, device_id: str, user_id: str) -> GrantRecord | None:
        row = self._one(
            f"SELECT {GRANT_COLUMNS} FROM grants WHERE device_id = %s AND user_id = %s",
            (device_id, user_id),
        )
        return grant_row(row) if row else None

    def insert_grant(self, grant: GrantRecord) -> None:
        def which() -> str:
            same = self.get_grant(grant.device_id, grant.user_id)
            return "grants.device_user" if same else "grants.one_owner"

        self._insert(
            "grants",
            f"INSERT INTO grants ({GRANT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)",
            (
                grant.device_id,
                grant.user_id,
                grant.role.value,
                grant.granted_by,
                grant.created_at,
                grant.expires_at,
            ),
            which,
        )

    def delete_grant(self, device_id: str, user_id: str) -> bool:
        count = self._rowcount(
            "DELETE FROM grants WHERE device_id = %s AND user_id = %s", (device_id, user_id)
        )
        return count == 1

    def count_failures(self, scope: str, key: str, since_ms: int) -> tuple[int, int | None]:
        row = self._one(
            "SELECT COUNT(*), MIN(at_ms) FROM failures WHERE scope = %s AND key = %s AND at_ms > %s",
            (scope, key, since_ms),
        )
        assert row is not None
        return int(row[0]), None if row[1] is None else int(row[1])

    def record_failure(self, scope: str, key: str, at_ms: int, forget_before_ms: int) -> None:
        self._rowcount(
            "DELETE FROM failures WHERE scope = %s AND at_ms <= %s", (scope, forget_before_ms)
        )
        self._rowcount(
            "INSERT INTO failures (scope, key, at_ms) VALUES (%s, %s, %s)", (scope, key, at_ms)
        )

    def clear_failures(self, scope: str, key: str) -> None:
        self._rowcount("DELETE FROM failures WHERE scope = %s AND key = %s", (scope, key))

    def delete_grants(self, device_id: str) -> list[GrantRecord]:
        rows = self._all(
            f"DELETE FROM grants WHERE device_id = %s RETURNING {GRANT_COLUMNS}", (device_id,)
        )
        return [grant_row(r) for r in rows]

    def grants_of_user(self, user_id: str) -> list[GrantRecord]:
        rows = self._all(
            f"SELECT {GRANT_COLUMNS} FROM grants WHERE user_id = %s ORDER BY device_id",
            (user_id,),
        )
        return [grant_row(r) for r in rows]

    # sessions
    def insert_session(self, session: SessionRecord) -> None:
        self._insert(
            "sessions",
            f"INSERT INTO sessions ({SESSION_COLUMNS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
            lambda: "sessions.session_id",
        )

    def get_session(self, session_id: str) -> SessionRecord | None:
        row = self._one(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE session_id = %s", (session_id,)
        )
        return session_row(row) if row else None

    def end_sessions(self, session_ids: list[str], at: int, reason: str) -> list[str]:
        if not session_ids:
            return []
        rows = self._all(
            "UPDATE sessions SET outcome = 'ended', ended_at = %s, reason = %s "
            "WHERE session_id = ANY(%s) AND outcome = 'opened' RETURNING session_id",
            (at, reason, list(session_ids)),
        )
        ended = {r[0] for r in rows}
        result: list[str] = []
        for session_id in session_ids:  # in the caller's order, each once (as on SQLite)
            if session_id in ended:
                result.append(session_id)
                ended.discard(session_id)
        return result

    def open_sessions(
        self, *, device_id: str = "", user_id: str = "", app_id: str = ""
    ) -> list[SessionRecord]:
        clauses, args = ["outcome = 'opened'"], []
        for column, value in (("device_id", device_id), ("user_id", user_id), ("app_id", app_id)):
            if value:
                clauses.append(f"{column} = %s")
                args.append(value)
        rows = self._all(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE {' AND '.join(clauses)}", tuple(args)
        )
        return [session_row(r) for r in rows]

    def sessions_of_device(self, device_id: str) -> list[SessionRecord]:
        rows = self._all(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE device_id = %s "
            "ORDER BY opened_at, session_id",
            (device_id,),
        )
        return [session_row(r) for r in rows]

    def close_session(self, session_id: str, at: int, reason: str, byte_count: int) -> bool:
        count = self._rowcount(
            "UPDATE sessions SET bytes = %s, ended_at = COALESCE(ended_at, %s), "
            "reason = CASE WHEN outcome = 'opened' THEN %s ELSE reason END, outcome = 'ended' "
            "WHERE session_id = %s AND outcome != 'denied'",
            (byte_count, at, reason, session_id),
        )
        return count == 1

    def end_all_open_sessions(self, at: int, reason: str, replica: str | None = None) -> list[str]:
        if replica is None:
            rows = self._all(
                "UPDATE sessions SET outcome = 'ended', ended_at = %s, reason = %s "
                "WHERE outcome = 'opened' RETURNING session_id",
                (at, reason),
            )
        else:
            rows = self._all(
                "UPDATE sessions SET outcome = 'ended', ended_at = %s, reason = %s "
                "WHERE outcome = 'opened' AND replica = %s RETURNING session_id",
                (at, reason, replica),
            )
        return sorted(r[0] for r in rows)

    def set_session_replica(self, session_id: str, replica: str) -> None:
        self._rowcount(
            "UPDATE sessions SET replica = %s WHERE session_id = %s", (replica, session_id)
        )

    # replicas
    def upsert_replica(self, name: str, internal_address: str, now: int) -> None:
        self._rowcount(
            f"INSERT INTO replicas ({REPLICA_COLUMNS}) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET internal_address = excluded.internal_address, "
            "started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at",
            (name, internal_address, now, now),
        )

    def heartbeat_replica(self, name: str, now: int) -> None:
        self._rowcount("UPDATE replicas SET heartbeat_at = %s WHERE name = %s", (now, name))

    def get_replica(self, name: str) -> ReplicaRecord | None:
        row = self._one(f"SELECT {REPLICA_COLUMNS} FROM replicas WHERE name = %s", (name,))
        return replica_row(row) if row else None

    # attachments. The epoch is bumped by one conditional upsert on the device's row (its
    # primary key is the constraint); writers holding the chain lock are serial anyway, and an
    # optimistic writer that races another attach of the same device fails to serialize (40001)
    # and is re-run by Store.run, so no epoch is ever handed out twice.
    def attach_device(
        self, device_id: str, replica: str, now: int, lease_expires_at: int
    ) -> tuple[AttachmentRecord, AttachmentRecord | None]:
        before = self._one(
            f"SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE device_id = %s FOR UPDATE",
            (device_id,),
        )
        row = self._one(
            f"INSERT INTO attachments ({ATTACHMENT_COLUMNS}) VALUES (%s, %s, 1, %s, %s) "
            "ON CONFLICT (device_id) DO UPDATE SET replica = excluded.replica, "
            "epoch = attachments.epoch + 1, attached_at = excluded.attached_at, "
            f"lease_expires_at = excluded.lease_expires_at RETURNING {ATTACHMENT_COLUMNS}",
            (device_id, replica, now, lease_expires_at),
        )
        assert row is not None
        return attachment_row(row), attachment_row(before) if before else None

    def renew_attachment(self, device_id: str, epoch: int, lease_expires_at: int) -> bool:
        count = self._rowcount(
            "UPDATE attachments SET lease_expires_at = %s "
            "WHERE device_id = %s AND epoch = %s AND replica <> ''",
            (lease_expires_at, device_id, epoch),
        )
        return count == 1

    def release_attachment(self, device_id: str, epoch: int) -> bool:
        count = self._rowcount(
            "UPDATE attachments SET replica = '', lease_expires_at = 0 "
            "WHERE device_id = %s AND epoch = %s AND replica <> ''",
            (device_id, epoch),
        )
        return count == 1

    def get_attachment(self, device_id: str) -> AttachmentRecord | None:
        row = self._one(
            f"SELECT {ATTACHMENT_COLUMNS} FROM attachments WHERE device_id = %s", (device_id,)
        )
        return attachment_row(row) if row else None

    def release_attachments_of(self, replica: str) -> list[str]:
        if not replica:
            return []
        rows = self._all(
            "UPDATE attachments SET replica = '', lease_expires_at = 0 "
            "WHERE replica = %s RETURNING device_id",
            (replica,),
        )
        return sorted(r[0] for r in rows)

    # events
    def append_event(self, kind: str, payload: dict[str, Any], origin: str, at_ms: int) -> int:
        # Seqs must become visible in seq order, or a reader polling events_after(last) could
        # pass over a smaller seq that commits later. What this relies on: every appender holds
        # the chain lock from before it draws its seq until it commits. Writers opened with the
        # writer lock (the default, and every re-run) hold LOCK TABLE audit_head IN EXCLUSIVE
        # MODE from BEGIN; any other writer (writer_lock=False) takes the head row FOR UPDATE
        # here, before drawing the seq, which conflicts with that table lock and with another
        # such row lock. Both are held to commit, and PostgreSQL makes a commit visible before
        # it releases the transaction's locks, so appenders commit one at a time in seq order.
        # (Rolled-back appenders leave gaps; readers never wait for a gap.)
        if self._head is None:
            head = self._one("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
            if head is None:
                raise RuntimeError(
                    "audit_head row is missing: the schema was not created by the broker"
                )
            self._head = (int(head[0]), str(head[1]))
        row = self._one(
            "WITH e AS (INSERT INTO events (kind, payload, origin, at_ms) "
            "VALUES (%s, %s, %s, %s) RETURNING seq) "
            "SELECT seq, pg_notify(%s, seq::text) FROM e",
            (kind, event_payload(payload), origin, at_ms, EVENTS_CHANNEL),
        )
        assert row is not None
        return int(row[0])

    def events_after(self, seq: int, limit: int = 500) -> list[EventRecord]:
        rows = self._all(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > %s ORDER BY seq LIMIT %s",
            (seq, limit),
        )
        return [event_row(r) for r in rows]

    def last_event_seq(self) -> int:
        row = self._one("SELECT MAX(seq) FROM events")
        return int(row[0]) if row and row[0] is not None else 0

    # audit
    def audit_entries_for(self, subject: str, action_prefix: str) -> list[AuditEntry]:
        rows = self._all(
            f"SELECT {AUDIT_COLUMNS} FROM audit_log "
            "WHERE subject = %s AND action LIKE %s ORDER BY seq",
            (subject, action_prefix.replace("%", "") + "%"),
        )
        return [_audit_entry(r) for r in rows]

    # fleet audit
    def audit_entries_since(self, since_ms: int, actions: tuple[str, ...]) -> list[AuditEntry]:
        if not actions:
            return []
        rows = self._all(
            f"SELECT {AUDIT_COLUMNS} FROM audit_log "
            "WHERE at_ms >= %s AND action = ANY(%s) ORDER BY seq",
            (since_ms, list(actions)),
        )
        return [_audit_entry(r) for r in rows]

    def failure_counts(self, scope: str, since_ms: int) -> list[FailureCount]:
        rows = self._all(
            "SELECT key, COUNT(*), MIN(at_ms), MAX(at_ms) FROM failures "
            "WHERE scope = %s AND at_ms >= %s GROUP BY key ORDER BY key",
            (scope, since_ms),
        )
        return [FailureCount(key, int(n), int(first), int(last)) for key, n, first, last in rows]

    def device_certificates_expiring(self, after: int, before: int) -> list[CertificateRecord]:
        rows = self._all(
            f"SELECT {CERT_COLUMNS} FROM certificates WHERE kind = 'device' "
            "AND status = 'active' AND not_after > %s AND not_after <= %s "
            "ORDER BY not_after, serial",
            (after, before),
        )
        return [cert_row(r) for r in rows]

    def fanout_sessions(self, since: int, min_devices: int) -> list[SessionRecord]:
        rows = self._all(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE opened_at >= %s AND user_id IN ("
            "SELECT user_id FROM sessions WHERE opened_at >= %s GROUP BY user_id "
            "HAVING COUNT(DISTINCT device_id) >= %s) ORDER BY user_id, opened_at, session_id",
            (since, since, min_devices),
        )
        return [session_row(r) for r in rows]

    def append_audit(self, event: AuditEvent, at_ms: int) -> AuditEntry:
        # A writer holding the chain lock read the head with it (and keeps it current); any
        # other writer locks the head row until commit, so one appender at a time, in any
        # process, extends the chain: a head moved since this snapshot is a serialization
        # failure (re-run by Store.run), never a fork.
        head = self._head or self._one("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
        if head is None:
            raise RuntimeError(
                "audit_head row is missing: the schema was not created by the broker"
            )
        seq, prev_hash = head[0] + 1, head[1]
        detail_json = canonical_detail(event.detail)
        digest = entry_hash(
            prev_hash, seq, at_ms, event.actor, event.action, event.subject, detail_json
        )
        self._conn.execute(
            f"WITH e AS (INSERT INTO audit_log ({AUDIT_COLUMNS}) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)) "
            "UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1",
            (
                seq,
                at_ms,
                event.actor,
                event.action,
                event.subject,
                detail_json,
                prev_hash,
                digest,
                seq,
                digest,
            ),
        )
        self._head = (seq, digest)
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


class PostgresStore:
    """The fleet store: any number of broker processes may share one PostgreSQL database."""

    def __init__(
        self,
        url: str,
        *,
        migrate: bool = True,
        min_size: int = 1,
        max_size: int = 10,
        attempts: int = 5,
        backoff_seconds: float = 0.005,
        writer_lock: bool = True,
        lock_timeout_ms: int = 10_000,
        connect_timeout: float = 10.0,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.url = url
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self.writer_lock = writer_lock
        self.retries = 0  # units re-run after a serialization failure or deadlock
        self.exhausted = 0  # units given up after `attempts` tries (raised Contention)
        self.on_run: RunObserver | None = None  # see Store.on_run (metrics)
        self._lock_timeout_ms = lock_timeout_ms
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        # The LISTEN connection for wait_for_events: one reader at a time (``_listening``);
        # other waiters sleep on ``_listen_cond`` and wake when ``_notified`` moves.
        self._listen_cond = threading.Condition()
        self._listener: psycopg.Connection[Any] | None = None
        self._listening = False
        self._notified = 0
        self._listener_lost = False
        self._closed = False
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True},
            configure=self._configure,
            open=False,
            timeout=connect_timeout,
            name="broker-store",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except psycopg.Error as error:
            self._pool.close()
            raise Unavailable(f"cannot connect to the PostgreSQL store: {error}") from error
        try:
            self.check_version()
            if migrate:
                self.migrate()
        except BaseException:
            self._pool.close()
            raise

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET synchronous_commit = on")
        conn.execute(f"SET lock_timeout = {int(self._lock_timeout_ms)}")
        conn.execute("SET idle_in_transaction_session_timeout = 60000")

    # -- schema ----------------------------------------------------------------------------------
    def core_executor(self) -> Executor:
        """A thread per pooled connection: PostgreSQL commits in parallel (writers still take
        the chain lock in turn), so there is nothing to batch."""
        return ThreadPoolExecutor(max_workers=self._max_size, thread_name_prefix="broker-core")

    def schema_version(self) -> int:
        with self._pool.connection() as conn:
            return self._version(conn)

    @staticmethod
    def _version(conn: psycopg.Connection[Any]) -> int:
        exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return 0
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0) if row else 0

    def check_version(self) -> None:
        """Refuse a database migrated by a newer broker."""
        current = self.schema_version()
        if current > LATEST_VERSION:
            raise SchemaTooNew(current, LATEST_VERSION, "PostgreSQL")

    def migrate(self, target: int | None = None) -> int:
        """Bring the schema to target (default: the latest; never below the baseline, never
        backwards) in one transaction; return the version. Concurrent migrators (replicas
        starting together) queue on an advisory lock."""
        target = max(LATEST_VERSION if target is None else target, BASELINE_VERSION)
        if target > LATEST_VERSION:
            raise ValueError(f"no schema v{target}: this broker knows up to v{LATEST_VERSION}")
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now(), note TEXT NOT NULL DEFAULT '')"
            )
            current = self._version(conn)
            if current > LATEST_VERSION:
                raise SchemaTooNew(current, LATEST_VERSION, "PostgreSQL")
            if current == 0:
                for statement in BASELINE:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, note) VALUES (%s, 'baseline')",
                    (BASELINE_VERSION,),
                )
                current = BASELINE_VERSION
            for version in range(current + 1, target + 1):
                for statement in STEPS[version]:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
            return self._version(conn)

    # -- transactions ----------------------------------------------------------------------------
    @contextmanager
    def _write(self, *, lock: bool) -> Iterator[PostgresTransaction]:
        try:
            with self._pool.connection() as conn:
                try:
                    if lock:
                        head: tuple[int, str] | None = self._begin(conn)
                    else:
                        conn.execute(BEGIN_WRITE)
                        head = None
                    yield PostgresTransaction(conn, head)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.info.transaction_status in (
                        TransactionStatus.INTRANS,
                        TransactionStatus.INERROR,
                    ):
                        conn.execute("ROLLBACK")
                    raise
        except psycopg.Error as error:
            translated = _translate(error)
            if translated is error:
                raise
            raise translated from error

    @staticmethod
    def _begin(conn: psycopg.Connection[Any]) -> tuple[int, str]:
        """BEGIN, take the chain lock, read the chain head: one round trip. LOCK is not a query,
        so the transaction's snapshot is taken after the lock is held (by the SELECT)."""
        cursor = conn.execute(f"{BEGIN_WRITE}; {LOCK_CHAIN}; {READ_HEAD}")
        while cursor.nextset():
            pass
        row = cursor.fetchone()
        if row is None:
            raise RuntimeError(
                "audit_head row is missing: the schema was not created by the broker"
            )
        return int(row[0]), str(row[1])

    @contextmanager
    def transaction(self) -> Iterator[PostgresTransaction]:
        """A serializable write transaction (commit on success, roll back on any exception).
        A serialization failure raises Contention: use run() to have it re-run instead."""
        with self._write(lock=self.writer_lock) as tx:
            yield tx

    def run(self, unit: Callable[[Transaction], T]) -> T:
        """Run unit in one transaction, re-running it on a serialization failure or deadlock
        (each re-run takes the chain lock up front) with jittered exponential backoff."""
        observer = self.on_run
        if observer is None:
            return self._run(unit, [0])
        started = time.perf_counter()
        reruns = [0]
        try:
            return self._run(unit, reruns)
        finally:
            observer(time.perf_counter() - started, reruns[0])

    def _run(self, unit: Callable[[Transaction], T], reruns: list[int]) -> T:
        lock = self.writer_lock
        for attempt in range(1, self.attempts + 1):
            try:
                with self._write(lock=lock) as tx:
                    return unit(tx)
            except SerializationFailure as failure:
                if attempt == self.attempts:
                    self.exhausted += 1
                    raise Contention(
                        f"the store could not commit this after {attempt} attempts "
                        "(concurrent changes); retry",
                        retry_after_seconds=1.0,
                    ) from failure
                self.retries += 1
                reruns[0] += 1
                lock = True
                pause = self.backoff_seconds * (2 ** (attempt - 1))
                time.sleep(random.uniform(0, pause))  # noqa: S311 (jitter, not a secret)
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def read(self) -> Iterator[PostgresTransaction]:
        """A read-only snapshot; it never waits for writers and never fails to serialize."""
        try:
            with self._pool.connection() as conn:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                try:
                    yield PostgresTransaction(conn)
                finally:
                    if conn.info.transaction_status != TransactionStatus.UNKNOWN:
                        conn.execute("ROLLBACK")
        except psycopg.Error as error:
            translated = _translate(error)
            if translated is error:
                raise
            raise translated from error

    def batch(self) -> nullcontext[None]:
        """Group commit is a SQLite detail: here each transaction commits on its own."""
        return nullcontext()

    def audit_entries(self) -> Iterator[AuditEntry]:
        """All audit entries in seq order (one snapshot, streamed in pages)."""
        with self.read() as tx, tx._conn.cursor(name="audit_entries") as cursor:
            cursor.itersize = 2000
            cursor.execute(f"SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq")
            for row in cursor:
                yield _audit_entry(row)

    # -- the event feed ----------------------------------------------------------------------
    def wait_for_events(self, timeout: float) -> bool:
        """Block up to timeout seconds for a NOTIFY on ``broker_events``; True if one arrived
        (or may have been missed: the first wait after the listening connection was lost and
        made again says True, so the caller polls ``events_after``). Thread-safe: one thread
        reads the connection, the others wait for it to report."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._listen_cond:
            seen = self._notified
            while self._listening:
                remaining = deadline - time.monotonic()
                if self._notified != seen:
                    return True
                if remaining <= 0 or self._closed:
                    return False
                self._listen_cond.wait(remaining)
            if self._notified != seen:
                return True
            if self._closed:
                return False
            self._listening = True
        arrived = False
        try:
            arrived = self._listen(deadline)
        finally:
            with self._listen_cond:
                self._listening = False
                if arrived:
                    self._notified += 1
                self._listen_cond.notify_all()
                orphan = self._listener if self._closed else None
                if orphan is not None:
                    self._listener = None
            if orphan is not None:  # close() ran while this thread was reading: close it here
                orphan.close()
        return arrived

    def _listen(self, deadline: float) -> bool:
        """Read notifications until one arrives or the deadline passes (the calling thread is
        the only reader). On a failure the connection is dropped, to be made again next time."""
        try:
            conn = self._listener
            if conn is None or conn.closed:
                conn = psycopg.connect(
                    self.url, autocommit=True, connect_timeout=max(1, int(self._connect_timeout))
                )
                conn.execute(f"LISTEN {EVENTS_CHANNEL}")
                with self._listen_cond:
                    if self._closed:
                        conn.close()
                        return False
                    self._listener = conn
                    if self._listener_lost:  # notifications may have been sent meanwhile
                        self._listener_lost = False
                        return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            received = list(conn.notifies(timeout=remaining, stop_after=1))
            return bool(received)
        except psycopg.Error:
            with self._listen_cond:
                broken, self._listener = self._listener, None
                self._listener_lost = not self._closed
            if broken is not None:
                broken.close()
            remaining = deadline - time.monotonic()
            if remaining > 0 and not self._closed:
                time.sleep(min(remaining, 0.5))  # do not spin on a server that is down
            return False

    def close(self) -> None:
        with self._listen_cond:
            self._closed = True
            listening = self._listening
            # A thread reading the listener closes it itself (closing a connection under a
            # reader in another thread is not safe); wake it with a notification.
            listener, self._listener = (None, None) if listening else (self._listener, None)
            self._listen_cond.notify_all()
        if listening:
            with suppress(psycopg.Error), self._pool.connection(timeout=1.0) as conn:
                conn.execute("SELECT pg_notify(%s, '0')", (EVENTS_CHANNEL,))
        if listener is not None:
            listener.close()
        self._pool.close()
