"""Storage: the store-of-record interface and its backends (SQLite default, PostgreSQL).

``open_store(config)`` (in ``broker.store.open``) picks the backend from ``config.store_url``.

Owns: the schema, migrations, and the one transaction contract every core decision runs in.
May import: broker.audit (entry format), base modules. Never grpc, never a core package above it.
"""

from broker.store.base import (
    AppRecord,
    AppState,
    AttachmentRecord,
    CertificateRecord,
    CertStatus,
    DeviceRecord,
    DeviceState,
    DuplicateKey,
    EnrollmentTokenRecord,
    EventRecord,
    GrantRecord,
    MissingReference,
    RenewalNonceRecord,
    ReplicaRecord,
    Role,
    SchemaTooNew,
    SessionOutcome,
    SessionRecord,
    Store,
    Transaction,
    UserRecord,
)

__all__ = [
    "AppRecord",
    "AppState",
    "AttachmentRecord",
    "CertStatus",
    "CertificateRecord",
    "DeviceRecord",
    "DeviceState",
    "DuplicateKey",
    "EnrollmentTokenRecord",
    "EventRecord",
    "GrantRecord",
    "MissingReference",
    "RenewalNonceRecord",
    "ReplicaRecord",
    "Role",
    "SchemaTooNew",
    "SessionOutcome",
    "SessionRecord",
    "Store",
    "Transaction",
    "UserRecord",
]
