"""Ending live sessions (I7), restarts, and the owner's access log (I12), through the real broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from broker.client.simcam import parse_payload
from broker.store import SessionOutcome
from tests.conftest import start_broker, stop_broker
from tests.helpers import (
    audit_entries,
    endpoints_of,
    eventually,
    operator_channel_of,
    sdk_app,
    sdk_camera,
    session_audit,
    session_row,
    start_camera,
    stop_task,
)

TTL = 300  # Config.session_token_ttl_seconds default

# trigger → (reason in the end event, reason stored on the session row, audit action naming it)
TEARDOWNS = {
    "device revoked": ("device revoked", "device revoked", "device.revoked"),
    "sign out": ("app instance signed out", "signed out", "app.revoked"),
    "share revoked": ("share revoked", "share revoked", "share.revoked"),
    "ownership reset": ("ownership reset", "ownership reset", "device.ownership_reset"),
    "token expired": ("session token expired", "session token expired", None),
}


async def _first_frames(stream, count: int = 3) -> tuple[object, list[bytes]]:
    frames = stream.frames()
    got = [await asyncio.wait_for(frames.__anext__(), 5) for _ in range(count)]
    return frames, got


@pytest.mark.parametrize("trigger", list(TEARDOWNS))
def test_i7_teardown_ends_the_live_stream_within_one_second_with_its_reason(
    broker, operator_channel, tmp_path, trigger
):
    end_reason, row_reason, action = TEARDOWNS[trigger]

    async def fire(owner, viewer, cam):
        if trigger == "device revoked":
            await asyncio.to_thread(
                admin_pb2_grpc.AdminServiceStub(operator_channel).RevokeDevice,
                admin_pb2.RevokeDeviceRequest(device_id="cam-td", reason="stolen"),
                timeout=10,
            )
        elif trigger == "sign out":
            assert await viewer.sign_out() == 1
        elif trigger == "share revoked":
            assert await owner.revoke_share("cam-td", "viewer-td") == 1
        elif trigger == "ownership reset":
            async with cam.client.channel() as channel:
                response = await device_pb2_grpc.DeviceServiceStub(channel).ResetOwnership(
                    device_pb2.ResetOwnershipRequest(), timeout=10
                )
            assert response.sessions_ended == 1
        else:
            broker.clock.advance(TTL + 1)  # the relay's sweeper runs every 0.2 s

    async def scenario():
        owner = await sdk_app(broker, tmp_path / "owner", "owner-td")
        viewer = await sdk_app(broker, tmp_path / "viewer", "viewer-td")
        cam = await sdk_camera(broker, operator_channel, tmp_path / "cam", "cam-td", owner=owner)
        await owner.share("cam-td", "viewer-td")
        task = await start_camera(cam)
        ticket = await viewer.open_session("cam-td")  # the viewer watches: every trigger hits it
        after = []
        async with viewer.watch(ticket) as stream:
            frames, first = await _first_frames(stream)
            start = time.monotonic()
            await fire(owner, viewer, cam)
            async for plaintext in frames:
                after.append(plaintext)
            elapsed = time.monotonic() - start
        row = await eventually(
            lambda: (r := session_row(broker, ticket.session_id)) and r.bytes and r
        )  # bytes are stored when the Watch handler finishes
        if trigger != "device revoked":  # a revoked camera's Attach stream is closed instead
            await eventually(lambda: cam.stats.streams_stopped == 1)
        await stop_task(task)
        return viewer.state, ticket, stream, first + after, elapsed, row

    state, ticket, stream, plaintexts, elapsed, row = asyncio.run(scenario())
    assert elapsed < 1.0
    assert stream.end_reason == end_reason
    assert {parse_payload(p)[:2] for p in plaintexts} == {("cam-td", ticket.session_id)}
    assert (row.device_id, row.user_id, row.app_id) == ("cam-td", state.user_id, state.app_id)
    assert (row.outcome, row.reason) == (SessionOutcome.ENDED, row_reason)
    assert row.bytes > 0 and row.ended_at
    trail = session_audit(broker, ticket.session_id)
    if action is None:  # expiry is noticed by the relay alone: the close records it
        assert [a for a, _ in trail] == ["session.opened", "session.closed"]
    else:  # the store ended it in the trigger's transaction, the relay's close follows
        assert [a for a, _ in trail] == ["session.opened", "session.ended", "session.closed"]
        assert trail[1][1]["reason"] == row_reason
        cause = [e for e in audit_entries(broker, action)]
        assert len(cause) == 1 and cause[0].detail["sessions_ended"] == [ticket.session_id]
    assert trail[-1][1]["reason"] == end_reason
    assert trail[-1][1]["bytes"] == row.bytes


# -- a restart ends every session; nothing survives with a different binding ---------------------


@pytest.fixture
def restartable(tmp_path: Path):
    """A broker the test may restart: holder['broker'] is whichever instance is current."""
    holder = {"broker": start_broker(tmp_path / "home")}
    yield holder
    stop_broker(holder["broker"])


def restart(holder: dict) -> object:
    """Stop the broker and start a new one on the same home (same PKI and store, new ports)."""
    old = holder["broker"]
    stop_broker(old)
    new = start_broker(old.config.home, clock=old.clock)
    holder["broker"] = new
    return new


def test_i7_broker_restart_ends_all_sessions_and_old_tokens_are_dead(restartable, tmp_path):
    async def scenario():
        first = restartable["broker"]
        with operator_channel_of(first) as operator:
            owner = await sdk_app(first, tmp_path / "owner", "owner-rs")
            cam = await sdk_camera(first, operator, tmp_path / "cam", "cam-rs", owner=owner)
        task = await start_camera(cam)
        old = await owner.open_session("cam-rs")
        idle = await owner.open_session("cam-rs")  # opened, never watched
        async with owner.watch(old) as stream:
            frames, before = await _first_frames(stream)
            second = await asyncio.to_thread(restart, restartable)
            leftover = [p async for p in frames]  # ends with the stopping broker's end event
        await stop_task(task)
        rows = {t.session_id: session_row(second, t.session_id) for t in (old, idle)}
        # Clients follow the broker to its new ports.
        cam.client.endpoints = owner.endpoints = endpoints_of(second)
        task = await start_camera(cam)
        async with owner.watch(old) as stale:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stale.frames():
                    pass
        fresh = await owner.open_session("cam-rs")
        async with owner.watch(fresh) as stream2:
            _, after = await _first_frames(stream2, 5)
        await stop_task(task)
        return (
            second, owner.state, old, idle, fresh, before + leftover, stream.end_reason, rows,
            refused.value, after,
        )  # fmt: skip

    second, state, old, idle, fresh, before, end_reason, rows, refused, after = asyncio.run(
        scenario()
    )
    assert {parse_payload(p)[:2] for p in before} == {("cam-rs", old.session_id)}
    assert end_reason == "broker restarted"
    for sid in (old.session_id, idle.session_id):
        row = rows[sid]
        assert row is not None
        assert (row.device_id, row.user_id, row.app_id) == ("cam-rs", state.user_id, state.app_id)
        assert (row.outcome, row.reason) == (SessionOutcome.ENDED, "broker restarted")
        assert row.ended_at
        assert (row.bytes > 0) is (sid == old.session_id)
    # The live one was closed by the stopping broker (with its traffic), the idle one by the new
    # broker's start-up sweep; both with the same reason.
    assert [(a, d["reason"]) for a, d in session_audit(second, old.session_id)[1:]] == [
        ("session.closed", "broker restarted")
    ]
    assert [(a, d["reason"]) for a, d in session_audit(second, idle.session_id)[1:]] == [
        ("session.ended", "broker restarted")
    ]
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert session_row(second, old.session_id) == rows[old.session_id]  # the refusal wrote nothing
    assert fresh.session_id not in (old.session_id, idle.session_id)
    assert {parse_payload(p)[:2] for p in after} == {("cam-rs", fresh.session_id)}


# -- ListAccess: the owner's view of every session on the camera ---------------------------------


def test_i12_list_access_shows_opened_denied_and_ended_sessions_to_the_owner_only(
    broker, operator_channel, tmp_path
):
    async def scenario():
        owner = await sdk_app(broker, tmp_path / "owner", "owner-la")
        viewer = await sdk_app(broker, tmp_path / "viewer", "viewer-la")
        stranger = await sdk_app(broker, tmp_path / "stranger", "stranger-la")
        cam = await sdk_camera(broker, operator_channel, tmp_path / "cam", "cam-la", owner=owner)
        await owner.share("cam-la", "viewer-la")
        task = await start_camera(cam)
        watched = await owner.open_session("cam-la")
        async with owner.watch(watched) as stream:
            await _first_frames(stream, 5)
        idle = await viewer.open_session("cam-la")
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stranger.open_session("cam-la")
        await eventually(
            lambda: (
                (r := session_row(broker, watched.session_id)) is not None
                and r.outcome is SessionOutcome.ENDED
            )
        )
        entries = await owner.list_access("cam-la")
        refusals = {}
        for who, app, device_id in (
            ("viewer", viewer, "cam-la"),
            ("stranger", stranger, "cam-la"),
            ("owner, unknown device", owner, "cam-nope"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await app.list_access(device_id)
            refusals[who] = info.value.code()
        await stop_task(task)
        apps = {"owner": owner.state, "viewer": viewer.state, "stranger": stranger.state}
        return entries, apps, (watched, idle), denied.value, refusals

    entries, apps, (watched, idle), denied, refusals = asyncio.run(scenario())
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refusals == dict.fromkeys(
        ("viewer", "stranger", "owner, unknown device"), grpc.StatusCode.PERMISSION_DENIED
    )
    by_outcome = {e.outcome: e for e in entries}
    assert len(entries) == 3 and set(by_outcome) == {"ended", "opened", "denied"}
    ended, opened, refused = by_outcome["ended"], by_outcome["opened"], by_outcome["denied"]
    for entry, who in ((ended, "owner"), (opened, "viewer"), (refused, "stranger")):
        assert (entry.user_id, entry.app_id) == (apps[who].user_id, apps[who].app_id)
        assert (entry.username, entry.app_label) == (f"{who}-la", "phone")
        assert entry.started_at > 0
    assert ended.session_id == watched.session_id
    assert ended.ended_at >= ended.started_at and ended.bytes > 0
    assert ended.reason == "watcher left"
    assert opened.session_id == idle.session_id
    assert (opened.ended_at, opened.bytes, opened.reason) == (0, 0, "")
    assert refused.session_id not in (watched.session_id, idle.session_id)
    assert refused.bytes == 0 and refused.reason == denied.details()
    refused_row = session_row(broker, refused.session_id)
    assert refused_row is not None
    assert (refused_row.outcome, refused_row.reason) == (SessionOutcome.DENIED, denied.details())
