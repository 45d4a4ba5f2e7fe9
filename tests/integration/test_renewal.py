"""Renewal through the SDKs, and which certificates the broker refuses (issue 5, items 1 and 2).

- DeviceClient / AppClient renew only once the jittered due time has passed, over mutual TLS with the
  current certificate; after expiry they renew by themselves with RenewExpiredCertificate
  (tests/integration/test_renew_expired.py) and raise ReenrollmentRequired, writing nothing but the
  audited refusal, once the broker's renewal window has passed too;
  ``ensure_identity`` then re-enrolls a camera with its birth certificate.
- A revoked certificate is refused on the very next RPC, on a connection opened before the
  revocation, without any CRL being published (the broker checks the store on every call, I7).
- A renewed party's superseded certificate works through the grace period, then is refused.
- Expired and not-yet-valid certificates are refused twice over: by the broker's own per-call check
  on its FakeClock (certificates issued by the running broker, clock moved past not_after or back
  before not_before: UNAUTHENTICATED), and by the TLS layer on the real clock (certificates issued
  offline by the same issuing CA on a FakeClock set in the past or the future and registered in the
  store: the handshake fails, UNAVAILABLE). Starting the broker itself on a past clock cannot give a
  not-yet-valid certificate: everything it issues is valid from its own "now".
"""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import pytest
from cryptography import x509

from broker._proto.broker.v1 import admin_pb2, app_pb2
from broker.client.app import AppClient
from broker.client.device import (
    DeviceClient,
    Endpoints,
    ReenrollmentRequired,
    jittered_renewal,
)
from broker.clock import FakeClock, unix
from broker.devices.enrollment import DeviceAuthority
from broker.identity.spiffe import device
from broker.pemfile import read_certificates
from broker.pki.ca import load_authority
from broker.pki.crl import build_crls, crls_pem
from broker.store import CertificateRecord, CertStatus
from tests.helpers import (
    PASSWORD,
    OperatorSnapshot,
    app_call,
    app_record,
    attach_once,
    audit_entries,
    birth_credentials,
    cert_rows,
    certificates_of,
    create_token,
    device_row,
    enroll_device,
    key_pem,
    mtls_channel,
    new_user,
    p256,
    renew_app,
    renew_device,
    rpc_error,
)

LIST = app_pb2.ListMyDevicesRequest()


def endpoints(broker) -> Endpoints:
    return Endpoints(broker.bootstrap, broker.main, broker.factory)


def device_client(broker, tmp_path, name: str) -> DeviceClient:
    return DeviceClient(tmp_path / name, endpoints(broker), broker.pki.ca_pem)


def window(renew_after: int, not_after: int) -> int:
    return min(3600, (not_after - renew_after) // 10)


def app_cert_rows(broker, app) -> list[CertificateRecord]:
    return certificates_of(broker, app.spiffe_id)


# -- item 1: SDK renewal ---------------------------------------------------------------------------


def test_jitter_stays_within_bounds_and_spreads_a_fleet():
    """renew_after ≤ due ≤ renew_after + min(3600, (not_after - renew_after)/10), per certificate."""
    import os

    for renew_after, not_after in ((1_000, 1_100), (0, 36_000), (5_000, 10_000_000), (7, 7)):
        dues = [jittered_renewal(renew_after, not_after, os.urandom(64)) for _ in range(400)]
        assert all(renew_after <= d <= renew_after + window(renew_after, not_after) for d in dues)
        if window(renew_after, not_after) >= 10:
            assert len(set(dues)) > 5, "no spread"
    chain = os.urandom(64)
    assert jittered_renewal(0, 36_000, chain) == jittered_renewal(0, 36_000, chain)  # stable


def test_device_renews_only_after_its_jittered_due_time(broker, operator_channel, tmp_path):
    clients = [device_client(broker, tmp_path, f"cam-j{i}") for i in range(3)]

    async def scenario() -> list[tuple[object, int, object, bool, bool]]:
        results = []
        for i, client in enumerate(clients):
            before = await client.enroll(create_token(operator_channel, f"cam-j{i}"))
            due = client.renew_due_at()
            early = await client.renew_if_due(now=before.renew_after - 1)
            just_before = await client.renew_if_due(now=due - 0.5)
            results.append((before, due, None, early, just_before))
        return results

    results = asyncio.run(scenario())
    dues = []
    for client, (before, due, _, early, just_before) in zip(clients, results, strict=True):
        leaf = read_certificates(client.chain_path)[0]
        assert before.not_after == unix(leaf.not_valid_after_utc)
        lifetime = before.not_after - unix(leaf.not_valid_before_utc) - 300  # 5 min backdating
        assert before.renew_after - (before.not_after - lifetime) == pytest.approx(
            lifetime * 2 / 3, abs=1
        )
        assert (
            before.renew_after
            <= due
            <= before.renew_after + window(before.renew_after, before.not_after)
        )
        assert client.renew_due_at() == due  # stable for one certificate
        assert (early, just_before) == (False, False)
        assert len(cert_rows(broker, before.device_id)) == 1  # nothing was asked of the broker
        dues.append(due - before.renew_after)
    assert len(set(dues)) > 1, "three cameras renewing at the same second: no jitter"

    client, (before, due, *_) = clients[0], results[0]
    old_serial = f"{read_certificates(client.chain_path)[0].serial_number:x}"
    assert asyncio.run(client.renew_if_due(now=due)) is True
    after = client.state
    assert after.device_id == before.device_id and after.not_after >= before.not_after
    new_serial = f"{read_certificates(client.chain_path)[0].serial_number:x}"
    rows = {r.serial: r for r in cert_rows(broker, before.device_id)}
    assert set(rows) == {old_serial, new_serial}
    assert rows[old_serial].status is CertStatus.SUPERSEDED
    assert rows[old_serial].superseded_by == new_serial
    assert rows[new_serial].status is CertStatus.ACTIVE
    [renewed] = audit_entries(broker, "certificate.renewed")
    assert renewed.actor == device(broker.config.trust_domain, before.device_id).spiffe_id
    assert renewed.detail["superseded"] == [old_serial]
    assert client.renew_due_at() >= after.renew_after  # the new certificate's own due time


def test_device_past_expiry_and_the_window_raises_reenrollment_required_and_writes_nothing(
    broker, operator_channel, tmp_path
):
    client = device_client(broker, tmp_path, "cam-x")
    state = asyncio.run(client.enroll(create_token(operator_channel, "cam-x")))
    chain_before = client.chain_path.read_bytes()
    audit_before = len(audit_entries(broker))
    start = broker.clock.now()

    window_end = state.not_after + broker.config.device_expired_renewal_days * 86_400
    for moment in (window_end + 86_400, state.not_after + 86_400 * 365):
        broker.clock.advance(moment - broker.clock.now().timestamp())
        with pytest.raises(ReenrollmentRequired, match="enroll again") as raised:
            asyncio.run(client.renew_if_due(now=moment))
        assert str(state.not_after) in str(raised.value)
        assert "beyond the renewal window" in str(raised.value)
        with pytest.raises(ReenrollmentRequired):
            asyncio.run(client.ensure_identity(now=moment))  # no birth certificate to fall back on
    assert client.chain_path.read_bytes() == chain_before
    assert len(cert_rows(broker, "cam-x")) == 1
    refusals = audit_entries(broker)[audit_before:]  # only the audited refusals (I12)
    assert [(e.action, e.detail["reason"]) for e in refusals] == [
        ("certificate.renew_expired.denied", "beyond window")
    ] * 4

    # Had it asked anyway, the broker (its clock past not_after) would refuse it.
    broker.clock.advance((start - broker.clock.now()).total_seconds())
    broker.clock.advance(state.not_after - start.timestamp())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(client.renew())
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in refused.value.details()
    assert len(cert_rows(broker, "cam-x")) == 1

    # A fresh enrollment token restores the identity (same device id, new certificate).
    broker.clock.advance((start - broker.clock.now()).total_seconds())
    again = asyncio.run(client.enroll(create_token(operator_channel, "cam-x")))
    assert again.device_id == "cam-x"
    current = f"{read_certificates(client.chain_path)[0].serial_number:x}"
    statuses = {r.serial: r.status for r in cert_rows(broker, "cam-x")}
    assert statuses == {
        f"{x509.load_pem_x509_certificate(chain_before).serial_number:x}": CertStatus.SUPERSEDED,
        current: CertStatus.ACTIVE,
    }


def test_ensure_identity_ok_renewed_then_re_enrolled_with_the_birth_certificate(broker, tmp_path):
    client = device_client(broker, tmp_path, "cam-b")
    birth = birth_credentials(broker, "cam-b")
    birth_pair = (birth[1], birth[0])  # (chain PEM, key PEM) as the SDK takes them

    async def scenario() -> tuple[str, str, str, object]:
        first = await client.enroll_with_birth_certificate(*birth_pair)
        ok = await client.ensure_identity(now=first.renew_after - 1, birth=birth_pair)
        renewed = await client.ensure_identity(now=client.renew_due_at(), birth=birth_pair)
        # Offline past the broker's renewal window: only the birth certificate brings it back.
        gone = client.state.not_after + (broker.config.device_expired_renewal_days + 1) * 86_400
        broker.clock.advance(gone - broker.clock.now().timestamp())
        again = await client.ensure_identity(now=gone, birth=birth_pair)
        return ok, renewed, again, first

    ok, renewed, again, first = asyncio.run(scenario())
    assert (ok, renewed, again) == ("ok", "renewed", "re-enrolled")
    assert client.state.device_id == first.device_id == "cam-b"
    current = f"{read_certificates(client.chain_path)[0].serial_number:x}"
    statuses = {r.serial: r.status for r in cert_rows(broker, "cam-b")}
    assert len(statuses) == 3 and statuses.pop(current) is CertStatus.ACTIVE
    assert set(statuses.values()) == {CertStatus.SUPERSEDED}
    enrolled = audit_entries(broker, "device.enrolled")
    assert [e.detail["via"] for e in enrolled] == ["birth", "birth"]
    assert [e.action for e in audit_entries(broker) if e.subject == "cam-b"] == [
        "device.enrolled",
        "certificate.renewed",
        "certificate.renew_expired.denied",
        "device.enrolled",
    ]


def test_app_renews_only_after_its_due_time_and_must_log_in_after_expiry(broker, tmp_path):
    app = AppClient(tmp_path / "app", endpoints(broker), broker.pki.ca_pem)

    async def scenario() -> object:
        await app.create_account("erin", PASSWORD)
        return await app.enroll("erin", PASSWORD, "phone")

    state = asyncio.run(scenario())
    assert state.not_after - state.renew_after == pytest.approx(7 * 86_400 / 3, abs=2)
    due = app.renew_due_at()
    assert (
        state.renew_after <= due <= state.renew_after + window(state.renew_after, state.not_after)
    )
    assert asyncio.run(app.renew_if_due(now=state.renew_after - 1)) is False
    assert asyncio.run(app.renew_if_due(now=due - 0.5)) is False
    old_serial = f"{read_certificates(app.chain_path)[0].serial_number:x}"
    spiffe = state.spiffe_id
    assert len(app_cert_rows(broker, state)) == 1

    assert asyncio.run(app.renew_if_due(now=due)) is True
    assert app.state.app_id == state.app_id and app.state.spiffe_id == spiffe
    rows = {r.serial: r for r in app_cert_rows(broker, state)}
    new_serial = f"{read_certificates(app.chain_path)[0].serial_number:x}"
    assert rows[old_serial].status is CertStatus.SUPERSEDED
    assert rows[new_serial].status is CertStatus.ACTIVE
    assert asyncio.run(app.list_devices()) == []  # the new certificate works

    gone = app.state.not_after + (broker.config.app_expired_renewal_days + 1) * 86_400
    broker.clock.advance(gone - broker.clock.now().timestamp())  # past the app's renewal window
    with pytest.raises(ReenrollmentRequired, match="log in again"):
        asyncio.run(app.renew_if_due(now=gone))
    assert len(app_cert_rows(broker, state)) == 2
    relogged = asyncio.run(app.enroll("erin", PASSWORD, "phone"))
    assert relogged.user_id == state.user_id and relogged.app_id != state.app_id


# -- item 2: refusals -------------------------------------------------------------------------------


def test_revoked_certificates_are_refused_on_the_next_rpc_before_any_crl_is_published(
    broker, operator_channel
):
    files = broker.pki.files
    crl_path = files.root / "crl.pem"
    store = broker.store()
    try:  # `make crl` before the revocations: the published CRL does not list them
        crl_path.write_text(crls_pem(build_crls(files, store, broker.clock)))
    finally:
        store.close()
    app = new_user(broker, "frank")
    camera = enroll_device(broker, operator_channel, "cam-rv")
    operator = OperatorSnapshot.of(broker)

    with app.channel(broker) as app_channel, camera.channel(broker) as device_channel:
        from broker._proto.broker.v1 import app_pb2_grpc

        stub = app_pb2_grpc.AppServiceStub(app_channel)
        assert list(stub.ListDevices(LIST, timeout=10).devices) == []
        assert next(m.accepted.device_id for m in attach_once(device_channel)) == "cam-rv"

        operator.call(
            broker, "RevokeAppInstance", admin_pb2.RevokeAppInstanceRequest(app_id=app.app_id)
        )
        operator.call(broker, "RevokeDevice", admin_pb2.RevokeDeviceRequest(device_id="cam-rv"))

        # Same connections, next RPC: refused at once.
        error = rpc_error(stub.ListDevices, LIST, timeout=10)
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert error.details() == "certificate has been revoked"
        error = rpc_error(attach_once, device_channel)
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert error.details() == "certificate has been revoked"

    published = x509.load_pem_x509_crl(crl_path.read_bytes())
    for serial in (app.serial, camera.serial):
        assert published.get_revoked_certificate_by_serial_number(int(serial, 16)) is None
    assert {r.status for r in cert_rows(broker, "cam-rv")} == {CertStatus.REVOKED}
    assert [r.status for r in app_cert_rows(broker, app)] == [CertStatus.REVOKED]
    assert app_record(broker, app.app_id).state.value == "revoked"
    # A new connection with the revoked certificates fares no better.
    assert rpc_error(app_call, broker, app, "ListDevices", LIST).code() is (
        grpc.StatusCode.UNAUTHENTICATED
    )


@pytest.mark.parametrize("kind", ["device", "app"])
def test_superseded_certificate_is_refused_after_the_grace_period(broker, operator_channel, kind):
    if kind == "device":
        old = enroll_device(broker, operator_channel, "cam-sg")
        new = renew_device(broker, old)

        def call(creds):
            with creds.channel(broker) as channel:
                return attach_once(channel)

        rows = lambda: {r.serial: r for r in cert_rows(broker, "cam-sg")}  # noqa: E731
    else:
        old = new_user(broker, "gina")
        new = renew_app(broker, old)

        def call(creds):
            return app_call(broker, creds, "ListDevices", LIST)

        rows = lambda: {r.serial: r for r in app_cert_rows(broker, old)}  # noqa: E731

    assert rows()[old.serial].status is CertStatus.SUPERSEDED
    assert rows()[old.serial].superseded_by == new.serial
    grace = broker.config.superseded_grace_seconds
    broker.clock.advance(grace - 1)
    call(old)  # still honoured inside the grace period
    broker.clock.advance(2)
    error = rpc_error(call, old)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "certificate was replaced by a renewal: use the new certificate"
    call(new)
    assert {s: r.status for s, r in rows().items()} == {
        old.serial: CertStatus.SUPERSEDED,
        new.serial: CertStatus.ACTIVE,
    }


@pytest.mark.parametrize(
    ("move", "message"),
    [
        ("past not_after", "certificate has expired: renew or re-enroll"),
        ("before not_before", "certificate is not yet valid: check the device clock"),
    ],
)
def test_broker_refuses_expired_and_not_yet_valid_certificates_on_its_clock(
    broker, operator_channel, move, message
):
    camera = enroll_device(broker, operator_channel, "cam-ck")
    app = new_user(broker, "hank")
    if move == "past not_after":  # the app's 7-day certificate expires first; go past both
        seconds = (camera.leaf.not_valid_after_utc - broker.clock.now()).total_seconds()
    else:
        seconds = -3600.0  # beyond the 5-minute backdating
    broker.clock.advance(seconds + (1 if seconds > 0 else 0))
    for call in (
        lambda: app_call(broker, app, "ListDevices", LIST),
        lambda: attach_once(camera.channel(broker)),
    ):
        error = rpc_error(call)
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert error.details() == message
    assert [r.status for r in cert_rows(broker, "cam-ck")] == [CertStatus.ACTIVE]
    denied = [e for e in audit_entries(broker) if e.action == "certificate.renewed"]
    assert denied == []


@pytest.mark.parametrize("offset_days", [-40, 2], ids=["expired", "not-yet-valid"])
def test_tls_refuses_certificates_expired_or_not_yet_valid_on_the_real_clock(
    broker, operator_channel, offset_days
):
    """A genuine certificate of an enrolled device, issued by the broker's issuing CA at another
    time and known to the store, fails the handshake itself: UNAVAILABLE, nothing written."""
    current = enroll_device(broker, operator_channel, "cam-tl")
    moment = dt.datetime.now(dt.UTC) + dt.timedelta(days=offset_days)
    authority = load_authority(broker.config, FakeClock(moment))
    key = p256()
    identity = device(broker.config.trust_domain, "cam-tl")
    issued = authority.issue(key.public_key(), identity, dt.timedelta(days=30))
    store = broker.store()
    try:  # recorded like any issued certificate, so only its validity can be the reason
        core = DeviceAuthority(broker.config, authority, store, FakeClock(moment))
        assert core.register_local_certificate(identity, issued.certificate, "test")
    finally:
        store.close()
    now = dt.datetime.now(dt.UTC)
    cert = issued.certificate
    assert (
        (cert.not_valid_after_utc < now) if offset_days < 0 else (cert.not_valid_before_utc > now)
    )
    audit_before = len(audit_entries(broker))

    with mtls_channel(
        broker.main, broker.pki.ca_pem, key_pem(key), issued.chain_pem.encode()
    ) as channel:
        error = rpc_error(attach_once, channel)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert len(audit_entries(broker)) == audit_before

    def last_seen() -> int | None:
        record = device_row(broker, "cam-tl")
        assert record is not None
        return record.last_seen_at

    assert last_seen() is None  # never reached the Attach handler
    # Control: the device's certificate from enrollment, valid now, attaches on the same path.
    with current.channel(broker) as channel:
        assert [m.accepted.device_id for m in attach_once(channel) if m.HasField("accepted")] == [
            "cam-tl"
        ]
    assert last_seen() is not None
