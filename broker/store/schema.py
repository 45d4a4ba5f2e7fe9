"""Versioned schema migrations for the SQLite store. Append new versions; never edit old ones."""

from __future__ import annotations

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # v1: devices, certificates, enrollment tokens, hash-chained audit log.
    (
        """CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ('active', 'revoked')),
            created_at INTEGER NOT NULL,
            enrolled_via TEXT NOT NULL,
            claim_code_hash TEXT,
            revoked_at INTEGER
        )""",
        """CREATE TABLE certificates (
            serial TEXT PRIMARY KEY,
            spiffe_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            spki_sha256 TEXT NOT NULL,
            fingerprint TEXT NOT NULL UNIQUE,
            not_before INTEGER NOT NULL,
            not_after INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('active', 'superseded', 'revoked')),
            issued_at INTEGER NOT NULL,
            superseded_by TEXT REFERENCES certificates(serial),
            superseded_at INTEGER,
            revoked_at INTEGER,
            revocation_reason TEXT
        )""",
        "CREATE INDEX certificates_subject ON certificates(subject)",
        "CREATE INDEX certificates_spki ON certificates(spki_sha256)",
        """CREATE TABLE enrollment_tokens (
            token_hash TEXT PRIMARY KEY,
            device_id TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            created_by TEXT NOT NULL,
            used_at INTEGER
        )""",
        """CREATE TABLE audit_log (
            seq INTEGER PRIMARY KEY,
            at_ms INTEGER NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            subject TEXT NOT NULL,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL UNIQUE
        )""",
    ),
    # v2: remember when each device last attached and which trust bundle it held (rotation status).
    (
        "ALTER TABLE devices ADD COLUMN last_seen_at INTEGER",
        "ALTER TABLE devices ADD COLUMN trust_bundle_version TEXT",
        "CREATE INDEX enrollment_tokens_device ON enrollment_tokens(device_id)",
    ),
    # v3: users, app instances, grants (ownership and shares), sessions.
    (
        """CREATE TABLE users (
            user_id TEXT PRIMARY KEY,
            username TEXT NOT NULL UNIQUE,
            password_hash TEXT NOT NULL,
            created_at INTEGER NOT NULL
        )""",
        """CREATE TABLE app_instances (
            app_id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users(user_id),
            label TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('active', 'revoked')),
            created_at INTEGER NOT NULL,
            revoked_at INTEGER
        )""",
        "CREATE INDEX app_instances_user ON app_instances(user_id)",
        """CREATE TABLE grants (
            device_id TEXT NOT NULL REFERENCES devices(device_id),
            user_id TEXT NOT NULL REFERENCES users(user_id),
            role TEXT NOT NULL CHECK (role IN ('owner', 'viewer')),
            granted_by TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER,
            PRIMARY KEY (device_id, user_id)
        )""",
        "CREATE UNIQUE INDEX grants_one_owner ON grants(device_id) WHERE role = 'owner'",
        "CREATE INDEX grants_user ON grants(user_id)",
        """CREATE TABLE sessions (
            session_id TEXT PRIMARY KEY,
            device_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            app_id TEXT NOT NULL,
            opened_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('opened', 'denied', 'ended')),
            reason TEXT NOT NULL DEFAULT '',
            cnf_thumbprint TEXT NOT NULL DEFAULT '',
            ended_at INTEGER,
            bytes INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX sessions_device ON sessions(device_id, opened_at)",
        "CREATE INDEX sessions_user ON sessions(user_id)",
    ),
    # v4: the owner's access log is read from the audit trail by device.
    ("CREATE INDEX audit_log_subject ON audit_log(subject, seq)",),
    # v5: which issuing CA signed each certificate (its SKI), so each CA's CRL lists its own.
    (
        "ALTER TABLE certificates ADD COLUMN issuer_ski TEXT",
        "CREATE INDEX certificates_revoked ON certificates(status, not_after)",
    ),
    # v6: v5's (status, not_after) index made SQLite scan every active certificate on each
    # renewal (bench/enroll.py: 330 µs -> 1,200 µs after 5,500 certificates). The CRL query only
    # needs revoked rows; per-subject lookups get (subject, status).
    (
        "DROP INDEX certificates_revoked",
        "CREATE INDEX certificates_revoked ON certificates(not_after) WHERE status = 'revoked'",
        "CREATE INDEX certificates_subject_status ON certificates(subject, status)",
    ),
    # v7: failed logins and wrong claim codes are counted in the store, so every broker process
    # shares one budget and a restart does not hand an attacker a fresh one.
    (
        """CREATE TABLE failures (
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            at_ms INTEGER NOT NULL
        )""",
        "CREATE INDEX failures_key ON failures(scope, key, at_ms)",
        "CREATE INDEX failures_age ON failures(scope, at_ms)",
    ),
    # v8: one fleet of replicas. Replicas and their internal addresses; which replica holds each
    # device's Attach stream, fenced by an epoch that never repeats (the row is kept after
    # release); the event feed every replica follows by seq; which replica opened each session.
    (
        """CREATE TABLE replicas (
            name TEXT PRIMARY KEY,
            internal_address TEXT NOT NULL,
            started_at INTEGER NOT NULL,
            heartbeat_at INTEGER NOT NULL
        )""",
        """CREATE TABLE attachments (
            device_id TEXT PRIMARY KEY,
            replica TEXT NOT NULL,
            epoch INTEGER NOT NULL CHECK (epoch > 0),
            attached_at INTEGER NOT NULL,
            lease_expires_at INTEGER NOT NULL
        )""",
        "CREATE INDEX attachments_replica ON attachments(replica) WHERE replica != ''",
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            origin TEXT NOT NULL,
            at_ms INTEGER NOT NULL
        )""",
        "ALTER TABLE sessions ADD COLUMN replica TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX sessions_replica_open ON sessions(replica) WHERE outcome = 'opened'",
    ),
    # v9: renew-after-expiry nonces (their SHA-256), each accepted once: the primary key is the
    # constraint behind single use (I8); rows older than the timestamp window are pruned.
    (
        """CREATE TABLE renewal_nonces (
            nonce_hash TEXT PRIMARY KEY,
            subject TEXT NOT NULL,
            used_at INTEGER NOT NULL
        )""",
        "CREATE INDEX renewal_nonces_age ON renewal_nonces(used_at)",
    ),
)

LATEST_VERSION = len(MIGRATIONS)
