"""Test helpers: the running-broker handle, CSRs of every flavour, foreign CAs, sync stubs over
real TLS, and reads of the store of record.

Reads of what the broker wrote go through the store contract (``broker.store.base``: ``Store`` and
``Transaction``) on a separate connection; only tables the contract cannot list or count are read
with SQL, in ``uncontracted_rows`` (see the section "reads the store contract has no method for").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf.message import Message

from broker._proto.broker.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    app_pb2,
    bootstrap_pb2,
    bootstrap_pb2_grpc,
    device_pb2,
)
from broker.audit.chain import AuditEntry
from broker.clock import FakeClock
from broker.config import Config
from broker.pki.ca import PkiFiles
from broker.store.base import (
    AppRecord,
    CertificateRecord,
    DeviceRecord,
    EnrollmentTokenRecord,
    SessionRecord,
    Store,
    Transaction,
    UserRecord,
)

if TYPE_CHECKING:
    from broker.client.app import AppClient, SessionTicket, WatchStream
    from broker.client.device import Endpoints
    from broker.client.simcam import SimulatedCamera
    from broker.identity.spiffe import Identity
    from broker.service.server import BrokerServer

T = TypeVar("T")

# Every key type a test signs a CSR with (including the ones the broker must refuse).
SigningKey = CertificateIssuerPrivateKeyTypes


@dataclass(frozen=True)
class Pki:
    files: PkiFiles

    @property
    def ca_pem(self) -> bytes:
        return self.files.ca_bundle.read_bytes()


@dataclass(frozen=True)
class RunningBroker:
    """A broker serving on loopback from a background thread (started by tests.conftest's
    ``start_broker``), plus the handles tests assert with."""

    config: Config
    server: BrokerServer
    loop: asyncio.AbstractEventLoop
    clock: FakeClock
    pki: Pki

    @property
    def home(self) -> Path:
        return self.config.home

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.server.ports['bootstrap']}"

    @property
    def main(self) -> str:
        return f"127.0.0.1:{self.server.ports['main']}"

    @property
    def factory(self) -> str:
        return f"127.0.0.1:{self.server.ports['factory']}"

    @property
    def endpoints(self) -> Endpoints:
        """The SDK's view of where this broker listens."""
        from broker.client.device import Endpoints

        return Endpoints(self.bootstrap, self.main)

    def store(self) -> Store:
        """A separate connection to the broker's store (either backend), for checking what was
        written."""
        from broker.store.open import open_store

        return open_store(self.config)

    @property
    def on_postgres(self) -> bool:
        return self.config.store_url.startswith("postgresql://")

    def on_loop(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        """Run a coroutine on the broker's event loop (e.g. to inspect presence)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def csr_for(
    key: SigningKey, *, extensions: list[x509.ExtensionType] | None = None, cn: str = "x"
) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    for ext in extensions or []:
        builder = builder.add_extension(ext, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def bootstrap_stub(broker: RunningBroker) -> tuple[grpc.Channel, bootstrap_pb2_grpc.BootstrapStub]:
    channel = grpc.secure_channel(broker.bootstrap, grpc.ssl_channel_credentials(broker.pki.ca_pem))
    return channel, bootstrap_pb2_grpc.BootstrapStub(channel)


def mtls_channel(target: str, ca_pem: bytes, key: bytes, chain: bytes) -> grpc.Channel:
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_pem, key, chain))


def create_token(operator_channel: grpc.Channel, device_id: str, ttl: int = 0) -> str:
    response = admin_pb2_grpc.AdminServiceStub(operator_channel).CreateEnrollmentToken(
        admin_pb2.CreateEnrollmentTokenRequest(device_id=device_id, ttl_seconds=ttl), timeout=10
    )
    return str(response.enrollment_token)


def enroll(broker: RunningBroker, token: str, csr_pem: str) -> bootstrap_pb2.EnrollDeviceResponse:
    channel, stub = bootstrap_stub(broker)
    with channel:
        response: bootstrap_pb2.EnrollDeviceResponse = stub.EnrollDevice(
            bootstrap_pb2.EnrollDeviceRequest(csr_pem=csr_pem, enrollment_token=token), timeout=10
        )
    return response


def self_signed_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return impostor_ca(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))


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


# -- integration helpers: enrolled credentials, sync stubs ---------------------------------------

TRUST_DOMAIN = "camera.local"


def device_spiffe(device_id: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/device/{device_id}"


@dataclass(frozen=True)
class DeviceCreds:
    """A device key and the chain the broker issued for it (kept outside the SDK, so tests can
    hold on to an old certificate after renewal)."""

    device_id: str
    key: SigningKey
    chain_pem: str

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(self.chain_pem.encode())[0]

    @property
    def serial(self) -> str:
        return f"{self.leaf.serial_number:x}"

    def channel(self, broker: RunningBroker, target: str | None = None) -> grpc.Channel:
        return mtls_channel(
            target or broker.main, broker.pki.ca_pem, key_pem(self.key), self.chain_pem.encode()
        )


def enroll_device(
    broker: RunningBroker,
    operator_channel: grpc.Channel,
    device_id: str,
    key: SigningKey | None = None,
) -> DeviceCreds:
    """Token + enrollment over the real bootstrap listener."""
    key = key or p256()
    response = enroll(broker, create_token(operator_channel, device_id), csr_for(key))
    return DeviceCreds(str(response.device_id), key, str(response.certificate_chain_pem))


def renew_device(
    broker: RunningBroker, creds: DeviceCreds, key: SigningKey | None = None
) -> DeviceCreds:
    """RenewCertificate over mTLS with creds; returns the new credentials."""
    from broker._proto.broker.v1 import device_pb2_grpc

    key = key or p256()
    with creds.channel(broker) as channel:
        response = device_pb2_grpc.DeviceServiceStub(channel).RenewCertificate(
            device_pb2.RenewCertificateRequest(csr_pem=csr_for(key)), timeout=10
        )
    return DeviceCreds(creds.device_id, key, str(response.certificate_chain_pem))


def attach_once(
    channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()
) -> list[device_pb2.BrokerMessage]:
    """Open Attach, send a hello, half-close; return every message the broker sent."""
    from broker._proto.broker.v1 import device_pb2_grpc

    hello = device_pb2.DeviceMessage(hello=device_pb2.Hello(trust_bundle_version="test"))
    responses = device_pb2_grpc.DeviceServiceStub(channel).Attach(
        iter([hello]), timeout=10, metadata=metadata
    )
    return list(responses)


def rpc_error(call: Callable[..., object], *args: object, **kwargs: object) -> grpc.RpcError:
    """Call and return the RpcError it must raise."""
    import pytest

    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
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
    broker: RunningBroker, device_id: str, key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of a factory birth certificate naming device_id."""
    from broker.pemfile import read_certificates, read_private_key
    from broker.pki.ca import make_birth_certificate

    files = broker.pki.files
    key = key or p256()
    cert = make_birth_certificate(
        key.public_key(),
        read_private_key(files.factory_key),
        read_certificates(files.factory_cert)[0],
        device_id,
        broker.clock.now(),
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


# -- reads through the store contract --------------------------------------------------------------


def read_store(broker: RunningBroker, query: Callable[[Transaction], T]) -> T:
    """query run in one read-only snapshot of a separate connection to the broker's store."""
    store: Store = broker.store()
    try:
        with store.read() as tx:
            return query(tx)
    finally:
        store.close()


def device_row(broker: RunningBroker, device_id: str) -> DeviceRecord | None:
    """The device's record, or None."""
    return read_store(broker, lambda tx: tx.get_device(device_id))


def device_count(broker: RunningBroker) -> int:
    """How many devices the store knows (any state)."""
    return read_store(broker, lambda tx: len(tx.list_devices()))


def certificates_of(broker: RunningBroker, spiffe_id: str) -> list[CertificateRecord]:
    """Every certificate record of a SPIFFE ID, oldest first."""
    return read_store(broker, lambda tx: list(tx.certificates_of(spiffe_id)))


def cert_rows(broker: RunningBroker, device_id: str) -> list[CertificateRecord]:
    """Every certificate record of the device's SPIFFE ID, oldest first."""
    return certificates_of(broker, device_spiffe(device_id))


def certificate(broker: RunningBroker, serial: str) -> CertificateRecord:
    """The certificate record with this serial (which must exist)."""
    record = read_store(broker, lambda tx: tx.get_certificate(serial))
    assert record is not None, f"no certificate {serial}"
    return record


def user_record(broker: RunningBroker, user_id: str) -> UserRecord:
    """The user's record (which must exist)."""
    record = read_store(broker, lambda tx: tx.get_user(user_id))
    assert record is not None, f"no user {user_id}"
    return record


def app_record(broker: RunningBroker, app_id: str) -> AppRecord:
    """The app instance's record (which must exist)."""
    record = read_store(broker, lambda tx: tx.get_app(app_id))
    assert record is not None, f"no app instance {app_id}"
    return record


def token_record(broker: RunningBroker, token: str) -> EnrollmentTokenRecord | None:
    """An enrollment token's record, looked up by its hash (the only form stored)."""
    from broker.devices.onetime import secret_hash

    return read_store(broker, lambda tx: tx.get_enrollment_token(secret_hash(token)))


def token_used_at(broker: RunningBroker, token: str) -> int | None:
    """used_at of an enrollment token (which must be stored)."""
    record = token_record(broker, token)
    assert record is not None, "expected one token row, found none"
    return record.used_at


def claim_code_hash_of(broker: RunningBroker, device_id: str) -> str | None:
    """The stored hash of the device's current claim code (None once used)."""
    record = device_row(broker, device_id)
    assert record is not None, f"no device {device_id}"
    return record.claim_code_hash


def session_row(broker: RunningBroker, session_id: str) -> SessionRecord | None:
    """One session's record, or None."""
    return read_store(broker, lambda tx: tx.get_session(session_id))


def session_rows(broker: RunningBroker, device_id: str) -> list[SessionRecord]:
    """Every session on the device, by opened_at then session_id."""
    return read_store(broker, lambda tx: list(tx.sessions_of_device(device_id)))


def audit_entries(broker: RunningBroker, action: str | None = None) -> list[AuditEntry]:
    """The audit trail in seq order, only the given action's entries when one is named."""
    store: Store = broker.store()
    try:
        return [e for e in store.audit_entries() if action is None or e.action == action]
    finally:
        store.close()


def session_audit(broker: RunningBroker, session_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(action, detail) of every audit entry that names the session, in order."""
    return [
        (e.action, dict(e.detail))
        for e in audit_entries(broker)
        if e.detail.get("session_id") == session_id
    ]


# -- reads the store contract has no method for ----------------------------------------------------
# The contract answers what the core asks: one record by key, or the records of one subject.
# Some tests assert on a whole table ("nothing was written", "exactly these grants exist"), which
# no core operation needs and so no contract method offers. uncontracted_rows is the one place
# that reads the database with SQL for them; count_rows and grant_rows are its typed uses.

UncontractedTable = Literal["users", "app_instances", "certificates", "enrollment_tokens", "grants"]
_COLUMN = re.compile(r"[a-z_]+")


def uncontracted_rows(broker: RunningBroker, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """Rows from a read-only connection to the broker's database (no contract method). SQL uses
    ``?`` placeholders on either backend."""
    if broker.on_postgres:
        import psycopg

        with psycopg.connect(broker.config.store_url) as pg:
            pg.read_only = True
            return [tuple(row) for row in pg.execute(sql.replace("?", "%s"), args).fetchall()]
    import sqlite3

    conn = sqlite3.connect(f"file:{broker.config.database}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql, args).fetchall())
    finally:
        conn.close()


def table_names(broker: RunningBroker) -> list[str]:
    """Every table of the broker's schema, on either backend."""
    sql = (
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        if broker.on_postgres
        else "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    )
    return sorted(str(name) for (name,) in uncontracted_rows(broker, sql))


def table_counts(broker: RunningBroker) -> dict[str, int]:
    """Row count of every table ("nothing was written" = no change between two calls)."""
    return {
        name: int(uncontracted_rows(broker, f'SELECT COUNT(*) FROM "{name}"')[0][0])
        for name in table_names(broker)
    }


def stored_bytes(broker: RunningBroker) -> list[bytes]:
    """Everything the store holds, as bytes to search (e.g. for a secret that must not be there):
    the SQLite files, or every PostgreSQL row as text."""
    if broker.on_postgres:
        return [
            str(row).encode()
            for name in table_names(broker)
            for row in uncontracted_rows(broker, f'SELECT * FROM "{name}"')
        ]
    return [path.read_bytes() for path in broker.config.database.parent.iterdir()]


def count_rows(broker: RunningBroker, table: UncontractedTable, **equals: str) -> int:
    """Rows of a table (whose column = value for each keyword), e.g. count_rows(b, "grants")."""
    assert all(_COLUMN.fullmatch(column) for column in equals), equals
    where = " AND ".join(f"{column} = ?" for column in equals)
    sql = f"SELECT COUNT(*) FROM {table}" + (f" WHERE {where}" if where else "")
    return int(uncontracted_rows(broker, sql, *equals.values())[0][0])


def grant_rows(broker: RunningBroker, device_id: str) -> list[tuple[str, str, int | None]]:
    """(user_id, role, expires_at) of every grant on the device, by user_id."""
    rows = uncontracted_rows(
        broker,
        "SELECT user_id, role, expires_at FROM grants WHERE device_id = ? ORDER BY user_id",
        device_id,
    )
    return [(str(user_id), str(role), expires_at) for user_id, role, expires_at in rows]


def db_rows(broker: RunningBroker, sql: str, *args: object) -> list[tuple[object, ...]]:
    """The old name of uncontracted_rows, kept for test files written against it; prefer a
    store read above, count_rows or grant_rows."""
    return uncontracted_rows(broker, sql, *args)


# -- users, app instances, claims and sessions (issue 3) -----------------------------------------

PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class AppCreds:
    """An app instance's key and the chain the broker issued for it (held outside the SDK)."""

    user_id: str
    app_id: str
    spiffe_id: str
    key: SigningKey
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
    def identity(self) -> Identity:
        from broker.identity.spiffe import Identity, Kind

        return Identity(Kind.APP, TRUST_DOMAIN, self.user_id, self.app_id)

    def channel(self, broker: RunningBroker) -> grpc.Channel:
        return mtls_channel(
            broker.main, broker.pki.ca_pem, key_pem(self.key), self.chain_pem.encode()
        )


def create_account(broker: RunningBroker, username: str, password: str = PASSWORD) -> str:
    channel, stub = bootstrap_stub(broker)
    with channel:
        response = stub.CreateAccount(
            bootstrap_pb2.CreateAccountRequest(username=username, password=password), timeout=10
        )
    return str(response.user_id)


def enroll_app(
    broker: RunningBroker,
    username: str,
    password: str = PASSWORD,
    *,
    key: SigningKey | None = None,
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


def new_user(broker: RunningBroker, username: str, password: str = PASSWORD) -> AppCreds:
    """Sign up and enroll one app instance."""
    create_account(broker, username, password)
    return enroll_app(broker, username, password)


def enroll_camera(
    broker: RunningBroker, operator_channel: grpc.Channel, device_id: str
) -> tuple[DeviceCreds, str]:
    """An enrolled device and the claim code the broker gave it."""
    key = p256()
    response = enroll(broker, create_token(operator_channel, device_id), csr_for(key))
    creds = DeviceCreds(str(response.device_id), key, str(response.certificate_chain_pem))
    return creds, str(response.claim_code)


def app_call(broker: RunningBroker, creds: AppCreds, method: str, request: Message) -> Any:
    """One AppService RPC with creds over mutual TLS (the response message of that RPC)."""
    from broker._proto.broker.v1 import app_pb2_grpc

    with creds.channel(broker) as channel:
        stub = app_pb2_grpc.AppServiceStub(channel)
        return getattr(stub, method)(request, timeout=10)


def claim_device(
    broker: RunningBroker, creds: AppCreds, device_id: str, code: str
) -> app_pb2.ClaimDeviceResponse:
    request = app_pb2.ClaimDeviceRequest(device_id=device_id, claim_code=code)
    response: app_pb2.ClaimDeviceResponse = app_call(broker, creds, "ClaimDevice", request)
    return response


def share_device(
    broker: RunningBroker, creds: AppCreds, device_id: str, username: str, expires_at: int = 0
) -> app_pb2.ShareDeviceResponse:
    request = app_pb2.ShareDeviceRequest(
        device_id=device_id, username=username, expires_at=expires_at
    )
    response: app_pb2.ShareDeviceResponse = app_call(broker, creds, "ShareDevice", request)
    return response


def open_session(
    broker: RunningBroker, creds: AppCreds, device_id: str, eph: bytes = b"\x01" * 32
) -> app_pb2.OpenSessionResponse:
    request = app_pb2.OpenSessionRequest(device_id=device_id, app_ephemeral_public_key=eph)
    response: app_pb2.OpenSessionResponse = app_call(broker, creds, "OpenSession", request)
    return response


def retry_delay(error: grpc.RpcError) -> int:
    """Seconds of the google.rpc.RetryInfo detail in the error's grpc-status-details-bin."""
    from google.rpc import error_details_pb2, status_pb2

    trailers = dict(error.trailing_metadata() or ())
    raw = trailers.get("grpc-status-details-bin")
    assert raw, f"no status details in {trailers}"
    status = status_pb2.Status.FromString(raw)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    infos = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(infos) == 1, status
    info = error_details_pb2.RetryInfo()
    infos[0].Unpack(info)
    return int(info.retry_delay.seconds)


# -- live streams (issue 4): SDK-level cameras and apps, polling --------------------------------


def endpoints_of(broker: RunningBroker) -> Endpoints:
    """The SDK's view of where a (possibly restarted) broker listens."""
    return broker.endpoints


def operator_channel_of(broker: RunningBroker) -> grpc.Channel:
    """An operator's mTLS channel to the main listener (for brokers started outside the fixture)."""
    files = broker.pki.files
    return mtls_channel(
        broker.main,
        files.ca_bundle.read_bytes(),
        files.operator_key.read_bytes(),
        files.operator_chain.read_bytes(),
    )


async def sdk_app(
    broker: RunningBroker, state_dir: Path, username: str, password: str = PASSWORD
) -> AppClient:
    """An AppClient with a fresh account and one enrolled app instance."""
    from broker.client.app import AppClient

    app = AppClient(state_dir, broker.endpoints, broker.pki.ca_pem)
    await app.create_account(username, password)
    await app.enroll(username, password, "phone")
    return app


async def sdk_camera(
    broker: RunningBroker,
    operator_channel: grpc.Channel,
    state_dir: Path,
    device_id: str,
    *,
    owner: AppClient | None = None,
    fps: float = 50,
    frame_bytes: int = 256,
) -> SimulatedCamera:
    """An enrolled SimulatedCamera (on the broker's clock), claimed by owner when given."""
    from broker.client.device import DeviceClient
    from broker.client.simcam import SimulatedCamera

    client = DeviceClient(state_dir, broker.endpoints, broker.pki.ca_pem)
    state = await client.enroll(create_token(operator_channel, device_id))
    if owner is not None:
        await owner.claim(device_id, state.claim_code)
    return SimulatedCamera(client, fps=fps, frame_bytes=frame_bytes, clock=broker.clock)


async def start_camera(camera: SimulatedCamera, timeout: float = 10) -> asyncio.Task[None]:
    """Run the camera in a task until it is attached; returns the task."""
    task = asyncio.create_task(camera.run())
    await asyncio.wait_for(camera.attached.wait(), timeout)
    return task


async def stop_task(task: asyncio.Task[Any]) -> None:
    import contextlib

    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def eventually(check: Callable[[], T], timeout: float = 5.0, interval: float = 0.02) -> T:
    """Poll check() (sync) until it returns something truthy; fail with its last value."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"condition not met within {timeout}s: {value!r}"
            return value
        await asyncio.sleep(interval)


def renew_app(broker: RunningBroker, creds: AppCreds, key: SigningKey | None = None) -> AppCreds:
    """AppService.RenewCertificate with creds; returns the new credentials."""
    key = key or p256()
    response: app_pb2.RenewAppCertificateResponse = app_call(
        broker, creds, "RenewCertificate", app_pb2.RenewAppCertificateRequest(csr_pem=csr_for(key))
    )
    chain = str(response.certificate_chain_pem)
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
    def of(cls, broker: RunningBroker) -> OperatorSnapshot:
        files = broker.pki.files
        return cls(
            files.ca_bundle.read_bytes(),
            files.operator_key.read_bytes(),
            files.operator_chain.read_bytes(),
        )

    def call(self, broker: RunningBroker, method: str, request: Message) -> Any:
        """One AdminService RPC on a new mutual-TLS connection with these credentials (the
        response message of that RPC)."""
        channel = mtls_channel(broker.main, self.ca_pem, self.key_pem, self.chain_pem)
        with channel:
            return getattr(admin_pb2_grpc.AdminServiceStub(channel), method)(request, timeout=10)


def reload_pki(
    broker: RunningBroker, operator: OperatorSnapshot | None = None
) -> admin_pb2.ReloadPkiResponse:
    """AdminService.ReloadPki, as `make rotate-*` ends."""
    snapshot = operator or OperatorSnapshot.of(broker)
    response: admin_pb2.ReloadPkiResponse = snapshot.call(
        broker, "ReloadPki", admin_pb2.ReloadPkiRequest()
    )
    return response


def rotation_status(broker: RunningBroker) -> admin_pb2.RotationStatusResponse:
    response: admin_pb2.RotationStatusResponse = OperatorSnapshot.of(broker).call(
        broker, "RotationStatus", admin_pb2.RotationStatusRequest()
    )
    return response


class Watcher:
    """An app watching one session in a background task: decrypted frames, end reason, errors."""

    def __init__(self, app: AppClient, ticket: SessionTicket) -> None:
        self.app = app
        self.ticket = ticket
        self.frames: list[tuple[str, str, int]] = []
        self.stream: WatchStream | None = None
        self.end_reason: str | None = None
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self, frames: int = 3) -> Watcher:
        self.task = asyncio.create_task(self._run())
        await self.wait_for(frames)
        return self

    async def _run(self) -> None:
        from broker.client.simcam import parse_payload

        try:
            async with self.app.watch(self.ticket) as stream:
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
        assert {f[:2] for f in self.frames} == {(ticket.device_id, ticket.session_id)}
        sequences = [f[2] for f in self.frames]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
        assert self.stream is not None, "never started watching"
        assert self.stream.rejected == 0, self.stream.mismatches

    async def stop(self) -> None:
        assert self.task is not None, "never started"
        await stop_task(self.task)
