"""What the core authorities share: config, store, clock, audit appends, issuance records."""

from __future__ import annotations

import datetime as dt

from broker.audit.chain import AuditEvent
from broker.clock import Clock, unix
from broker.config import Config
from broker.identity.spiffe import Identity
from broker.pki.ca import IssuedCertificate, IssuingAuthority
from broker.pki.csr import PublicKey, spki_sha256
from broker.store import CertificateRecord, CertStatus, Store, Transaction


class CoreService:
    """Base of DeviceAuthority, Accounts and Ownership."""

    def __init__(self, config: Config, store: Store, clock: Clock) -> None:
        self._config = config
        self._store = store
        self._clock = clock

    def _now(self) -> int:
        return unix(self._clock.now())

    def _now_ms(self) -> int:
        return int(self._clock.now().timestamp() * 1000)

    def _audit(self, tx: Transaction, event: AuditEvent) -> None:
        tx.append_audit(event, self._now_ms())

    def _key_is_free(self, tx: Transaction, key: PublicKey, identity: Identity) -> bool:
        """Whether no other identity already holds this public key."""
        return tx.subjects_with_key(spki_sha256(key)) <= {identity.spiffe_id}

    def _renew(
        self,
        tx: Transaction,
        ca: IssuingAuthority,
        caller: Identity,
        key: PublicKey,
        lifetime: dt.timedelta,
        audit_subject: str,
    ) -> IssuedCertificate:
        """Issue and record a new certificate for caller, supersede its others, audit it."""
        issued = ca.issue(key, caller, lifetime)
        self._record_issued(tx, caller, issued, key)
        superseded = tx.supersede_certificates(caller.spiffe_id, issued.serial, self._now())
        self._audit(
            tx,
            AuditEvent(
                caller.spiffe_id,
                "certificate.renewed",
                audit_subject,
                {"serial": issued.serial, "superseded": superseded},
            ),
        )
        return issued

    def _record_issued(
        self, tx: Transaction, identity: Identity, issued: IssuedCertificate, key: PublicKey
    ) -> None:
        """Store a certificate just issued, in the transaction that decided to issue it."""
        tx.insert_certificate(
            CertificateRecord(
                serial=issued.serial,
                spiffe_id=identity.spiffe_id,
                kind=identity.kind.value,
                subject=identity.spiffe_id,
                spki_sha256=spki_sha256(key),
                fingerprint=issued.fingerprint,
                not_before=unix(issued.not_before),
                not_after=unix(issued.not_after),
                status=CertStatus.ACTIVE,
                issued_at=self._now(),
                issuer_ski=issued.issuer_ski,
            )
        )
