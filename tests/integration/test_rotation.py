"""Hot rotation of the PKI on a live broker with a streaming fleet (issue 5).

A small fleet (three SimulatedCameras heartbeating every 0.1 s, one of them streaming to a live
watcher) stays attached while each rotation runs against the broker's home and the broker reloads
through ``AdminService.ReloadPki`` (what every ``make rotate-*`` target ends with). After each:

- no session ends (none of these rotations must end one), the watcher keeps decrypting frames;
- every camera reconnects (new channel, new TLS handshake, the current server certificate) and
  renews, and a new session on each renewed camera streams end to end;
- pushed trust bundles are acknowledged and counted by RotationStatus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from dataclasses import dataclass

import grpc
import jwt
import pytest
from cryptography import x509

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc
from broker.cli import _register_offline
from broker.client.app import AppClient
from broker.client.bundle import load_bundle
from broker.client.device import DeviceClient, Endpoints, TlsHandshakeFailed
from broker.client.simcam import SimulatedCamera
from broker.errors import FailedPrecondition, PermissionDenied
from broker.pemfile import read_certificates
from broker.pki.rotation import (
    cross_cert_path,
    retire_root,
    rotate_intermediate,
    rotate_root,
    rotate_server_cert,
    rotate_token_key,
)
from broker.store import CertStatus
from tests.helpers import (
    OperatorSnapshot,
    Watcher,
    birth_credentials,
    cert_rows,
    create_token,
    eventually,
    reload_pki,
    rotation_status,
    sdk_app,
    sdk_camera,
    served_certificate,
    start_camera,
    stop_task,
)

FLEET = ("cam-r1", "cam-r2", "cam-r3")


def ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def aki(cert: x509.Certificate) -> bytes | None:
    return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier


def leaf_of(client: DeviceClient) -> x509.Certificate:
    return read_certificates(client.chain_path)[0]


@dataclass
class Fleet:
    """Attached simulated cameras owned by one app user, the first one watched live."""

    broker: object
    owner: AppClient
    cameras: dict[str, SimulatedCamera]
    tasks: dict[str, asyncio.Task[None]]
    watcher: Watcher

    @classmethod
    async def up(cls, broker, operator_channel, tmp_path) -> Fleet:
        owner = await sdk_app(broker, tmp_path / "owner", "owner-rot")
        cameras = {}
        for device_id in FLEET:
            camera = await sdk_camera(
                broker, operator_channel, tmp_path / device_id, device_id, owner=owner, fps=50
            )
            camera.heartbeat_interval = 0.1
            cameras[device_id] = camera
        tasks = {d: await start_camera(c) for d, c in cameras.items()}
        watcher = await Watcher(owner, await owner.open_session(FLEET[0])).start()
        return cls(broker, owner, cameras, tasks, watcher)

    def bundle_versions(self) -> set[str]:
        return {load_bundle(c.client.trust_path).version for c in self.cameras.values()}

    async def acknowledged(self, version: str) -> None:
        """Every camera adopted the pushed bundle and the broker recorded its acknowledgement."""
        await eventually(lambda: self.bundle_versions() == {version})

        def counted() -> object:
            status = rotation_status(self.broker)
            return status.devices_with_current_bundle == len(FLEET) and status

        await eventually(counted)

    def assert_still_attached(self) -> None:
        for device_id, camera in self.cameras.items():
            assert camera.ended is None, (device_id, camera.ended)
            assert not self.tasks[device_id].done(), device_id
            assert camera.attached.is_set(), device_id

    async def assert_streams_survived(self) -> None:
        """The rotation ended nothing: the watcher keeps decrypting frames from its camera."""
        seen = len(self.watcher.frames)
        await self.watcher.wait_for(seen + 10)
        self.watcher.assert_intact()
        self.assert_still_attached()

    async def restart(self, device_id: str) -> None:
        """Reconnect: a new channel, so a new TLS handshake with whatever certs/ holds now."""
        await stop_task(self.tasks[device_id])
        self.tasks[device_id] = await start_camera(self.cameras[device_id])

    async def reconnect_renew_and_stream(self) -> None:
        """Each camera reconnects, renews from the current issuing CA, reconnects with the new
        certificate, and streams a new session end to end (the first camera to a new watcher
        that stays open)."""
        await self.watcher.stop()
        files = self.broker.pki.files
        issuing = read_certificates(files.issuing_cert)[0]
        server_leaf = read_certificates(files.server_chain)[0]
        for device_id, camera in self.cameras.items():
            client = camera.client
            await self.restart(device_id)
            served = await asyncio.to_thread(
                served_certificate,
                self.broker.main,
                client.bundle_path.read_bytes(),
                client.key_path.read_bytes(),
                client.chain_path.read_bytes(),
            )
            assert served.serial_number == server_leaf.serial_number
            old_serial = leaf_of(client).serial_number
            await client.renew()
            renewed = leaf_of(client)
            assert renewed.serial_number != old_serial
            assert aki(renewed) == ski(issuing), "renewed certificate not from the current CA"
            await self.restart(device_id)
            rows = {int(r.serial, 16): r for r in cert_rows(self.broker, device_id)}
            assert rows[renewed.serial_number].status is CertStatus.ACTIVE
            assert rows[old_serial].status is CertStatus.SUPERSEDED
            if device_id != FLEET[0]:
                watcher = await Watcher(self.owner, await self.owner.open_session(device_id)).start(
                    5
                )
                watcher.assert_intact()
                await watcher.stop()
        # The first camera gets a new long-lived watcher, for the next rotation to leave alone.
        self.watcher = await Watcher(self.owner, await self.owner.open_session(FLEET[0])).start()

    async def down(self) -> None:
        await self.watcher.stop()
        for task in self.tasks.values():
            await stop_task(task)


def retire(broker, version: str, *, force: bool = False):
    store = broker.store()
    try:
        return retire_root(broker.config, store, version, force=force)
    finally:
        store.close()


def run_with_fleet(broker, operator_channel, tmp_path, body) -> None:
    async def scenario() -> None:
        fleet = await Fleet.up(broker, operator_channel, tmp_path)
        try:
            await body(fleet)
        finally:
            await fleet.down()

    asyncio.run(scenario())


# -- server certificate ---------------------------------------------------------------------------


def test_rotate_server_cert_serves_the_new_certificate_and_ends_nothing(
    broker, operator_channel, tmp_path
):
    files = broker.pki.files

    async def body(fleet: Fleet) -> None:
        before = await asyncio.to_thread(served_certificate, broker.bootstrap, broker.pki.ca_pem)
        version = broker.server.runtime.trust_bundle.version
        report = await asyncio.to_thread(rotate_server_cert, broker.config, broker.clock)
        response = await asyncio.to_thread(reload_pki, broker)
        # The bundle (roots, issuing CAs, JWKS) did not change: nothing to push.
        assert (response.bundle_changed, response.cameras_notified) == (False, 0)
        assert response.trust_bundle_version == version

        new_leaf = read_certificates(files.server_chain)[0]
        assert f"{new_leaf.serial_number:x}" == report.details["serial"]
        assert new_leaf.serial_number != before.serial_number
        # Every listener serves it on the next handshake (main and factory want a client cert).
        client = fleet.cameras[FLEET[1]].client
        birth_key, birth_cert = birth_credentials(broker, "cam-born")
        for address, key, chain in (
            (broker.bootstrap, None, None),
            (broker.main, client.key_path.read_bytes(), client.chain_path.read_bytes()),
            (broker.factory, birth_key, birth_cert),
        ):
            served = await asyncio.to_thread(
                served_certificate, address, broker.pki.ca_pem, key, chain
            )
            assert served.serial_number == new_leaf.serial_number, address

        await fleet.assert_streams_survived()
        assert fleet.bundle_versions() == {version}
        # The operator's connection made before the rotation keeps working too.
        listed = await asyncio.to_thread(
            admin_pb2_grpc.AdminServiceStub(operator_channel).ListDevices,
            admin_pb2.ListDevicesRequest(),
            timeout=10,
        )
        assert sorted((d.device_id, d.online) for d in listed.devices) == [(d, True) for d in FLEET]
        await fleet.reconnect_renew_and_stream()

    run_with_fleet(broker, operator_channel, tmp_path, body)


# -- intermediate ---------------------------------------------------------------------------------


def test_rotate_intermediate_new_certs_from_new_ca_old_ones_stay_valid(
    broker, operator_channel, tmp_path
):
    files = broker.pki.files

    async def body(fleet: Fleet) -> None:
        old_issuing = read_certificates(files.issuing_cert)[0]
        old_version = broker.server.runtime.trust_bundle.version
        broker.clock.advance(1)
        report = await asyncio.to_thread(rotate_intermediate, broker.config, broker.clock)
        response = await asyncio.to_thread(reload_pki, broker)
        new_issuing = read_certificates(files.issuing_cert)[0]
        assert new_issuing.serial_number != old_issuing.serial_number
        assert response.bundle_changed and response.cameras_notified == len(FLEET)
        assert response.issuing_ca_serial == report.details["new_issuing_serial"]
        assert response.trust_bundle_version != old_version

        # Both issuing CAs are served in the bundle, the new one first.
        bundle = broker.server.runtime.trust_bundle
        served = x509.load_pem_x509_certificates(bundle.issuing_certificates_pem.encode())
        assert [c.serial_number for c in served] == [
            new_issuing.serial_number,
            old_issuing.serial_number,
        ]
        await fleet.acknowledged(bundle.version)
        status = rotation_status(broker)
        assert (status.active_devices, status.online_devices) == (3, 3)
        assert (status.devices_with_current_bundle, status.online_with_current_bundle) == (3, 3)
        assert list(status.lagging_device_ids) == [] and not status.root_rotation_pending

        await fleet.assert_streams_survived()
        # Certificates from the old issuing CA keep working until they renew: reconnect on them.
        for device_id in FLEET[1:]:
            assert aki(leaf_of(fleet.cameras[device_id].client)) == ski(old_issuing)
            await fleet.restart(device_id)
        await fleet.assert_streams_survived()
        await fleet.reconnect_renew_and_stream()
        rows = [r for d in FLEET for r in cert_rows(broker, d) if r.status is CertStatus.ACTIVE]
        assert {r.issuer_ski for r in rows} == {ski(new_issuing).hex()}

    run_with_fleet(broker, operator_channel, tmp_path, body)


# -- root, cross-signed, then retired -------------------------------------------------------------


def test_rotate_root_push_acknowledge_renew_then_retire(broker, operator_channel, tmp_path):
    files = broker.pki.files
    laggard_dir = tmp_path / "cam-lag"
    snapshot_dir = tmp_path / "cam-lag-old"

    async def body(fleet: Fleet) -> None:
        # A fourth camera, enrolled but offline during the rotation.
        laggard = DeviceClient(
            laggard_dir, Endpoints(broker.bootstrap, broker.main), broker.pki.ca_pem
        )
        await laggard.enroll(create_token(operator_channel, "cam-lag"))
        old_root = read_certificates(files.root_cert)[0]
        old_bundle = broker.pki.ca_pem

        operator = OperatorSnapshot.of(broker)  # read before the rotation, as the CLI does
        broker.clock.advance(1)
        report = await asyncio.to_thread(rotate_root, broker.config, broker.clock)
        _register_offline(broker.config, "test")  # the new operator cert, as the CLI does
        response = await asyncio.to_thread(reload_pki, broker, operator)
        new_root = read_certificates(files.root_cert)[0]
        assert report.details["pending_old_root"] == f"{old_root.serial_number:x}"
        assert response.bundle_changed and response.cameras_notified == len(FLEET)
        bundle = broker.server.runtime.trust_bundle
        roots = x509.load_pem_x509_certificates(bundle.ca_certificates_pem.encode())
        assert [r.serial_number for r in roots] == [new_root.serial_number, old_root.serial_number]
        cross = read_certificates(cross_cert_path(files))[0]
        assert cross.subject == new_root.subject and cross.issuer == old_root.subject
        cross.verify_directly_issued_by(old_root)

        await fleet.acknowledged(bundle.version)
        status = rotation_status(broker)
        assert status.root_rotation_pending and status.trust_bundle_version == bundle.version
        assert (status.active_devices, status.online_devices) == (4, 3)
        assert (status.devices_with_current_bundle, status.online_with_current_bundle) == (3, 3)
        assert list(status.lagging_device_ids) == ["cam-lag"]
        await fleet.assert_streams_survived()

        # The attached cameras got the new root; the laggard still pins only the old one, and the
        # broker's chain (leaf, new issuing CA, cross certificate) still verifies for it.
        assert laggard.bundle_path.read_bytes() == old_bundle
        served = await asyncio.to_thread(
            served_certificate,
            broker.main,
            old_bundle,
            laggard.key_path.read_bytes(),
            laggard.chain_path.read_bytes(),
        )
        assert served.serial_number == read_certificates(files.server_chain)[0].serial_number

        # Every active camera still holds a certificate under the old root: retiring is refused.
        with pytest.raises(FailedPrecondition) as refused:
            retire(broker, bundle.version)
        message = refused.value.message
        assert "1 active camera(s) lack the current trust bundle (cam-lag)" in message
        assert "4 still hold a certificate under the old root" in message
        assert "cam-lag, cam-r1, cam-r2, cam-r3" in message and "FORCE=1" in message
        assert cross_cert_path(files).exists()  # nothing was retired

        # The fleet reconnects, renews (new chain under the new root) and streams again.
        await fleet.reconnect_renew_and_stream()
        for camera in fleet.cameras.values():
            assert leaf_of(camera.client).issuer == read_certificates(files.issuing_cert)[0].subject

        with pytest.raises(FailedPrecondition) as refused:
            retire(broker, bundle.version)
        assert "(cam-lag) and 1 still hold a certificate under the old root (cam-lag)" in (
            refused.value.message
        )

        # The laggard comes online: keep a copy of its old state (old bundle, old certificate),
        # then let it attach, adopt the pushed bundle, acknowledge and renew.
        shutil.copytree(laggard_dir, snapshot_dir)
        late = SimulatedCamera(laggard, clock=broker.clock, heartbeat_interval=0.1)
        late_task = await start_camera(late)
        await eventually(lambda: load_bundle(laggard.trust_path).version == bundle.version)
        await eventually(lambda: not rotation_status(broker).lagging_device_ids)
        await laggard.renew()
        await stop_task(late_task)

        # Apps are not counted by retire-root: the owner's app renews (new chain, new root) first.
        await fleet.owner.renew()
        retired = retire(broker, bundle.version)
        assert retired.details["stale_bundle"] == [] and retired.details["old_chain_certs"] == []
        assert not cross_cert_path(files).exists()
        assert files.ca_bundle.read_bytes().count(b"BEGIN CERTIFICATE") == 1

        # The old operator certificate was under the old root: reload with the reissued one.
        response = await asyncio.to_thread(reload_pki, broker)
        assert response.bundle_changed and response.cameras_notified == len(FLEET)
        retired_bundle = broker.server.runtime.trust_bundle
        assert retired_bundle.ca_certificates_pem == files.ca_bundle.read_text()
        issuing = x509.load_pem_x509_certificates(retired_bundle.issuing_certificates_pem.encode())
        assert [c.issuer for c in issuing] == [new_root.subject]
        await fleet.acknowledged(retired_bundle.version)
        status = rotation_status(broker)
        assert not status.root_rotation_pending
        assert (status.active_devices, status.devices_with_current_bundle) == (4, 3)
        assert list(status.lagging_device_ids) == ["cam-lag"]  # offline since its renewal
        await fleet.assert_streams_survived()
        await fleet.reconnect_renew_and_stream()

        # A camera holding only the old bundle cannot verify the broker any more.
        stale = DeviceClient(snapshot_dir, Endpoints(broker.bootstrap, broker.main), b"")
        assert stale.bundle_path.read_bytes() == old_bundle
        with pytest.raises(TlsHandshakeFailed) as failed:
            await stale.renew()
        error = failed.value
        assert isinstance(error, grpc.aio.AioRpcError)  # callers catching gRPC errors still do
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert "CERTIFICATE_VERIFY_FAILED" in error.details()  # gRPC's own words, kept
        assert error.details().startswith(
            "TLS handshake failed: the broker's certificate does not chain to a root in this "
            "device's trust bundle (ca-bundle.pem); the bundle is out of date"
        )
        # With the new bundle but its certificate still under the retired root, the broker
        # refuses the handshake (gRPC says only "Socket closed"); the SDK says why.
        shutil.copy(files.ca_bundle, snapshot_dir / "ca-bundle.pem")
        camera = SimulatedCamera(stale, heartbeat_interval=0.1)
        await asyncio.wait_for(camera.run(), 10)
        assert isinstance(camera.ended, TlsHandshakeFailed), camera.ended
        assert camera.ended.code() is grpc.StatusCode.UNAVAILABLE
        assert "certificate does not chain to a root in its trust bundle" in camera.ended.details()
        assert "re-enroll" in camera.ended.reason
        assert len(cert_rows(broker, "cam-lag")) == 2  # the refused camera changed nothing

    run_with_fleet(broker, operator_channel, tmp_path, body)


def test_cancelling_a_write_does_not_cancel_the_attach_stream(broker, operator_channel, tmp_path):
    """A camera cancels the task that sends a stream's frames when the broker stops that stream
    (SimulatedCamera does). Cancelling a task inside grpc.aio's ``call.write`` cancels the whole
    RPC, which dropped the camera offline at random during the fleet tests above; the SDK's writes
    are shielded, so the Attach stream survives any number of cancelled writes."""

    async def scenario() -> list[int]:
        client = DeviceClient(
            tmp_path / "cam-w", Endpoints(broker.bootstrap, broker.main), broker.pki.ca_pem
        )
        await client.enroll(create_token(operator_channel, "cam-w"))
        acks = []
        async with client.attach(heartbeat_interval=3600) as session:
            while (await session.receive(timeout=5)).WhichOneof("kind") != "accepted":
                pass
            for _ in range(30):
                task = asyncio.create_task(session.heartbeat())
                await asyncio.sleep(0)  # let it enter call.write, then cancel it there
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await session.heartbeat()  # the stream still carries messages both ways
            while True:
                message = await session.receive(timeout=5)
                assert message is not None
                if message.WhichOneof("kind") == "heartbeat_ack":
                    acks.append(message.heartbeat_ack.sequence)
                    if message.heartbeat_ack.sequence == 31:
                        return acks

    acks = asyncio.run(scenario())
    assert acks[-1] == 31


def test_retire_root_without_pending_rotation_is_refused(broker):
    store = broker.store()
    try:
        with pytest.raises(FailedPrecondition, match="no root rotation is pending"):
            retire_root(broker.config, store, "x", force=True)
    finally:
        store.close()


def test_rotate_root_twice_without_retiring_is_refused(broker):
    broker.clock.advance(1)
    rotate_root(broker.config, broker.clock)
    before = sorted(p.name for p in broker.pki.files.root.iterdir())
    with pytest.raises(FailedPrecondition, match="already pending"):
        rotate_root(broker.config, broker.clock)
    assert sorted(p.name for p in broker.pki.files.root.iterdir()) == before


# -- session-token signing key --------------------------------------------------------------------


def test_rotate_token_key_new_kid_for_new_sessions_old_tokens_valid_until_expiry(
    broker, operator_channel, tmp_path
):
    files = broker.pki.files
    keys_json = files.root / "token-keys" / "keys.json"

    async def body(fleet: Fleet) -> None:
        old_kid = json.loads(keys_json.read_text())["active"]
        # A session opened (token minted) before the rotation, watched only after it.
        early = await fleet.owner.open_session(FLEET[1])
        assert jwt.get_unverified_header(early.token)["kid"] == old_kid

        report = await asyncio.to_thread(rotate_token_key, broker.config, broker.clock)
        new_kid = report.details["new_kid"]
        assert report.details["previous_kid"] == old_kid and new_kid != old_kid
        response = await asyncio.to_thread(reload_pki, broker)
        assert response.bundle_changed and response.cameras_notified == len(FLEET)
        bundle = broker.server.runtime.trust_bundle
        assert {k["kid"] for k in json.loads(bundle.jwks_json)["keys"]} == {old_kid, new_kid}
        await fleet.acknowledged(bundle.version)
        for camera in fleet.cameras.values():  # the JWKS each camera verifies tokens with
            jwks = json.loads(load_bundle(camera.client.trust_path).jwks_json)
            assert {k["kid"] for k in jwks["keys"]} == {old_kid, new_kid}
        await fleet.assert_streams_survived()

        # New sessions are signed with the new key, and the cameras' own verifiers accept them.
        fresh = await fleet.owner.open_session(FLEET[2])
        assert jwt.get_unverified_header(fresh.token)["kid"] == new_kid
        camera = fleet.cameras[FLEET[2]]
        started = camera.stats.streams_started
        watcher = await Watcher(fleet.owner, fresh).start(5)
        watcher.assert_intact()
        assert camera.stats.streams_started == started + 1 and camera.stats.refusals == []
        await watcher.stop()

        # A token from the old key still verifies (broker and camera) until it expires.
        camera = fleet.cameras[FLEET[1]]
        watcher = await Watcher(fleet.owner, early).start(5)
        watcher.assert_intact()
        assert camera.stats.refusals == []
        await watcher.stop()
        await fleet.reconnect_renew_and_stream()

        verifier = camera.client.token_verifier(broker.clock)
        assert verifier.verify(early.token).session_id == early.session_id
        broker.clock.advance(early.expires_at - broker.clock.now().timestamp() + 1)
        with pytest.raises(PermissionDenied, match="expired"):
            verifier.verify(early.token)

    run_with_fleet(broker, operator_channel, tmp_path, body)

    # Once every token the old key signed has expired, the next rotation drops it from the JWKS.
    old_kid = json.loads(keys_json.read_text())["published"][0]["kid"]
    broker.clock.advance(broker.config.session_token_ttl_seconds + 61)
    report = rotate_token_key(broker.config, broker.clock)
    assert old_kid in report.details["pruned"]
    published = [k["kid"] for k in json.loads(keys_json.read_text())["published"]]
    assert old_kid not in published and len(published) == 2
    assert not (files.root / "token-keys" / f"{old_kid}.key").exists()


def test_app_verifies_cameras_of_both_issuing_cas_rotated_in_the_same_second(
    broker, operator_channel, tmp_path
):
    """Rotated within the same second as `ca init`: the names still differ (they carry a key tag
    besides the time), and an app holding both CAs verifies cameras of each. verify_device_chain
    also tries every CA with a matching name, so even colliding names would not break it."""
    files = broker.pki.files

    async def scenario() -> None:
        owner = await sdk_app(broker, tmp_path / "owner", "owner-same")
        old_cam = await sdk_camera(
            broker, operator_channel, tmp_path / "c1", "cam-old", owner=owner
        )
        old_issuing = read_certificates(files.issuing_cert)[0]
        rotate_intermediate(broker.config, broker.clock)  # the FakeClock has not moved
        await asyncio.to_thread(reload_pki, broker)
        new_issuing = read_certificates(files.issuing_cert)[0]
        assert new_issuing.subject != old_issuing.subject  # the key tag keeps names apart
        new_cam = await sdk_camera(
            broker, operator_channel, tmp_path / "c2", "cam-new", owner=owner
        )
        assert aki(leaf_of(new_cam.client)) == ski(new_issuing)
        assert aki(leaf_of(old_cam.client)) == ski(old_issuing)
        for camera in (new_cam, old_cam):  # the first watch refreshes the app's bundle
            task = await start_camera(camera)
            ticket = await owner.open_session(camera.client.state.device_id)
            watcher = await Watcher(owner, ticket).start(3)
            watcher.assert_intact()
            await watcher.stop()
            await stop_task(task)
        issuing = load_bundle(owner.trust_path).issuing_cas()
        assert [c.serial_number for c in issuing] == [
            new_issuing.serial_number,
            old_issuing.serial_number,
        ]

    asyncio.run(scenario())
