"""Device lifecycle: enrollment tokens, enrollment, renewal, revocation, per-call certificate checks.

Core logic with no transport: callers pass verified identities in and get records or BrokerErrors out.
Every state change and every refusal of a secret is appended to the audit log in the same
transaction as the change (I12).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import NoReturn

from cryptography import x509

from broker.audit.attempts import record_revoked_attempt
from broker.audit.chain import AuditEvent
from broker.audit.recorder import AuditRecorder
from broker.audit.session_ends import end_sessions_audited
from broker.clock import Clock, now_ms, now_s, unix
from broker.cluster.events import EFFECTS, effects_to_payload
from broker.config import Config
from broker.devices.onetime import (
    ENROLLMENT_TOKEN_PREFIX,
    claim_code_hash,
    new_claim_code,
    new_enrollment_token,
    secret_hash,
)
from broker.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from broker.identity.spiffe import Identity, Kind, device, from_certificate, validate_device_id
from broker.outcomes import Effects, EndAttach, EndSessions
from broker.pemfile import read_certificates
from broker.pki.ca import IssuedCertificate, IssuingAuthority, PkiFiles
from broker.pki.certbook import CertificateBook, Presigned, presign, signed_for
from broker.pki.csr import PublicKey, public_key_from_csr, spki_sha256
from broker.store import (
    AppState,
    CertificateRecord,
    CertStatus,
    DeviceRecord,
    DeviceState,
    EnrollmentTokenRecord,
    Store,
    Transaction,
)

MAX_TOKEN_CHARS = 128
# A renewal refused because its key belongs to another identity (fleet audit: key reuse).
KEY_REUSE_RENEWAL = "certificate.renew.denied"
log = logging.getLogger("broker.devices")


@dataclass(frozen=True, slots=True)
class EnrollmentToken:
    device_id: str
    token: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class Enrollment:
    identity: Identity
    issued: IssuedCertificate
    claim_code: str


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    record: DeviceRecord
    current_certificate: CertificateRecord | None
    online: bool = False  # a live attachment on any replica (store of record)


@dataclass(frozen=True, slots=True)
class DeviceRevoked:
    """Outcome of revoking a device: its revoked serials and what must end live."""

    serials: tuple[str, ...]
    effects: Effects


class DeviceAuthority:
    """Decides who gets which device certificate, and whether a presented certificate still counts."""

    def __init__(self, config: Config, ca: IssuingAuthority, store: Store, clock: Clock) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._recorder = AuditRecorder(clock)
        self._certs = CertificateBook(clock, self._recorder)
        self._ca = ca

    # -- helpers -------------------------------------------------------------------------------
    def _deny(self, error: PermissionDenied | FailedPrecondition, event: AuditEvent) -> NoReturn:
        """Record a refusal in its own transaction (the refused one rolled back), then raise it."""
        self._store.run(lambda tx: self._recorder.append(tx, event))
        raise error

    def create_enrollment_token(
        self, actor: Identity, device_id: str, ttl_seconds: int = 0
    ) -> EnrollmentToken:
        """Mint a one-time token for device_id; only its hash is stored."""
        validate_device_id(device_id)
        ttl = ttl_seconds or self._config.enrollment_token_ttl_seconds
        if not 60 <= ttl <= self._config.max_enrollment_token_ttl_seconds:
            raise InvalidArgument(
                f"ttl_seconds must be between 60 and {self._config.max_enrollment_token_ttl_seconds}"
            )
        token = new_enrollment_token()
        now = now_s(self._clock)

        def unit(tx: Transaction) -> None:
            existing = tx.get_device(device_id)
            if existing is not None and existing.state is DeviceState.REVOKED:
                raise FailedPrecondition(
                    f"device {device_id} is revoked; enroll it under a new device_id"
                )
            tx.insert_enrollment_token(
                EnrollmentTokenRecord(
                    secret_hash(token), device_id, now, now + ttl, actor.spiffe_id
                )
            )
            self._recorder.append(
                tx,
                AuditEvent(
                    actor.spiffe_id,
                    "enrollment_token.created",
                    device_id,
                    {"expires_at": now + ttl},
                ),
            )

        self._store.run(unit)
        return EnrollmentToken(device_id, token, now + ttl)

    # -- enrollment ------------------------------------------------------------------------------
    def enroll_with_token(self, csr_pem: str, token: str) -> Enrollment:
        """Enroll with a one-time token. The CSR is checked before the token is touched."""
        return self.enroll_key_with_token(public_key_from_csr(csr_pem), token)

    # -- signing before the writer ------------------------------------------------------------------
    def check_and_presign(
        self, csr_pem: str, subject: Identity | None
    ) -> tuple[PublicKey, Presigned | None]:
        """Check the CSR and sign subject's device certificate for its key, off the store's
        thread (the signing thread); the enrollment or renewal transaction then only records
        it, or drops it unseen if it refuses. No subject: check only."""
        key = public_key_from_csr(csr_pem)
        if subject is None:
            return key, None
        return key, presign(self._ca, subject, key, self._lifetime())

    def token_subject(self, token: str) -> Identity | None:
        """The device a live token would enroll, read without consuming it: what to presign
        for. None for a token that is unknown, used or expired (nothing is signed for those);
        the consuming transaction decides either way."""
        if not token.startswith(ENROLLMENT_TOKEN_PREFIX) or len(token) > MAX_TOKEN_CHARS:
            return None
        with self._store.read() as tx:
            record = tx.get_enrollment_token(secret_hash(token))
        if record is None or record.used_at is not None or record.expires_at <= now_s(self._clock):
            return None
        return device(self._config.trust_domain, record.device_id)

    def _lifetime(self) -> dt.timedelta:
        return dt.timedelta(days=self._config.device_cert_days)

    def enroll_key_with_token(
        self, key: PublicKey, token: str, presigned: Presigned | None = None
    ) -> Enrollment:
        """enroll_with_token for a CSR already checked (public_key_from_csr, off this thread)."""
        if not token:
            raise InvalidArgument(
                "enrollment_token is required (or enroll over the factory listener)"
            )
        if len(token) > MAX_TOKEN_CHARS or not token.startswith(ENROLLMENT_TOKEN_PREFIX):
            self._deny(
                PermissionDenied("enrollment token is invalid, expired or already used"),
                AuditEvent("anonymous", "device.enroll.denied", "", {"reason": "malformed token"}),
            )
        token_hash = secret_hash(token)
        now = now_s(self._clock)

        def unit(tx: Transaction) -> Enrollment:
            record = tx.consume_enrollment_token(token_hash, now)
            if record is None:
                known = tx.get_enrollment_token(token_hash)
                reason = _token_refusal_reason(known, now)
                raise _Refused(reason, known.device_id if known else "")
            identity = device(self._config.trust_domain, record.device_id)
            refusal = self._enrollment_refusal(tx, identity, key)
            if refusal is not None:
                # Raising rolls the transaction back: a refused enrollment leaves the token unused.
                raise _Refused(refusal, record.device_id)
            return self._enroll(tx, identity, key, "token", presigned)

        try:
            return self._store.run(unit)
        except _Refused as refused:
            self._deny(
                PermissionDenied(_refusal_message(refused.reason)),
                AuditEvent(
                    "anonymous",
                    "device.enroll.denied",
                    refused.subject,
                    {"reason": refused.reason, "via": "token"},
                ),
            )

    def enroll_with_birth_certificate(
        self, csr_pem: str, birth_device_id: str, birth_serial: str
    ) -> Enrollment:
        """Enroll (or re-enroll) the device a TLS-verified factory birth certificate names."""
        return self.enroll_key_with_birth_certificate(
            public_key_from_csr(csr_pem), birth_device_id, birth_serial
        )

    def enroll_key_with_birth_certificate(
        self,
        key: PublicKey,
        birth_device_id: str,
        birth_serial: str,
        presigned: Presigned | None = None,
    ) -> Enrollment:
        """enroll_with_birth_certificate for a CSR already checked."""
        identity = device(self._config.trust_domain, birth_device_id)

        def unit(tx: Transaction) -> Enrollment | str:
            refusal = self._enrollment_refusal(tx, identity, key)
            if refusal is None:
                return self._enroll(tx, identity, key, f"birth:{birth_serial}", presigned)
            return refusal

        outcome = self._store.run(unit)
        if isinstance(outcome, Enrollment):
            return outcome
        refusal = outcome
        self._deny(
            PermissionDenied(_refusal_message(refusal)),
            AuditEvent(
                f"birth:{birth_serial}",
                "device.enroll.denied",
                identity.name,
                {"reason": refusal, "via": "birth"},
            ),
        )

    def _enrollment_refusal(
        self, tx: Transaction, identity: Identity, key: PublicKey
    ) -> str | None:
        existing = tx.get_device(identity.name)
        if existing is not None and existing.state is DeviceState.REVOKED:
            return "device revoked"
        if not self._certs.key_is_free(tx, key, identity):
            return "key bound to another identity"
        return None

    def _enroll(
        self,
        tx: Transaction,
        identity: Identity,
        key: PublicKey,
        via: str,
        presigned: Presigned | None,
    ) -> Enrollment:
        issued = signed_for(self._ca, identity, key, self._lifetime(), presigned)
        claim_code = new_claim_code()
        existing = tx.get_device(identity.name)
        if existing is None:
            tx.insert_device(
                DeviceRecord(
                    identity.name,
                    DeviceState.ACTIVE,
                    now_s(self._clock),
                    via,
                    claim_code_hash(claim_code),
                )
            )
        elif existing.claim_code_hash is not None:
            tx.set_claim_code_hash(identity.name, claim_code_hash(claim_code))  # old code dies here
        else:
            claim_code = ""  # already owned: no claim code to hand out
        self._certs.record_issued(tx, identity, issued, key)
        superseded = tx.supersede_certificates(
            identity.spiffe_id, issued.serial, now_s(self._clock)
        )
        self._recorder.append(
            tx,
            AuditEvent(
                via if via.startswith("birth:") else "anonymous",
                "device.enrolled",
                identity.name,
                {
                    "serial": issued.serial,
                    "via": via.split(":", maxsplit=1)[0],
                    "superseded": superseded,
                },
            ),
        )
        return Enrollment(identity, issued, claim_code)

    # -- renewal ---------------------------------------------------------------------------------
    def renew(self, caller: Identity, csr_pem: str) -> IssuedCertificate:
        """A new certificate for the caller's own identity; the old one is superseded."""
        return self.renew_key(caller, public_key_from_csr(csr_pem))

    def renew_key(
        self, caller: Identity, key: PublicKey, presigned: Presigned | None = None
    ) -> IssuedCertificate:
        """renew for a CSR already checked."""
        if caller.kind is not Kind.DEVICE:
            raise PermissionDenied("only device certificates are renewed here")

        def unit(tx: Transaction) -> IssuedCertificate:
            record = tx.get_device(caller.name)
            if record is None or record.state is not DeviceState.ACTIVE:
                raise Unauthenticated("device is not active")
            return self._certs.renew(
                tx,
                self._ca,
                caller,
                key,
                self._lifetime(),
                caller.name,
                _refusal_message("key bound to another identity"),
                presigned,
            )

        try:
            return self._store.run(unit)
        except PermissionDenied as denied:  # the one refusal unit raises: the key is taken
            self._deny(
                denied,
                AuditEvent(
                    caller.spiffe_id,
                    KEY_REUSE_RENEWAL,
                    caller.name,
                    {"reason": "key bound to another identity"},
                ),
            )

    # -- revocation ------------------------------------------------------------------------------
    def revoke_device(self, actor: Identity, device_id: str, reason: str) -> DeviceRevoked:
        """Revoke the device and every certificate it holds; its sessions and Attach stream end."""
        validate_device_id(device_id)
        if len(reason) > 200:
            raise InvalidArgument("reason must be at most 200 characters")
        identity = device(self._config.trust_domain, device_id)
        now = now_s(self._clock)

        def unit(tx: Transaction) -> DeviceRevoked:
            record = tx.get_device(device_id)
            if record is not None and record.state is DeviceState.REVOKED:
                raise FailedPrecondition(f"device {device_id} is already revoked")
            cancelled = tx.cancel_enrollment_tokens(device_id, now)
            if record is None:
                if not cancelled:
                    raise NotFound(
                        f"no device {device_id} and no outstanding enrollment token for it"
                    )
                # Never enrolled: keep a revoked record so the id cannot be enrolled later.
                tx.insert_device(
                    DeviceRecord(device_id, DeviceState.REVOKED, now, "never", None, now)
                )
            else:
                tx.revoke_device(device_id, now)
            serials = tx.revoke_certificates(identity.spiffe_id, now, reason or "unspecified")
            attachment = tx.get_attachment(device_id)
            if attachment is not None:  # a revoked camera is offline everywhere, at once
                tx.release_attachment(device_id, attachment.epoch)
            open_ids = [r.session_id for r in tx.open_sessions(device_id=device_id)]
            ended = end_sessions_audited(
                tx, open_ids, now, now_ms(self._clock), "device revoked", actor.spiffe_id
            )
            self._recorder.append(
                tx,
                AuditEvent(
                    actor.spiffe_id,
                    "device.revoked",
                    device_id,
                    {
                        "serials": serials,
                        "reason": reason,
                        "tokens_cancelled": cancelled,
                        "sessions_ended": ended,
                    },
                ),
            )
            effects = Effects(
                end_sessions=(EndSessions("device revoked", tuple(ended), device_id=device_id),),
                end_attach=(
                    EndAttach(device_id, Unauthenticated("device certificate has been revoked")),
                ),
                revocations_changed=True,
            )
            # Every other replica ends the device's streams too (same transaction as the change).
            tx.append_event(
                EFFECTS, effects_to_payload(effects), self._config.replica_name, now_ms(self._clock)
            )
            return DeviceRevoked(tuple(serials), effects)

        return self._store.run(unit)

    # -- queries ---------------------------------------------------------------------------------
    def list_devices(self) -> list[DeviceStatus]:
        """Every device with its newest active certificate."""
        now = now_s(self._clock)
        with self._store.read() as tx:
            result = []
            for record in tx.list_devices():
                certs = tx.certificates_of(
                    device(self._config.trust_domain, record.device_id).spiffe_id
                )
                active = [c for c in certs if c.status is CertStatus.ACTIVE]
                attachment = tx.get_attachment(record.device_id)
                online = (
                    record.state is DeviceState.ACTIVE
                    and attachment is not None
                    and attachment.live_at(now)
                )
                result.append(DeviceStatus(record, active[-1] if active else None, online))
            return result

    def issuing_serial(self) -> str:
        """Serial of the issuing CA currently signing."""
        from broker.pki.ca import serial_hex

        return serial_hex(self._ca.certificate.serial_number)

    def certificate(self, serial: str) -> CertificateRecord:
        """Look up an issued certificate by hex serial."""
        if (
            not serial
            or len(serial) > 64
            or any(c not in "0123456789abcdef" for c in serial.lower())
        ):
            raise InvalidArgument("serial must be the certificate serial number in hex")
        with self._store.read() as tx:
            record = tx.get_certificate(serial.lower().lstrip("0") or "0")
        if record is None:
            raise NotFound("no certificate with that serial")
        return record

    def audit(self, event: AuditEvent) -> None:
        """Append one audit entry in its own transaction."""
        self._store.run(lambda tx: self._recorder.append(tx, event))

    def record_presence(self, device_id: str, trust_bundle_version: str) -> None:
        """Remember that the device attached now holding that trust bundle version."""
        now = now_s(self._clock)
        self._store.run(lambda tx: tx.record_presence(device_id, now, trust_bundle_version))

    # -- per-call certificate check (I1, I7) -------------------------------------------------------
    def check_presented(
        self, identity: Identity, cert: x509.Certificate, serial: str, fp: str
    ) -> None:
        """Refuse a verified peer certificate this broker did not issue or no longer honours.
        Refusals of revoked identities are also counted for the fleet audit."""
        try:
            self._check_presented(identity, cert, serial, fp)
        except _RevokedIdentity:
            self._note_revoked_attempt(identity, serial)
            raise

    def _note_revoked_attempt(self, identity: Identity, serial: str) -> None:
        # Best effort: the caller is refused (UNAUTHENTICATED) whether or not this is recorded.
        try:
            record_revoked_attempt(
                self._store, self._clock, identity.spiffe_id, identity.name, serial
            )
        except Exception:
            log.warning("could not record a revoked identity's attempt serial=%s", serial)

    def _check_presented(
        self, identity: Identity, cert: x509.Certificate, serial: str, fp: str
    ) -> None:
        now = now_s(self._clock)
        if unix(cert.not_valid_after_utc) <= now:
            raise Unauthenticated("certificate has expired: renew or re-enroll")
        if unix(cert.not_valid_before_utc) > now:
            raise Unauthenticated("certificate is not yet valid: check the device clock")
        with self._store.read() as tx:
            record = tx.get_certificate(serial)
            if record is None or record.fingerprint != fp or record.spiffe_id != identity.spiffe_id:
                raise Unauthenticated("certificate was not issued by this broker")
            if record.status is CertStatus.REVOKED:
                raise _RevokedIdentity("certificate has been revoked")
            if record.status is CertStatus.SUPERSEDED and (
                record.superseded_at is None
                or now > record.superseded_at + self._config.superseded_grace_seconds
            ):
                raise Unauthenticated(
                    "certificate was replaced by a renewal: use the new certificate"
                )
            if identity.kind is Kind.DEVICE:
                dev = tx.get_device(identity.name)
                if dev is None or dev.state is not DeviceState.ACTIVE:
                    raise _RevokedIdentity("device has been revoked")
            elif identity.kind is Kind.APP:
                app = tx.get_app(identity.app_id)
                if app is None or app.state is not AppState.ACTIVE or app.user_id != identity.name:
                    raise _RevokedIdentity("app instance is signed out or revoked")

    def register_offline_certificates(self, files: PkiFiles, actor: str) -> list[str]:
        """Record the operator and broker certificates (issued offline by `ca init` or a rotation)
        if the store lacks them: only certificates the store knows are accepted (I10)."""
        registered = []
        for path in (files.operator_chain, files.server_chain):
            if path.exists():
                cert = read_certificates(path)[0]
                identity = from_certificate(cert, self._config.trust_domain)
                if self.register_local_certificate(identity, cert, actor):
                    registered.append(str(path))
        return registered

    def register_local_certificate(
        self, identity: Identity, cert: x509.Certificate, actor: str
    ) -> bool:
        """Record a certificate issued offline (operator, broker) if the store lacks it."""
        from broker.pki.ca import authority_key_id, fingerprint, serial_hex

        serial = serial_hex(cert.serial_number)
        key = cert.public_key()

        def unit(tx: Transaction) -> bool:
            if tx.get_certificate(serial) is not None:
                return False
            tx.insert_certificate(
                CertificateRecord(
                    serial=serial,
                    spiffe_id=identity.spiffe_id,
                    kind=identity.kind,
                    subject=identity.spiffe_id,
                    spki_sha256=spki_sha256(key),  # type: ignore[arg-type]
                    fingerprint=fingerprint(cert),
                    not_before=unix(cert.not_valid_before_utc),
                    not_after=unix(cert.not_valid_after_utc),
                    status=CertStatus.ACTIVE,
                    issued_at=now_s(self._clock),
                    issuer_ski=authority_key_id(cert),
                )
            )
            self._recorder.append(
                tx,
                AuditEvent(
                    actor,
                    "certificate.issued",
                    identity.spiffe_id,
                    {"serial": serial, "offline": True},
                ),
            )
            return True

        return self._store.run(unit)


class _RevokedIdentity(Unauthenticated):
    """A presented certificate (or its device or app instance) is revoked: UNAUTHENTICATED,
    and counted as a revoked identity's attempt (fleet audit)."""


class _Refused(Exception):
    """Raised inside a store transaction to roll it back; carries why enrollment was refused."""

    def __init__(self, reason: str, subject: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.subject = subject


def _token_refusal_reason(record: EnrollmentTokenRecord | None, now: int) -> str:
    if record is None:
        return "unknown token"
    if record.used_at is not None:
        return "token already used"
    if record.expires_at <= now:
        return "token expired"
    return "token refused"


def _refusal_message(reason: str) -> str:
    if reason == "device revoked":
        return "this device has been revoked and cannot enroll again"
    if reason == "key bound to another identity":
        return (
            "this public key already belongs to another identity: generate a new key on the device"
        )
    # Unknown, used and expired tokens look the same to the caller.
    return "enrollment token is invalid, expired or already used"
