"""Test helpers: CSRs of every flavour, foreign CAs, and sync stubs over real TLS."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc, bootstrap_pb2, bootstrap_pb2_grpc
from broker.ca import PkiFiles


@dataclass(frozen=True)
class Pki:
    files: PkiFiles

    @property
    def ca_pem(self) -> bytes:
        return self.files.ca_bundle.read_bytes()


def key_pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def csr_for(key: object, *, extensions: list[x509.ExtensionType] | None = None, cn: str = "x") -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    for ext in extensions or []:
        builder = builder.add_extension(ext, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, algorithm)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def bootstrap_stub(broker: object) -> tuple[grpc.Channel, bootstrap_pb2_grpc.BootstrapStub]:
    channel = grpc.secure_channel(
        broker.bootstrap,  # type: ignore[attr-defined]
        grpc.ssl_channel_credentials(broker.pki.ca_pem),  # type: ignore[attr-defined]
    )
    return channel, bootstrap_pb2_grpc.BootstrapStub(channel)


def mtls_channel(target: str, ca_pem: bytes, key: bytes, chain: bytes) -> grpc.Channel:
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_pem, key, chain))


def create_token(operator_channel: grpc.Channel, device_id: str, ttl: int = 0) -> str:
    response = admin_pb2_grpc.AdminServiceStub(operator_channel).CreateEnrollmentToken(
        admin_pb2.CreateEnrollmentTokenRequest(device_id=device_id, ttl_seconds=ttl), timeout=10
    )
    return str(response.enrollment_token)


def enroll(broker: object, token: str, csr_pem: str) -> bootstrap_pb2.EnrollDeviceResponse:
    channel, stub = bootstrap_stub(broker)
    with channel:
        return stub.EnrollDevice(
            bootstrap_pb2.EnrollDeviceRequest(csr_pem=csr_pem, enrollment_token=token), timeout=10
        )


def self_signed_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = p256()
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def forged_leaf(
    template: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate from another CA copying subject, SAN and serial of a genuine one."""
    key = p256()
    san = template.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(template.subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(template.serial_number)
        .not_valid_before(template.not_valid_before_utc)
        .not_valid_after(template.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
