"""The mutual-TLS identity layer on the main listener (issue 2), through real handshakes.

Who may connect (only certificates chaining to the issuing CA *and* recorded by this broker), and
what each identity may call: every RPC admits exactly one identity kind (I3), and the identity is
read from the verified peer certificate only, never from metadata or a request field (I1).
"""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from broker.pemfile import read_certificates, read_private_key
from broker.store import CertStatus
from tests.helpers import (
    RunningBroker,
    attach_once,
    audit_entries,
    birth_credentials,
    cert_rows,
    certificates_of,
    count_rows,
    csr_for,
    device_row,
    device_spiffe,
    enroll_device,
    forged_leaf,
    impostor_ca,
    key_pem,
    mtls_channel,
    p256,
    pem,
    rpc_error,
    self_signed_ca,
)

DEVICE = "cam-0001"
OTHER = "cam-0002"


def renew_call(channel: grpc.Channel, csr_pem: str | None = None, **kwargs: object) -> object:
    return device_pb2_grpc.DeviceServiceStub(channel).RenewCertificate(
        device_pb2.RenewCertificateRequest(csr_pem=csr_pem or csr_for(p256())), timeout=10, **kwargs
    )


def list_devices_call(channel: grpc.Channel) -> object:
    return admin_pb2_grpc.AdminServiceStub(channel).ListDevices(
        admin_pb2.ListDevicesRequest(), timeout=10
    )


def leaf_of(chain_pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain_pem.encode())[0]


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def device_cert_count(broker: RunningBroker) -> int:
    return count_rows(broker, "certificates", kind="device")


def sign_leaf(
    issuer_key: object,
    issuer: x509.Certificate,
    spiffe_id: str,
    *,
    serial: int | None = None,
) -> tuple[object, x509.Certificate]:
    """A client leaf with the device profile, signed by whatever key the test supplies."""
    key = p256()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "forged")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
        )
        .sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return key, cert


# -- who may connect -----------------------------------------------------------------------------


def test_main_listener_without_client_certificate_fails_the_handshake(broker, operator_channel):
    """mTLS is required: no client certificate means no channel (gRPC reports UNAVAILABLE)."""
    enroll_device(broker, operator_channel, DEVICE)
    before = device_cert_count(broker)
    channel = grpc.secure_channel(broker.main, grpc.ssl_channel_credentials(broker.pki.ca_pem))
    with channel:
        assert rpc_error(renew_call, channel).code() is grpc.StatusCode.UNAVAILABLE
        assert rpc_error(list_devices_call, channel).code() is grpc.StatusCode.UNAVAILABLE
    assert device_cert_count(broker) == before


@pytest.mark.parametrize("same_ca_subject", [False, True], ids=["foreign-ca", "ca-subject-copied"])
def test_i1_forged_device_cert_from_another_ca_is_refused_at_tls(
    broker, operator_channel, same_ca_subject
):
    """A cert from another CA copying subject, URI SAN and serial of a genuine device cert (and,
    in one variant, the issuing CA's subject name too) never gets past the handshake."""
    genuine = enroll_device(broker, operator_channel, DEVICE)
    issuing = read_certificates(broker.pki.files.issuing_cert)[0]
    ca_key, ca_cert = impostor_ca(issuing.subject) if same_ca_subject else self_signed_ca("Evil")
    key, forged = forged_leaf(genuine.leaf, ca_key, ca_cert)
    assert forged.serial_number == genuine.leaf.serial_number
    assert uri_sans(forged) == [device_spiffe(DEVICE)]

    for chain in (pem(forged), pem(forged) + pem(ca_cert)):
        with mtls_channel(broker.main, broker.pki.ca_pem, key_pem(key), chain) as channel:
            error = rpc_error(renew_call, channel)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
    [record] = cert_rows(broker, DEVICE)
    assert record.serial == genuine.serial and record.status is CertStatus.ACTIVE


def test_forged_operator_cert_from_another_ca_is_refused_at_tls(broker, operator_channel):
    operator_cert = read_certificates(broker.pki.files.operator_chain)[0]
    ca_key, ca_cert = self_signed_ca("Evil")
    key, forged = forged_leaf(operator_cert, ca_key, ca_cert)
    with mtls_channel(broker.main, broker.pki.ca_pem, key_pem(key), pem(forged)) as channel:
        error = rpc_error(
            admin_pb2_grpc.AdminServiceStub(channel).CreateEnrollmentToken,
            admin_pb2.CreateEnrollmentTokenRequest(device_id=DEVICE),
            timeout=10,
        )
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert count_rows(broker, "enrollment_tokens") == 0


def test_birth_certificate_on_main_listener_is_refused(broker):
    """Factory birth certificates open only the factory listener; main trusts the issuing PKI."""
    key, cert = birth_credentials(broker, "cam-b001")
    with mtls_channel(broker.main, broker.pki.ca_pem, key, cert) as channel:
        assert rpc_error(renew_call, channel).code() is grpc.StatusCode.UNAVAILABLE
        assert rpc_error(list_devices_call, channel).code() is grpc.StatusCode.UNAVAILABLE
    assert device_row(broker, "cam-b001") is None
    assert device_cert_count(broker) == 0


def test_leaf_signed_by_the_root_directly_is_unauthenticated(broker, operator_channel):
    """A leaf that chains to the trusted root but not through the issuing CA passes TLS, and the
    broker refuses it: only the issuing CA issues identities."""
    genuine = enroll_device(broker, operator_channel, DEVICE)
    root_key = read_private_key(broker.pki.files.root_key)
    root = read_certificates(broker.pki.files.root_cert)[0]
    key, cert = sign_leaf(root_key, root, device_spiffe(DEVICE), serial=genuine.leaf.serial_number)
    with mtls_channel(broker.main, broker.pki.ca_pem, key_pem(key), pem(cert)) as channel:
        error = rpc_error(renew_call, channel)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert [r.serial for r in cert_rows(broker, DEVICE)] == [genuine.serial]


def test_leaf_from_issuing_key_but_not_recorded_is_unauthenticated(broker, operator_channel):
    """A certificate the broker never recorded (e.g. minted with a stolen copy of the issuing key,
    reusing a genuine serial) is refused: serial, fingerprint and identity must match the store."""
    genuine = enroll_device(broker, operator_channel, DEVICE)
    issuing_key = read_private_key(broker.pki.files.issuing_key)
    issuing = read_certificates(broker.pki.files.issuing_cert)[0]
    for serial in (genuine.leaf.serial_number, None):
        key, cert = sign_leaf(issuing_key, issuing, device_spiffe(DEVICE), serial=serial)
        chain = pem(cert) + pem(issuing)
        with mtls_channel(broker.main, broker.pki.ca_pem, key_pem(key), chain) as ch:
            error = rpc_error(renew_call, ch)
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert [r.serial for r in cert_rows(broker, DEVICE)] == [genuine.serial]


# -- I3: each RPC admits exactly one identity kind -----------------------------------------------


def test_i3_device_cert_on_admin_service_is_permission_denied(broker, operator_channel):
    creds = enroll_device(broker, operator_channel, DEVICE)
    tokens_before = count_rows(broker, "enrollment_tokens")
    with creds.channel(broker) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        calls = [
            (admin.ListDevices, admin_pb2.ListDevicesRequest()),
            (admin.CreateEnrollmentToken, admin_pb2.CreateEnrollmentTokenRequest(device_id=OTHER)),
            (admin.RevokeDevice, admin_pb2.RevokeDeviceRequest(device_id=DEVICE)),
        ]
        for method, request in calls:
            error = rpc_error(method, request, timeout=10)
            assert error.code() is grpc.StatusCode.PERMISSION_DENIED, method
    assert count_rows(broker, "enrollment_tokens") == tokens_before
    assert device_row(broker, OTHER) is None
    [record] = cert_rows(broker, DEVICE)
    assert record.status is CertStatus.ACTIVE
    assert audit_entries(broker, "device.revoked") == []


def test_i3_operator_cert_on_device_service_is_permission_denied(broker, operator_channel):
    operator_spiffe = "spiffe://camera.local/operator/admin"
    before = certificates_of(broker, operator_spiffe)
    error = rpc_error(renew_call, operator_channel)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(certificates_of(broker, operator_spiffe)) == len(before)
    assert device_cert_count(broker) == 0

    error = rpc_error(attach_once, operator_channel)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED


# -- I1: identity from the certificate only ------------------------------------------------------


SPOOF_METADATA = (
    ("x-device-id", OTHER),
    ("device-id", OTHER),
    ("x-spiffe-id", device_spiffe(OTHER)),
    ("x-forwarded-client-cert", f"URI={device_spiffe(OTHER)}"),
)


def test_i1_device_id_in_metadata_is_never_trusted_on_renewal(broker, operator_channel):
    """RenewCertificate with another device's id in metadata (and in the CSR's SAN and subject)
    returns a certificate for the caller's own id and leaves the other device untouched."""
    mine = enroll_device(broker, operator_channel, DEVICE)
    other = enroll_device(broker, operator_channel, OTHER)
    csr = csr_for(
        p256(),
        cn=OTHER,
        extensions=[
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_spiffe(OTHER))])
        ],
    )
    with mine.channel(broker) as channel:
        response = renew_call(channel, csr, metadata=SPOOF_METADATA)

    leaf = leaf_of(response.certificate_chain_pem)
    assert uri_sans(leaf) == [device_spiffe(DEVICE)]
    statuses = {r.serial: r.status for r in cert_rows(broker, DEVICE)}
    assert statuses == {
        mine.serial: CertStatus.SUPERSEDED,
        f"{leaf.serial_number:x}": CertStatus.ACTIVE,
    }
    [other_row] = cert_rows(broker, OTHER)
    assert other_row.serial == other.serial and other_row.status is CertStatus.ACTIVE


def test_i1_device_id_in_metadata_is_never_trusted_on_attach(broker, operator_channel):
    mine = enroll_device(broker, operator_channel, DEVICE)
    enroll_device(broker, operator_channel, OTHER)
    with mine.channel(broker) as channel:
        messages = attach_once(channel, SPOOF_METADATA)
    accepted = [m.accepted for m in messages if m.HasField("accepted")]
    assert [a.device_id for a in accepted] == [DEVICE]
    assert device_row(broker, DEVICE).last_seen_at is not None
    assert device_row(broker, OTHER).last_seen_at is None


def test_i1_operator_cannot_act_as_a_device_through_metadata(broker, operator_channel):
    enroll_device(broker, operator_channel, DEVICE)
    error = rpc_error(renew_call, operator_channel, metadata=(("x-device-id", DEVICE),))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(cert_rows(broker, DEVICE)) == 1
