"""Certificate revocation lists, one per trusted issuing CA, built from the store (RFC 5280 §5).

The broker refuses revoked serials on every RPC from the store directly (grpcio has no CRL hook);
CRLs are for relying parties outside the broker. Entries leave a CRL once the certificate has
expired, so the list stays small.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from broker.clock import Clock, unix
from broker.pemfile import read_certificates, read_private_key
from broker.pki.ca import PkiFiles, subject_key_id
from broker.store import CertificateRecord, Store

NEXT_UPDATE = dt.timedelta(days=7)
REASONS = {
    "key compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "signed out": x509.ReasonFlags.cessation_of_operation,
}


def _issuing_with_keys(files: PkiFiles) -> list[tuple[Path, Path]]:
    pairs = [(files.issuing_cert, files.issuing_key)]
    previous = files.root / "issuing-previous"
    if previous.exists():
        pairs += [(p, p.with_suffix(".key")) for p in sorted(previous.glob("*.pem"))]
    return [(c, k) for c, k in pairs if c.exists() and k.exists()]


def _entry(record: CertificateRecord, revoked_at: dt.datetime) -> x509.RevokedCertificate:
    builder = (
        x509.RevokedCertificateBuilder()
        .serial_number(int(record.serial, 16))
        .revocation_date(revoked_at)
    )
    reason = REASONS.get((record.revocation_reason or "").lower())
    if reason is not None:
        builder = builder.add_extension(x509.CRLReason(reason), critical=False)
    return builder.build()


def build_crls(files: PkiFiles, store: Store, clock: Clock) -> list[x509.CertificateRevocationList]:
    """A signed CRL for every issuing CA whose key is available."""
    now = clock.now().replace(microsecond=0)
    with store.read() as tx:
        revoked = tx.revoked_unexpired(unix(now))
    crls = []
    for cert_path, key_path in _issuing_with_keys(files):
        ca = read_certificates(cert_path)[0]
        ski = subject_key_id(ca)
        ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.subject)
            .last_update(now)
            .next_update(now + NEXT_UPDATE)
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        for record in revoked:
            if record.issuer_ski in (ski, None):
                at = dt.datetime.fromtimestamp(record.revoked_at or unix(now), dt.UTC)
                builder = builder.add_revoked_certificate(_entry(record, at))
        crls.append(builder.sign(read_private_key(key_path), hashes.SHA256()))
    return crls


def crls_pem(crls: list[x509.CertificateRevocationList]) -> str:
    """Concatenated PEM of the CRLs."""
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in crls)
