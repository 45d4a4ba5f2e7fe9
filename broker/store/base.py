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

from broker.audit.chain import AuditEntry, AuditEvent


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
    issuer_ski: str | None = None


@dataclass(frozen=True, slots=True)
class EnrollmentTokenRecord:
    token_hash: str
    device_id: str
    created_at: int
    expires_at: int
    created_by: str
    used_at: int | None = None


class Role(enum.Enum):
    OWNER = "owner"
    VIEWER = "viewer"


class SessionOutcome(enum.Enum):
    OPENED = "opened"
    DENIED = "denied"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class UserRecord:
    user_id: str
    username: str
    password_hash: str
    created_at: int


@dataclass(frozen=True, slots=True)
class AppRecord:
    app_id: str
    user_id: str
    label: str
    state: DeviceState
    created_at: int
    revoked_at: int | None = None


@dataclass(frozen=True, slots=True)
class GrantRecord:
    device_id: str
    user_id: str
    role: Role
    granted_by: str
    created_at: int
    expires_at: int | None = None

    def active_at(self, now: int) -> bool:
        """Whether the grant holds at time now (owner grants never expire)."""
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str
    device_id: str
    user_id: str
    app_id: str
    opened_at: int
    expires_at: int
    outcome: SessionOutcome
    reason: str = ""
    cnf_thumbprint: str = ""
    ended_at: int | None = None
    bytes: int = 0


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
    def revoked_unexpired(self, now: int) -> list[CertificateRecord]: ...
    def active_certificates_issued_by(self, issuer_skis: set[str]) -> list[CertificateRecord]: ...

    # enrollment tokens
    def insert_enrollment_token(self, token: EnrollmentTokenRecord) -> None: ...
    def get_enrollment_token(self, token_hash: str) -> EnrollmentTokenRecord | None: ...
    def consume_enrollment_token(
        self, token_hash: str, now: int
    ) -> EnrollmentTokenRecord | None: ...
    def cancel_enrollment_tokens(self, device_id: str, now: int) -> int: ...

    # users and app instances
    def insert_user(self, user: UserRecord) -> None: ...
    def get_user(self, user_id: str) -> UserRecord | None: ...
    def get_user_by_username(self, username: str) -> UserRecord | None: ...
    def insert_app(self, app: AppRecord) -> None: ...
    def get_app(self, app_id: str) -> AppRecord | None: ...
    def revoke_app(self, app_id: str, at: int) -> None: ...

    # ownership and shares
    def claim_device(self, device_id: str, claim_code_hash: str) -> bool: ...
    def get_grant(self, device_id: str, user_id: str) -> GrantRecord | None: ...
    def insert_grant(self, grant: GrantRecord) -> None: ...
    def delete_grant(self, device_id: str, user_id: str) -> bool: ...
    def delete_grants(self, device_id: str) -> list[GrantRecord]: ...
    def grants_of_user(self, user_id: str) -> list[GrantRecord]: ...

    # sessions
    def insert_session(self, session: SessionRecord) -> None: ...
    def get_session(self, session_id: str) -> SessionRecord | None: ...
    def end_sessions(self, session_ids: list[str], at: int, reason: str) -> list[str]: ...
    def open_sessions(
        self, *, device_id: str = "", user_id: str = "", app_id: str = ""
    ) -> list[SessionRecord]: ...
    def sessions_of_device(self, device_id: str) -> list[SessionRecord]: ...

    def close_session(self, session_id: str, at: int, reason: str, byte_count: int) -> bool: ...
    def end_all_open_sessions(self, at: int, reason: str) -> list[str]: ...

    # audit (I12)
    def append_audit(self, event: AuditEvent, at_ms: int) -> AuditEntry: ...
    def audit_entries_for(self, subject: str, action_prefix: str) -> list[AuditEntry]: ...


class Store(Protocol):
    """A store of record. ``transaction()`` commits on success and rolls back on any exception."""

    def transaction(self) -> AbstractContextManager[Transaction]: ...
    def read(self) -> AbstractContextManager[Transaction]: ...
    def batch(self) -> AbstractContextManager[None]: ...
    def audit_entries(self) -> Iterator[AuditEntry]: ...
    def schema_version(self) -> int: ...
    def close(self) -> None: ...
