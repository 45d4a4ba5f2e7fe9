"""The store's book of issued certificates: recording issuance and renewal, key ownership (I2).

Shared by the device authority and accounts by composition: each holds a CertificateBook.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from broker.audit.chain import AuditEvent
from broker.audit.recorder import AuditRecorder
from broker.clock import Clock, now_s, unix
from broker.errors import PermissionDenied
from broker.identity.spiffe import Identity
from broker.pki.ca import IssuedCertificate, IssuingAuthority
from broker.pki.csr import PublicKey, spki_sha256
from broker.store import CertificateRecord, CertStatus, Transaction


@dataclass(frozen=True, slots=True)
class Presigned:
    """A certificate signed before the transaction that decides whether to hand it out, so the
    store's writer thread never waits on a signature. It exists only in memory: it is recorded
    and returned only if that transaction commits, and is dropped (never seen) otherwise."""

    identity: Identity
    key: PublicKey
    issued: IssuedCertificate


def presign(
    ca: IssuingAuthority, identity: Identity, key: PublicKey, lifetime: dt.timedelta
) -> Presigned:
    """Sign identity's next certificate for key, off the store's thread."""
    return Presigned(identity, key, ca.issue(key, identity, lifetime))


def signed_for(
    ca: IssuingAuthority,
    identity: Identity,
    key: PublicKey,
    lifetime: dt.timedelta,
    presigned: Presigned | None,
) -> IssuedCertificate:
    """The presigned certificate when it was made for this identity and key by the CA still
    issuing; otherwise (none, or a CA rotated in between) sign now."""
    if (
        presigned is not None
        and presigned.identity == identity
        and presigned.key == key
        and presigned.issued.issuer_ski == ca.ski
    ):
        return presigned.issued
    return ca.issue(key, identity, lifetime)


class CertificateBook:
    """Records certificates in the transaction that decided to issue them."""

    def __init__(self, clock: Clock, recorder: AuditRecorder) -> None:
        self._clock = clock
        self._recorder = recorder

    @staticmethod
    def key_is_free(tx: Transaction, key: PublicKey, identity: Identity) -> bool:
        """Whether no other identity already holds this public key."""
        return tx.subjects_with_key(spki_sha256(key)) <= {identity.spiffe_id}

    def renew(
        self,
        tx: Transaction,
        ca: IssuingAuthority,
        caller: Identity,
        key: PublicKey,
        lifetime: dt.timedelta,
        audit_subject: str,
        key_taken: str,
        presigned: Presigned | None = None,
    ) -> IssuedCertificate:
        """Issue and record a new certificate for caller, supersede its others, audit it. A key
        that another identity holds is refused with PermissionDenied(key_taken) (I2)."""
        if not self.key_is_free(tx, key, caller):
            raise PermissionDenied(key_taken)
        issued = signed_for(ca, caller, key, lifetime, presigned)
        self.record_issued(tx, caller, issued, key)
        superseded = tx.supersede_certificates(caller.spiffe_id, issued.serial, now_s(self._clock))
        self._recorder.append(
            tx,
            AuditEvent(
                caller.spiffe_id,
                "certificate.renewed",
                audit_subject,
                {"serial": issued.serial, "superseded": superseded},
            ),
        )
        return issued

    def record_issued(
        self, tx: Transaction, identity: Identity, issued: IssuedCertificate, key: PublicKey
    ) -> None:
        """Store a certificate just issued, in the transaction that decided to issue it."""
        tx.insert_certificate(
            CertificateRecord(
                serial=issued.serial,
                spiffe_id=identity.spiffe_id,
                kind=identity.kind,
                subject=identity.spiffe_id,
                spki_sha256=spki_sha256(key),
                fingerprint=issued.fingerprint,
                not_before=unix(issued.not_before),
                not_after=unix(issued.not_after),
                status=CertStatus.ACTIVE,
                issued_at=now_s(self._clock),
                issuer_ski=issued.issuer_ski,
            )
        )
