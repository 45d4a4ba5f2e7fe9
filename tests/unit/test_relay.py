"""broker.sessions.relay on its own event loop, with a real Presence whose Attach handles stand in for the
cameras (their outboxes are what the broker would write down each Attach stream)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from broker.clock import FakeClock, unix
from broker.errors import FailedPrecondition
from broker.sessions.presence import AttachHandle, Presence
from broker.sessions.relay import (
    Accepted,
    FrameVerdict,
    Rejected,
    Relay,
    StartStreamCommand,
    StopStreamCommand,
)


class Harness:
    """A relay, its presence registry, its clock and every alarm it raised."""

    def __init__(self, queue_frames: int = 64) -> None:
        self.clock = FakeClock()
        self.presence = Presence()
        self.alarms: list[tuple[str, str, str]] = []
        self.relay = Relay(
            self.presence,
            self.clock,
            lambda *alarm: self.alarms.append(alarm),
            queue_frames=queue_frames,
        )

    def attach(self, device_id: str) -> AttachHandle:
        return self.presence.attach(device_id, serial=f"serial-{device_id}")

    def open(self, session_id: str, device_id: str, ttl: int = 300, user: str = "u-1") -> Any:
        expires = unix(self.clock.now()) + ttl
        return self.relay.open(session_id, device_id, user, f"a-{user}", expires)


def sent(handle: AttachHandle) -> list[object]:
    """Everything queued for the camera so far."""
    items = []
    while not handle.outbox.empty():
        items.append(handle.outbox.get_nowait())
    return items


def run(scenario: Callable[[Harness], Awaitable[None]], **kwargs: Any) -> None:
    async def main() -> None:
        await scenario(Harness(**kwargs))

    asyncio.run(main())


# -- I6: identity check per frame and per handshake ------------------------------------------------


def test_a_frame_from_the_sessions_device_is_delivered():
    async def scenario(h: Harness) -> None:
        cam = h.attach("cam-a")
        live = h.open("s-1", "cam-a")
        assert h.relay.on_frame("cam-a", "s-1", 1, b"abc") is FrameVerdict.DELIVERED
        assert live.wake.is_set()
        assert live.take() == [(1, b"abc")]
        assert (live.frames_relayed, live.bytes_relayed, live.dropped) == (1, 3, 0)
        assert not live.wake.is_set() and sent(cam) == [] and h.alarms == []

    run(scenario)


def test_a_frame_from_another_device_is_dropped_and_alarmed():
    async def scenario(h: Harness) -> None:
        cam_a, cam_b = h.attach("cam-a"), h.attach("cam-b")
        live = h.open("s-b", "cam-b")
        verdict = h.relay.on_frame("cam-a", "s-b", 7, b"\x00" * 16)
        assert verdict is FrameVerdict.MISROUTED
        assert h.alarms == [("cam-a", "s-b", "frame from a device that is not the session's")]
        assert list(live.frames) == [] and live.bytes_relayed == 0 and not live.wake.is_set()
        assert not live.ended  # the real camera's stream goes on
        assert sent(cam_a) == [] and sent(cam_b) == []

    run(scenario)


def test_a_handshake_from_another_device_is_ignored_and_alarmed():
    async def scenario(h: Harness) -> None:
        h.attach("cam-a")
        h.attach("cam-b")
        live = h.open("s-b", "cam-b")
        forged = Accepted(b"k" * 32, b"sig", "chain of cam-a")
        assert h.relay.on_accept("cam-a", "s-b", forged) is FrameVerdict.MISROUTED
        assert h.relay.on_reject("cam-a", "s-b", "no") is FrameVerdict.MISROUTED
        assert not live.handshake.done() and not live.ended
        assert [a[2] for a in h.alarms] == ["handshake from a device that is not the session's"] * 2
        genuine = Accepted(b"g" * 32, b"sig", "chain of cam-b")
        assert h.relay.on_accept("cam-b", "s-b", genuine) is FrameVerdict.DELIVERED
        assert live.handshake.result() == genuine

    run(scenario)


def test_a_camera_refusal_ends_the_session_with_its_reason():
    async def scenario(h: Harness) -> None:
        cam = h.attach("cam-a")
        live = h.open("s-1", "cam-a")
        assert h.relay.on_reject("cam-a", "s-1", "token is for another device") is (
            FrameVerdict.DELIVERED
        )
        assert live.handshake.result() == Rejected("token is for another device")
        assert live.end_reason == "token is for another device"
        h.relay.detach(live)
        assert live.end_reason == "token is for another device"  # not "watcher left"
        assert sent(cam) == []  # the camera refused: nothing to stop

    run(scenario)


def test_the_closed_stream_of_another_device_does_not_end_the_session():
    async def scenario(h: Harness) -> None:
        live = h.open("s-1", "cam-a")
        h.relay.on_closed("cam-b", "s-1", "bye")
        assert not live.ended
        h.relay.on_closed("cam-a", "s-1", "lens cap")
        assert live.end_reason == "camera closed the stream: lens cap"

    run(scenario)


# -- bounded queues ----------------------------------------------------------------------------


def test_a_slow_watcher_loses_the_oldest_frames_and_the_queue_stays_bounded():
    async def scenario(h: Harness) -> None:
        h.attach("cam-a")
        live = h.open("s-1", "cam-a")
        for sequence in range(1, 11):
            h.relay.on_frame("cam-a", "s-1", sequence, b"x" * 100)
            assert len(live.frames) <= 4
        assert live.frames.maxlen == 4
        assert (live.dropped, live.frames_relayed, live.bytes_relayed) == (6, 10, 1000)
        assert [s for s, _ in live.take()] == [7, 8, 9, 10]
        h.relay.on_frame("cam-a", "s-1", 11, b"x")
        assert [s for s, _ in live.take()] == [11] and live.dropped == 6

    run(scenario, queue_frames=4)


def test_each_watcher_of_one_camera_has_its_own_queue():
    async def scenario(h: Harness) -> None:
        h.attach("cam-a")
        one, two = h.open("s-1", "cam-a", user="u-1"), h.open("s-2", "cam-a", user="u-2")
        h.relay.on_frame("cam-a", "s-1", 1, b"for one")
        h.relay.on_frame("cam-a", "s-2", 1, b"for two")
        assert one.take() == [(1, b"for one")] and two.take() == [(1, b"for two")]

    run(scenario)


def test_one_watcher_per_session():
    async def scenario(h: Harness) -> None:
        h.open("s-1", "cam-a")
        with pytest.raises(FailedPrecondition):
            h.open("s-1", "cam-a")

    run(scenario)


# -- streams nobody watches ------------------------------------------------------------------------


def test_a_frame_for_a_session_nobody_watches_stops_that_stream_once():
    async def scenario(h: Harness) -> None:
        cam = h.attach("cam-a")
        for sequence in (1, 2, 3):
            assert h.relay.on_frame("cam-a", "s-gone", sequence, b"x") is FrameVerdict.NO_WATCHER
        assert sent(cam) == [StopStreamCommand("s-gone", "nobody is watching this session")]
        assert h.alarms == []

    run(scenario)


def test_frames_after_the_session_ended_are_not_delivered():
    async def scenario(h: Harness) -> None:
        cam = h.attach("cam-a")
        live = h.open("s-1", "cam-a")
        h.relay.end("s-1", "share revoked")
        assert h.relay.on_frame("cam-a", "s-1", 5, b"late") is FrameVerdict.NO_WATCHER
        assert list(live.frames) == []
        assert sent(cam)[0] == StopStreamCommand("s-1", "share revoked")

    run(scenario)


# -- start, teardown and expiry (I7) --------------------------------------------------------------


def test_start_asks_the_attached_camera_and_fails_when_it_is_offline():
    async def scenario(h: Harness) -> None:
        live = h.open("s-1", "cam-a")
        assert h.relay.start(live, "token", b"e" * 32) is False
        cam = h.attach("cam-a")
        assert h.relay.start(live, "token", b"e" * 32) is True
        assert sent(cam) == [StartStreamCommand("s-1", "token", b"e" * 32)]

    run(scenario)


def test_end_where_ends_only_matching_sessions_and_wakes_their_watchers():
    async def scenario(h: Harness) -> None:
        cam_a, cam_b = h.attach("cam-a"), h.attach("cam-b")
        a1, a2 = h.open("s-1", "cam-a", user="u-1"), h.open("s-2", "cam-a", user="u-2")
        b1 = h.open("s-3", "cam-b", user="u-1")
        assert h.relay.end_where("share revoked", device_id="cam-a", user_id="u-1") == ["s-1"]
        assert (a1.end_reason, a2.end_reason, b1.end_reason) == ("share revoked", None, None)
        assert a1.wake.is_set() and a1.handshake.result() == Rejected("share revoked")
        assert sent(cam_a) == [StopStreamCommand("s-1", "share revoked")] and sent(cam_b) == []
        assert "s-3" in h.relay.end_where("signed out", app_id="a-u-1")
        assert (a1.end_reason, b1.end_reason) == ("share revoked", "signed out")  # first wins
        assert h.relay.end("s-unknown", "x") is False

    run(scenario)


def test_a_camera_that_disconnects_ends_its_sessions():
    async def scenario(h: Harness) -> None:
        h.attach("cam-a")
        live, other = h.open("s-1", "cam-a"), h.open("s-2", "cam-b")
        h.relay.on_device_gone("cam-a")
        assert (live.end_reason, other.end_reason) == ("camera disconnected", None)

    run(scenario)


def test_a_watcher_leaving_stops_the_camera_and_forgets_the_session():
    async def scenario(h: Harness) -> None:
        cam = h.attach("cam-a")
        live = h.open("s-1", "cam-a")
        h.relay.detach(live)
        assert live.end_reason == "watcher left" and h.relay.get("s-1") is None
        assert sent(cam) == [StopStreamCommand("s-1", "watcher left")]
        assert h.relay.live_count() == 0

    run(scenario)


def test_sessions_expire_with_their_token():
    async def scenario(h: Harness) -> None:
        cam = h.attach("cam-a")
        short, long = h.open("s-short", "cam-a", ttl=10), h.open("s-long", "cam-a", ttl=300)
        assert h.relay.expire() == []
        h.clock.advance(9)
        assert h.relay.expire() == []
        h.clock.advance(1)  # exp is exclusive: a token is dead at its exp second
        assert h.relay.expire() == ["s-short"]
        assert short.end_reason == "session token expired" and short.wake.is_set()
        assert short.handshake.result() == Rejected("session token expired")
        assert long.end_reason is None
        assert sent(cam) == [StopStreamCommand("s-short", "session token expired")]
        assert h.relay.expire() == []  # ended once

    run(scenario)


def test_the_sweeper_expires_sessions_and_ends_the_rest_when_the_broker_stops():
    async def scenario(h: Harness) -> None:
        short, long = h.open("s-short", "cam-a", ttl=10), h.open("s-long", "cam-a", ttl=300)
        sweeper = asyncio.create_task(h.relay.run_expiry(interval=0.01))
        h.clock.advance(10)
        await asyncio.wait_for(short.wake.wait(), 1)
        assert short.end_reason == "session token expired" and not long.ended
        sweeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sweeper
        assert long.end_reason == "broker restarted"  # the same reason the store gives it

    run(scenario)


# -- StopStream at most once per session (issue 8) ------------------------------------------------


def stops(items: list[object]) -> list[StopStreamCommand]:
    return [item for item in items if isinstance(item, StopStreamCommand)]


def test_a_watcher_leaving_stops_the_camera_once_despite_frames_in_flight() -> None:
    """The watcher hangs up (StopStream "watcher left"); the frames the camera sent before it saw
    that arrive afterwards and must not stop the same session a second time."""

    async def scenario(h: Harness) -> None:
        cam = h.attach("cam-a")
        live = h.open("s-1", "cam-a")
        h.relay.on_accept("cam-a", "s-1", Accepted(b"k" * 32, b"sig", "chain"))
        h.relay.on_frame("cam-a", "s-1", 1, b"x")
        h.relay.detach(live)
        for sequence in (2, 3, 4):
            assert h.relay.on_frame("cam-a", "s-1", sequence, b"x") is FrameVerdict.NO_WATCHER
        assert stops(sent(cam)) == [StopStreamCommand("s-1", "watcher left")]

    run(scenario)


@pytest.mark.parametrize("ending", ["end", "end_where", "expire", "sweeper-stop"])
def test_every_teardown_path_stops_the_camera_exactly_once(ending: str) -> None:
    """Whatever ends the session first, then the watcher leaving, then late frames: one
    StopStream for the session, carrying the first reason."""

    async def scenario(h: Harness) -> None:
        cam = h.attach("cam-a")
        live = h.open("s-1", "cam-a", ttl=10)
        other = h.open("s-2", "cam-a", ttl=300, user="u-2")
        if ending == "end":
            h.relay.end("s-1", "share revoked")
        elif ending == "end_where":
            h.relay.end_where("share revoked", user_id="u-1")
        elif ending == "expire":
            h.clock.advance(10)
            h.relay.expire()
        else:
            sweeper = asyncio.create_task(h.relay.run_expiry(interval=10))
            await asyncio.sleep(0)
            sweeper.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sweeper
        first = live.end_reason
        assert first is not None
        h.relay.end("s-1", "again")
        h.relay.end_where("and again", device_id="cam-a")  # ends s-2 too: its own single stop
        h.relay.expire()
        h.relay.detach(live)
        h.relay.on_frame("cam-a", "s-1", 9, b"late")
        h.relay.detach(other)
        h.relay.on_frame("cam-a", "s-2", 9, b"late")
        commands = stops(sent(cam))
        assert [c for c in commands if c.session_id == "s-1"] == [StopStreamCommand("s-1", first)]
        assert other.end_reason is not None
        assert [c for c in commands if c.session_id == "s-2"] == [
            StopStreamCommand("s-2", other.end_reason)
        ]

    run(scenario)


def test_stop_is_per_camera_and_the_memory_of_stopped_sessions_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from broker.sessions import relay as relay_module

    monkeypatch.setattr(relay_module, "STOPPED_MEMORY", 4)

    async def scenario(h: Harness) -> None:
        cam_a, cam_b = h.attach("cam-a"), h.attach("cam-b")
        live = h.open("s-b", "cam-b")
        h.relay.detach(live)
        h.relay.on_frame("cam-a", "s-b", 1, b"misrouted")  # another camera: told once, too
        h.relay.on_frame("cam-a", "s-b", 2, b"misrouted")
        assert stops(sent(cam_b)) == [StopStreamCommand("s-b", "watcher left")]
        assert stops(sent(cam_a)) == [StopStreamCommand("s-b", "nobody is watching this session")]
        for n in range(10):
            h.relay.on_frame("cam-a", f"s-gone-{n}", 1, b"x")
        assert len(h.relay._stopped) == 4

    run(scenario)
