"""Revocation, supersession and expiry of device certificates (issue 2), through the real server.

I7: revoking a device blocks its next RPC at once and ends its live Attach stream within 1 s.
The broker's own per-call check runs on the server's FakeClock, so moving that clock tests the
broker's expiry and grace-period logic while TLS (on the real clock) still accepts the handshake.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc, bootstrap_pb2, bootstrap_pb2_grpc
from broker.client.device import DeviceClient, Endpoints
from broker.store import CertStatus, DeviceState
from tests.helpers import (
    RunningBroker,
    attach_once,
    audit_entries,
    birth_credentials,
    cert_rows,
    count_rows,
    create_token,
    csr_for,
    device_count,
    device_row,
    enroll,
    enroll_device,
    mtls_channel,
    p256,
    renew_device,
    rpc_error,
    token_used_at,
)

DEVICE = "cam-0001"
OPERATOR = "spiffe://camera.local/operator/admin"


def revoke(operator_channel: grpc.Channel, device_id: str, reason: str = "stolen") -> object:
    return admin_pb2_grpc.AdminServiceStub(operator_channel).RevokeDevice(
        admin_pb2.RevokeDeviceRequest(device_id=device_id, reason=reason), timeout=10
    )


def accepted_ids(messages: list[object]) -> list[str]:
    return [m.accepted.device_id for m in messages if m.HasField("accepted")]  # type: ignore[attr-defined]


def token_count(broker: RunningBroker) -> int:
    return count_rows(broker, "enrollment_tokens")


# -- I7: revoking a device -----------------------------------------------------------------------


def test_i7_revocation_ends_live_attach_within_one_second_and_blocks_next_rpc(
    broker, operator_channel, tmp_path
):
    """A device attached through the SDK is revoked by the operator: its Attach stream ends with
    UNAUTHENTICATED in under 1 s, its next RPC is UNAUTHENTICATED, and the store says revoked."""
    client = DeviceClient(
        tmp_path / "dev", Endpoints(broker.bootstrap, broker.main), broker.pki.ca_pem
    )
    stub = admin_pb2_grpc.AdminServiceStub(operator_channel)

    async def scenario() -> tuple[object, grpc.StatusCode, float]:
        await client.enroll(create_token(operator_channel, DEVICE))
        async with client.attach() as session:
            first = await session.receive(timeout=5)
            assert first is not None and first.accepted.device_id == DEVICE
            online = await asyncio.to_thread(
                stub.ListDevices, admin_pb2.ListDevicesRequest(), timeout=10
            )
            assert [(d.device_id, d.online) for d in online.devices] == [(DEVICE, True)]

            async def until_ended() -> grpc.StatusCode:
                while True:
                    try:
                        message = await session.receive()
                    except grpc.aio.AioRpcError as error:
                        return error.code()
                    if message is None:
                        return grpc.StatusCode.OK

            ended = asyncio.create_task(until_ended())
            started = time.monotonic()
            response = await asyncio.to_thread(
                stub.RevokeDevice,
                admin_pb2.RevokeDeviceRequest(device_id=DEVICE, reason="stolen"),
                timeout=10,
            )
            code = await asyncio.wait_for(ended, timeout=5)
            elapsed = time.monotonic() - started
        return response, code, elapsed

    response, code, elapsed = asyncio.run(scenario())

    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert elapsed < 1.0, f"Attach stream ended {elapsed:.3f}s after revocation"
    serials = [r.serial for r in cert_rows(broker, DEVICE)]
    assert list(response.revoked_serials) == serials
    assert response.attach_streams_closed == 1

    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(client.renew())
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED

    record = device_row(broker, DEVICE)
    assert record.state is DeviceState.REVOKED and record.revoked_at is not None
    rows = cert_rows(broker, DEVICE)
    assert len(rows) == 1  # the refused renewal issued nothing
    assert all(r.status is CertStatus.REVOKED and r.revocation_reason == "stolen" for r in rows)
    [entry] = audit_entries(broker, "device.revoked")
    assert entry.subject == DEVICE and entry.actor == OPERATOR
    assert entry.detail["serials"] == serials
    listed = admin_pb2_grpc.AdminServiceStub(operator_channel).ListDevices(
        admin_pb2.ListDevicesRequest(), timeout=10
    )
    assert [(d.device_id, d.state, d.online) for d in listed.devices] == [
        (DEVICE, "revoked", False)
    ]


def test_i7_revoked_device_cannot_attach_again(broker, operator_channel):
    creds = enroll_device(broker, operator_channel, DEVICE)
    with creds.channel(broker) as channel:
        assert accepted_ids(attach_once(channel)) == [DEVICE]
    revoke(operator_channel, DEVICE)
    with creds.channel(broker) as channel:
        assert rpc_error(attach_once, channel).code() is grpc.StatusCode.UNAUTHENTICATED


def test_i7_revocation_covers_a_superseded_certificate_still_in_grace(broker, operator_channel):
    """After a renewal the old certificate is still honoured for a while; revocation ends that too."""
    old = enroll_device(broker, operator_channel, DEVICE)
    new = renew_device(broker, old)
    response = revoke(operator_channel, DEVICE)
    assert sorted(response.revoked_serials) == sorted([old.serial, new.serial])
    for creds in (old, new):
        with creds.channel(broker) as channel:
            assert rpc_error(attach_once, channel).code() is grpc.StatusCode.UNAUTHENTICATED
    assert {r.status for r in cert_rows(broker, DEVICE)} == {CertStatus.REVOKED}


def test_token_creation_for_a_revoked_device_is_failed_precondition(broker, operator_channel):
    enroll_device(broker, operator_channel, DEVICE)
    revoke(operator_channel, DEVICE)
    before = token_count(broker)
    error = rpc_error(create_token, operator_channel, DEVICE)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert token_count(broker) == before
    assert device_row(broker, DEVICE).state is DeviceState.REVOKED


def test_revocation_cancels_outstanding_tokens_of_the_device(broker, operator_channel):
    """A token minted before revocation cannot bring the device back."""
    enroll_device(broker, operator_channel, DEVICE)
    spare = create_token(operator_channel, DEVICE)
    revoke(operator_channel, DEVICE)
    error = rpc_error(enroll, broker, spare, csr_for(p256()))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(cert_rows(broker, DEVICE)) == 1
    assert {r.status for r in cert_rows(broker, DEVICE)} == {CertStatus.REVOKED}
    assert device_row(broker, DEVICE).state is DeviceState.REVOKED


def test_revoking_a_never_enrolled_device_with_a_token_blocks_its_enrollment(
    broker, operator_channel
):
    token = create_token(operator_channel, DEVICE)
    response = revoke(operator_channel, DEVICE)
    assert list(response.revoked_serials) == []
    assert token_used_at(broker, token) is not None
    assert (
        rpc_error(enroll, broker, token, csr_for(p256())).code()
        is grpc.StatusCode.PERMISSION_DENIED
    )
    assert cert_rows(broker, DEVICE) == []
    assert device_row(broker, DEVICE).state is DeviceState.REVOKED


def test_revoked_device_cannot_re_enroll_with_its_birth_certificate(broker):
    key, cert = birth_credentials(broker, "cam-b001")
    request = bootstrap_pb2.EnrollDeviceRequest(csr_pem=csr_for(p256()))
    with mtls_channel(broker.factory, broker.pki.ca_pem, key, cert) as channel:
        bootstrap_pb2_grpc.BootstrapStub(channel).EnrollDevice(request, timeout=10)
    files = broker.pki.files
    with mtls_channel(
        broker.main,
        broker.pki.ca_pem,
        files.operator_key.read_bytes(),
        files.operator_chain.read_bytes(),
    ) as operator:
        revoke(operator, "cam-b001")
    with mtls_channel(broker.factory, broker.pki.ca_pem, key, cert) as channel:
        error = rpc_error(
            bootstrap_pb2_grpc.BootstrapStub(channel).EnrollDevice,
            bootstrap_pb2.EnrollDeviceRequest(csr_pem=csr_for(p256())),
            timeout=10,
        )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert {r.status for r in cert_rows(broker, "cam-b001")} == {CertStatus.REVOKED}
    assert len(cert_rows(broker, "cam-b001")) == 1
    reasons = [e.detail["reason"] for e in audit_entries(broker, "device.enroll.denied")]
    assert reasons == ["device revoked"]


def test_revoking_an_unknown_device_is_not_found(broker, operator_channel):
    error = rpc_error(revoke, operator_channel, "cam-9999")
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert device_row(broker, "cam-9999") is None
    assert audit_entries(broker, "device.revoked") == []


def test_revoking_twice_is_failed_precondition(broker, operator_channel):
    enroll_device(broker, operator_channel, DEVICE)
    revoke(operator_channel, DEVICE)
    error = rpc_error(revoke, operator_channel, DEVICE)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert len(audit_entries(broker, "device.revoked")) == 1


@pytest.mark.parametrize("device_id", ["", "CAM-0001", "../x", "has space"])
def test_revoking_an_invalid_device_id_is_invalid_argument(broker, operator_channel, device_id):
    error = rpc_error(revoke, operator_channel, device_id)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert device_count(broker) == 0


# -- renewal grace and expiry (the broker's own check, on its FakeClock) -------------------------


def test_superseded_certificate_works_during_grace_then_is_unauthenticated(
    broker, operator_channel
):
    old = enroll_device(broker, operator_channel, DEVICE)
    new = renew_device(broker, old)
    rows = {r.serial: r for r in cert_rows(broker, DEVICE)}
    assert rows[old.serial].status is CertStatus.SUPERSEDED
    assert rows[old.serial].superseded_by == new.serial
    assert rows[new.serial].status is CertStatus.ACTIVE

    grace = broker.config.superseded_grace_seconds
    broker.clock.advance(grace - 1)
    with old.channel(broker) as channel:
        assert accepted_ids(attach_once(channel)) == [DEVICE]

    broker.clock.advance(2)  # now grace + 1 seconds after the renewal
    with old.channel(broker) as channel:
        assert rpc_error(attach_once, channel).code() is grpc.StatusCode.UNAUTHENTICATED
        assert rpc_error(renew_device, broker, old).code() is grpc.StatusCode.UNAUTHENTICATED
    with new.channel(broker) as channel:
        assert accepted_ids(attach_once(channel)) == [DEVICE]
    assert {r.serial for r in cert_rows(broker, DEVICE)} == {old.serial, new.serial}


def test_expired_certificate_is_unauthenticated(broker, operator_channel):
    """Past not_after on the broker's clock the certificate no longer counts, though the
    handshake (on the real clock) still succeeds; renewal issues nothing."""
    creds = enroll_device(broker, operator_channel, DEVICE)
    broker.clock.advance((creds.leaf.not_valid_after_utc - broker.clock.now()).total_seconds() + 1)

    with creds.channel(broker) as channel:
        assert rpc_error(attach_once, channel).code() is grpc.StatusCode.UNAUTHENTICATED
    assert rpc_error(renew_device, broker, creds).code() is grpc.StatusCode.UNAUTHENTICATED
    [record] = cert_rows(broker, DEVICE)
    assert record.serial == creds.serial and record.status is CertStatus.ACTIVE
    # The operator's 90-day certificate is still fine at this time: the refusal was the device's.
    listed = admin_pb2_grpc.AdminServiceStub(operator_channel).ListDevices(
        admin_pb2.ListDevicesRequest(), timeout=10
    )
    assert [d.device_id for d in listed.devices] == [DEVICE]


def test_certificate_not_yet_valid_on_the_broker_clock_is_unauthenticated(broker, operator_channel):
    creds = enroll_device(broker, operator_channel, DEVICE)
    broker.clock.advance(-3600)  # the 5-minute backdating does not cover an hour
    with creds.channel(broker) as channel:
        assert rpc_error(attach_once, channel).code() is grpc.StatusCode.UNAUTHENTICATED
    assert len(cert_rows(broker, DEVICE)) == 1
