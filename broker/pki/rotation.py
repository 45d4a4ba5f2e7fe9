"""Rotating the PKI: server certificate, issuing CA, root (cross-signed), token-signing key.

These are offline operations on ``certs/`` (they need CA keys the running broker never loads); the
live broker then reloads (``AdminService.ReloadPki``) and pushes the new trust bundle to every
attached camera. Nothing here deletes a key a live certificate still depends on: previous issuing
CAs and roots move to ``issuing-previous/`` and ``roots-previous/`` and stay trusted until retired.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from broker.clock import Clock, unix
from broker.config import Config
from broker.errors import ConfigurationError, FailedPrecondition
from broker.identity.spiffe import Kind
from broker.identity.spiffe import broker as broker_identity
from broker.pemfile import (
    PRIVATE_MODE,
    cert_pem,
    read_certificates,
    read_private_key,
    replace_private_key,
    write_atomic,
)
from broker.pki.ca import (
    IssuedCertificate,
    PkiFiles,
    _ca_key_usage,
    key_tag,
    load_authority,
    make_issuing,
    make_root,
    new_key,
    random_serial,
    serial_hex,
    subject_key_id,
)
from broker.protocol.e2e import directly_issued
from broker.protocol.spiffe_id import SpiffeId
from broker.protocol.tokens import TokenKeyring
from broker.store import CertStatus, DeviceRecord, DeviceState, Store, Transaction

SERVER_IPS = ("127.0.0.1", "::1")


def _previous(files: PkiFiles, kind: str) -> Path:
    return files.root / f"{kind}-previous"


def cross_cert_path(files: PkiFiles) -> Path:
    """The new root cross-signed by the old one, present while a root rotation is pending."""
    return files.root / "root-cross.pem"


def previous_roots(files: PkiFiles) -> list[x509.Certificate]:
    folder = _previous(files, "roots")
    return (
        [read_certificates(p)[0] for p in sorted(folder.glob("*.pem"))] if folder.exists() else []
    )


def previous_issuing(files: PkiFiles) -> list[x509.Certificate]:
    folder = _previous(files, "issuing")
    return (
        [read_certificates(p)[0] for p in sorted(folder.glob("*.pem"))] if folder.exists() else []
    )


def trusted_roots(files: PkiFiles) -> list[x509.Certificate]:
    """Current root first, then roots not yet retired."""
    return [read_certificates(files.root_cert)[0], *previous_roots(files)]


def trusted_issuing(files: PkiFiles) -> list[x509.Certificate]:
    """Current issuing CA first, then previous ones still trusted for the certificates they issued."""
    return [read_certificates(files.issuing_cert)[0], *previous_issuing(files)]


def issuing_bundle_pem(files: PkiFiles) -> str:
    return "".join(cert_pem(c).decode("ascii") for c in trusted_issuing(files))


def write_ca_bundle(files: PkiFiles) -> None:
    """ca-bundle.pem = every trusted root (the file devices pin)."""
    write_atomic(files.ca_bundle, b"".join(cert_pem(c) for c in trusted_roots(files)))


def _archive(files: PkiFiles, kind: str, cert_path: Path, key_path: Path) -> Path:
    """Move a CA's cert and key into <kind>-previous/<serial>.{pem,key}; returns the new cert path."""
    cert = read_certificates(cert_path)[0]
    folder = _previous(files, kind)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{serial_hex(cert.serial_number)}.pem"
    shutil.copy2(cert_path, target)
    key_target = target.with_suffix(".key")
    shutil.copy2(key_path, key_target)
    os.chmod(key_target, PRIVATE_MODE)
    return target


@dataclass(frozen=True, slots=True)
class RotationReport:
    """What a rotation did, for the CLI to print and audit."""

    action: str
    details: dict[str, object]
    next_step: str


def server_chain_pem(files: PkiFiles, leaf: x509.Certificate) -> str:
    """Leaf + current issuing CA (+ the cross-signed root while a root rotation is pending, so
    devices that still pin only the old root can verify the broker)."""
    chain = cert_pem(leaf) + cert_pem(read_certificates(files.issuing_cert)[0])
    cross = cross_cert_path(files)
    if cross.exists():
        chain += cross.read_bytes()
    return chain.decode("ascii")


def rotate_server_cert(config: Config, clock: Clock) -> RotationReport:
    """A new broker key and certificate from the current issuing CA; picked up on the next handshake."""
    files = PkiFiles(config.certs_dir)
    authority = load_authority(config, clock)
    key = new_key()
    issued: IssuedCertificate = authority.issue(
        key.public_key(),
        broker_identity(config.trust_domain),
        dt.timedelta(days=config.server_cert_days),
        dns_names=tuple(dict.fromkeys(("localhost", *config.server_names))),
        ip_addresses=SERVER_IPS,
    )
    # The broker re-reads both files per handshake and only switches when key and cert match.
    replace_private_key(files.server_key, key)
    write_atomic(files.server_chain, server_chain_pem(files, issued.certificate).encode("ascii"))
    return RotationReport(
        "pki.server_cert_rotated",
        {"serial": issued.serial, "not_after": unix(issued.not_after)},
        "new connections use the new certificate at once; existing connections keep working",
    )


def rotate_intermediate(config: Config, clock: Clock) -> RotationReport:
    """A new issuing CA under the current root; the previous one stays trusted until its
    certificates expire or renew."""
    files = PkiFiles(config.certs_dir)
    if not files.root_key.exists():
        raise ConfigurationError(
            f"root key {files.root_key} is needed (bring the offline root online)"
        )
    old = read_certificates(files.issuing_cert)[0]
    archived = _archive(files, "issuing", files.issuing_cert, files.issuing_key)
    root_key = read_private_key(files.root_key)
    root_cert = read_certificates(files.root_cert)[0]
    key = new_key()
    cert = make_issuing(key, root_key, root_cert, config.trust_domain, clock.now())
    replace_private_key(files.issuing_key, key)
    write_atomic(files.issuing_cert, cert_pem(cert))
    return RotationReport(
        "pki.intermediate_rotated",
        {
            "new_issuing_serial": serial_hex(cert.serial_number),
            "previous_issuing_serial": serial_hex(old.serial_number),
            "previous_kept_at": str(archived),
        },
        "reload the broker (done by the make target); new certificates come from the new issuing CA",
    )


def reissue_operator_cert(config: Config, clock: Clock) -> str:
    """A new operator certificate (same name, new key) from the current issuing CA, so the CLI
    keeps working once the old root is retired. Returns its serial."""
    from broker.identity.spiffe import from_certificate

    files = PkiFiles(config.certs_dir)
    identity = from_certificate(read_certificates(files.operator_chain)[0], config.trust_domain)
    key = new_key()
    issued = load_authority(config, clock).issue(
        key.public_key(), identity, dt.timedelta(days=config.operator_cert_days)
    )
    replace_private_key(files.operator_key, key)
    write_atomic(files.operator_chain, issued.chain_pem.encode("ascii"))
    return issued.serial


def cross_sign(
    new_root: x509.Certificate,
    new_key_: ec.EllipticCurvePrivateKey,
    old_root: x509.Certificate,
    old_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
) -> x509.Certificate:
    """The new root's name and key, certified by the old root (for devices pinning only the old)."""
    del new_key_  # the cross certificate carries the new root's public key, signed by the old key
    ski = new_root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    old_ski = old_root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(new_root.subject)
        .issuer_name(old_root.subject)
        .public_key(new_root.public_key())
        .serial_number(random_serial())
        .not_valid_before(now.replace(microsecond=0) - dt.timedelta(minutes=5))
        .not_valid_after(min(new_root.not_valid_after_utc, old_root.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(old_ski), critical=False
        )
        .sign(old_key, hashes.SHA256())
    )


def rotate_root(config: Config, clock: Clock) -> RotationReport:
    """A new root (cross-signed by the old), a new issuing CA under it, a new server certificate.
    The bundle carries both roots until ``retire_root``."""
    files = PkiFiles(config.certs_dir)
    if cross_cert_path(files).exists():
        raise FailedPrecondition("a root rotation is already pending: run `make retire-root` first")
    now = clock.now()
    old_root = read_certificates(files.root_cert)[0]
    old_key = read_private_key(files.root_key)
    _archive(files, "roots", files.root_cert, files.root_key)
    key = new_key()
    root = make_root(key, f"Camera Broker Root CA {now:%Y%m%d%H%M%S} {key_tag(key)}", now)
    cross = cross_sign(root, key, old_root, old_key, now)
    replace_private_key(files.root_key, key)
    write_atomic(files.root_cert, cert_pem(root))
    write_atomic(cross_cert_path(files), cert_pem(cross))
    write_ca_bundle(files)
    rotate_intermediate(config, clock)
    rotate_server_cert(config, clock)
    operator_serial = reissue_operator_cert(config, clock)
    state = {
        "pending_old_root": serial_hex(old_root.serial_number),
        "new_root": serial_hex(root.serial_number),
    }
    write_atomic(files.root / "rotation.json", json.dumps(state, indent=2).encode())
    return RotationReport(
        "pki.root_rotated",
        {**state, "new_root_ski": subject_key_id(root), "operator_cert_serial": operator_serial},
        "cameras receive the new bundle on their Attach stream; watch `make rotation-status`, "
        "then `make retire-root` once every active camera holds it",
    )


@dataclass(frozen=True, slots=True)
class Lagging:
    """Devices that would break if the old root were retired now."""

    stale_bundle: list[str]
    old_chain_certs: list[str]
    old_chain_apps: list[str] = field(default_factory=list)


def _issued_by_any(cert: x509.Certificate, issuers: list[x509.Certificate]) -> bool:
    return any(directly_issued(cert, issuer) for issuer in issuers)


def retiring_issuing(files: PkiFiles) -> list[x509.Certificate]:
    """Previous issuing CAs that chain to a root about to be retired."""
    old_roots = previous_roots(files)
    return [c for c in previous_issuing(files) if _issued_by_any(c, old_roots)]


@dataclass(frozen=True, slots=True)
class BundleAdoption:
    """How far the fleet has taken up the current trust bundle (``make rotation-status``)."""

    active: int
    online: int
    current: int
    online_current: int
    lagging: list[str]
    root_rotation_pending: bool


def _active_devices(tx: Transaction) -> list[DeviceRecord]:
    return [d for d in tx.list_devices() if d.state is DeviceState.ACTIVE]


def _stale(devices: list[DeviceRecord], current_version: str) -> list[str]:
    return sorted(d.device_id for d in devices if d.trust_bundle_version != current_version)


def bundle_adoption(
    files: PkiFiles, store: Store, current_version: str, now: int
) -> BundleAdoption:
    """Active devices holding the current bundle, online (a live attachment on any replica) or
    not, and those that lag."""
    with store.read() as tx:
        active = _active_devices(tx)
        online = {
            d.device_id
            for d in active
            if (attachment := tx.get_attachment(d.device_id)) is not None
            and attachment.live_at(now)
        }
    current = [d for d in active if d.trust_bundle_version == current_version]
    return BundleAdoption(
        active=len(active),
        online=sum(d.device_id in online for d in active),
        current=len(current),
        online_current=sum(d.device_id in online for d in current),
        lagging=_stale(active, current_version),
        root_rotation_pending=cross_cert_path(files).exists(),
    )


def lagging_devices(
    files: PkiFiles, store: Store, current_version: str, trust_domain: str
) -> Lagging:
    """Active devices not holding the current bundle, and active devices whose certificate was
    issued by an issuing CA under a root about to be retired."""
    retiring = {subject_key_id(c) for c in retiring_issuing(files)}
    with store.read() as tx:
        devices = _active_devices(tx)
        stale = _stale(devices, current_version)
        old_chain = []
        for d in devices:
            certs = tx.certificates_of(str(SpiffeId.device(trust_domain, d.device_id)))
            if any(c.status is CertStatus.ACTIVE and c.issuer_ski in retiring for c in certs):
                old_chain.append(d.device_id)
        # App instances too: one still on an old-root certificate would be locked out.
        apps = sorted(
            SpiffeId.parse(c.spiffe_id).app_id
            for c in tx.active_certificates_issued_by(retiring)
            if c.kind is Kind.APP
        )
    return Lagging(stale, sorted(old_chain), apps)


def retire_root(
    config: Config,
    store: Store,
    current_version: str,
    *,
    force: bool,
    clock: Clock | None = None,
) -> RotationReport:
    """Drop the old root (and issuing CAs under it) from the bundle. Refuses while any active camera
    lacks the current bundle or still uses a certificate under the old root, unless forced."""
    from broker.clock import SystemClock

    clock = clock or SystemClock()
    files = PkiFiles(config.certs_dir)
    state_path = files.root / "rotation.json"
    if not cross_cert_path(files).exists() or not state_path.exists():
        raise FailedPrecondition("no root rotation is pending: run `make rotate-root` first")
    lag = lagging_devices(files, store, current_version, config.trust_domain)
    if (lag.stale_bundle or lag.old_chain_certs or lag.old_chain_apps) and not force:
        apps = (
            f"; {len(lag.old_chain_apps)} app instance(s) still hold a certificate under the old "
            f"root ({', '.join(lag.old_chain_apps[:20])}) and must renew first"
            if lag.old_chain_apps
            else ""
        )
        raise FailedPrecondition(
            f"{len(lag.stale_bundle)} active camera(s) lack the current trust bundle "
            f"({', '.join(lag.stale_bundle[:20]) or '-'}) and {len(lag.old_chain_certs)} still hold a "
            f"certificate under the old root ({', '.join(lag.old_chain_certs[:20]) or '-'}){apps}; "
            "wait for them to attach and renew, or force with FORCE=1"
        )
    retired = files.root / "retired" / str(unix(clock.now()))
    retired.mkdir(parents=True, exist_ok=True)
    for cert in retiring_issuing(files):
        stem = _previous(files, "issuing") / serial_hex(cert.serial_number)
        for suffix in (".pem", ".key"):
            shutil.move(str(stem.with_suffix(suffix)), retired / f"issuing-{stem.name}{suffix}")
    shutil.move(str(_previous(files, "roots")), retired / "roots-previous")
    shutil.move(str(cross_cert_path(files)), retired / "root-cross.pem")
    shutil.move(str(state_path), retired / "rotation.json")
    write_ca_bundle(files)
    leaf = read_certificates(files.server_chain)[0]
    write_atomic(files.server_chain, server_chain_pem(files, leaf).encode("ascii"))
    return RotationReport(
        "pki.root_retired",
        {
            "forced": force,
            "stale_bundle": lag.stale_bundle,
            "old_chain_certs": lag.old_chain_certs,
            "old_chain_apps": lag.old_chain_apps,
            "archived_to": str(retired),
        },
        "cameras holding only the old root can no longer connect; re-provision them",
    )


def rotate_token_key(config: Config, clock: Clock) -> RotationReport:
    """A new session-token signing key; the old public key stays published until every token it
    signed has expired."""
    files = PkiFiles(config.certs_dir)
    keyring_dir = files.token_keys
    TokenKeyring.ensure(keyring_dir)
    retire_after = unix(clock.now()) + config.session_token_ttl_seconds + 60
    new_kid, old_kid, pruned = TokenKeyring.rotate(keyring_dir, retire_after, unix(clock.now()))
    return RotationReport(
        "pki.token_key_rotated",
        {
            "new_kid": new_kid,
            "previous_kid": old_kid,
            "previous_published_until": retire_after,
            "pruned": pruned,
        },
        "new sessions are signed with the new key; cameras get the new JWKS with the bundle push",
    )
