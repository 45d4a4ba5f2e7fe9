"""Watch on any replica (issue 11, items 1 and 3): two brokers on one store and one PKI home.

- A camera attached to r1, an app watching through r2: r2 forwards to r1's internal listener over
  mutual TLS with its replica certificate; frames decrypt end to end, the per-frame identity check
  still runs on r1 (where the Attach stream is), end reasons reach the app unchanged, and the
  session's close is recorded once.
- r1 re-checks everything: a forged ForwardWatch with a stale epoch is refused
  (FAILED_PRECONDITION), and the holder's refusals reach the app with their status and message.
- Identities: replica certificates are refused on every public RPC, and app, device and operator
  certificates on the internal listener (PERMISSION_DENIED, I3).
- The replica certificate: issued on first start (0600 key), kept, renewed at 2/3 of its life.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker._proto.broker.internal.v1 import replica_pb2, replica_pb2_grpc
from broker._proto.broker.v1 import admin_pb2, app_pb2, device_pb2
from broker.client.app import AppClient
from broker.identity.spiffe import Kind, from_certificate
from broker.pemfile import read_certificates
from broker.pki.ca import load_authority
from broker.pki.replica import ReplicaFiles, ensure_replica_certificate
from broker.service.internal import (
    SERVICE,
    STALE_EPOCH,
    advertise_replica,
    build_internal_server,
    prepare_replica_certificate,
)
from broker.service.watching import OFFLINE
from broker.sessions.relay import FrameVerdict
from broker.store import CertStatus, SessionOutcome
from tests.conftest import start_broker, stop_broker
from tests.helpers import (
    PASSWORD,
    RunningBroker,
    Watcher,
    certificate,
    enroll_app,
    eventually,
    key_pem,
    mtls_channel,
    operator_channel_of,
    read_store,
    sdk_app,
    sdk_camera,
    session_audit,
    start_camera,
    stop_task,
)
from tests.pg import fresh_database, integration_backend


@dataclass
class Replica:
    broker: RunningBroker
    internal: str  # host:port of its internal listener
    own_server: grpc.aio.Server | None  # wired by this test (None: the broker wires its own)

    @property
    def rt(self) -> Any:
        return self.broker.server.runtime

    @property
    def files(self) -> ReplicaFiles:
        return ReplicaFiles.of(self.broker.config)


def _wire_internal(broker: RunningBroker) -> Replica:
    """The broker's internal listener: its own if server.py starts one, else built here exactly
    as server.py is meant to (certificate, listener, address in the store)."""
    if "internal" in broker.server.ports:
        return Replica(broker, f"127.0.0.1:{broker.server.ports['internal']}", None)

    async def wire() -> tuple[grpc.aio.Server, int]:
        rt = broker.server.runtime
        authority = load_authority(broker.config, broker.clock)
        await rt.run(
            prepare_replica_certificate, broker.config, authority, broker.clock, rt.devices
        )
        server, port = build_internal_server(rt, broker.server.effects, broker.config)
        await server.start()
        await rt.run(advertise_replica, rt, port)
        return server, port

    server, port = broker.on_loop(wire())
    return Replica(broker, f"127.0.0.1:{port}", server)


WATCH_WAIT = 3.0  # how long a Watch waits for a camera that is not attached (config)


@dataclass
class Fleet:
    r1: Replica
    r2: Replica


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """r1 and r2 on the same home (certs/, token keys) and the same store, one clock."""
    with ExitStack() as stack:
        store_url = ""
        if integration_backend() == "postgres":
            store_url = stack.enter_context(fresh_database())
        wait = WATCH_WAIT
        b1 = start_broker(tmp_path, store_url=store_url, replica_name="r1", watch_wait_seconds=wait)
        b2 = start_broker(
            tmp_path, b1.clock, store_url=store_url, replica_name="r2", watch_wait_seconds=wait
        )
        replicas = [_wire_internal(b1), _wire_internal(b2)]
        try:
            yield Fleet(*replicas)
        finally:
            for replica in replicas:
                if replica.own_server is not None:
                    replica.broker.on_loop(replica.own_server.stop(0))
                stop_broker(replica.broker)


def _replica_channel(target: str, broker: RunningBroker, files: ReplicaFiles) -> grpc.Channel:
    return mtls_channel(target, broker.pki.ca_pem, files.key.read_bytes(), files.chain.read_bytes())


async def _camera_on_r1_app_on_r2(fleet: Fleet, tmp_path: Path, device_id: str) -> Any:
    b1, b2 = fleet.r1.broker, fleet.r2.broker
    app = await sdk_app(b2, tmp_path / f"app-{device_id}", f"owner-{device_id}")
    with operator_channel_of(b1) as operator:
        camera = await sdk_camera(b1, operator, tmp_path / device_id, device_id, owner=app)
    task = await start_camera(camera)
    await eventually(lambda: fleet.r1.rt.presence.handle(device_id) is not None)
    handle = fleet.r1.rt.presence.handle(device_id)
    await eventually(lambda: handle.epoch > 0)
    return app, camera, task


def _forward_request(app: AppClient, ticket: Any, epoch: int) -> replica_pb2.ForwardWatchRequest:
    return replica_pb2.ForwardWatchRequest(
        session_id=ticket.session_id,
        token=ticket.token,
        app_ephemeral_public_key=ticket.ephemeral_public,
        app_spiffe_id=app.state.spiffe_id,
        cnf_thumbprint=app.thumbprint(),
        attach_epoch=epoch,
    )


# -- Watch through another replica ---------------------------------------------------------------


def test_watch_on_r2_is_forwarded_to_the_camera_on_r1_and_decrypts_end_to_end(fleet, tmp_path):
    device_id = "cam-fwd-1"

    async def scenario() -> None:
        app, _camera, task = await _camera_on_r1_app_on_r2(fleet, tmp_path, device_id)
        ticket = await app.open_session(device_id)
        watcher = await Watcher(app, ticket).start(5)
        watcher.assert_intact()
        # r1 holds the session on its relay; r2 relays the holder's events only.
        assert fleet.r1.rt.relay.get(ticket.session_id) is not None
        assert fleet.r2.rt.relay.get(ticket.session_id) is None

        # The per-frame identity check stays on r1: a frame claiming this session from another
        # camera's stream is refused there (alarm), and the viewer never sees it.
        async def misrouted() -> FrameVerdict:
            return fleet.r1.rt.relay.on_frame("cam-intruder", ticket.session_id, 10**6, b"x" * 64)

        assert fleet.r1.broker.on_loop(misrouted()) is FrameVerdict.MISROUTED
        count = len(watcher.frames)
        await watcher.wait_for(count + 5)
        watcher.assert_intact()

        # An end reason decided on r1 reaches the app through r2 unchanged.
        reason = "device revoked by operator (test)"

        async def end() -> bool:
            return fleet.r1.rt.relay.end(ticket.session_id, reason)

        assert fleet.r1.broker.on_loop(end())
        await eventually(lambda: watcher.end_reason is not None, timeout=5)
        assert watcher.end_reason == reason
        assert watcher.error is None
        await watcher.stop()

        # The close is recorded once, by the holder, with the reason and the traffic.
        closes = await eventually(
            lambda: [
                d
                for a, d in session_audit(fleet.r1.broker, ticket.session_id)
                if a == "session.closed"
            ]
        )
        await asyncio.sleep(0.3)
        closes = [
            d for a, d in session_audit(fleet.r1.broker, ticket.session_id) if a == "session.closed"
        ]
        assert len(closes) == 1, closes
        assert closes[0]["reason"] == reason and closes[0]["bytes"] > 0
        await stop_task(task)

    asyncio.run(scenario())


def test_holder_refusal_reaches_the_app_with_its_status_and_message(fleet, tmp_path):
    """A second Watch of a session already watched (through r2) is refused by r1, the holder;
    the app gets r1's status and message unchanged."""
    device_id = "cam-fwd-2"

    async def scenario() -> None:
        app, _camera, task = await _camera_on_r1_app_on_r2(fleet, tmp_path, device_id)
        ticket = await app.open_session(device_id)
        watcher = await Watcher(app, ticket).start(3)
        second = Watcher(app, ticket)
        second.task = asyncio.create_task(second._run())
        await eventually(lambda: second.error is not None or second.end_reason is not None)
        error = second.error
        assert isinstance(error, grpc.aio.AioRpcError), error
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert error.details() == "this session is already being watched; open a new session"
        watcher.assert_intact()
        await watcher.stop()
        await stop_task(task)

    asyncio.run(scenario())


def test_watch_on_r2_of_a_camera_attached_nowhere_is_unavailable_after_the_wait(fleet, tmp_path):
    """The Watch waits (bounded by watch_wait_seconds) for the camera, then fails UNAVAILABLE
    saying so; the session is closed "watcher left", no stream was started."""
    device_id = "cam-fwd-off"

    async def scenario() -> None:
        b1, b2 = fleet.r1.broker, fleet.r2.broker
        app = await sdk_app(b2, tmp_path / "app-off", "owner-off")
        with operator_channel_of(b1) as operator:
            await sdk_camera(b1, operator, tmp_path / device_id, device_id, owner=app)
        ticket = await app.open_session(device_id)
        watcher = Watcher(app, ticket)
        started = time.monotonic()
        watcher.task = asyncio.create_task(watcher._run())
        await eventually(lambda: watcher.error is not None, WATCH_WAIT + 5)
        waited = time.monotonic() - started
        assert isinstance(watcher.error, grpc.aio.AioRpcError)
        assert watcher.error.code() is grpc.StatusCode.UNAVAILABLE
        assert watcher.error.details() == f"{OFFLINE} (waited {WATCH_WAIT:.0f} s)"
        assert WATCH_WAIT - 0.1 <= waited < WATCH_WAIT + 3, waited
        record = read_store(b2, lambda tx: tx.get_session(ticket.session_id))
        assert (record.outcome, record.reason, record.bytes) == (
            SessionOutcome.ENDED,
            "watcher left",
            0,
        )

    asyncio.run(scenario())


def test_watch_waits_for_a_camera_that_attaches_and_costs_one_session(fleet, tmp_path):
    """A viewer whose camera is between replicas (here: not attached yet) is not refused at once:
    its Watch on r2 waits, the camera attaches to r1, and the same session streams. One watcher,
    one session (issue 12: no session per retry)."""
    device_id = "cam-fwd-late"

    async def scenario() -> None:
        b1, b2 = fleet.r1.broker, fleet.r2.broker
        app = await sdk_app(b2, tmp_path / "app-late", "owner-late")
        with operator_channel_of(b1) as operator:
            camera = await sdk_camera(b1, operator, tmp_path / device_id, device_id, owner=app)
        ticket = await app.open_session(device_id)
        watcher = Watcher(app, ticket)
        watcher.task = asyncio.create_task(watcher._run())
        await asyncio.sleep(0.6)  # the Watch is waiting: past the first look at the store
        assert watcher.error is None and not watcher.frames
        task = await start_camera(camera)
        await watcher.wait_for(3, WATCH_WAIT + 5)
        watcher.assert_intact()
        sessions = read_store(b1, lambda tx: [r for r in tx.open_sessions(device_id=device_id)])
        assert [r.session_id for r in sessions] == [ticket.session_id]
        await watcher.stop()
        await stop_task(task)

    asyncio.run(scenario())


def test_i7_a_share_revoked_while_the_watch_waits_is_refused_and_streams_nothing(fleet, tmp_path):
    """The guest's Watch on r2 waits for a camera that is not attached; the owner revokes the
    share meanwhile. The waiting Watch re-verifies the session at its next look and ends
    PERMISSION_DENIED; when the camera attaches afterwards, nothing is streamed to the guest."""
    device_id = "cam-fwd-revoked"

    async def scenario() -> None:
        b1, b2 = fleet.r1.broker, fleet.r2.broker
        owner = await sdk_app(b2, tmp_path / "app-rv-owner", "owner-rv")
        guest = await sdk_app(b2, tmp_path / "app-rv-guest", "guest-rv")
        with operator_channel_of(b1) as operator:
            camera = await sdk_camera(b1, operator, tmp_path / device_id, device_id, owner=owner)
        await owner.share(device_id, "guest-rv")
        ticket = await guest.open_session(device_id)
        watcher = Watcher(guest, ticket)
        watcher.task = asyncio.create_task(watcher._run())
        await asyncio.sleep(0.4)  # waiting for the camera
        assert watcher.error is None and watcher.end_reason is None
        revoked_at = time.monotonic()
        assert await owner.revoke_share(device_id, "guest-rv") == 1
        await eventually(lambda: watcher.error is not None, WATCH_WAIT)
        assert time.monotonic() - revoked_at < 1.5  # the next look at the store, at most 1 s
        assert isinstance(watcher.error, grpc.aio.AioRpcError)
        assert watcher.error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert watcher.error.details() == "no open session with that id"
        task = await start_camera(camera)
        await asyncio.sleep(0.5)
        assert watcher.frames == []
        record = read_store(b2, lambda tx: tx.get_session(ticket.session_id))
        assert (record.outcome, record.reason) == (SessionOutcome.ENDED, "share revoked")
        await stop_task(task)

    asyncio.run(scenario())


# -- the holder re-checks: a forged forward with a stale epoch ------------------------------------


def test_forged_forward_with_a_stale_epoch_is_refused_by_the_holder(fleet, tmp_path):
    device_id = "cam-fwd-epoch"

    async def scenario() -> None:
        app, _camera, task = await _camera_on_r1_app_on_r2(fleet, tmp_path, device_id)
        epoch = read_store(fleet.r1.broker, lambda tx: tx.get_attachment(device_id)).epoch
        assert epoch == fleet.r1.rt.presence.handle(device_id).epoch
        ticket = await app.open_session(device_id)

        def forge(attach_epoch: int) -> grpc.RpcError:
            channel = _replica_channel(fleet.r1.internal, fleet.r2.broker, fleet.r2.files)
            with channel:
                stub = replica_pb2_grpc.ReplicaServiceStub(channel)
                call = stub.ForwardWatch(_forward_request(app, ticket, attach_epoch), timeout=10)
                with pytest.raises(grpc.RpcError) as caught:
                    next(iter(call))
                return caught.value

        for stale in (epoch - 1, epoch + 1, 0):
            error = await asyncio.to_thread(forge, stale)
            assert error.code() is grpc.StatusCode.FAILED_PRECONDITION, stale
            assert error.details() == STALE_EPOCH
        # Nothing was relayed and the session is still usable through the normal path.
        assert fleet.r1.rt.relay.get(ticket.session_id) is None
        watcher = await Watcher(app, ticket).start(3)
        watcher.assert_intact()
        await watcher.stop()
        await stop_task(task)

    asyncio.run(scenario())


# -- identities: replica certificates only on the internal listener ------------------------------


def _raw_call(channel: grpc.Channel, path: str, method: Any) -> grpc.RpcError:
    """Call one RPC with an empty request body; the refusal it ends with."""
    ident = (lambda b: b, lambda b: b)
    with pytest.raises(grpc.RpcError) as caught:
        if method.client_streaming:
            call = channel.stream_stream(path, *ident)(iter([b""]), timeout=10)
            next(iter(call))
        elif method.server_streaming:
            next(iter(channel.unary_stream(path, *ident)(b"", timeout=10)))
        else:
            channel.unary_unary(path, *ident)(b"", timeout=10)
    return caught.value


@pytest.mark.parametrize("module", [app_pb2, admin_pb2, device_pb2], ids=["app", "admin", "device"])
def test_replica_certificate_is_refused_on_every_public_rpc(fleet, module):
    b1 = fleet.r1.broker
    (service,) = module.DESCRIPTOR.services_by_name.values()
    with _replica_channel(b1.main, b1, fleet.r2.files) as channel:
        for method in service.methods:
            error = _raw_call(channel, f"/{service.full_name}/{method.name}", method)
            assert error.code() is grpc.StatusCode.PERMISSION_DENIED, method.full_name
            assert error.details() == (
                f"this RPC is for {_kind_of(service.name).value} identities, not replica"
            )


def _kind_of(service: str) -> Kind:
    return {"AppService": Kind.APP, "AdminService": Kind.OPERATOR, "DeviceService": Kind.DEVICE}[
        service
    ]


def test_replica_certificate_calling_list_devices_is_permission_denied(fleet):
    b1 = fleet.r1.broker
    with _replica_channel(b1.main, b1, fleet.r2.files) as channel:
        from broker._proto.broker.v1 import app_pb2_grpc

        with pytest.raises(grpc.RpcError) as caught:
            app_pb2_grpc.AppServiceStub(channel).ListDevices(
                app_pb2.ListMyDevicesRequest(), timeout=10
            )
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_public_identities_are_refused_on_the_internal_listener(fleet, tmp_path):
    b1, b2 = fleet.r1.broker, fleet.r2.broker
    path = f"/{SERVICE.full_name}/ForwardWatch"
    (method,) = SERVICE.methods
    sdk_owner = asyncio.run(sdk_app(b2, tmp_path / "app-int", "owner-int"))
    app = enroll_app(b2, "owner-int", PASSWORD)
    files = b1.pki.files
    credentials = {
        "app": (key_pem(app.key), app.chain_pem.encode()),
        "operator": (files.operator_key.read_bytes(), files.operator_chain.read_bytes()),
    }
    for who, (key, chain) in credentials.items():
        with mtls_channel(fleet.r1.internal, b1.pki.ca_pem, key, chain) as channel:
            error = _raw_call(channel, path, method)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED, who
        assert error.details().startswith("this RPC is for replica identities"), who
    # And a replica may call it (it gets past the ACL to the checks behind it).
    with _replica_channel(fleet.r1.internal, b1, fleet.r2.files) as channel:
        stub = replica_pb2_grpc.ReplicaServiceStub(channel)
        request = replica_pb2.ForwardWatchRequest(
            session_id="nope", app_spiffe_id=sdk_owner.state.spiffe_id
        )
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(stub.ForwardWatch(request, timeout=10)))
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "no open session with that id"


def test_internal_listener_acl_admits_only_replicas(fleet):
    from broker.service.server import Binding, acl_table

    binding = Binding(
        SERVICE, lambda s, g: None, None, {m.name: Kind.REPLICA for m in SERVICE.methods}
    )
    assert set(acl_table([binding]).values()) == {Kind.REPLICA}
    assert [m.name for m in SERVICE.methods] == ["ForwardWatch"]


# -- the replica certificate -----------------------------------------------------------------------


def test_replica_certificate_is_recorded_kept_and_renewed_at_two_thirds(fleet):
    b1 = fleet.r1.broker
    files = fleet.r1.files
    assert stat.S_IMODE(os.stat(files.key).st_mode) == 0o600
    leaf = read_certificates(files.chain)[0]
    identity = from_certificate(leaf, b1.config.trust_domain)
    assert identity.kind is Kind.REPLICA and identity.replica_name == "r1"
    record = certificate(b1, f"{leaf.serial_number:x}")
    assert record.kind is Kind.REPLICA and record.status is CertStatus.ACTIVE

    authority = load_authority(b1.config, b1.clock)
    ensure_replica_certificate(b1.config, authority, b1.clock)
    assert read_certificates(files.chain)[0].serial_number == leaf.serial_number  # kept

    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    b1.clock.advance((life * 0.7).total_seconds())
    ensure_replica_certificate(b1.config, authority, b1.clock)
    renewed = read_certificates(files.chain)[0]
    assert renewed.serial_number != leaf.serial_number
    assert from_certificate(renewed, b1.config.trust_domain) == identity
    assert stat.S_IMODE(os.stat(files.key).st_mode) == 0o600
