"""A PKI reload applied on the event loop (issue 9): typed outcomes, no asyncio from the core thread.

- An idle attached camera gets the TrustBundleUpdate within 1 s of a token-key rotation: the push
  is queued on the event loop, so nothing waits for unrelated traffic to wake the stream.
- After rotate-root, a camera renews over its open Attach stream; once retire-root drops the old
  root, the reload ends that stream (UNAVAILABLE, "reconnect with your current certificate")
  because its certificate no longer chains to a trusted issuing CA. Reconnected with the renewed
  certificate, a new session's hello verifies in the app SDK (I6).
"""

from __future__ import annotations

import asyncio
import time

import grpc

from broker.cli import _register_offline
from broker.client.bundle import load_bundle
from broker.pemfile import read_certificates
from broker.pki.rotation import retire_root, rotate_root, rotate_token_key
from broker.service.effects import STALE_CERTIFICATE
from tests.helpers import (
    OperatorSnapshot,
    Watcher,
    eventually,
    reload_pki,
    sdk_app,
    sdk_camera,
    start_camera,
    stop_task,
)


def test_idle_camera_gets_the_bundle_update_within_one_second_of_a_token_key_rotation(
    broker, operator_channel, tmp_path
):
    async def scenario() -> None:
        camera = await sdk_camera(broker, operator_channel, tmp_path / "cam", "cam-idle")
        client = camera.client
        # A raw Attach session with heartbeats far apart: only the broker's push can wake it.
        async with client.attach(heartbeat_interval=3600) as session:
            first = await session.receive(timeout=5)
            assert first is not None and first.WhichOneof("kind") == "accepted"
            started = time.monotonic()
            await asyncio.to_thread(rotate_token_key, broker.config, broker.clock)
            response = await asyncio.to_thread(reload_pki, broker)
            assert response.bundle_changed and response.cameras_notified == 1
            message = await session.receive(timeout=1.0)
            elapsed = time.monotonic() - started
            assert message is not None, "no TrustBundleUpdate within 1 s"
            assert message.WhichOneof("kind") == "trust_bundle_update"
            pushed = message.trust_bundle_update.trust_bundle
            assert pushed.version == broker.server.runtime.trust_bundle.version
            assert elapsed < 1.0, elapsed

    asyncio.run(scenario())


def test_retired_root_ends_streams_on_old_certificates_and_renewed_camera_streams_again(
    broker, operator_channel, tmp_path
):
    files = broker.pki.files

    async def scenario() -> None:
        owner = await sdk_app(broker, tmp_path / "owner", "owner-retire")
        camera = await sdk_camera(
            broker, operator_channel, tmp_path / "cam", "cam-retire", owner=owner, fps=50
        )
        camera.heartbeat_interval = 0.1
        task = await start_camera(camera)

        operator = OperatorSnapshot.of(broker)
        broker.clock.advance(1)
        await asyncio.to_thread(rotate_root, broker.config, broker.clock)
        _register_offline(broker.config, "test")
        await asyncio.to_thread(reload_pki, broker, operator)
        bundle = broker.server.runtime.trust_bundle
        await eventually(lambda: load_bundle(camera.client.trust_path).version == bundle.version)

        # Renew over the open stream: the stream itself still runs on the old-root certificate.
        await camera.client.renew()
        await owner.renew()
        new_issuing = read_certificates(files.issuing_cert)[0]
        assert read_certificates(camera.client.chain_path)[0].issuer == new_issuing.subject
        assert not task.done()

        store = broker.store()
        try:
            retire_root(broker.config, store, bundle.version, force=False)
        finally:
            store.close()
        await asyncio.to_thread(reload_pki, broker)

        # The stream opened with the retired chain ends, telling the camera what to do.
        await asyncio.wait_for(task, 5)
        ended = camera.ended
        assert isinstance(ended, grpc.aio.AioRpcError)
        assert ended.code() is grpc.StatusCode.UNAVAILABLE
        assert ended.details() == STALE_CERTIFICATE
        assert "reconnect with your current certificate" in ended.details()

        # Reconnected on its renewed certificate, the camera streams to a verifying app again.
        camera.ended = None
        task = await start_camera(camera)
        watcher = await Watcher(owner, await owner.open_session("cam-retire")).start(5)
        watcher.assert_intact()
        assert watcher.frames, "no frame decrypted after reconnecting"
        await watcher.stop()
        await stop_task(task)

    asyncio.run(scenario())
