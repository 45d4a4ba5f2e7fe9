"""A replica's own certificate for the internal listener (DESIGN: many replicas, one fleet).

Each replica of a fleet holds ``spiffe://<td>/broker/replica/<name>``, issued by the online issuing
CA when the replica first starts and renewed, like the broker certificate, once 2/3 of its life has
passed (or when it no longer comes from the current issuing CA). The same certificate serves the
internal listener and authenticates this replica when it forwards a Watch to another one, so it
carries both serverAuth and clientAuth (``Profile.PEER``), and the broker's loopback names so a
peer can verify the server by name. Key and chain live in ``certs/replicas/<name>.key`` (0600) and
``.pem``; the listener re-reads them per handshake, so a renewal needs no restart.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.clock import Clock
from broker.config import Config
from broker.identity.spiffe import Identity, from_certificate, replica
from broker.pemfile import read_certificates, read_private_key, replace_private_key, write_atomic
from broker.pki.ca import IssuingAuthority, PkiFiles, new_key, renewal_due_at
from broker.pki.rotation import SERVER_IPS, server_chain_pem


@dataclass(frozen=True, slots=True)
class ReplicaFiles:
    """Where one replica's key and chain live under ``certs/replicas/``."""

    certs_dir: Path
    name: str

    @property
    def folder(self) -> Path:
        return self.certs_dir / "replicas"

    @property
    def key(self) -> Path:
        return self.folder / f"{self.name}.key"

    @property
    def chain(self) -> Path:
        return self.folder / f"{self.name}.pem"

    @classmethod
    def of(cls, config: Config, name: str | None = None) -> ReplicaFiles:
        return cls(config.certs_dir, name or config.replica_name)


def replica_identity(config: Config) -> Identity:
    """This replica's identity (validates the configured name)."""
    return replica(config.trust_domain, config.replica_name)


def replica_certificate(config: Config) -> x509.Certificate:
    """The leaf of this replica's current chain on disk."""
    return read_certificates(ReplicaFiles.of(config).chain)[0]


def _needs_issuing(
    files: ReplicaFiles, identity: Identity, authority: IssuingAuthority, now: dt.datetime
) -> bool:
    """Whether this replica needs a (new) certificate: none yet, unreadable, not its identity,
    not from the current issuing CA, key and chain apart, or 2/3 of its life gone."""
    if not files.key.exists() or not files.chain.exists():
        return True
    try:
        key = read_private_key(files.key)
        leaf = read_certificates(files.chain)[0]
        if from_certificate(leaf, identity.trust_domain) != identity:
            return True
        leaf.verify_directly_issued_by(authority.certificate)
    except Exception:  # unreadable, foreign, or from a retired issuing CA: issue afresh
        return True
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        return True
    return now >= renewal_due_at(leaf.not_valid_before_utc, leaf.not_valid_after_utc)


def ensure_replica_certificate(
    config: Config, authority: IssuingAuthority, clock: Clock
) -> tuple[Path, Path]:
    """Issue this replica's certificate if it has none or it is due; returns (key, chain) paths.

    The caller records the leaf in the store (DeviceAuthority.register_local_certificate), so the
    per-call certificate check accepts it like any certificate this broker issued.
    """
    files = ReplicaFiles.of(config)
    identity = replica_identity(config)
    if not _needs_issuing(files, identity, authority, clock.now()):
        return files.key, files.chain
    key = new_key()
    issued = authority.issue(
        key.public_key(),
        identity,
        dt.timedelta(days=config.server_cert_days),
        dns_names=tuple(dict.fromkeys(("localhost", *config.server_names))),
        ip_addresses=SERVER_IPS,
    )
    # Key first, then chain: a reader in between sees a pair that does not match and keeps the
    # previous credentials (the listener checks key against chain before switching).
    replace_private_key(files.key, key)
    chain = server_chain_pem(PkiFiles(config.certs_dir), issued.certificate)
    write_atomic(files.chain, chain.encode("ascii"))
    return files.key, files.chain
