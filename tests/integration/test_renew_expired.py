"""Renewal after expiry (issue 13 item 4): Bootstrap.RenewExpiredCertificate.

A camera (or app instance) whose certificate expired within its window, and that is not revoked
or superseded, proves possession of the expired key and gets a new certificate with no token.

The broker starts on a FakeClock set weeks in the past: parties enroll "then", and the clock is
moved forward to about the real time, so the expired certificate is expired for the broker and
for TLS alike while the renewed one is valid for both (the TLS layer checks validity on the real
clock; tests/integration/test_renewal.py explains the two clocks).

Every refusal asserts the exact status, that nothing was written (no certificate, no nonce used:
the transaction rolled back), and a ``certificate.renew_expired.denied`` audit entry (I12).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc, app_pb2, bootstrap_pb2
from broker.client.app import AppClient
from broker.client.device import DeviceClient, ReenrollmentRequired
from broker.client.identity_dir import expired_renewal_request
from broker.clock import FakeClock
from broker.pemfile import read_certificates, read_private_key
from broker.store import CertStatus
from tests.conftest import start_broker, stop_broker
from tests.helpers import (
    PASSWORD,
    AppCreds,
    DeviceCreds,
    RunningBroker,
    app_call,
    attach_once,
    audit_entries,
    bootstrap_stub,
    certificates_of,
    claim_device,
    create_account,
    csr_for,
    enroll_app,
    enroll_camera,
    enroll_device,
    forged_leaf,
    grant_rows,
    new_user,
    p256,
    pem,
    rpc_error,
    self_signed_ca,
)
from tests.pg import fresh_database, integration_backend

DAY = 86_400
DENIED = "certificate.renew_expired.denied"
RENEWED = "certificate.renewed_after_expiry"
Start = Callable[..., RunningBroker]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """start(days_ago, **config): a broker whose clock starts days_ago in the past."""
    with ExitStack() as stack:

        def make(days_ago: int, **overrides: Any) -> RunningBroker:
            if integration_backend() == "postgres":
                overrides["store_url"] = stack.enter_context(fresh_database())
            begin = dt.datetime.now(dt.UTC) - dt.timedelta(days=days_ago)
            running = start_broker(tmp_path / f"home-{days_ago}", FakeClock(begin), **overrides)
            stack.callback(stop_broker, running)
            return running

        yield make


@pytest.fixture
def broker(start: Start) -> RunningBroker:
    """Started 40 days ago: camera certificates (30 days) issued at start expired 10 days ago."""
    return start(40)


def back_to_now(broker: RunningBroker, days: int) -> int:
    """Move the broker's clock forward by days; return its time (Unix seconds)."""
    broker.clock.advance(days * DAY)
    return int(broker.clock.now().timestamp())


def renew_request(
    creds: DeviceCreds | AppCreds,
    timestamp: int,
    *,
    new_key: Any = None,
    signer: Any = None,
    nonce: bytes | None = None,
) -> bootstrap_pb2.RenewExpiredCertificateRequest:
    return expired_renewal_request(
        signer or creds.key,
        creds.chain_pem.encode(),
        csr_for(new_key or p256()),
        timestamp,
        nonce,
    )


def renew_expired(
    broker: RunningBroker, request: bootstrap_pb2.RenewExpiredCertificateRequest
) -> bootstrap_pb2.RenewExpiredCertificateResponse:
    channel, stub = bootstrap_stub(broker)
    with channel:
        response: bootstrap_pb2.RenewExpiredCertificateResponse = stub.RenewExpiredCertificate(
            request, timeout=20
        )
    return response


def refused(
    broker: RunningBroker, request: bootstrap_pb2.RenewExpiredCertificateRequest
) -> grpc.RpcError:
    channel, stub = bootstrap_stub(broker)
    with channel:
        return rpc_error(stub.RenewExpiredCertificate, request, timeout=20)


def nonce_used(
    broker: RunningBroker, request: bootstrap_pb2.RenewExpiredCertificateRequest
) -> bool:
    store = broker.store()
    try:
        with store.read() as tx:
            return tx.get_renewal_nonce(hashlib.sha256(request.nonce).hexdigest()) is not None
    finally:
        store.close()


def assert_refused_cleanly(
    broker: RunningBroker,
    request: bootstrap_pb2.RenewExpiredCertificateRequest,
    code: grpc.StatusCode,
    spiffe_id: str,
    reason: str,
    *,
    says: str = "",
) -> grpc.RpcError:
    """The request is refused with code; no certificate, no nonce, one denial audited."""
    before = certificates_of(broker, spiffe_id)
    denials = len(audit_entries(broker, DENIED))
    error = refused(broker, request)
    assert error.code() is code, error.details()
    assert says.lower() in (error.details() or "").lower(), error.details()
    assert certificates_of(broker, spiffe_id) == before  # nothing issued, nothing superseded
    assert not nonce_used(broker, request)  # the refused transaction rolled back
    entries = audit_entries(broker, DENIED)
    assert len(entries) == denials + 1
    assert entries[-1].detail["reason"] == reason
    assert not audit_entries(broker, RENEWED)
    return error


def device_chain_works(broker: RunningBroker, creds: DeviceCreds) -> bool:
    """The chain attaches over mutual TLS on the main listener."""
    with creds.channel(broker) as channel:
        messages = attach_once(channel)
    return messages[0].HasField("accepted") and messages[0].accepted.device_id == creds.device_id


# -- cameras ----------------------------------------------------------------------------------------


def test_camera_renews_days_after_expiry_keeps_owner_and_attaches(broker, operator_channel):
    """I1/I2: the identity comes from the verified expired leaf; only the CSR's key is taken."""
    creds, claim_code = enroll_camera(broker, operator_channel, "cam-holiday")
    now = back_to_now(broker, 40)
    owner = new_user(broker, "olga")  # an app enrolled now (TLS checks the real clock)
    claim_device(broker, owner, "cam-holiday", claim_code)
    grants_before = grant_rows(broker, "cam-holiday")
    assert grants_before == [(owner.user_id, "owner", None)]
    assert creds.leaf.not_valid_after_utc.timestamp() < now - 9 * DAY  # expired ~10 days ago

    new_key = p256()
    response = renew_expired(broker, renew_request(creds, now, new_key=new_key))
    renewed = DeviceCreds("cam-holiday", new_key, response.certificate_chain_pem)
    assert response.spiffe_id == "spiffe://camera.local/device/cam-holiday"
    assert renewed.leaf.public_key() == new_key.public_key()  # I2: only the key from the CSR
    assert response.not_after == int(renewed.leaf.not_valid_after_utc.timestamp())
    assert response.not_after - now == pytest.approx(30 * DAY, abs=400)
    assert response.trust_bundle.version

    rows = {r.serial: r for r in certificates_of(broker, response.spiffe_id)}
    assert rows[creds.serial].status is CertStatus.SUPERSEDED
    assert rows[creds.serial].superseded_by == renewed.serial
    assert rows[renewed.serial].status is CertStatus.ACTIVE
    assert grant_rows(broker, "cam-holiday") == grants_before  # owner kept
    [entry] = audit_entries(broker, RENEWED)
    assert entry.actor == response.spiffe_id and entry.subject == "cam-holiday"
    assert entry.detail["expired_serial"] == creds.serial
    assert entry.detail["serial"] == renewed.serial
    assert entry.detail["days_expired"] in (9, 10)
    assert device_chain_works(broker, renewed)


def test_camera_may_keep_its_key(broker, operator_channel):
    creds = enroll_device(broker, operator_channel, "cam-samekey")
    now = back_to_now(broker, 40)
    response = renew_expired(broker, renew_request(creds, now, new_key=creds.key))
    assert device_chain_works(
        broker, DeviceCreds("cam-samekey", creds.key, response.certificate_chain_pem)
    )


def test_beyond_the_window_says_re_enroll_and_writes_nothing(start, tmp_path):
    broker = start(40, device_expired_renewal_days=5)
    with grpc.secure_channel(broker.main, _operator_creds(broker)) as operator_channel:
        creds = enroll_device(broker, operator_channel, "cam-drawer")
    now = back_to_now(broker, 40)
    error = assert_refused_cleanly(
        broker,
        renew_request(creds, now),
        grpc.StatusCode.FAILED_PRECONDITION,
        "spiffe://camera.local/device/cam-drawer",
        "beyond window",
        says="re-enroll with a new enrollment token",
    )
    assert "beyond the renewal window of 5 days" in error.details()
    assert "expired 9 days ago" in error.details() or "expired 10 days ago" in error.details()


def test_not_yet_expired_must_use_renew_certificate(broker, operator_channel):
    creds = enroll_device(broker, operator_channel, "cam-fresh")
    now = int(broker.clock.now().timestamp())
    assert_refused_cleanly(
        broker,
        renew_request(creds, now),
        grpc.StatusCode.FAILED_PRECONDITION,
        "spiffe://camera.local/device/cam-fresh",
        "not expired",
        says="RenewCertificate",
    )


def test_revoked_camera_is_refused(broker, operator_channel):
    """I7: a revoked camera never comes back this way."""
    creds = enroll_device(broker, operator_channel, "cam-stolen")
    admin_pb2_grpc.AdminServiceStub(operator_channel).RevokeDevice(
        admin_pb2.RevokeDeviceRequest(device_id="cam-stolen", reason="stolen"), timeout=10
    )
    now = back_to_now(broker, 40)
    assert_refused_cleanly(
        broker,
        renew_request(creds, now),
        grpc.StatusCode.PERMISSION_DENIED,
        "spiffe://camera.local/device/cam-stolen",
        "certificate revoked",
        says="revoked",
    )


def test_superseded_certificate_is_refused_the_newest_renews(broker, operator_channel):
    old = enroll_device(broker, operator_channel, "cam-twice")
    new = enroll_device(broker, operator_channel, "cam-twice")  # re-enrolled: old superseded
    now = back_to_now(broker, 40)
    assert_refused_cleanly(
        broker,
        renew_request(old, now),
        grpc.StatusCode.PERMISSION_DENIED,
        "spiffe://camera.local/device/cam-twice",
        "certificate superseded",
        says="replaced by a newer one",
    )
    assert renew_expired(broker, renew_request(new, now)).certificate_chain_pem


def test_bad_signature_and_signature_by_another_key_are_refused(broker, operator_channel):
    """I1: possession of the expired certificate's key is the only proof accepted."""
    creds = enroll_device(broker, operator_channel, "cam-sig")
    now = back_to_now(broker, 40)
    spiffe = "spiffe://camera.local/device/cam-sig"
    other = renew_request(creds, now, signer=p256())
    assert_refused_cleanly(
        broker, other, grpc.StatusCode.UNAUTHENTICATED, spiffe, "bad signature", says="signature"
    )
    tampered = renew_request(creds, now)
    tampered.nonce = bytes(32)  # signed over another nonce
    assert_refused_cleanly(
        broker, tampered, grpc.StatusCode.UNAUTHENTICATED, spiffe, "bad signature"
    )
    garbage = renew_request(creds, now)
    garbage.signature = b"\x30\x06\x02\x01\x01\x02\x01\x01"
    assert_refused_cleanly(
        broker, garbage, grpc.StatusCode.UNAUTHENTICATED, spiffe, "bad signature"
    )


def test_stale_or_future_timestamp_is_refused_naming_the_skew(broker, operator_channel):
    creds = enroll_device(broker, operator_channel, "cam-clock")
    now = back_to_now(broker, 40)
    spiffe = "spiffe://camera.local/device/cam-clock"
    for offset in (-301, 3600):
        error = assert_refused_cleanly(
            broker,
            renew_request(creds, now + offset),
            grpc.StatusCode.INVALID_ARGUMENT,
            spiffe,
            "clock skew",
            says="clock skew",
        )
        assert f"{offset:+d} s" in error.details()
    assert renew_expired(broker, renew_request(creds, now - 250)).certificate_chain_pem


def test_replayed_request_is_refused_permission_denied(broker, operator_channel):
    """I8: a renewal request is single-use."""
    creds = enroll_device(broker, operator_channel, "cam-replay")
    now = back_to_now(broker, 40)
    request = renew_request(creds, now)
    first = renew_expired(broker, request)
    issued = certificates_of(broker, first.spiffe_id)
    error = refused(broker, request)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "already used" in error.details()
    assert certificates_of(broker, first.spiffe_id) == issued
    assert audit_entries(broker, DENIED)[-1].detail["reason"] == "nonce already used"
    assert len(audit_entries(broker, RENEWED)) == 1


def test_twenty_concurrent_replays_renew_exactly_once(broker, operator_channel):
    """I8: of 20 racing copies of one request, exactly one succeeds; the rest get
    PERMISSION_DENIED (never INTERNAL), and one certificate is issued."""
    creds = enroll_device(broker, operator_channel, "cam-race")
    now = back_to_now(broker, 40)
    request = renew_request(creds, now)
    barrier = threading.Barrier(20)
    outcomes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def racer() -> None:
        channel, stub = bootstrap_stub(broker)
        with channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            barrier.wait(timeout=30)
            try:
                stub.RenewExpiredCertificate(request, timeout=60)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
        with lock:
            outcomes.append(code)

    threads = [threading.Thread(target=racer) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert sorted(outcomes, key=str) == sorted(
        [grpc.StatusCode.OK] + [grpc.StatusCode.PERMISSION_DENIED] * 19, key=str
    ), outcomes
    rows = certificates_of(broker, "spiffe://camera.local/device/cam-race")
    assert [r.status for r in rows].count(CertStatus.ACTIVE) == 1 and len(rows) == 2
    assert len(audit_entries(broker, RENEWED)) == 1
    reasons = [e.detail["reason"] for e in audit_entries(broker, DENIED)]
    assert reasons == ["nonce already used"] * 19


def test_key_of_another_identity_is_refused(broker, operator_channel):
    """I2: the new key must not belong to another identity."""
    creds = enroll_device(broker, operator_channel, "cam-a")
    neighbour = enroll_device(broker, operator_channel, "cam-b")
    now = back_to_now(broker, 40)
    assert_refused_cleanly(
        broker,
        renew_request(creds, now, new_key=neighbour.key),
        grpc.StatusCode.PERMISSION_DENIED,
        "spiffe://camera.local/device/cam-a",
        "key bound to another identity",
        says="another identity",
    )


def test_certificate_from_another_ca_is_refused(broker, operator_channel):
    """I1: a leaf copying a real camera's name and serial, signed by a foreign CA."""
    creds = enroll_device(broker, operator_channel, "cam-real")
    ca_key, ca_cert = self_signed_ca("impostor")
    key, leaf = forged_leaf(creds.leaf, ca_key, ca_cert)
    forged = DeviceCreds("cam-real", key, (pem(leaf) + pem(ca_cert)).decode())
    now = back_to_now(broker, 40)
    assert_refused_cleanly(
        broker,
        renew_request(forged, now),
        grpc.StatusCode.UNAUTHENTICATED,
        "spiffe://camera.local/device/cam-real",
        "untrusted issuer",
        says="not issued by a CA this broker trusts",
    )


def test_certificate_of_a_foreign_trust_domain_is_refused(broker):
    """I1: signed by our issuing CA (bypassing its profile), but naming another trust domain."""
    files = broker.pki.files
    ca_key = read_private_key(files.issuing_key)
    ca_cert = read_certificates(files.issuing_cert)[0]
    key = p256()
    begin = broker.clock.now() - dt.timedelta(days=1)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(begin)
        .not_valid_after(begin + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://other.example/device/cam-x")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    creds = DeviceCreds("cam-x", key, (pem(leaf) + pem(ca_cert)).decode())
    now = back_to_now(broker, 40)
    error = refused(broker, renew_request(creds, now))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "trust domain" in error.details()
    assert audit_entries(broker, DENIED)[-1].detail["reason"] == "bad identity"
    assert not audit_entries(broker, RENEWED)


def test_malformed_request_is_invalid_argument(broker, operator_channel):
    creds = enroll_device(broker, operator_channel, "cam-bad")
    now = back_to_now(broker, 40)
    spiffe = "spiffe://camera.local/device/cam-bad"
    short = renew_request(creds, now, nonce=b"\x01" * 15)
    assert_refused_cleanly(
        broker, short, grpc.StatusCode.INVALID_ARGUMENT, spiffe, "malformed request", says="nonce"
    )
    no_chain = renew_request(creds, now)
    no_chain.certificate_chain_pem = "not a certificate"
    assert_refused_cleanly(
        broker, no_chain, grpc.StatusCode.INVALID_ARGUMENT, spiffe, "malformed request"
    )


# -- app instances ---------------------------------------------------------------------------------


def test_app_instance_renews_within_its_own_window(start):
    broker = start(20)  # app certificates (7 days) issued at start expired 13 days ago
    create_account(broker, "anna")
    app = enroll_app(broker, "anna")
    now = back_to_now(broker, 20)
    new_key = p256()
    response = renew_expired(broker, renew_request(app, now, new_key=new_key))
    assert response.spiffe_id == app.spiffe_id  # same app instance
    renewed = AppCreds(
        app.user_id, app.app_id, app.spiffe_id, new_key, response.certificate_chain_pem
    )
    assert response.not_after - now == pytest.approx(7 * DAY, abs=400)
    assert app_call(broker, renewed, "ListDevices", app_pb2.ListMyDevicesRequest()).devices == []
    [entry] = audit_entries(broker, RENEWED)
    assert entry.subject == app.app_id and entry.detail["days_expired"] in (12, 13)


def test_app_instance_beyond_its_window_must_log_in_again(broker):
    create_account(broker, "bert")
    app = enroll_app(broker, "bert")
    now = back_to_now(broker, 40)  # expired 33 days ago; the app window is 30 days
    assert_refused_cleanly(
        broker,
        renew_request(app, now),
        grpc.StatusCode.FAILED_PRECONDITION,
        app.spiffe_id,
        "beyond window",
        says="log in again",
    )


def test_revoked_app_instance_is_refused(start):
    broker = start(20)
    create_account(broker, "carl")
    app = enroll_app(broker, "carl")
    with grpc.secure_channel(broker.main, _operator_creds(broker)) as operator_channel:
        admin_pb2_grpc.AdminServiceStub(operator_channel).RevokeAppInstance(
            admin_pb2.RevokeAppInstanceRequest(app_id=app.app_id, reason="lost"), timeout=10
        )
    now = back_to_now(broker, 20)
    assert_refused_cleanly(
        broker,
        renew_request(app, now),
        grpc.StatusCode.PERMISSION_DENIED,
        app.spiffe_id,
        "certificate revoked",
        says="revoked",
    )


# -- the SDKs do it by themselves --------------------------------------------------------------------


def test_device_sdk_with_an_expired_identity_on_disk_comes_back_by_itself(
    broker, operator_channel, tmp_path
):
    client = DeviceClient(tmp_path / "cam", broker.endpoints, broker.pki.ca_pem)
    state = asyncio.run(client.enroll(_token(operator_channel, "cam-sdk")))
    old_chain = client.chain_path.read_bytes()
    now = back_to_now(broker, 40)
    assert now > state.not_after

    async def come_back() -> tuple[str, str]:
        outcome = await client.ensure_identity(now=now)
        async with client.attach() as session:
            first = await session.receive(timeout=10)
        assert first is not None
        return outcome, first.accepted.device_id

    assert asyncio.run(come_back()) == ("renewed", "cam-sdk")
    assert client.chain_path.read_bytes() != old_chain
    assert client.state.not_after > now and client.state.device_id == "cam-sdk"
    assert len(audit_entries(broker, RENEWED)) == 1


def test_device_sdk_beyond_the_window_raises_reenrollment_required(start, tmp_path):
    broker = start(40, device_expired_renewal_days=5)
    with grpc.secure_channel(broker.main, _operator_creds(broker)) as operator_channel:
        token = _token(operator_channel, "cam-gone")
    client = DeviceClient(tmp_path / "cam", broker.endpoints, broker.pki.ca_pem)
    asyncio.run(client.enroll(token))
    chain = client.chain_path.read_bytes()
    now = back_to_now(broker, 40)
    with pytest.raises(ReenrollmentRequired, match="enroll again") as raised:
        asyncio.run(client.ensure_identity(now=now))
    assert "beyond the renewal window of 5 days" in str(raised.value)
    assert client.chain_path.read_bytes() == chain
    assert not audit_entries(broker, RENEWED)


def test_app_sdk_comes_back_by_itself_within_its_window(start, tmp_path):
    broker = start(20)
    app = AppClient(tmp_path / "app", broker.endpoints, broker.pki.ca_pem)

    async def enroll() -> None:
        await app.create_account("dora", PASSWORD)
        await app.enroll("dora", PASSWORD, "phone")

    asyncio.run(enroll())
    before = app.state
    now = back_to_now(broker, 20)
    assert asyncio.run(app.renew_if_due(now=now)) is True
    assert app.state.app_id == before.app_id and app.state.not_after > now
    assert asyncio.run(app.list_devices()) == []


# -- helpers -----------------------------------------------------------------------------------------


def _operator_creds(broker: RunningBroker) -> grpc.ChannelCredentials:
    files = broker.pki.files
    return grpc.ssl_channel_credentials(
        files.ca_bundle.read_bytes(),
        files.operator_key.read_bytes(),
        files.operator_chain.read_bytes(),
    )


def _token(operator_channel: grpc.Channel, device_id: str) -> str:
    from tests.helpers import create_token

    return create_token(operator_channel, device_id)


def test_not_served_on_the_factory_listener(broker):
    """I3: on the factory listener the RPC maps to no identity kind."""
    from broker._proto.broker.v1 import bootstrap_pb2_grpc
    from tests.helpers import birth_credentials, mtls_channel

    key, chain = birth_credentials(broker, "cam-factory")
    with mtls_channel(broker.factory, broker.pki.ca_pem, key, chain) as channel:
        error = rpc_error(
            bootstrap_pb2_grpc.BootstrapStub(channel).RenewExpiredCertificate,
            bootstrap_pb2.RenewExpiredCertificateRequest(),
            timeout=10,
        )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert not audit_entries(broker, RENEWED) and not audit_entries(broker, DENIED)


def test_a_renewal_whose_response_was_lost_can_be_asked_again_with_the_same_new_key(
    broker, operator_channel
):
    """The first answer never reached the camera: it asks again (fresh nonce, same new key) and
    gets a certificate; the lost one is superseded. A different key is still refused (I2)."""
    creds = enroll_device(broker, operator_channel, "cam-lost")
    now = back_to_now(broker, 40)
    new_key = p256()
    lost = renew_expired(broker, renew_request(creds, now, new_key=new_key))

    again = renew_expired(broker, renew_request(creds, now, new_key=new_key))

    assert again.certificate_chain_pem != lost.certificate_chain_pem
    rows = {c.serial: c.status for c in certificates_of(broker, lost.spiffe_id)}
    lost_leaf = x509.load_pem_x509_certificate(lost.certificate_chain_pem.encode())
    lost_serial = f"{lost_leaf.serial_number:x}"
    assert rows[lost_serial] is CertStatus.SUPERSEDED
    assert list(rows.values()).count(CertStatus.ACTIVE) == 1
    assert len(audit_entries(broker, RENEWED)) == 2
    before = certificates_of(broker, lost.spiffe_id)
    other = refused(broker, renew_request(creds, now, new_key=p256()))
    assert other.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "replaced by a newer one" in other.details()
    assert certificates_of(broker, lost.spiffe_id) == before
    assert audit_entries(broker, DENIED)[-1].detail["reason"] == "certificate superseded"


def test_device_sdk_retries_a_lost_renewal_with_the_key_it_already_sent(
    broker, operator_channel, tmp_path
):
    """The SDK keeps the new key of an unanswered renewal after expiry (0600) and asks again for
    it; the broker issues again for that key (PROTOCOL 4.5.3), and the pending key is gone."""
    client = DeviceClient(tmp_path / "cam", broker.endpoints, broker.pki.ca_pem)
    asyncio.run(client.enroll(_token(operator_channel, "cam-retry")))
    now = back_to_now(broker, 40)
    pending = client.pending_renewal_key()  # as if an attempt was sent and its answer lost
    lost = renew_expired(
        broker,
        expired_renewal_request(
            read_private_key(client.key_path), client.chain_path.read_bytes(), csr_for(pending), now
        ),
    )
    assert (client.pending_key_path.stat().st_mode & 0o777) == 0o600

    assert asyncio.run(client.ensure_identity(now=now)) == "renewed"

    leaf = x509.load_pem_x509_certificate(client.chain_path.read_bytes())
    assert leaf.public_key() == pending.public_key()
    assert read_private_key(client.key_path).private_numbers() == pending.private_numbers()
    assert not client.pending_key_path.exists()
    assert client.chain_path.read_text() != lost.certificate_chain_pem
    assert len(audit_entries(broker, RENEWED)) == 2
