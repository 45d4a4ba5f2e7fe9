"""Schema migrations: an old (v1) database opened by today's code is upgraded in place, intact."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from broker.audit.chain import AuditEvent, verify_chain
from broker.identity.spiffe import Kind
from broker.store import (
    CertificateRecord,
    CertStatus,
    DeviceRecord,
    DeviceState,
    EnrollmentTokenRecord,
)
from broker.store.schema import LATEST_VERSION, MIGRATIONS
from broker.store.sqlite import SqliteStore

T0 = 1_700_000_000
DEVICE_SPIFFE = "spiffe://camera.local/device/cam-0001"
CERT = CertificateRecord(
    serial="4a1fd2c39b8e7f6a5d4c3b2a1f0e9d8c",
    spiffe_id=DEVICE_SPIFFE,
    kind=Kind.DEVICE,
    subject=DEVICE_SPIFFE,
    spki_sha256="ab" * 32,
    fingerprint="cd" * 32,
    not_before=T0 - 300,
    not_after=T0 + 30 * 86_400,
    status=CertStatus.ACTIVE,
    issued_at=T0,
)
OLD_CERT = CertificateRecord(
    serial="1b2c3d4e5f60718293a4b5c6d7e8f901",
    spiffe_id=DEVICE_SPIFFE,
    kind=Kind.DEVICE,
    subject=DEVICE_SPIFFE,
    spki_sha256="ef" * 32,
    fingerprint="01" * 32,
    not_before=T0 - 86_400,
    not_after=T0 + 29 * 86_400,
    status=CertStatus.ACTIVE,  # superseded by CERT while building the v1 database
    issued_at=T0 - 86_400,
)
TOKEN = EnrollmentTokenRecord(
    token_hash="9f" * 32,
    device_id="cam-0001",
    created_at=T0 - 3600,
    expires_at=T0 + 7 * 86_400,
    created_by="spiffe://camera.local/operator/admin",
    used_at=T0,
)
UNUSED_TOKEN = EnrollmentTokenRecord(
    "8e" * 32, "cam-0002", T0, T0 + 3600, "spiffe://camera.local/operator/admin"
)
AUDIT = [
    AuditEvent(
        "spiffe://camera.local/operator/admin",
        "enrollment_token.created",
        "cam-0001",
        {"expires_at": T0},
    ),
    AuditEvent(
        "anonymous", "device.enrolled", "cam-0001", {"serial": OLD_CERT.serial, "via": "token"}
    ),
    AuditEvent(DEVICE_SPIFFE, "certificate.renewed", "cam-0001", {"serial": CERT.serial}),
]


def _columns(path: Path, table: str) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def _make_v1_database(path: Path) -> None:
    """A database as the first release left it, with realistic rows in every table."""
    store = SqliteStore(path, migrate=False)
    try:
        assert store.schema_version() == 0
        assert store.migrate(target=1) == 1
        assert "last_seen_at" not in _columns(path, "devices")
        # The v1 devices table has no presence columns, so insert the way v1 code did.
        with sqlite3.connect(path, isolation_level=None) as conn:
            conn.executemany(
                "INSERT INTO devices (device_id, state, created_at, enrolled_via, claim_code_hash, "
                "revoked_at) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    ("cam-0001", "active", T0 - 86_400, "token", "77" * 32, None),
                    ("cam-0003", "revoked", T0 - 2 * 86_400, "birth:5e", None, T0 - 10),
                ],
            )
            # Certificates too: later versions add columns the v1 table does not have.
            conn.executemany(
                "INSERT INTO certificates (serial, spiffe_id, kind, subject, spki_sha256, fingerprint, "
                "not_before, not_after, status, issued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        c.serial,
                        c.spiffe_id,
                        c.kind.value,
                        c.subject,
                        c.spki_sha256,
                        c.fingerprint,
                        c.not_before,
                        c.not_after,
                        c.status.value,
                        c.issued_at,
                    )
                    for c in (OLD_CERT, CERT)
                ],
            )
        with store.transaction() as tx:
            tx.supersede_certificates(DEVICE_SPIFFE, CERT.serial, T0)
            tx.insert_enrollment_token(TOKEN)
            tx.insert_enrollment_token(UNUSED_TOKEN)
            for i, event in enumerate(AUDIT):
                tx.append_audit(event, (T0 + i) * 1000)
    finally:
        store.close()


def test_v1_database_is_migrated_to_latest_with_rows_intact(tmp_path: Path) -> None:
    path = tmp_path / "var" / "broker.db"
    _make_v1_database(path)

    store = SqliteStore(path)
    try:
        assert store.schema_version() == LATEST_VERSION
        assert LATEST_VERSION >= 2
        with store.read() as tx:
            active = tx.get_device("cam-0001")
            revoked = tx.get_device("cam-0003")
            assert active == DeviceRecord(
                "cam-0001", DeviceState.ACTIVE, T0 - 86_400, "token", "77" * 32, None, None, None
            )
            assert revoked == DeviceRecord(
                "cam-0003",
                DeviceState.REVOKED,
                T0 - 2 * 86_400,
                "birth:5e",
                None,
                T0 - 10,
                None,
                None,
            )
            assert tx.get_certificate(CERT.serial) == CERT
            old = tx.get_certificate(OLD_CERT.serial)
            assert old is not None
            assert (old.status, old.superseded_by, old.superseded_at) == (
                CertStatus.SUPERSEDED,
                CERT.serial,
                T0,
            )
            assert tx.get_enrollment_token(TOKEN.token_hash) == TOKEN
            assert tx.get_enrollment_token(UNUSED_TOKEN.token_hash) == UNUSED_TOKEN
            assert tx.subjects_with_key(CERT.spki_sha256) == {DEVICE_SPIFFE}

        for column in ("last_seen_at", "trust_bundle_version"):
            assert column in _columns(path, "devices")
        with sqlite3.connect(path) as conn:
            nulls = conn.execute(
                "SELECT COUNT(*) FROM devices WHERE last_seen_at IS NULL AND trust_bundle_version IS NULL"
            ).fetchone()[0]
            indexes = {r[1] for r in conn.execute("PRAGMA index_list(enrollment_tokens)")}
        assert nulls == 2
        assert "enrollment_tokens_device" in indexes

        entries = list(store.audit_entries())
        assert [e.action for e in entries] == [e.action for e in AUDIT]
        assert verify_chain(entries).ok

        # The migrated database works with today's code: new columns are written and read back,
        # and the chain keeps growing from the old head.
        with store.transaction() as tx:
            tx.record_presence("cam-0001", T0 + 60, "bundle-2")
            tx.append_audit(AuditEvent("broker", "device.attached", "cam-0001"), (T0 + 60) * 1000)
        with store.read() as tx:
            seen = tx.get_device("cam-0001")
        assert seen is not None
        assert (seen.last_seen_at, seen.trust_bundle_version) == (T0 + 60, "bundle-2")
        assert verify_chain(store.audit_entries()).ok
    finally:
        store.close()


def test_every_migration_step_is_recorded_once(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    _make_v1_database(path)
    SqliteStore(path).close()
    with sqlite3.connect(path) as conn:
        versions = [
            r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")
        ]
    assert versions == list(range(1, LATEST_VERSION + 1))


def test_migration_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    first = SqliteStore(path)
    with first.transaction() as tx:
        tx.insert_device(DeviceRecord("cam-0001", DeviceState.ACTIVE, T0, "token"))
        tx.append_audit(AUDIT[0], T0 * 1000)
    schema_before = _schema(path)
    assert first.migrate() == LATEST_VERSION
    assert first.migrate(target=1) == LATEST_VERSION  # never goes backwards
    first.close()

    for _ in range(2):
        again = SqliteStore(path)
        assert again.schema_version() == LATEST_VERSION
        assert again.migrate() == LATEST_VERSION
        again.close()

    assert _schema(path) == schema_before
    with sqlite3.connect(path) as conn:
        versions = [
            r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")
        ]
    assert versions == list(range(1, LATEST_VERSION + 1))
    store = SqliteStore(path)
    try:
        with store.read() as tx:
            assert [d.device_id for d in tx.list_devices()] == ["cam-0001"]
        assert verify_chain(store.audit_entries()).ok
    finally:
        store.close()


def test_two_stores_migrating_the_same_fresh_file(tmp_path: Path) -> None:
    """Two processes starting at once: the second sees the first's work and applies nothing twice."""
    path = tmp_path / "broker.db"
    a = SqliteStore(path, migrate=False)
    b = SqliteStore(path, migrate=False)
    try:
        assert a.migrate() == LATEST_VERSION
        assert b.migrate() == LATEST_VERSION
    finally:
        a.close()
        b.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == LATEST_VERSION


def test_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (LATEST_VERSION + 1,))
    before = _schema(path)
    with pytest.raises(RuntimeError, match=rf"v{LATEST_VERSION + 1} is newer than this broker"):
        SqliteStore(path)
    assert _schema(path) == before


def test_migrations_list_is_append_only_shape() -> None:
    """Each version is a non-empty tuple of SQL statements; LATEST_VERSION counts them."""
    assert len(MIGRATIONS) == LATEST_VERSION
    for statements in MIGRATIONS:
        assert statements
        assert all(isinstance(s, str) and s.strip() for s in statements)


def _schema(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as conn:
        return sorted(conn.execute("SELECT type, name, COALESCE(sql, '') FROM sqlite_master"))
