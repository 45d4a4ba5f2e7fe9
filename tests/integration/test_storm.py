"""Reconnect storm (I6): the 2024 incident was a cache mixing device/user mappings when every camera
reconnected at once. Here every camera has a live watcher, the broker restarts, and all cameras
re-attach while all apps re-open sessions at the same time; an oracle checks every delivered frame's
plaintext against the store's sessions table. bench/storm.py runs the same story at 10,000 cameras.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import pytest

from broker.client.simcam import parse_payload
from tests.conftest import start_broker, stop_broker
from tests.helpers import (
    RunningBroker,
    endpoints_of,
    operator_channel_of,
    sdk_app,
    sdk_camera,
    session_row,
    start_camera,
    stop_task,
)

CAMERAS = 20
FRAMES = 5


@pytest.fixture
def storm_home(tmp_path: Path):
    holder = {"broker": start_broker(tmp_path / "home")}
    yield holder
    stop_broker(holder["broker"])


def bound_to(broker: RunningBroker, session_id: str) -> tuple[str, str, str]:
    """(device_id, user_id, app_id) of a session, as the store of record has it."""
    record = session_row(broker, session_id)
    assert record is not None, f"no session {session_id}"
    return record.device_id, record.user_id, record.app_id


async def watch_until_frames(app, device_id: str) -> tuple[object, list[bytes]]:
    """Open a session and watch it until FRAMES frames decrypt; re-open while the camera is not
    back yet (UNAVAILABLE: offline, or the stream ended before any frame)."""
    for _ in range(200):
        ticket = await app.open_session(device_id)
        try:
            async with app.watch(ticket) as stream:
                got = []
                async for plaintext in stream.frames():
                    got.append(plaintext)
                    if len(got) == FRAMES:
                        assert stream.rejected == 0, stream.mismatches
                        return ticket, got
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        await asyncio.sleep(0.05)
    raise AssertionError(f"{device_id}: no frames after 200 attempts")


def test_i6_reconnect_storm_delivers_every_frame_to_the_right_watcher_only(storm_home, tmp_path):
    async def scenario():
        first = storm_home["broker"]
        ids = [f"cam-storm-{i:02d}" for i in range(CAMERAS)]
        owners = await asyncio.gather(
            *(sdk_app(first, tmp_path / f"owner-{d}", f"owner-{d}") for d in ids)
        )
        with operator_channel_of(first) as operator:
            cameras = [
                await sdk_camera(first, operator, tmp_path / d, d, owner=o, fps=20, frame_bytes=128)
                for d, o in zip(ids, owners, strict=True)
            ]
        tasks = await asyncio.gather(*(start_camera(c) for c in cameras))
        # Every camera has a live watcher when the broker goes down.
        async with AsyncExitStack() as live:
            streams = []
            for owner, device_id in zip(owners, ids, strict=True):
                ticket = await owner.open_session(device_id)
                streams.append(await live.enter_async_context(owner.watch(ticket)))
            for stream in streams:
                await stream.frames().__anext__()
            second = await asyncio.to_thread(restart, storm_home)
        for task in tasks:
            await stop_task(task)
        for client in [c.client for c in cameras] + list(owners):
            client.endpoints = endpoints_of(second)
        # The storm: every camera re-attaches and every app re-opens, all at once.
        start = time.monotonic()
        tasks = [asyncio.create_task(c.run()) for c in cameras]
        results = await asyncio.gather(
            *(watch_until_frames(o, d) for o, d in zip(owners, ids, strict=True))
        )
        elapsed = time.monotonic() - start
        attached = sum(c.attached.is_set() for c in cameras)
        for task in tasks:
            await stop_task(task)
        users = [o.state for o in owners]
        return second, ids, users, results, elapsed, attached

    second, ids, users, results, elapsed, attached = asyncio.run(scenario())
    mismatches = []
    for device_id, user, (ticket, plaintexts) in zip(ids, users, results, strict=True):
        bound = bound_to(second, ticket.session_id)  # the store of record's binding of it
        if bound != (device_id, user.user_id, user.app_id):
            mismatches.append((ticket.session_id, bound))
        for plaintext in plaintexts:
            sender, session_id, _ = parse_payload(plaintext)
            if (sender, session_id) != (bound[0], ticket.session_id):
                mismatches.append((ticket.session_id, sender, session_id))
    assert mismatches == []
    assert all(len(p) == FRAMES for _, p in results)  # every watcher got frames
    assert attached == CAMERAS
    assert elapsed < 15


def restart(holder: dict) -> object:
    old = holder["broker"]
    stop_broker(old)
    new = start_broker(old.config.home, clock=old.clock)
    holder["broker"] = new
    return new
