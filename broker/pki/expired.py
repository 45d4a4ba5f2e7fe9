"""Renewal after expiry: a camera or app instance whose certificate expired not long ago proves
possession of the expired key and gets a new certificate, with no enrollment token or password.

The proof is a signature over ``broker.protocol.renewal``'s transcript (the expired leaf, the CSR,
a single-use nonce, a timestamp). Checks run in two steps, so that CPU-heavy work stays off the
store's thread:

1. ``check`` (store-free; the service runs it on the signing thread): the request is well formed,
   the leaf was signed by an issuing CA trusted now, carries one URI SAN of a camera or an app
   instance of this trust domain, the signature verifies with the leaf's key, the timestamp is
   within the skew window, the leaf has expired, and not longer ago than its kind's window.
2. ``renew`` (one store transaction): the nonce is recorded (its primary key makes a replay, even a
   concurrent one, lose, I8), the store knows this exact certificate, it is the identity's newest
   one and not revoked, the identity is still active, the new key belongs to no other identity
   (I2); then the new certificate is issued, recorded, supersedes the old ones and is audited.

Any refusal rolls the transaction back (no certificate, no nonce used) and is audited on its own
as ``certificate.renew_expired.denied`` with the reason (I12). What differs between cameras and
app instances (window, lifetime, "is it still active", what to tell the client) is a ``KindPolicy``
given by ``broker.devices.expired`` and ``broker.accounts.expired``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.audit.chain import AuditEvent
from broker.audit.recorder import AuditRecorder
from broker.clock import Clock, now_s, unix
from broker.errors import (
    BrokerError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from broker.identity.spiffe import Identity, Kind, from_certificate
from broker.pki.ca import IssuedCertificate, IssuingAuthority, fingerprint, serial_hex
from broker.pki.certbook import CertificateBook, Presigned, presign, signed_for
from broker.pki.csr import PublicKey, public_key_from_csr, spki_sha256
from broker.pki.trust import TrustBundle
from broker.protocol.e2e import directly_issued
from broker.protocol.renewal import (
    MAX_NONCE_BYTES,
    MAX_SKEW_SECONDS,
    MIN_NONCE_BYTES,
    RenewalTranscript,
    renewal_signature_valid,
)
from broker.store import CertificateRecord, CertStatus, DuplicateKey, Store, Transaction

DAY = 86_400
MAX_CHAIN_PEM_BYTES = 16 * 1024
# Nonces are kept well past the +-300 s timestamp window (a replay needs a timestamp the window
# still admits, so a nonce older than 2 x 300 s can never be presented again), then pruned.
NONCE_RETENTION_SECONDS = 3_600
# A renewal whose response was lost may be asked again, with the same new key, for this long.
RETRY_WINDOW_SECONDS = 3_600
DENIED = "certificate.renew_expired.denied"
RENEWED = "certificate.renewed_after_expiry"


@dataclass(frozen=True, slots=True)
class KindPolicy:
    """What renewal after expiry means for one identity kind (camera or app instance)."""

    kind: Kind
    window_days: int
    lifetime: dt.timedelta
    # How the party comes back once past the window ("re-enroll ..." / "log in again ...").
    come_back: str
    # Why the identity may not renew (revoked, signed out, unknown), or None.
    refusal: Callable[[Transaction, Identity], str | None]
    # The audit subject of its certificate events (device_id / app_id, as renewal uses).
    audit_subject: Callable[[Identity], str]


@dataclass(frozen=True, slots=True)
class ExpiredRenewalRequest:
    """The fields of Bootstrap.RenewExpiredCertificate, as received."""

    certificate_chain_pem: str
    csr_pem: str
    nonce: bytes
    timestamp: int
    signature: bytes


@dataclass(frozen=True, slots=True)
class CheckedRenewal:
    """A request that passed every store-free check: what the transaction still has to decide."""

    identity: Identity
    serial: str
    fingerprint: str
    key: PublicKey
    expired_at: int
    nonce_hash: str
    checked_at: int
    # Signed here, off the store's writer; recorded and returned only if the transaction commits.
    presigned: Presigned

    @property
    def days_expired(self) -> int:
        return (self.checked_at - self.expired_at) // DAY


@dataclass(frozen=True, slots=True)
class RenewedAfterExpiry:
    """Outcome: the identity and its new certificate."""

    identity: Identity
    issued: IssuedCertificate
    days_expired: int
    superseded: tuple[str, ...]


class RenewalRefused(Exception):
    """A refusal, before it is audited: the error for the client, the reason for the audit log."""

    def __init__(self, error: BrokerError, reason: str, identity: Identity | None = None) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason
        self.identity = identity


class ExpiredRenewals:
    """Decides whether an expired certificate may be renewed without a token, and renews it."""

    def __init__(
        self,
        trust_domain: str,
        ca: IssuingAuthority,
        store: Store,
        clock: Clock,
        policies: Mapping[Kind, KindPolicy],
    ) -> None:
        self._trust_domain = trust_domain
        self._ca = ca
        self._store = store
        self._clock = clock
        self._policies = dict(policies)
        self._recorder = AuditRecorder(clock)
        self._certs = CertificateBook(clock, self._recorder)
        self._issuers: tuple[str, list[x509.Certificate]] = ("", [])

    # -- step 1: store-free ----------------------------------------------------------------------
    def check(self, request: ExpiredRenewalRequest, bundle: TrustBundle) -> CheckedRenewal:
        """Every check that needs no store (CPU: chain and request signatures); RenewalRefused
        otherwise. ``bundle`` is the trust bundle served now (its issuing CAs are trusted)."""
        leaf, csr_der, key = _parse(request)
        identity = self._identity(leaf, bundle)
        policy = self._policies[identity.kind]
        transcript = RenewalTranscript(
            leaf.public_bytes(serialization.Encoding.DER), csr_der, request.nonce, request.timestamp
        )
        if not renewal_signature_valid(leaf.public_key(), transcript, request.signature):
            raise RenewalRefused(
                Unauthenticated(
                    "signature does not verify with the expired certificate's key: sign the "
                    "renew-expired transcript with that certificate's private key"
                ),
                "bad signature",
                identity,
            )
        now = now_s(self._clock)
        skew = request.timestamp - now
        if abs(skew) > MAX_SKEW_SECONDS:
            raise RenewalRefused(
                InvalidArgument(
                    f"timestamp is {skew:+d} s off the broker's clock (now {now}); at most "
                    f"{MAX_SKEW_SECONDS} s of clock skew are allowed: correct the clock, then "
                    "sign a new request"
                ),
                "clock skew",
                identity,
            )
        expired_at = unix(leaf.not_valid_after_utc)
        if expired_at > now:
            raise RenewalRefused(
                FailedPrecondition(
                    f"certificate is still valid until {expired_at}: renew it with "
                    "RenewCertificate over mutual TLS on the main listener"
                ),
                "not expired",
                identity,
            )
        days = (now - expired_at) // DAY
        if now - expired_at > policy.window_days * DAY:
            raise RenewalRefused(
                FailedPrecondition(
                    f"certificate expired {days} days ago, beyond the renewal window of "
                    f"{policy.window_days} days: {policy.come_back}"
                ),
                "beyond window",
                identity,
            )
        return CheckedRenewal(
            identity,
            serial_hex(leaf.serial_number),
            fingerprint(leaf),
            key,
            expired_at,
            hashlib.sha256(request.nonce).hexdigest(),
            now,
            presign(self._ca, identity, key, policy.lifetime),
        )

    def _identity(self, leaf: x509.Certificate, bundle: TrustBundle) -> Identity:
        if not any(directly_issued(leaf, ca) for ca in self._trusted_issuers(bundle)):
            raise RenewalRefused(
                Unauthenticated("certificate was not issued by a CA this broker trusts"),
                "untrusted issuer",
            )
        try:
            identity = from_certificate(leaf, self._trust_domain)
        except BrokerError as error:
            raise RenewalRefused(Unauthenticated(error.message), "bad identity") from None
        if identity.kind not in self._policies:
            raise RenewalRefused(
                PermissionDenied(
                    "only camera and app-instance certificates are renewed after expiry"
                ),
                f"kind {identity.kind.value}",
                identity,
            )
        return identity

    def _trusted_issuers(self, bundle: TrustBundle) -> list[x509.Certificate]:
        """The bundle's issuing CAs that are CAs signed by one of its roots (cached per version).

        cryptography's path builder refuses the issuing CA's URI name constraint and the leaf is
        expired by design, so the one-level path is checked with the library's signature check."""
        version, issuers = self._issuers
        if version != bundle.version or not issuers:
            roots = x509.load_pem_x509_certificates(bundle.ca_certificates_pem.encode("ascii"))
            cas = x509.load_pem_x509_certificates(bundle.issuing_certificates_pem.encode("ascii"))
            issuers = [
                ca for ca in cas if _is_ca(ca) and any(directly_issued(ca, r) for r in roots)
            ]
            self._issuers = (bundle.version, issuers)
        return issuers

    # -- step 2: the transaction -----------------------------------------------------------------
    def renew(self, checked: CheckedRenewal) -> RenewedAfterExpiry:
        """Issue the new certificate, or refuse (audited, nothing else written)."""
        policy = self._policies[checked.identity.kind]

        def unit(tx: Transaction) -> RenewedAfterExpiry:
            try:
                tx.use_renewal_nonce(
                    checked.nonce_hash, checked.identity.spiffe_id, now_s(self._clock)
                )
            except DuplicateKey:
                raise RenewalRefused(
                    PermissionDenied(
                        "this renewal request was already used (replay refused): sign a new "
                        "request with a fresh nonce"
                    ),
                    "nonce already used",
                    checked.identity,
                ) from None
            self._check_record(tx, checked, policy)
            return self._issue(tx, checked, policy)

        try:
            return self._store.run(unit)
        except RenewalRefused as refused:
            self.deny(refused)

    def _check_record(self, tx: Transaction, checked: CheckedRenewal, policy: KindPolicy) -> None:
        identity = checked.identity
        record = tx.get_certificate(checked.serial)
        if (
            record is None
            or record.fingerprint != checked.fingerprint
            or record.subject != identity.spiffe_id
        ):
            raise RenewalRefused(
                Unauthenticated("certificate was not issued by this broker"),
                "unknown certificate",
                identity,
            )
        if record.status is CertStatus.REVOKED:
            raise RenewalRefused(
                PermissionDenied(f"certificate has been revoked: {policy.come_back}"),
                "certificate revoked",
                identity,
            )
        newer = [
            c
            for c in tx.certificates_of(identity.spiffe_id)
            if c.serial != record.serial and c.status is CertStatus.ACTIVE
        ]
        if (record.status is CertStatus.SUPERSEDED or newer) and not self._is_retry(
            record, newer, checked
        ):
            raise RenewalRefused(
                PermissionDenied(
                    "certificate was replaced by a newer one: use the newest certificate "
                    f"(or, if it is lost, {policy.come_back})"
                ),
                "certificate superseded",
                identity,
            )
        refusal = policy.refusal(tx, identity)
        if refusal is not None:
            raise RenewalRefused(PermissionDenied(f"{refusal}: renewal refused"), refusal, identity)
        if not self._certs.key_is_free(tx, checked.key, identity):
            raise RenewalRefused(
                PermissionDenied(
                    "this public key already belongs to another identity: generate a new key"
                ),
                "key bound to another identity",
                identity,
            )

    def _is_retry(
        self, record: CertificateRecord, newer: list[CertificateRecord], checked: CheckedRenewal
    ) -> bool:
        """A renewal whose response was lost: the certificate it superseded was issued after
        this one expired (so by a renewal after expiry), within the last hour, for the very key
        this request proves possession of (CSR signature) beside the expired one. Signing that
        key again gives the client nothing it could not have had; refusing would strand it."""
        recent = now_s(self._clock) - RETRY_WINDOW_SECONDS
        spki = spki_sha256(checked.key)
        return len(newer) == 1 and all(
            c.spki_sha256 == spki and c.issued_at >= max(record.not_after, recent) for c in newer
        )

    def _issue(
        self, tx: Transaction, checked: CheckedRenewal, policy: KindPolicy
    ) -> RenewedAfterExpiry:
        identity = checked.identity
        now = now_s(self._clock)
        issued = signed_for(self._ca, identity, checked.key, policy.lifetime, checked.presigned)
        self._certs.record_issued(tx, identity, issued, checked.key)
        superseded = tx.supersede_certificates(identity.spiffe_id, issued.serial, now)
        tx.forget_renewal_nonces(now - NONCE_RETENTION_SECONDS)
        self._recorder.append(
            tx,
            AuditEvent(
                identity.spiffe_id,
                RENEWED,
                policy.audit_subject(identity),
                {
                    "serial": issued.serial,
                    "expired_serial": checked.serial,
                    "expired_at": checked.expired_at,
                    "days_expired": checked.days_expired,
                    "superseded": superseded,
                },
            ),
        )
        return RenewedAfterExpiry(identity, issued, checked.days_expired, tuple(superseded))

    # -- refusals --------------------------------------------------------------------------------
    def deny(self, refused: RenewalRefused) -> NoReturn:
        """Audit a refusal in its own transaction (the refused one rolled back), then raise it."""
        identity = refused.identity
        policy = self._policies.get(identity.kind) if identity else None
        event = AuditEvent(
            identity.spiffe_id if identity else "anonymous",
            DENIED,
            policy.audit_subject(identity) if policy and identity else "",
            {"reason": refused.reason},
        )
        self._store.run(lambda tx: self._recorder.append(tx, event))
        raise refused.error


def _parse(request: ExpiredRenewalRequest) -> tuple[x509.Certificate, bytes, PublicKey]:
    """The expired leaf, the CSR's DER and its (checked) public key; RenewalRefused if malformed."""
    try:
        if not 0 < len(request.certificate_chain_pem) <= MAX_CHAIN_PEM_BYTES:
            raise InvalidArgument(
                f"certificate_chain_pem must be the expired certificate chain (PEM, at most "
                f"{MAX_CHAIN_PEM_BYTES} bytes)"
            )
        try:
            leaf = x509.load_pem_x509_certificates(request.certificate_chain_pem.encode("ascii"))[0]
        except (ValueError, UnicodeEncodeError, IndexError):
            raise InvalidArgument(
                "certificate_chain_pem is not PEM certificates (leaf first): send the expired "
                "chain exactly as it was issued"
            ) from None
        key = public_key_from_csr(request.csr_pem)
        csr_der = x509.load_pem_x509_csr(request.csr_pem.encode("ascii")).public_bytes(
            serialization.Encoding.DER
        )
        if not MIN_NONCE_BYTES <= len(request.nonce) <= MAX_NONCE_BYTES:
            raise InvalidArgument(
                f"nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} fresh random bytes"
            )
        if request.timestamp <= 0:
            raise InvalidArgument("timestamp must be the Unix time (seconds) of signing")
        if not request.signature:
            raise InvalidArgument("signature is empty: sign the renew-expired transcript")
    except InvalidArgument as error:
        raise RenewalRefused(error, "malformed request") from None
    return leaf, csr_der, key


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
