"""Key types (issue 8, item 3): whatever enrollment accepts works end to end; nothing else enrolls.

The broker certifies exactly ECDSA P-256 (secp256r1) and P-384 (secp384r1) keys, for devices and
apps, at enrollment and at renewal. Each accepted type is shown working end to end over the real
listeners: enroll -> attach -> an app opens a session -> Watch decrypts the camera's frames (the
camera signs the handshake with its P-256 or P-384 key, ECDSA with SHA-256, DER-encoded), and the
same for an app key of each type (mutual TLS with it, the token's cnf bound to its certificate).

Every other key type used to be certified and then fail later (Ed25519: grpc's mutual TLS answers
NO_COMMON_SIGNATURE_ALGORITHMS; RSA: the app refuses the session handshake). Now EnrollDevice (token
and factory paths), EnrollApp and both RenewCertificate RPCs refuse it with INVALID_ARGUMENT and a
message naming the accepted types, before anything is written: the enrollment token stays unused,
no row is added to any table, and a valid CSR afterwards succeeds. I2: only the public key is taken
from a CSR, and only once it is a key the whole protocol can use.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import NameOID

from broker._proto.broker.v1 import (
    app_pb2,
    app_pb2_grpc,
    bootstrap_pb2,
    bootstrap_pb2_grpc,
    device_pb2,
    device_pb2_grpc,
)
from broker.client.app import AppClient
from broker.client.device import DeviceClient, Endpoints
from broker.client.simcam import SimulatedCamera, parse_payload
from broker.store import CertStatus
from tests.helpers import (
    PASSWORD,
    app_call,
    audit_entries,
    birth_credentials,
    bootstrap_stub,
    cert_rows,
    create_account,
    create_token,
    csr_for,
    db_rows,
    device_row,
    enroll,
    enroll_app,
    enroll_device,
    mtls_channel,
    p256,
    rpc_error,
    rsa_key,
    stop_task,
    table_counts,
    token_used_at,
)

ACCEPTED = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}
ACCEPTED_TEXT = "the CSR key must be ECDSA P-256 (secp256r1) or P-384 (secp384r1)"


def refusal(key_type: str) -> str:
    return f"unsupported key type {key_type}: {ACCEPTED_TEXT}"


def any_csr(key: object) -> str:
    """A validly self-signed CSR for any key type (EdDSA signs without a separate hash)."""
    eddsa = isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(key, None if eddsa else hashes.SHA256())  # type: ignore[arg-type]
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


# The refused types, each with the name the refusal gives it. Keys are made once per run (RSA-3072
# generation is slow); every test gets a fresh broker, so sharing a key between tests is harmless.
REFUSED: dict[str, tuple[str, Callable[[], object]]] = {
    "rsa2048": ("RSA-2048", lambda: rsa_key(2048)),
    "rsa3072": ("RSA-3072", lambda: rsa_key(3072)),
    "ed25519": ("Ed25519", ed25519.Ed25519PrivateKey.generate),
    "ed448": ("Ed448", ed448.Ed448PrivateKey.generate),
    "secp521r1": ("ECDSA secp521r1", lambda: ec.generate_private_key(ec.SECP521R1())),
    "secp256k1": ("ECDSA secp256k1", lambda: ec.generate_private_key(ec.SECP256K1())),
}


@functools.cache
def refused_csr(kind: str) -> str:
    return any_csr(REFUSED[kind][1]())


def assert_refused(error: grpc.RpcError, kind: str) -> None:
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details() == refusal(REFUSED[kind][0])


def leaf_curve(chain_pem: bytes | str) -> ec.EllipticCurve:
    data = chain_pem.encode() if isinstance(chain_pem, str) else chain_pem
    key = x509.load_pem_x509_certificates(data)[0].public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.curve


# -- accepted types, end to end -------------------------------------------------------------------


async def _watch_frames(
    broker: object, camera_client: DeviceClient, owner: AppClient, device_id: str, count: int = 5
) -> tuple[str, list[tuple[object, ...]], int]:
    """Attach the camera, open a session as owner, Watch and decrypt count frames."""
    camera = SimulatedCamera(camera_client, fps=50, frame_bytes=256, clock=broker.clock)  # type: ignore[attr-defined]
    task = asyncio.create_task(camera.run())
    try:
        await asyncio.wait_for(camera.attached.wait(), 10)
        ticket = await owner.open_session(device_id)
        got = []
        async with owner.watch(ticket) as stream:
            async for plaintext in stream.frames():
                got.append(parse_payload(plaintext))
                if len(got) == count:
                    break
        return ticket.session_id, got, stream.rejected
    finally:
        await stop_task(task)


def _endpoints(broker: object) -> Endpoints:
    return Endpoints(broker.bootstrap, broker.main)  # type: ignore[attr-defined]


@pytest.mark.parametrize("key_type", list(ACCEPTED))
def test_device_key_type_enrolls_attaches_and_streams_end_to_end(
    broker, operator_channel, tmp_path, key_type
):
    """A camera with a P-256 / P-384 key: enrolled, attached over mutual TLS with that key, and its
    handshake signature (ECDSA with SHA-256 by that key) verified by the app, which decrypts frames."""
    device_id = f"cam-{key_type.lower()}"

    async def scenario():
        camera_client = DeviceClient(
            tmp_path / "camera", _endpoints(broker), broker.pki.ca_pem, key_type=key_type
        )
        state = await camera_client.enroll(create_token(operator_channel, device_id))
        owner = AppClient(tmp_path / "owner", _endpoints(broker), broker.pki.ca_pem)
        await owner.create_account("owner", PASSWORD)
        await owner.enroll("owner", PASSWORD, "phone")
        await owner.claim(device_id, state.claim_code)
        session_id, got, rejected = await _watch_frames(broker, camera_client, owner, device_id)
        return camera_client, owner, session_id, got, rejected

    camera_client, owner, session_id, got, rejected = asyncio.run(scenario())

    assert isinstance(leaf_curve(camera_client.chain_path.read_bytes()), ACCEPTED[key_type])
    assert isinstance(leaf_curve(owner.chain_path.read_bytes()), ec.SECP256R1)
    assert len(got) == 5
    assert {g[:2] for g in got} == {(device_id, session_id)}
    assert rejected == 0


@pytest.mark.parametrize("key_type", list(ACCEPTED))
def test_app_key_type_enrolls_opens_a_session_and_watches_end_to_end(
    broker, operator_channel, tmp_path, key_type
):
    """An app with a P-256 / P-384 key: enrolled, calls over mutual TLS with that key, its
    certificate thumbprint bound into the session token (cnf), and Watch decrypts the frames."""
    device_id = "cam-app-key"

    async def scenario():
        camera_client = DeviceClient(tmp_path / "camera", _endpoints(broker), broker.pki.ca_pem)
        state = await camera_client.enroll(create_token(operator_channel, device_id))
        owner = AppClient(
            tmp_path / "owner", _endpoints(broker), broker.pki.ca_pem, key_type=key_type
        )
        await owner.create_account("owner", PASSWORD)
        await owner.enroll("owner", PASSWORD, "phone")
        await owner.claim(device_id, state.claim_code)
        session_id, got, rejected = await _watch_frames(broker, camera_client, owner, device_id)
        return camera_client, owner, session_id, got, rejected

    camera_client, owner, session_id, got, rejected = asyncio.run(scenario())

    assert isinstance(leaf_curve(owner.chain_path.read_bytes()), ACCEPTED[key_type])
    assert isinstance(leaf_curve(camera_client.chain_path.read_bytes()), ec.SECP256R1)
    assert len(got) == 5
    assert {g[:2] for g in got} == {(device_id, session_id)}
    assert rejected == 0


def test_sdk_renewal_keeps_the_key_type_and_refuses_unknown_ones(
    broker, operator_channel, tmp_path
):
    """The SDKs make P-256 keys by default, P-384 on request, and keep the held key's type when they
    renew; asking for anything else fails before a key is made."""

    async def scenario():
        camera = DeviceClient(
            tmp_path / "camera", _endpoints(broker), broker.pki.ca_pem, key_type="P-384"
        )
        await camera.enroll(create_token(operator_channel, "cam-renew"))
        # A later process opening the same directory without naming a type keeps P-384.
        reopened = DeviceClient(tmp_path / "camera", _endpoints(broker), broker.pki.ca_pem)
        await reopened.renew()
        app = AppClient(tmp_path / "app", _endpoints(broker), broker.pki.ca_pem)
        await app.create_account("anna", PASSWORD)
        await app.enroll("anna", PASSWORD, "phone")
        first_app_curve = leaf_curve(app.chain_path.read_bytes())
        await app.renew()
        return reopened, app, first_app_curve

    camera, app, first_app_curve = asyncio.run(scenario())

    assert isinstance(leaf_curve(camera.chain_path.read_bytes()), ec.SECP384R1)
    assert isinstance(camera.private_key().curve, ec.SECP384R1)
    assert isinstance(first_app_curve, ec.SECP256R1)
    assert isinstance(leaf_curve(app.chain_path.read_bytes()), ec.SECP256R1)
    for bad in ("Ed25519", "RSA-2048", "P-521", "p256"):
        with pytest.raises(ValueError, match="key_type must be one of P-256, P-384"):
            DeviceClient(tmp_path / "x", _endpoints(broker), broker.pki.ca_pem, key_type=bad)


# -- refused types: INVALID_ARGUMENT, nothing written, nothing consumed ---------------------------


@pytest.mark.parametrize("kind", list(REFUSED))
def test_enroll_device_refuses_key_type_and_keeps_the_token(broker, operator_channel, kind):
    """EnrollDevice with a refused key type: INVALID_ARGUMENT naming the accepted types; the token
    stays unused (I8), no device, certificate, audit or any other row is written; the same token then
    enrolls a P-256 CSR."""
    device_id = f"cam-{kind}"
    token = create_token(operator_channel, device_id)
    before = table_counts(broker)

    error = rpc_error(enroll, broker, token, refused_csr(kind))

    assert_refused(error, kind)
    assert token_used_at(broker, token) is None
    assert device_row(broker, device_id) is None
    assert cert_rows(broker, device_id) == []
    assert table_counts(broker) == before
    assert audit_entries(broker, "device.enroll.denied") == []

    response = enroll(broker, token, csr_for(p256()))
    assert response.device_id == device_id
    assert token_used_at(broker, token) is not None
    assert len(cert_rows(broker, device_id)) == 1


@pytest.mark.parametrize("kind", list(REFUSED))
def test_enroll_device_with_birth_certificate_refuses_key_type(broker, kind):
    """The factory path checks the CSR the same way (the birth certificate's own key is the
    factory's business): INVALID_ARGUMENT, nothing written, then a P-256 CSR enrolls."""
    device_id = f"cam-birth-{kind}"
    key_pem, cert_pem = birth_credentials(broker, device_id)
    before = table_counts(broker)

    with mtls_channel(broker.factory, broker.pki.ca_pem, key_pem, cert_pem) as channel:
        stub = bootstrap_pb2_grpc.BootstrapStub(channel)
        error = rpc_error(
            stub.EnrollDevice,
            bootstrap_pb2.EnrollDeviceRequest(csr_pem=refused_csr(kind)),
            timeout=10,
        )
        assert_refused(error, kind)
        assert table_counts(broker) == before
        response = stub.EnrollDevice(
            bootstrap_pb2.EnrollDeviceRequest(csr_pem=csr_for(p256())), timeout=10
        )
    assert response.device_id == device_id


@pytest.mark.parametrize("kind", list(REFUSED))
def test_enroll_app_refuses_key_type_and_writes_nothing(broker, kind):
    """EnrollApp with a refused key type: INVALID_ARGUMENT before the password is looked at (not a
    failed login), no app instance or certificate row; then a P-256 CSR enrolls."""
    create_account(broker, "anna")
    before = table_counts(broker)
    request = bootstrap_pb2.EnrollAppRequest(
        username="anna", password=PASSWORD, csr_pem=refused_csr(kind), label="phone"
    )
    channel, stub = bootstrap_stub(broker)
    with channel:
        error = rpc_error(stub.EnrollApp, request, timeout=10)

    assert_refused(error, kind)
    assert table_counts(broker) == before
    assert db_rows(broker, "SELECT COUNT(*) FROM app_instances") == [(0,)]
    assert db_rows(broker, "SELECT COUNT(*) FROM certificates WHERE kind = 'app'") == [(0,)]
    assert audit_entries(broker, "user.login.denied") == []

    assert enroll_app(broker, "anna").app_id


@pytest.mark.parametrize("kind", list(REFUSED))
def test_device_renewal_refuses_key_type_and_keeps_the_certificate(broker, operator_channel, kind):
    """DeviceService.RenewCertificate with a refused key type: INVALID_ARGUMENT; the current
    certificate stays the only one and ACTIVE, nothing is written; then a P-256 renewal works."""
    creds = enroll_device(broker, operator_channel, f"cam-{kind}")
    before = table_counts(broker)

    with creds.channel(broker) as channel:
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        error = rpc_error(
            stub.RenewCertificate,
            device_pb2.RenewCertificateRequest(csr_pem=refused_csr(kind)),
            timeout=10,
        )
        assert_refused(error, kind)
        assert table_counts(broker) == before
        [record] = cert_rows(broker, creds.device_id)
        assert record.serial == creds.serial and record.status is CertStatus.ACTIVE

        renewed = stub.RenewCertificate(
            device_pb2.RenewCertificateRequest(csr_pem=csr_for(p256())), timeout=10
        )
    assert renewed.certificate_chain_pem
    assert len(cert_rows(broker, creds.device_id)) == 2


@pytest.mark.parametrize("kind", list(REFUSED))
def test_app_renewal_refuses_key_type_and_keeps_the_certificate(broker, kind):
    """AppService.RenewCertificate with a refused key type: INVALID_ARGUMENT; the app's certificate
    stays the only one and ACTIVE, nothing is written; then a P-256 renewal works."""
    create_account(broker, "anna")
    creds = enroll_app(broker, "anna")
    before = table_counts(broker)

    with creds.channel(broker) as channel:
        error = rpc_error(
            app_pb2_grpc.AppServiceStub(channel).RenewCertificate,
            app_pb2.RenewAppCertificateRequest(csr_pem=refused_csr(kind)),
            timeout=10,
        )
    assert_refused(error, kind)
    assert table_counts(broker) == before
    assert db_rows(broker, "SELECT serial, status FROM certificates WHERE kind = 'app'") == [
        (creds.serial, CertStatus.ACTIVE.value)
    ]

    renewed = app_call(
        broker,
        creds,
        "RenewCertificate",
        app_pb2.RenewAppCertificateRequest(csr_pem=csr_for(p256())),
    )
    assert renewed.certificate_chain_pem  # type: ignore[attr-defined]
