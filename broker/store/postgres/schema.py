"""Versioned schema for the PostgreSQL store. Append new steps; never edit old ones.

PostgreSQL support started when the SQLite schema was at v6, so a fresh PostgreSQL database is
created directly at v6 from ``BASELINE`` (the same tables, columns, constraints and indexes as
SQLite's v1..v6, in PostgreSQL types) and recorded as version 6. Later versions are numbered like
SQLite's: a change to the schema adds the same version number to both backends, here in ``STEPS``.

PostgreSQL-only additions to the baseline, both constraints behind a check the core makes:
- ``certificate_keys``: one row per public key naming the one subject that may hold it, so two
  identities can never be bound to one key, even by writers that race.
- ``audit_head``: the head of the hash chain (one row); every append locks it, so concurrent
  writers, in any number of processes, extend one chain. ``audit_log.prev_hash`` is unique: a
  fork cannot be stored.
"""

from __future__ import annotations

from broker.audit.chain import GENESIS

BASELINE_VERSION = 6

BASELINE: tuple[str, ...] = (
    """CREATE TABLE devices (
        device_id TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('active', 'revoked')),
        created_at BIGINT NOT NULL,
        enrolled_via TEXT NOT NULL,
        claim_code_hash TEXT,
        revoked_at BIGINT,
        last_seen_at BIGINT,
        trust_bundle_version TEXT
    )""",
    """CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        spki_sha256 TEXT NOT NULL,
        fingerprint TEXT NOT NULL UNIQUE,
        not_before BIGINT NOT NULL,
        not_after BIGINT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('active', 'superseded', 'revoked')),
        issued_at BIGINT NOT NULL,
        superseded_by TEXT REFERENCES certificates(serial),
        superseded_at BIGINT,
        revoked_at BIGINT,
        revocation_reason TEXT,
        issuer_ski TEXT
    )""",
    "CREATE INDEX certificates_subject ON certificates(subject)",
    "CREATE INDEX certificates_spki ON certificates(spki_sha256)",
    "CREATE INDEX certificates_revoked ON certificates(not_after) WHERE status = 'revoked'",
    "CREATE INDEX certificates_subject_status ON certificates(subject, status)",
    """CREATE TABLE certificate_keys (
        spki_sha256 TEXT PRIMARY KEY,
        subject TEXT NOT NULL
    )""",
    """CREATE TABLE enrollment_tokens (
        token_hash TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        created_by TEXT NOT NULL,
        used_at BIGINT
    )""",
    "CREATE INDEX enrollment_tokens_device ON enrollment_tokens(device_id)",
    """CREATE TABLE users (
        user_id TEXT PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        created_at BIGINT NOT NULL
    )""",
    """CREATE TABLE app_instances (
        app_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(user_id),
        label TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('active', 'revoked')),
        created_at BIGINT NOT NULL,
        revoked_at BIGINT
    )""",
    "CREATE INDEX app_instances_user ON app_instances(user_id)",
    """CREATE TABLE grants (
        device_id TEXT NOT NULL REFERENCES devices(device_id),
        user_id TEXT NOT NULL REFERENCES users(user_id),
        role TEXT NOT NULL CHECK (role IN ('owner', 'viewer')),
        granted_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT,
        PRIMARY KEY (device_id, user_id)
    )""",
    "CREATE UNIQUE INDEX grants_one_owner ON grants(device_id) WHERE role = 'owner'",
    "CREATE INDEX grants_user ON grants(user_id)",
    """CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        device_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        app_id TEXT NOT NULL,
        opened_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        outcome TEXT NOT NULL CHECK (outcome IN ('opened', 'denied', 'ended')),
        reason TEXT NOT NULL DEFAULT '',
        cnf_thumbprint TEXT NOT NULL DEFAULT '',
        ended_at BIGINT,
        bytes BIGINT NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX sessions_device ON sessions(device_id, opened_at)",
    "CREATE INDEX sessions_user ON sessions(user_id)",
    "CREATE INDEX sessions_open ON sessions(outcome) WHERE outcome = 'opened'",
    """CREATE TABLE audit_log (
        seq BIGINT PRIMARY KEY CHECK (seq > 0),
        at_ms BIGINT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL UNIQUE,
        hash TEXT NOT NULL UNIQUE
    )""",
    "CREATE INDEX audit_log_subject ON audit_log(subject, seq)",
    """CREATE TABLE audit_head (
        id SMALLINT PRIMARY KEY CHECK (id = 1),
        seq BIGINT NOT NULL,
        hash TEXT NOT NULL
    )""",
    f"INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '{GENESIS}')",
)

# Steps after the baseline: version -> statements (v7 will be the first).
STEPS: dict[int, tuple[str, ...]] = {
    # v7 (as SQLite's v7): failure counters shared by every replica and kept across restarts.
    7: (
        """CREATE TABLE failures (
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            at_ms BIGINT NOT NULL
        )""",
        "CREATE INDEX failures_key ON failures(scope, key, at_ms)",
        "CREATE INDEX failures_age ON failures(scope, at_ms)",
    ),
    # v8 (as SQLite's v8): replicas, fenced attachments, the event feed, sessions' replica.
    # events.seq is an identity column; appenders take the chain lock before drawing a seq and
    # hold it to commit (see PostgresTransaction.append_event), so seqs commit in order.
    8: (
        """CREATE TABLE replicas (
            name TEXT PRIMARY KEY,
            internal_address TEXT NOT NULL,
            started_at BIGINT NOT NULL,
            heartbeat_at BIGINT NOT NULL
        )""",
        """CREATE TABLE attachments (
            device_id TEXT PRIMARY KEY,
            replica TEXT NOT NULL,
            epoch BIGINT NOT NULL CHECK (epoch > 0),
            attached_at BIGINT NOT NULL,
            lease_expires_at BIGINT NOT NULL
        )""",
        "CREATE INDEX attachments_replica ON attachments(replica) WHERE replica <> ''",
        """CREATE TABLE events (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            origin TEXT NOT NULL,
            at_ms BIGINT NOT NULL
        )""",
        "ALTER TABLE sessions ADD COLUMN replica TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX sessions_replica_open ON sessions(replica) WHERE outcome = 'opened'",
    ),
    # v9 (as SQLite's v9): renew-after-expiry nonces, each accepted once (primary key, I8).
    9: (
        """CREATE TABLE renewal_nonces (
            nonce_hash TEXT PRIMARY KEY,
            subject TEXT NOT NULL,
            used_at BIGINT NOT NULL
        )""",
        "CREATE INDEX renewal_nonces_age ON renewal_nonces(used_at)",
    ),
}

LATEST_VERSION = BASELINE_VERSION + len(STEPS)
