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
from broker.pki.ca import PkiFiles


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


# -- integration helpers: enrolled credentials, sync stubs, store snapshots ---------------------

TRUST_DOMAIN = "camera.local"


def device_spiffe(device_id: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/device/{device_id}"


@dataclass(frozen=True)
class DeviceCreds:
    """A device key and the chain the broker issued for it (kept outside the SDK, so tests can
    hold on to an old certificate after renewal)."""

    device_id: str
    key: object
    chain_pem: str

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(self.chain_pem.encode())[0]

    @property
    def serial(self) -> str:
        return f"{self.leaf.serial_number:x}"

    def channel(self, broker: object, target: str | None = None) -> grpc.Channel:
        return mtls_channel(
            target or broker.main,  # type: ignore[attr-defined]
            broker.pki.ca_pem,  # type: ignore[attr-defined]
            key_pem(self.key),
            self.chain_pem.encode(),
        )


def enroll_device(
    broker: object, operator_channel: grpc.Channel, device_id: str, key: object | None = None
) -> DeviceCreds:
    """Token + enrollment over the real bootstrap listener."""
    key = key or p256()
    response = enroll(broker, create_token(operator_channel, device_id), csr_for(key))
    return DeviceCreds(str(response.device_id), key, str(response.certificate_chain_pem))


def renew_device(broker: object, creds: DeviceCreds, key: object | None = None) -> DeviceCreds:
    """RenewCertificate over mTLS with creds; returns the new credentials."""
    from broker._proto.broker.v1 import device_pb2, device_pb2_grpc

    key = key or p256()
    with creds.channel(broker) as channel:
        response = device_pb2_grpc.DeviceServiceStub(channel).RenewCertificate(
            device_pb2.RenewCertificateRequest(csr_pem=csr_for(key)), timeout=10
        )
    return DeviceCreds(creds.device_id, key, str(response.certificate_chain_pem))


def attach_once(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> list[object]:
    """Open Attach, send a hello, half-close; return every message the broker sent."""
    from broker._proto.broker.v1 import device_pb2, device_pb2_grpc

    hello = device_pb2.DeviceMessage(hello=device_pb2.Hello(trust_bundle_version="test"))
    responses = device_pb2_grpc.DeviceServiceStub(channel).Attach(
        iter([hello]), timeout=10, metadata=metadata
    )
    return list(responses)


def rpc_error(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    """Call and return the RpcError it must raise."""
    import pytest

    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


def tamper_csr_signature(csr_pem: str) -> str:
    """The same CSR with one bit of its signature flipped (still parses, no longer verifies)."""
    import base64

    der = bytearray(
        x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01  # the signature BIT STRING is the last element of the request
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def birth_credentials(
    broker: object, device_id: str, key: object | None = None
) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of a factory birth certificate naming device_id."""
    from broker.pki.ca import make_birth_certificate
    from broker.pki.pemfile import read_certificates, read_private_key

    files = broker.pki.files  # type: ignore[attr-defined]
    key = key or p256()
    cert = make_birth_certificate(
        key.public_key(),  # type: ignore[attr-defined]
        read_private_key(files.factory_key),
        read_certificates(files.factory_cert)[0],
        device_id,
        broker.clock.now(),  # type: ignore[attr-defined]
    )
    return key_pem(key), pem(cert)


def impostor_ca(subject: x509.Name) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA with exactly the given subject (e.g. copying the real issuing CA's)."""
    key = p256()
    now = dt.datetime.now(dt.UTC)
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
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def db_rows(broker: object, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Rows from a read-only connection to the broker's database (for 'nothing was written')."""
    import sqlite3

    path = broker.config.database  # type: ignore[attr-defined]
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql, args).fetchall())
    finally:
        conn.close()


def token_used_at(broker: object, token: str) -> object:
    """used_at of an enrollment token (looked up by its hash, the only form stored)."""
    from broker.devices.onetime import secret_hash

    rows = db_rows(
        broker, "SELECT used_at FROM enrollment_tokens WHERE token_hash = ?", secret_hash(token)
    )
    assert len(rows) == 1, f"expected one token row, found {len(rows)}"
    return rows[0][0]


def device_row(broker: object, device_id: str) -> object:
    """The devices record (via the store interface), or None."""
    store = broker.store()  # type: ignore[attr-defined]
    try:
        with store.read() as tx:
            return tx.get_device(device_id)
    finally:
        store.close()


def cert_rows(broker: object, device_id: str) -> list[object]:
    """Every certificates record of the device's SPIFFE ID, oldest first."""
    store = broker.store()  # type: ignore[attr-defined]
    try:
        with store.read() as tx:
            return list(tx.certificates_of(device_spiffe(device_id)))
    finally:
        store.close()


def audit_entries(broker: object, action: str | None = None) -> list[object]:
    store = broker.store()  # type: ignore[attr-defined]
    try:
        return [e for e in store.audit_entries() if action is None or e.action == action]
    finally:
        store.close()


# -- users, app instances, claims and sessions (issue 3) -----------------------------------------

PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class AppCreds:
    """An app instance's key and the chain the broker issued for it (held outside the SDK)."""

    user_id: str
    app_id: str
    spiffe_id: str
    key: object
    chain_pem: str

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(self.chain_pem.encode())[0]

    @property
    def serial(self) -> str:
        return f"{self.leaf.serial_number:x}"

    @property
    def thumbprint(self) -> str:
        """RFC 8705 x5t#S256 of the leaf, as the broker puts it in a token's cnf."""
        from broker.protocol.tokens import cert_thumbprint

        return cert_thumbprint(self.leaf.public_bytes(serialization.Encoding.DER))

    @property
    def identity(self) -> object:
        from broker.identity.spiffe import Identity, Kind

        return Identity(Kind.APP, TRUST_DOMAIN, self.user_id, self.app_id)

    def channel(self, broker: object) -> grpc.Channel:
        return mtls_channel(
            broker.main,  # type: ignore[attr-defined]
            broker.pki.ca_pem,  # type: ignore[attr-defined]
            key_pem(self.key),
            self.chain_pem.encode(),
        )


def create_account(broker: object, username: str, password: str = PASSWORD) -> str:
    channel, stub = bootstrap_stub(broker)
    with channel:
        response = stub.CreateAccount(
            bootstrap_pb2.CreateAccountRequest(username=username, password=password), timeout=10
        )
    return str(response.user_id)


def enroll_app(
    broker: object, username: str, password: str = PASSWORD, *, key: object | None = None
) -> AppCreds:
    """Password login + CSR over the real bootstrap listener."""
    key = key or p256()
    channel, stub = bootstrap_stub(broker)
    with channel:
        response = stub.EnrollApp(
            bootstrap_pb2.EnrollAppRequest(
                username=username, password=password, csr_pem=csr_for(key), label="test phone"
            ),
            timeout=10,
        )
    return AppCreds(
        str(response.user_id),
        str(response.app_id),
        str(response.spiffe_id),
        key,
        str(response.certificate_chain_pem),
    )


def new_user(broker: object, username: str, password: str = PASSWORD) -> AppCreds:
    """Sign up and enroll one app instance."""
    create_account(broker, username, password)
    return enroll_app(broker, username, password)


def enroll_camera(
    broker: object, operator_channel: grpc.Channel, device_id: str
) -> tuple[DeviceCreds, str]:
    """An enrolled device and the claim code the broker gave it."""
    key = p256()
    response = enroll(broker, create_token(operator_channel, device_id), csr_for(key))
    creds = DeviceCreds(str(response.device_id), key, str(response.certificate_chain_pem))
    return creds, str(response.claim_code)


def app_call(broker: object, creds: AppCreds, method: str, request: object) -> object:
    """One AppService RPC with creds over mutual TLS."""
    from broker._proto.broker.v1 import app_pb2_grpc

    with creds.channel(broker) as channel:
        stub = app_pb2_grpc.AppServiceStub(channel)
        return getattr(stub, method)(request, timeout=10)


def claim_device(broker: object, creds: AppCreds, device_id: str, code: str) -> object:
    from broker._proto.broker.v1 import app_pb2

    request = app_pb2.ClaimDeviceRequest(device_id=device_id, claim_code=code)
    return app_call(broker, creds, "ClaimDevice", request)


def share_device(
    broker: object, creds: AppCreds, device_id: str, username: str, expires_at: int = 0
) -> object:
    from broker._proto.broker.v1 import app_pb2

    return app_call(
        broker,
        creds,
        "ShareDevice",
        app_pb2.ShareDeviceRequest(device_id=device_id, username=username, expires_at=expires_at),
    )


def open_session(
    broker: object, creds: AppCreds, device_id: str, eph: bytes = b"\x01" * 32
) -> object:
    from broker._proto.broker.v1 import app_pb2

    return app_call(
        broker,
        creds,
        "OpenSession",
        app_pb2.OpenSessionRequest(device_id=device_id, app_ephemeral_public_key=eph),
    )


def retry_delay(error: grpc.RpcError) -> int:
    """Seconds of the google.rpc.RetryInfo detail in the error's grpc-status-details-bin."""
    from google.rpc import error_details_pb2, status_pb2

    trailers = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    raw = trailers.get("grpc-status-details-bin")
    assert raw, f"no status details in {trailers}"
    status = status_pb2.Status.FromString(raw)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(infos) == 1, status
    info = error_details_pb2.RetryInfo()
    infos[0].Unpack(info)
    return int(info.retry_delay.seconds)


def grant_rows(broker: object, device_id: str) -> list[tuple[object, ...]]:
    """(user_id, role, expires_at) of every grant on the device."""
    return db_rows(
        broker,
        "SELECT user_id, role, expires_at FROM grants WHERE device_id = ? ORDER BY user_id",
        device_id,
    )


def session_rows(broker: object, device_id: str) -> list[tuple[object, ...]]:
    """(session_id, user_id, app_id, outcome, reason) of every session on the device."""
    return db_rows(
        broker,
        "SELECT session_id, user_id, app_id, outcome, reason FROM sessions "
        "WHERE device_id = ? ORDER BY opened_at, session_id",
        device_id,
    )


# -- live streams (issue 4): SDK-level cameras and apps, polling --------------------------------


def endpoints_of(broker: object) -> object:
    """The SDK's view of where a (possibly restarted) broker listens."""
    from broker.client.device import Endpoints

    return Endpoints(broker.bootstrap, broker.main)  # type: ignore[attr-defined]


def operator_channel_of(broker: object) -> grpc.Channel:
    """An operator's mTLS channel to the main listener (for brokers started outside the fixture)."""
    files = broker.pki.files  # type: ignore[attr-defined]
    return mtls_channel(
        broker.main,  # type: ignore[attr-defined]
        files.ca_bundle.read_bytes(),
        files.operator_key.read_bytes(),
        files.operator_chain.read_bytes(),
    )


async def sdk_app(
    broker: object, state_dir: object, username: str, password: str = PASSWORD
) -> object:
    """An AppClient with a fresh account and one enrolled app instance."""
    from broker.client.app import AppClient

    app = AppClient(state_dir, endpoints_of(broker), broker.pki.ca_pem)  # type: ignore[arg-type, attr-defined]
    await app.create_account(username, password)
    await app.enroll(username, password, "phone")
    return app


async def sdk_camera(
    broker: object,
    operator_channel: grpc.Channel,
    state_dir: object,
    device_id: str,
    *,
    owner: object | None = None,
    fps: float = 50,
    frame_bytes: int = 256,
) -> object:
    """An enrolled SimulatedCamera (on the broker's clock), claimed by owner when given."""
    from broker.client.device import DeviceClient
    from broker.client.simcam import SimulatedCamera

    client = DeviceClient(state_dir, endpoints_of(broker), broker.pki.ca_pem)  # type: ignore[arg-type, attr-defined]
    state = await client.enroll(create_token(operator_channel, device_id))
    if owner is not None:
        await owner.claim(device_id, state.claim_code)  # type: ignore[attr-defined]
    return SimulatedCamera(client, fps=fps, frame_bytes=frame_bytes, clock=broker.clock)  # type: ignore[attr-defined]


async def start_camera(camera: object, timeout: float = 10) -> object:
    """Run the camera in a task until it is attached; returns the task."""
    import asyncio

    task = asyncio.create_task(camera.run())  # type: ignore[attr-defined]
    await asyncio.wait_for(camera.attached.wait(), timeout)  # type: ignore[attr-defined]
    return task


async def stop_task(task: object) -> None:
    import asyncio
    import contextlib

    task.cancel()  # type: ignore[attr-defined]
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task  # type: ignore[misc]


async def eventually(check: object, timeout: float = 5.0, interval: float = 0.02) -> object:
    """Poll check() (sync) until it returns something truthy; fail with its last value."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = check()  # type: ignore[operator]
        if value or time.monotonic() > deadline:
            assert value, f"condition not met within {timeout}s: {value!r}"
            return value
        await asyncio.sleep(interval)


def session_row(broker: object, session_id: str) -> tuple[object, ...] | None:
    """(device_id, user_id, app_id, outcome, reason, bytes, ended_at) of one session."""
    rows = db_rows(
        broker,
        "SELECT device_id, user_id, app_id, outcome, reason, bytes, ended_at FROM sessions "
        "WHERE session_id = ?",
        session_id,
    )
    return rows[0] if rows else None


def session_audit(broker: object, session_id: str) -> list[tuple[str, dict[str, object]]]:
    """(action, detail) of every audit entry that names the session, in order."""
    return [
        (e.action, dict(e.detail))  # type: ignore[attr-defined]
        for e in audit_entries(broker)
        if e.detail.get("session_id") == session_id  # type: ignore[attr-defined]
    ]


def claim_code_hash_of(broker: object, device_id: str) -> object:
    """The stored hash of the device's current claim code (None once used)."""
    rows = db_rows(broker, "SELECT claim_code_hash FROM devices WHERE device_id = ?", device_id)
    return rows[0][0]


def renew_app(broker: object, creds: AppCreds, key: object | None = None) -> AppCreds:
    """AppService.RenewCertificate with creds; returns the new credentials."""
    from broker._proto.broker.v1 import app_pb2

    key = key or p256()
    response = app_call(
        broker, creds, "RenewCertificate", app_pb2.RenewAppCertificateRequest(csr_pem=csr_for(key))
    )
    chain = str(response.certificate_chain_pem)  # type: ignore[attr-defined]
    return AppCreds(creds.user_id, creds.app_id, creds.spiffe_id, key, chain)


# -- rotation and renewal (issue 5) ---------------------------------------------------------------


def served_certificate(
    address: str, ca_pem: bytes, key_pem: bytes | None = None, chain_pem: bytes | None = None
) -> x509.Certificate:
    """The leaf certificate a listener presents in a fresh TLS handshake (verified against
    ca_pem, with a client certificate when given), read with the standard library's ssl."""
    import os
    import socket
    import ssl
    import tempfile

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    context.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory() as folder:
        if key_pem is not None and chain_pem is not None:
            key_path, chain_path = os.path.join(folder, "k.pem"), os.path.join(folder, "c.pem")
            with open(key_path, "wb") as f:
                f.write(key_pem)
            with open(chain_path, "wb") as f:
                f.write(chain_pem)
            context.load_cert_chain(chain_path, key_path)
        host, port = address.rsplit(":", 1)
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@dataclass(frozen=True)
class OperatorSnapshot:
    """The operator's credentials as read at one moment (the CLI reads them before a rotation)."""

    ca_pem: bytes
    key_pem: bytes
    chain_pem: bytes

    @classmethod
    def of(cls, broker: object) -> OperatorSnapshot:
        files = broker.pki.files  # type: ignore[attr-defined]
        return cls(
            files.ca_bundle.read_bytes(),
            files.operator_key.read_bytes(),
            files.operator_chain.read_bytes(),
        )

    def call(self, broker: object, method: str, request: object) -> object:
        """One AdminService RPC on a new mutual-TLS connection with these credentials."""
        channel = mtls_channel(broker.main, self.ca_pem, self.key_pem, self.chain_pem)  # type: ignore[attr-defined]
        with channel:
            return getattr(admin_pb2_grpc.AdminServiceStub(channel), method)(request, timeout=10)


def reload_pki(broker: object, operator: OperatorSnapshot | None = None) -> object:
    """AdminService.ReloadPki, as `make rotate-*` ends."""
    return (operator or OperatorSnapshot.of(broker)).call(
        broker, "ReloadPki", admin_pb2.ReloadPkiRequest()
    )


def rotation_status(broker: object) -> object:
    return OperatorSnapshot.of(broker).call(
        broker, "RotationStatus", admin_pb2.RotationStatusRequest()
    )


class Watcher:
    """An app watching one session in a background task: decrypted frames, end reason, errors."""

    def __init__(self, app: object, ticket: object) -> None:
        self.app = app
        self.ticket = ticket
        self.frames: list[tuple[str, str, int]] = []
        self.stream: object = None
        self.end_reason: str | None = None
        self.error: BaseException | None = None
        self.task: object = None

    async def start(self, frames: int = 3) -> Watcher:
        import asyncio

        self.task = asyncio.create_task(self._run())
        await self.wait_for(frames)
        return self

    async def _run(self) -> None:
        from broker.client.simcam import parse_payload

        try:
            async with self.app.watch(self.ticket) as stream:  # type: ignore[attr-defined]
                self.stream = stream
                async for plaintext in stream.frames():
                    self.frames.append(parse_payload(plaintext))
                self.end_reason = stream.end_reason or "stream closed"
        except Exception as error:  # kept for the assertion that names it
            self.error = error

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        await eventually(
            lambda: len(self.frames) >= count or self.error or self.end_reason, timeout
        )
        assert self.error is None and self.end_reason is None, (self.error, self.end_reason)

    def assert_intact(self) -> None:
        """Still live; every frame came from the session's camera, in order; none rejected."""
        assert self.error is None and self.end_reason is None, (self.error, self.end_reason)
        ticket = self.ticket
        assert {f[:2] for f in self.frames} == {(ticket.device_id, ticket.session_id)}  # type: ignore[attr-defined]
        sequences = [f[2] for f in self.frames]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
        assert self.stream.rejected == 0, self.stream.mismatches  # type: ignore[attr-defined]

    async def stop(self) -> None:
        await stop_task(self.task)
