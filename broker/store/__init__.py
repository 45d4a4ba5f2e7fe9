"""Storage: the store-of-record interface and its backends (SQLite default)."""

from broker.store.base import (
    CertificateRecord,
    CertStatus,
    DeviceRecord,
    DeviceState,
    EnrollmentTokenRecord,
    Store,
    Transaction,
)

__all__ = [
    "CertStatus",
    "CertificateRecord",
    "DeviceRecord",
    "DeviceState",
    "EnrollmentTokenRecord",
    "Store",
    "Transaction",
]
