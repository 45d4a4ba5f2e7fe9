"""The storage interface every backend implements, and its record types.

Core logic runs its checks and writes inside one ``Store.transaction()``; backends make that
transaction serializable for writers, so single-use secrets are consumed atomically (I8).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from broker.audit import AuditEntry, AuditEvent


class DeviceState(enum.Enum):
    ACTIVE = "active"
    REVOKED = "revoked"


class CertStatus(enum.Enum):
    ACTIVE = "active"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    state: DeviceState
    created_at: int
    enrolled_via: str
    claim_code_hash: str | None = None
    revoked_at: int | None = None
    last_seen_at: int | None = None
    trust_bundle_version: str | None = None


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: str
    spiffe_id: str
    kind: str
    subject: str
    spki_sha256: str
    fingerprint: str
    not_before: int
    not_after: int
    status: CertStatus
    issued_at: int
    superseded_by: str | None = None
    superseded_at: int | None = None
    revoked_at: int | None = None
    revocation_reason: str | None = None


@dataclass(frozen=True, slots=True)
class EnrollmentTokenRecord:
    token_hash: str
    device_id: str
    created_at: int
    expires_at: int
    created_by: str
    used_at: int | None = None


class Transaction(Protocol):
    """Reads and writes inside one store transaction."""

    # devices
    def get_device(self, device_id: str) -> DeviceRecord | None: ...
    def insert_device(self, device: DeviceRecord) -> None: ...
    def set_claim_code_hash(self, device_id: str, claim_code_hash: str | None) -> None: ...
    def revoke_device(self, device_id: str, at: int) -> None: ...
    def list_devices(self) -> list[DeviceRecord]: ...
    def record_presence(self, device_id: str, at: int, trust_bundle_version: str) -> None: ...

    # certificates
    def insert_certificate(self, cert: CertificateRecord) -> None: ...
    def get_certificate(self, serial: str) -> CertificateRecord | None: ...
    def certificates_of(self, subject: str) -> list[CertificateRecord]: ...
    def subjects_with_key(self, spki_sha256: str) -> set[str]: ...
    def supersede_certificates(self, subject: str, by_serial: str, at: int) -> list[str]: ...
    def revoke_certificates(self, subject: str, at: int, reason: str) -> list[str]: ...

    # enrollment tokens
    def insert_enrollment_token(self, token: EnrollmentTokenRecord) -> None: ...
    def get_enrollment_token(self, token_hash: str) -> EnrollmentTokenRecord | None: ...
    def consume_enrollment_token(
        self, token_hash: str, now: int
    ) -> EnrollmentTokenRecord | None: ...

    # audit (I12)
    def append_audit(self, event: AuditEvent, at_ms: int) -> AuditEntry: ...


class Store(Protocol):
    """A store of record. ``transaction()`` commits on success and rolls back on any exception."""

    def transaction(self) -> AbstractContextManager[Transaction]: ...
    def read(self) -> AbstractContextManager[Transaction]: ...
    def audit_entries(self) -> Iterator[AuditEntry]: ...
    def schema_version(self) -> int: ...
    def close(self) -> None: ...
