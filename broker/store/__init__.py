"""Storage: the store-of-record interface and its backends (SQLite default)."""

from broker.store.base import (
    AppRecord,
    CertificateRecord,
    CertStatus,
    DeviceRecord,
    DeviceState,
    EnrollmentTokenRecord,
    GrantRecord,
    Role,
    SessionOutcome,
    SessionRecord,
    Store,
    Transaction,
    UserRecord,
)

__all__ = [
    "AppRecord",
    "CertStatus",
    "CertificateRecord",
    "DeviceRecord",
    "DeviceState",
    "EnrollmentTokenRecord",
    "GrantRecord",
    "Role",
    "SessionOutcome",
    "SessionRecord",
    "Store",
    "Transaction",
    "UserRecord",
]
