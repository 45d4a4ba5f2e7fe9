"""The certificate authority: dev PKI creation, fixed leaf profiles, issuance.

No transport here. Issuance takes a public key (already checked by ``broker.pki.csr``) and an identity
decided by the caller from server-side records; nothing else from the requester reaches a
certificate (I2).
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.clock import Clock
from broker.config import Config
from broker.errors import ConfigurationError
from broker.identity.spiffe import Identity, Kind
from broker.pemfile import cert_pem, read_certificates, read_private_key, write_private_key
from broker.pki.csr import PublicKey

BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock skew on devices
ROOT_LIFETIME = dt.timedelta(days=3650)
ISSUING_LIFETIME = dt.timedelta(days=1825)
FACTORY_LIFETIME = dt.timedelta(days=3650)
BIRTH_LIFETIME = dt.timedelta(days=7300)
RENEW_FRACTION = 2 / 3


class Profile(enum.Enum):
    """Fixed leaf profiles; the EKU follows from the identity kind, never from the CSR."""

    CLIENT = "client"
    SERVER = "server"
    # A broker replica both serves and calls the internal listener: serverAuth and clientAuth.
    PEER = "peer"


PROFILE_EKUS = {
    Profile.CLIENT: [ExtendedKeyUsageOID.CLIENT_AUTH],
    Profile.SERVER: [ExtendedKeyUsageOID.SERVER_AUTH],
    Profile.PEER: [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
}
PROFILE_OF_KIND = {Kind.BROKER: Profile.SERVER, Kind.REPLICA: Profile.PEER}


@dataclass(frozen=True, slots=True)
class PkiFiles:
    """Where the PKI lives under ``certs/``."""

    root: Path

    @property
    def root_key(self) -> Path:
        return self.root / "root.key"

    @property
    def root_cert(self) -> Path:
        return self.root / "root.pem"

    @property
    def issuing_key(self) -> Path:
        return self.root / "issuing.key"

    @property
    def issuing_cert(self) -> Path:
        return self.root / "issuing.pem"

    @property
    def factory_key(self) -> Path:
        return self.root / "factory.key"

    @property
    def factory_cert(self) -> Path:
        return self.root / "factory.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def server_chain(self) -> Path:
        return self.root / "server.pem"

    @property
    def operator_key(self) -> Path:
        return self.root / "operator.key"

    @property
    def operator_chain(self) -> Path:
        return self.root / "operator.pem"

    @property
    def ca_bundle(self) -> Path:
        """The trust anchor file a device pins: the root certificate(s)."""
        return self.root / "ca-bundle.pem"

    @property
    def token_keys(self) -> Path:
        """Session-token signing keys (0600) and their index."""
        return self.root / "token-keys"

    @property
    def factory_batches(self) -> Path:
        return self.root / "factory-batch"


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A freshly signed leaf and what callers need to hand it out and record it."""

    certificate: x509.Certificate
    chain_pem: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    renew_after: dt.datetime
    issuer_ski: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key, the default for every key the broker creates."""
    return ec.generate_private_key(ec.SECP256R1())


def random_serial() -> int:
    """A 128-bit random, positive, non-zero serial number."""
    return secrets.randbits(127) | (1 << 126)


def serial_hex(serial: int) -> str:
    """The canonical text form of a serial number, as stored."""
    return f"{serial:x}"


def fingerprint(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the certificate's DER: its thumbprint (RFC 8705 x5t#S256 uses the same hash)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def key_tag(key: ec.EllipticCurvePrivateKey) -> str:
    """Eight hex digits of the key's SKI: keeps CA names unique even within one second."""
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest.hex()[:8]


def subject_key_id(cert: x509.Certificate) -> str:
    """Hex SubjectKeyIdentifier of a CA certificate."""
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def renewal_due_at(not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """When a certificate is due for renewal: RENEW_FRACTION of its lifetime."""
    return not_before + (not_after - not_before) * RENEW_FRACTION


def authority_key_id(cert: x509.Certificate) -> str:
    """Hex AuthorityKeyIdentifier of a certificate (its issuer's SKI), or empty."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return ""
    return aki.key_identifier.hex() if aki.key_identifier else ""


def _name(common_name: str, *, serial_number: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if serial_number is not None:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number))
    return x509.Name(attrs)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _validity(now: dt.datetime, lifetime: dt.timedelta) -> tuple[dt.datetime, dt.datetime]:
    start = now.replace(microsecond=0) - BACKDATE
    return start, now.replace(microsecond=0) + lifetime


def make_root(key: ec.EllipticCurvePrivateKey, name: str, now: dt.datetime) -> x509.Certificate:
    """A self-signed root CA certificate."""
    not_before, not_after = _validity(now, ROOT_LIFETIME)
    subject = _name(name)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def make_factory_root(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    """The factory CA: a separate self-signed root that signs birth certificates only."""
    not_before, not_after = _validity(now, FACTORY_LIFETIME)
    subject = _name("Camera Broker Factory CA")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def make_issuing(
    key: ec.EllipticCurvePrivateKey,
    root_key: ec.EllipticCurvePrivateKey,
    root_cert: x509.Certificate,
    trust_domain: str,
    now: dt.datetime,
) -> x509.Certificate:
    """An issuing CA under the root: pathLen 0, URI names constrained to the trust domain."""
    not_before, not_after = _validity(now, ISSUING_LIFETIME)
    not_after = min(not_after, root_cert.not_valid_after_utc)
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)], excluded_subtrees=None
    )
    return (
        x509.CertificateBuilder()
        .subject_name(_name(f"Camera Broker Issuing CA {now:%Y%m%d%H%M%S} {key_tag(key)}"))
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(constraints, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_aki(root_cert), critical=False)
        .sign(root_key, hashes.SHA256())
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def make_birth_certificate(
    key_public: PublicKey,
    factory_key: ec.EllipticCurvePrivateKey,
    factory_cert: x509.Certificate,
    device_id: str,
    now: dt.datetime,
) -> x509.Certificate:
    """A factory birth certificate naming device_id in its subject serialNumber."""
    not_before, not_after = _validity(now, BIRTH_LIFETIME)
    not_after = min(not_after, factory_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(device_id, serial_number=device_id))
        .issuer_name(factory_cert.subject)
        .public_key(key_public)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key_public), critical=False)
        .add_extension(_aki(factory_cert), critical=False)
        .sign(factory_key, hashes.SHA256())
    )


class IssuingAuthority:
    """The online issuing CA: signs leaf certificates with a fixed profile."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        trust_domain: str,
        clock: Clock,
    ) -> None:
        self._signer = _Signer.of(key, cert)
        self._trust_domain = trust_domain
        self._clock = clock

    @property
    def certificate(self) -> x509.Certificate:
        return self._signer.cert

    def replace(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        """Switch to a rotated issuing CA (the broker reloads after `make rotate-intermediate`).
        One attribute swap, so a signature in flight on another thread uses the old CA or the
        new one, never a mix of the two."""
        self._signer = _Signer.of(key, cert)

    @property
    def ski(self) -> str:
        """Hex subject key identifier of this CA (recorded with each certificate it issues)."""
        return self._signer.ski

    def issue(
        self,
        public_key: PublicKey,
        subject: Identity,
        lifetime: dt.timedelta,
        *,
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
    ) -> IssuedCertificate:
        """Sign a leaf for subject's SPIFFE ID. Only the public key comes from the requester (I2)."""
        if subject.trust_domain != self._trust_domain:
            raise ConfigurationError("refusing to issue outside the configured trust domain")
        profile = PROFILE_OF_KIND.get(subject.kind, Profile.CLIENT)
        signer = self._signer
        now = self._clock.now()
        not_before, not_after = _validity(now, lifetime)
        not_after = min(not_after, signer.cert.not_valid_after_utc)
        serial = random_serial()
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(subject.spiffe_id)]
        names += [x509.DNSName(n) for n in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        common_name = dns_names[0] if dns_names else subject.name
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(signer.cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage(PROFILE_EKUS[profile]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(signer.aki, critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(signer.key, hashes.SHA256())
        )
        renew_after = renewal_due_at(now.replace(microsecond=0), not_after)
        chain = cert_pem(cert).decode("ascii") + signer.cert_pem
        return IssuedCertificate(
            cert, chain, serial_hex(serial), not_before, not_after, renew_after, signer.ski
        )


@dataclass(frozen=True, slots=True)
class _Signer:
    """The issuing CA's key and what every leaf copies from its certificate, swapped as one."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    cert_pem: str
    aki: x509.AuthorityKeyIdentifier
    ski: str

    @classmethod
    def of(cls, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> _Signer:
        return cls(key, cert, cert_pem(cert).decode("ascii"), _aki(cert), subject_key_id(cert))


@dataclass(frozen=True, slots=True)
class InitReport:
    """What ``init_pki`` created (paths), so the CLI can say what it did."""

    created: tuple[Path, ...]
    operator: IssuedCertificate | None
    server: IssuedCertificate | None


def load_authority(config: Config, clock: Clock) -> IssuingAuthority:
    """The issuing CA from ``certs/`` (the root key is never loaded by a running broker)."""
    files = PkiFiles(config.certs_dir)
    if not files.issuing_key.exists() or not files.issuing_cert.exists():
        raise ConfigurationError(
            f"no issuing CA in {files.root}: run `broker ca init` (make certs)"
        )
    cert = read_certificates(files.issuing_cert)[0]
    return IssuingAuthority(read_private_key(files.issuing_key), cert, config.trust_domain, clock)


def init_pki(config: Config, clock: Clock, operator_name: str = "admin") -> InitReport:
    """Create whatever part of the dev PKI is missing. Never replaces an existing key."""
    from broker.identity.spiffe import broker as broker_identity
    from broker.identity.spiffe import operator as operator_identity

    files = PkiFiles(config.certs_dir)
    files.root.mkdir(parents=True, exist_ok=True)
    now = clock.now()
    created: list[Path] = []

    root_key = _ensure_key(files.root_key, created)
    if not files.root_cert.exists():
        _write_cert(files.root_cert, make_root(root_key, "Camera Broker Root CA", now), created)
    root_cert = read_certificates(files.root_cert)[0]
    if not files.ca_bundle.exists():
        _write_cert(files.ca_bundle, root_cert, created)

    issuing_key = _ensure_key(files.issuing_key, created)
    if not files.issuing_cert.exists():
        issuing = make_issuing(issuing_key, root_key, root_cert, config.trust_domain, now)
        _write_cert(files.issuing_cert, issuing, created)

    factory_key = _ensure_key(files.factory_key, created)
    if not files.factory_cert.exists():
        _write_cert(files.factory_cert, make_factory_root(factory_key, now), created)

    authority = load_authority(config, clock)
    server = None
    if not files.server_chain.exists():
        server_key = _ensure_key(files.server_key, created)
        ips = ("127.0.0.1", "::1")
        server = authority.issue(
            server_key.public_key(),
            broker_identity(config.trust_domain),
            dt.timedelta(days=config.server_cert_days),
            dns_names=tuple(dict.fromkeys(("localhost", *config.server_names))),
            ip_addresses=ips,
        )
        _write_text(files.server_chain, server.chain_pem, created)
    operator = None
    if not files.operator_chain.exists():
        op_key = _ensure_key(files.operator_key, created)
        operator = authority.issue(
            op_key.public_key(),
            operator_identity(config.trust_domain, operator_name),
            dt.timedelta(days=config.operator_cert_days),
        )
        _write_text(files.operator_chain, operator.chain_pem, created)
    from broker.protocol.tokens import TokenKeyring

    if TokenKeyring.ensure(files.token_keys):
        created.append(files.token_keys / "keys.json")
    return InitReport(tuple(created), operator, server)


def _ensure_key(path: Path, created: list[Path]) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        return read_private_key(path)
    key = new_key()
    write_private_key(path, key)
    created.append(path)
    return key


def _write_cert(path: Path, cert: x509.Certificate, created: list[Path]) -> None:
    _write_text(path, cert_pem(cert).decode("ascii"), created)


def _write_text(path: Path, text: str, created: list[Path]) -> None:
    from broker.pemfile import write_atomic

    write_atomic(path, text.encode("ascii"))
    created.append(path)
