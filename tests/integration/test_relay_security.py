"""The relay cannot show a stranger's camera (I5, I6): misrouting, forged session ids, several
watchers, slow watchers, streams nobody watches, and refusals at either end of the handshake.

Everything runs through the real broker over mutual TLS with the SDK's camera and app; faults are
injected into the broker's relay on its own event loop (the relay methods are looked up per message,
so patching the Relay instance changes what the running broker does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from broker._proto.broker.v1 import device_pb2
from broker.client.simcam import parse_payload
from broker.protocol.e2e import HandshakeError, raw_public
from broker.sessions.relay import Accepted, FrameVerdict
from broker.store import SessionOutcome
from tests.helpers import (
    audit_entries,
    eventually,
    sdk_app,
    sdk_camera,
    session_audit,
    session_row,
    start_camera,
    stop_task,
)

UNDECRYPTABLE = "does not decrypt under this session's key"


async def _drain(stream, sink: list[bytes]) -> None:
    """Read a stream to its end, keeping every plaintext it yields."""
    async for plaintext in stream.frames():
        sink.append(plaintext)


async def _take(frames, count: int, timeout: float = 5.0) -> list[tuple[str, str, int]]:
    """The next count plaintexts of an open frames() iterator, parsed by the oracle."""
    return [
        parse_payload(await asyncio.wait_for(frames.__anext__(), timeout)) for _ in range(count)
    ]


# -- I6: a broker routing bug leaks nothing -------------------------------------------------------


def test_i6_frames_misrouted_by_the_broker_decrypt_to_nothing(
    broker, operator_channel, tmp_path, monkeypatch
):
    """Fault injection: camera A's frames are pushed into camera B's watcher queue, bypassing the
    relay's identity check. B's watcher decrypts none of them and reports each as a mismatch."""
    relay = broker.server.runtime.relay

    async def scenario():
        owner = await sdk_app(broker, tmp_path / "owner", "owner-ab")
        cam_a = await sdk_camera(broker, operator_channel, tmp_path / "a", "cam-a", owner=owner)
        cam_b = await sdk_camera(
            broker, operator_channel, tmp_path / "b", "cam-b", owner=owner, fps=10
        )
        tasks = [await start_camera(cam_a), await start_camera(cam_b)]
        ticket_a = await owner.open_session("cam-a")
        ticket_b = await owner.open_session("cam-b")
        routed_to_b: list[int] = []
        original = relay.on_frame

        def corrupted(device_id, session_id, sequence, ciphertext):
            live_b = relay.get(ticket_b.session_id)
            if device_id == "cam-a" and live_b is not None and not live_b.ended:
                live_b.push(sequence, ciphertext)  # the bug: wrong queue, no identity check
                routed_to_b.append(sequence)
                return FrameVerdict.DELIVERED
            return original(device_id, session_id, sequence, ciphertext)

        monkeypatch.setattr(relay, "on_frame", corrupted)
        seen_by_a: list[bytes] = []
        async with owner.watch(ticket_a) as stream_a:
            drain_a = asyncio.create_task(_drain(stream_a, seen_by_a))
            # A is ahead of B (50 vs 10 fps, started first): its sequence numbers are fresh to B.
            await eventually(lambda: cam_a.stats.frames_sent >= 10)
            async with owner.watch(ticket_b) as stream_b:
                got = await _take(stream_b.frames(), 8)
        await stop_task(drain_a)
        for task in tasks:
            await stop_task(task)
        return ticket_b, got, stream_b, routed_to_b, seen_by_a

    ticket_b, got, stream_b, routed_to_b, seen_by_a = asyncio.run(scenario())
    assert len(routed_to_b) >= 10, "the fault was not exercised"
    # B's watcher: only B's own frames of its own session, in order...
    assert {(d, s) for d, s, _ in got} == {("cam-b", ticket_b.session_id)}
    assert [q for _, _, q in got] == sorted({q for _, _, q in got})
    # ...and every frame of A that reached it was refused, none decrypted.
    assert stream_b.rejected > 0
    assert UNDECRYPTABLE in stream_b.mismatches[0]
    assert all(UNDECRYPTABLE in m or "replayed or out of order" in m for m in stream_b.mismatches)
    # A's own watcher saw A's frames only until the fault diverted them, and nothing else.
    assert {parse_payload(p)[0] for p in seen_by_a} <= {"cam-a"}


def test_i6_frame_and_handshake_with_another_cameras_session_id_are_dropped_and_alarmed(
    broker, operator_channel, tmp_path
):
    """Camera A writes another camera's session id into a MediaFrame and a StreamAccept: the relay
    routes by the Attach stream's certificate identity, drops both and audits 'relay.alarm'."""

    async def scenario():
        owner = await sdk_app(broker, tmp_path / "owner", "owner-forge")
        rogue = await sdk_camera(broker, operator_channel, tmp_path / "a", "cam-rogue")
        cam_b = await sdk_camera(broker, operator_channel, tmp_path / "b", "cam-b", owner=owner)
        task = await start_camera(cam_b)
        ticket = await owner.open_session("cam-b")
        async with owner.watch(ticket) as stream, rogue.client.attach() as attach:
            frames = stream.frames()
            first = await _take(frames, 3)
            assert (await attach.receive(5)).WhichOneof("kind") == "accepted"
            await attach.send_raw_frame(ticket.session_id, 10**6, b"\x00" * 64)
            await attach._write(
                device_pb2.DeviceMessage(
                    stream_accept=device_pb2.StreamAccept(
                        session_id=ticket.session_id,
                        device_ephemeral_public_key=raw_public(x25519.X25519PrivateKey.generate()),
                        signature=b"forged",
                    )
                )
            )
            await eventually(lambda: len(audit_entries(broker, "relay.alarm")) >= 2)
            later = await _take(frames, 10)  # B keeps streaming, undisturbed
        await stop_task(task)
        return ticket, first + later, stream

    ticket, got, stream = asyncio.run(scenario())
    assert {(d, s) for d, s, _ in got} == {("cam-b", ticket.session_id)}
    assert stream.rejected == 0 and stream.mismatches == []
    entries = audit_entries(broker, "relay.alarm")
    assert [(e.subject, e.actor, e.detail) for e in entries] == [
        (
            "cam-rogue",
            "spiffe://camera.local/device/cam-rogue",
            {
                "session_id": ticket.session_id,
                "reason": "frame from a device that is not the session's",
            },
        ),
        (
            "cam-rogue",
            "spiffe://camera.local/device/cam-rogue",
            {
                "session_id": ticket.session_id,
                "reason": "handshake from a device that is not the session's",
            },
        ),
    ]


# -- several watchers, each with its own session and key -----------------------------------------


def test_i6_two_watchers_of_one_camera_each_decrypt_only_their_own_session(
    broker, operator_channel, tmp_path
):
    async def scenario():
        owner = await sdk_app(broker, tmp_path / "owner", "owner-two")
        viewer = await sdk_app(broker, tmp_path / "viewer", "viewer-two")
        cam = await sdk_camera(broker, operator_channel, tmp_path / "c", "cam-two", owner=owner)
        await owner.share("cam-two", "viewer-two")
        task = await start_camera(cam)
        t_owner = await owner.open_session("cam-two")
        t_viewer = await viewer.open_session("cam-two")
        async with owner.watch(t_owner) as s_owner, viewer.watch(t_viewer) as s_viewer:
            got_owner, got_viewer = await asyncio.gather(
                _take(s_owner.frames(), 15), _take(s_viewer.frames(), 15)
            )
            live = [broker.server.runtime.relay.get(t.session_id) for t in (t_owner, t_viewer)]
        await stop_task(task)
        users = (owner.state.user_id, viewer.state.user_id)
        return cam, (t_owner, s_owner, got_owner), (t_viewer, s_viewer, got_viewer), live, users

    cam, owner_side, viewer_side, live, users = asyncio.run(scenario())
    assert owner_side[0].session_id != viewer_side[0].session_id
    for ticket, stream, got in (owner_side, viewer_side):
        assert {(d, s) for d, s, _ in got} == {("cam-two", ticket.session_id)}
        assert stream.rejected == 0
    # Two handshakes, two keys: the camera's device ephemeral keys differ per session.
    assert owner_side[1].hello.device_ephemeral_public_key != (
        viewer_side[1].hello.device_ephemeral_public_key
    )
    assert cam.stats.streams_started == 2
    # The broker's view: two live sessions, each bound to its own user.
    assert [(x.user_id, x.device_id) for x in live] == [(u, "cam-two") for u in users]


# -- slow watchers lose the oldest frames, memory stays bounded ---------------------------------


def _small_window_channel(app):
    """The app's mTLS channel without BDP probing: the HTTP/2 window stays at 64 KiB, so a watcher
    that stops reading backs up into the broker's queue quickly."""

    def channel():
        creds = grpc.ssl_channel_credentials(
            app.bundle_path.read_bytes(), app.key_path.read_bytes(), app.chain_path.read_bytes()
        )
        return grpc.aio.secure_channel(
            app.endpoints.main, creds, options=[("grpc.http2.bdp_probe", 0)]
        )

    return channel


def test_i6_a_slow_watcher_loses_oldest_frames_and_the_queue_stays_bounded(
    broker, operator_channel, tmp_path
):
    relay = broker.server.runtime.relay

    async def queue_state(session_id):
        live = relay.get(session_id)
        return len(live.frames), live.frames.maxlen, live.dropped

    async def scenario():
        owner = await sdk_app(broker, tmp_path / "owner", "owner-slow")
        owner.channel = _small_window_channel(owner)
        cam = await sdk_camera(
            broker, operator_channel, tmp_path / "c", "cam-slow", owner=owner,
            fps=100, frame_bytes=16 * 1024,
        )  # fmt: skip
        task = await start_camera(cam)
        ticket = await owner.open_session("cam-slow")
        samples = []
        async with owner.watch(ticket) as stream:
            frames = stream.frames()
            got = await _take(frames, 1)
            for _ in range(30):  # the watcher does not read for ~1.5 s
                await asyncio.sleep(0.05)
                samples.append(broker.on_loop(queue_state(ticket.session_id)))
            while not stream.dropped:
                got += await _take(frames, 1)
            got += await _take(frames, 5)
        await stop_task(task)
        return ticket, got, stream, samples

    ticket, got, stream, samples = asyncio.run(scenario())
    maxlen = samples[0][1]
    assert maxlen == 64
    assert max(length for length, _, _ in samples) == maxlen  # it filled up...
    assert all(length <= maxlen for length, _, _ in samples)  # ...and never grew past it
    assert samples[-1][2] > 0 and stream.dropped > 0
    sequences = [q for _, _, q in got]
    assert {(d, s) for d, s, _ in got} == {("cam-slow", ticket.session_id)}
    assert sequences == sorted(set(sequences))  # strictly increasing...
    assert max(b - a for a, b in itertools.pairwise(sequences)) > 1  # ...with a gap
    assert stream.rejected == 0


# -- a camera streaming to nobody is stopped ------------------------------------------------------


def test_i6_a_frame_for_a_session_nobody_watches_gets_a_stop_stream(
    broker, operator_channel, tmp_path
):
    async def scenario():
        cam = await sdk_camera(broker, operator_channel, tmp_path / "c", "cam-lonely")
        received = []
        async with cam.client.attach() as attach:
            assert (await attach.receive(5)).WhichOneof("kind") == "accepted"
            await attach.send_raw_frame("s-nobody", 1, b"\x01" * 32)
            await attach.send_raw_frame("s-nobody", 2, b"\x02" * 32)  # no second StopStream
            await attach.heartbeat()
            while True:
                message = await attach.receive(5)
                received.append(message)
                if message.WhichOneof("kind") == "heartbeat_ack":
                    break
        return received

    received = asyncio.run(scenario())
    kinds = [m.WhichOneof("kind") for m in received]
    assert kinds == ["stop_stream", "heartbeat_ack"]
    assert received[0].stop_stream.session_id == "s-nobody"
    assert received[0].stop_stream.reason == "nobody is watching this session"
    assert audit_entries(broker, "relay.alarm") == []  # its own device: not an alarm


# -- I5: the camera refuses a StartStream that is not for it -------------------------------------


@pytest.mark.parametrize("fault", ["token for another device", "app key swapped"])
def test_i5_camera_refuses_a_start_stream_not_bound_to_it(
    broker, operator_channel, tmp_path, monkeypatch, fault
):
    relay = broker.server.runtime.relay

    async def scenario():
        owner = await sdk_app(broker, tmp_path / "owner", "owner-refuse")
        cam = await sdk_camera(broker, operator_channel, tmp_path / "a", "cam-a", owner=owner)
        await sdk_camera(broker, operator_channel, tmp_path / "b", "cam-b", owner=owner)
        task = await start_camera(cam)
        ticket = await owner.open_session("cam-a")
        if fault == "token for another device":
            # A broker bug hands camera A the token of a session on camera B.
            other = await owner.open_session("cam-b")
            original = relay.start
            monkeypatch.setattr(
                relay, "start", lambda live, token, eph: original(live, other.token, eph)
            )
            watched = ticket
        else:
            # A broker bug puts an app key other than the token's into the StartStream; the
            # broker's own check passed (the app sent its real key), so only the camera sees it.
            original = relay.start
            stranger = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
            monkeypatch.setattr(
                relay, "start", lambda live, token, eph: original(live, token, stranger)
            )
            watched = ticket
        plaintexts = []
        async with owner.watch(watched) as stream:
            async for plaintext in stream.frames():
                plaintexts.append(plaintext)
        row = await eventually(
            lambda: (
                (r := session_row(broker, ticket.session_id))
                and r.outcome is SessionOutcome.ENDED
                and r
            )
        )
        await stop_task(task)
        return ticket, cam, stream, plaintexts, row

    ticket, cam, stream, plaintexts, row = asyncio.run(scenario())
    expected = {
        "token for another device": "session token refused: Audience doesn't match",
        "app key swapped": "app key does not match the session token",
    }[fault]
    assert cam.stats.refusals == [expected]
    assert (cam.stats.streams_started, cam.stats.streams_refused) == (0, 1)
    assert stream.end_reason == expected
    assert stream.hello is None and stream.opener is None and plaintexts == []
    assert (row.outcome, row.reason, row.bytes) == (SessionOutcome.ENDED, expected, 0)
    assert [a for a, _ in session_audit(broker, ticket.session_id)] == [
        "session.opened",
        "session.closed",
    ]


# -- I6: the app refuses a hello that does not prove the camera it asked for ----------------------


@pytest.mark.parametrize("fault", ["chain of another camera", "signature", "device key swapped"])
def test_i6_app_refuses_a_hello_not_from_its_camera(
    broker, operator_channel, tmp_path, monkeypatch, fault
):
    relay = broker.server.runtime.relay

    async def scenario():
        owner = await sdk_app(broker, tmp_path / "owner", "owner-hello")
        cam = await sdk_camera(broker, operator_channel, tmp_path / "a", "cam-a", owner=owner)
        other = await sdk_camera(broker, operator_channel, tmp_path / "b", "cam-b")
        other_chain = other.client.chain_path.read_text()
        original = relay.on_accept

        def tampered(device_id, session_id, accepted):
            if fault == "chain of another camera":
                accepted = dataclasses.replace(accepted, device_chain_pem=other_chain)
            elif fault == "signature":
                sig = bytearray(accepted.signature)
                sig[-1] ^= 1
                accepted = dataclasses.replace(accepted, signature=bytes(sig))
            else:  # a man in the middle substitutes its own X25519 key
                mitm = raw_public(x25519.X25519PrivateKey.generate())
                accepted = dataclasses.replace(accepted, device_ephemeral=mitm)
            assert isinstance(accepted, Accepted)
            return original(device_id, session_id, accepted)

        monkeypatch.setattr(relay, "on_accept", tampered)
        task = await start_camera(cam)
        ticket = await owner.open_session("cam-a")
        plaintexts = []
        async with owner.watch(ticket) as stream:
            with pytest.raises(HandshakeError) as refused:
                async for plaintext in stream.frames():
                    plaintexts.append(plaintext)
        await stop_task(task)
        return stream, plaintexts, refused.value

    stream, plaintexts, error = asyncio.run(scenario())
    expected = {
        "chain of another camera": (
            "stream comes from spiffe://camera.local/device/cam-b, "
            "not spiffe://camera.local/device/cam-a"
        ),
        "signature": "the camera's handshake signature does not verify",
        "device key swapped": "the camera's handshake signature does not verify",
    }[fault]
    assert error.message == expected
    assert stream.hello is not None and stream.opener is None
    assert plaintexts == []


def test_i5_broker_refuses_a_watch_whose_app_key_is_not_the_tokens(
    broker, operator_channel, tmp_path
):
    """The WatchRequest's X25519 key must hash to the token's eph claim: PERMISSION_DENIED, and
    the camera is never asked to start."""

    async def scenario():
        owner = await sdk_app(broker, tmp_path / "owner", "owner-eph")
        cam = await sdk_camera(broker, operator_channel, tmp_path / "a", "cam-eph", owner=owner)
        task = await start_camera(cam)
        ticket = await owner.open_session("cam-eph")
        swapped = dataclasses.replace(ticket, ephemeral_key=x25519.X25519PrivateKey.generate())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async with owner.watch(swapped) as stream:
                async for _ in stream.frames():
                    pass
        await stop_task(task)
        return err.value, cam

    error, cam = asyncio.run(scenario())
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "app_ephemeral_public_key" in error.details()
    assert cam.stats.streams_started == 0 and cam.stats.streams_refused == 0
