"""The storage interface every backend implements, its record types and its typed errors.

Core logic runs its checks and writes inside one ``Store.transaction()`` (or a unit of work given
to ``Store.run()``, which a backend may re-run on a serialization failure); backends make that
transaction serializable for writers, so single-use secrets are consumed atomically (I8).

Every check-then-act has a constraint behind it. When an insert breaks one, every backend raises
the same ``DuplicateKey`` (naming the constraint from ``CONSTRAINTS``), and the transaction stays
usable, so a caller that loses a race sees the same typed error a sequential caller would.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from broker.audit.chain import AuditEntry, AuditEvent
from broker.errors import AlreadyExists, ConfigurationError, FailedPrecondition
from broker.identity.spiffe import Kind

T = TypeVar("T")

# Backend-neutral names of the uniqueness rules every backend enforces (DuplicateKey.constraint).
CONSTRAINTS = frozenset(
    {
        "devices.device_id",
        "certificates.serial",
        "certificates.fingerprint",
        "certificates.spki_sha256",  # one identity (subject) per public key
        "enrollment_tokens.token_hash",
        "users.user_id",
        "users.username",
        "app_instances.app_id",
        "grants.device_user",  # one grant per (device, user)
        "grants.one_owner",  # at most one owner per device
        "sessions.session_id",
        "renewal_nonces.nonce_hash",  # a renew-after-expiry request is accepted once (I8)
    }
)


class DuplicateKey(AlreadyExists):
    """An insert would break a uniqueness rule; ``constraint`` is one of ``CONSTRAINTS``."""

    def __init__(self, constraint: str) -> None:
        super().__init__(_DUPLICATE_MESSAGES.get(constraint, f"{constraint} already exists"))
        self.constraint = constraint


# The words a sequential caller gets from the core for the same refusal, where the core has one.
_DUPLICATE_MESSAGES = {
    "users.username": "that username is taken",
    "certificates.spki_sha256": "this public key is already bound to another identity",
    "grants.one_owner": "the device already has an owner",
}


class MissingReference(FailedPrecondition):
    """An insert names a row that does not exist (a foreign key); ``table`` is the inserted one."""

    def __init__(self, table: str) -> None:
        super().__init__(f"{table} row refers to a row that does not exist")
        self.table = table


class SchemaTooNew(ConfigurationError, RuntimeError):
    """The database was migrated by a newer broker; this one refuses to open it."""

    def __init__(self, found: int, known: int, backend: str) -> None:
        super().__init__(
            f"{backend} database schema v{found} is newer than this broker (v{known}); "
            "upgrade the broker, or restore a backup taken before the upgrade"
        )
        self.found = found
        self.known = known


class AppState(enum.Enum):
    ACTIVE = "active"
    REVOKED = "revoked"  # by an operator, or signed out by the app itself


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
    kind: Kind
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


@dataclass(frozen=True, slots=True)
class RenewalNonceRecord:
    """A renew-after-expiry nonce already used (its hash), by whom and when."""

    nonce_hash: str
    subject: str
    used_at: int


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
    state: AppState
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
    replica: str = ""  # the replica that opened it (ends it when that replica stops or restarts)


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    """A broker replica of the fleet and the address of its internal (replica-only) listener."""

    name: str
    internal_address: str
    started_at: int
    heartbeat_at: int


@dataclass(frozen=True, slots=True)
class AttachmentRecord:
    """Which replica holds a device's Attach stream. One row per device, kept after release so
    that epochs never repeat."""

    device_id: str
    replica: str  # '' once released
    epoch: int  # fencing token: grows by one on every attach of the device, never reused
    attached_at: int
    lease_expires_at: int  # 0 once released; an expired lease means offline

    def live_at(self, now: int) -> bool:
        return bool(self.replica) and now < self.lease_expires_at


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One entry of the fleet's event feed (revocations, share changes, PKI reloads...)."""

    seq: int
    kind: str
    payload: dict[str, Any]  # JSON object
    origin: str  # replica that appended it
    at_ms: int


@dataclass(frozen=True, slots=True)
class FailureCount:
    """The failures one key of a scope has on record since some time (fleet audit)."""

    key: str
    count: int
    first_ms: int
    last_ms: int


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

    # renew-after-expiry nonces (single-use, I8)
    def use_renewal_nonce(self, nonce_hash: str, subject: str, at: int) -> None:
        """Record a nonce as used; DuplicateKey("renewal_nonces.nonce_hash") if it already was
        (the transaction stays usable)."""
        ...

    def get_renewal_nonce(self, nonce_hash: str) -> RenewalNonceRecord | None: ...
    def forget_renewal_nonces(self, used_before: int) -> int:
        """Delete nonces used before used_before; return how many."""
        ...

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
    def end_all_open_sessions(self, at: int, reason: str, replica: str | None = None) -> list[str]:
        """End open sessions (only those of replica when given) and return their ids, sorted."""
        ...

    def set_session_replica(self, session_id: str, replica: str) -> None: ...

    # replicas of the fleet
    def upsert_replica(self, name: str, internal_address: str, now: int) -> None:
        """Record a (re)started replica: started_at = heartbeat_at = now."""
        ...

    def heartbeat_replica(self, name: str, now: int) -> None: ...
    def get_replica(self, name: str) -> ReplicaRecord | None: ...

    # attachments (fenced by epoch)
    def attach_device(
        self, device_id: str, replica: str, now: int, lease_expires_at: int
    ) -> tuple[AttachmentRecord, AttachmentRecord | None]:
        """Attach device_id to replica with epoch = previous epoch + 1 (1 if none); return
        (new, previous row or None). The previous row is returned as stored, released or not:
        check ``previous.live_at(now)`` for a live Attach elsewhere."""
        ...

    def renew_attachment(self, device_id: str, epoch: int, lease_expires_at: int) -> bool:
        """Extend the lease; False (and nothing changed) if epoch is not the current one or
        the attachment was released."""
        ...

    def release_attachment(self, device_id: str, epoch: int) -> bool:
        """replica = '' and lease 0, only if epoch is the current one (and not yet released)."""
        ...

    def get_attachment(self, device_id: str) -> AttachmentRecord | None: ...
    def release_attachments_of(self, replica: str) -> list[str]:
        """Release every attachment held by replica; return the device ids, sorted."""
        ...

    # events (the fleet's feed)
    def append_event(self, kind: str, payload: dict[str, Any], origin: str, at_ms: int) -> int:
        """Append an event; return its seq. Seqs grow in commit order, so a reader polling
        ``events_after(last)`` never skips one."""
        ...

    def events_after(self, seq: int, limit: int = 500) -> list[EventRecord]: ...
    def last_event_seq(self) -> int: ...

    # failure counters (rate limits shared by every process, kept across restarts)
    def count_failures(self, scope: str, key: str, since_ms: int) -> tuple[int, int | None]:
        """(failures of key since since_ms, the oldest one's time or None)."""
        ...

    def record_failure(self, scope: str, key: str, at_ms: int, forget_before_ms: int) -> None:
        """Count one failure, and forget every failure of this scope older than forget_before_ms."""
        ...

    def clear_failures(self, scope: str, key: str) -> None: ...

    # audit (I12)
    def append_audit(self, event: AuditEvent, at_ms: int) -> AuditEntry: ...
    def audit_entries_for(self, subject: str, action_prefix: str) -> list[AuditEntry]: ...

    # fleet audit (read-only scans an operator runs now and then; no index of their own)
    def audit_entries_since(self, since_ms: int, actions: tuple[str, ...]) -> list[AuditEntry]:
        """Entries whose action is one of actions with at_ms >= since_ms, in seq order."""
        ...

    def failure_counts(self, scope: str, since_ms: int) -> list[FailureCount]:
        """Per key of scope, its failures with at_ms >= since_ms (count, first, last), by key."""
        ...

    def device_certificates_expiring(self, after: int, before: int) -> list[CertificateRecord]:
        """Active device certificates with after < not_after <= before, by not_after, serial."""
        ...

    def fanout_sessions(self, since: int, min_devices: int) -> list[SessionRecord]:
        """Sessions of any outcome opened at or after since by users who opened sessions on at
        least min_devices distinct devices since then; by user_id, opened_at, session_id."""
        ...


RunObserver = Callable[[float, int], None]


class Store(Protocol):
    """A store of record. ``transaction()`` commits on success and rolls back on any exception.

    ``run(unit)`` runs ``unit`` in one transaction and returns its result; on a serialization
    failure or deadlock the backend rolls back and runs ``unit`` again (so ``unit`` must have no
    effects outside the transaction), a bounded number of times, then raises
    ``broker.errors.Contention`` (UNAVAILABLE with retry info)."""

    def transaction(self) -> AbstractContextManager[Transaction]: ...
    def run(self, unit: Callable[[Transaction], T]) -> T: ...

    # Told after every run(): its seconds (re-runs and their backoff included) and how many
    # times it was re-run. A plain hook so that a metrics exporter (broker.service.metrics)
    # can watch the store without the store importing one; None costs nothing.
    on_run: RunObserver | None

    def read(self) -> AbstractContextManager[Transaction]: ...
    def batch(self) -> AbstractContextManager[None]: ...
    def audit_entries(self) -> Iterator[AuditEntry]: ...
    def migrate(self) -> int: ...
    def core_executor(self) -> Executor:
        """Where the broker runs store-touching core calls: SQLite batches them on one thread
        (group commit, one fsync per batch); PostgreSQL runs them on a pool of threads."""
        ...

    def schema_version(self) -> int: ...
    def wait_for_events(self, timeout: float) -> bool:
        """Block up to timeout seconds for a new-event notification; True if one arrived (or
        may have been missed). PostgreSQL: LISTEN on a dedicated connection; SQLite: sleeps
        and returns False (replicas on SQLite poll ``events_after``)."""
        ...

    def close(self) -> None: ...
