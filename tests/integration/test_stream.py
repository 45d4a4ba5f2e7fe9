"""Live streams end to end: relay, end-to-end encryption, teardown (I5, I6, I7)."""

from __future__ import annotations

import asyncio
import time

from broker.client.app import AppClient
from broker.client.device import DeviceClient, Endpoints
from broker.client.simcam import SimulatedCamera, parse_payload
from tests.helpers import create_token


async def _setup(broker, tmp_path, operator_channel, device_id="cam-live"):
    endpoints = Endpoints(broker.bootstrap, broker.main)
    client = DeviceClient(tmp_path / device_id, endpoints, broker.pki.ca_pem)
    state = await client.enroll(create_token(operator_channel, device_id))
    owner = AppClient(tmp_path / f"owner-{device_id}", endpoints, broker.pki.ca_pem)
    await owner.create_account(f"owner-{device_id}", "a long enough password")
    await owner.enroll(f"owner-{device_id}", "a long enough password", "phone")
    await owner.claim(device_id, state.claim_code)
    camera = SimulatedCamera(client, fps=50, frame_bytes=256, clock=broker.clock)
    return camera, owner


def test_i6_watcher_receives_decrypted_frames_from_its_camera(broker, operator_channel, tmp_path):
    async def scenario():
        camera, owner = await _setup(broker, tmp_path, operator_channel)
        task = asyncio.create_task(camera.run())
        await asyncio.wait_for(camera.attached.wait(), 5)
        ticket = await owner.open_session("cam-live")
        got = []
        async with owner.watch(ticket) as stream:
            async for plaintext in stream.frames():
                got.append(parse_payload(plaintext))
                if len(got) == 10:
                    break
        task.cancel()
        return ticket, got, stream

    ticket, got, stream = asyncio.run(scenario())
    assert [g[:2] for g in got] == [("cam-live", ticket.session_id)] * 10
    assert [g[2] for g in got] == sorted(g[2] for g in got)
    assert stream.rejected == 0


def test_i7_revoking_the_device_ends_the_live_stream_within_one_second(
    broker, operator_channel, tmp_path
):
    from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc

    async def scenario():
        camera, owner = await _setup(broker, tmp_path, operator_channel, "cam-rev")
        task = asyncio.create_task(camera.run())
        await asyncio.wait_for(camera.attached.wait(), 5)
        ticket = await owner.open_session("cam-rev")
        async with owner.watch(ticket) as stream:
            frames = stream.frames()
            await frames.__anext__()
            start = time.monotonic()
            await asyncio.to_thread(
                admin_pb2_grpc.AdminServiceStub(operator_channel).RevokeDevice,
                admin_pb2.RevokeDeviceRequest(device_id="cam-rev", reason="test"),
            )
            async for _ in frames:
                pass
            elapsed = time.monotonic() - start
        task.cancel()
        return stream.end_reason, elapsed

    reason, elapsed = asyncio.run(scenario())
    assert reason == "device revoked"
    assert elapsed < 1.0
