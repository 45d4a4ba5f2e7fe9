"""The relay: moves ciphertext from a camera's Attach stream to the app watching that session.

Asyncio only (no grpc, no protobuf). Rules (I6, I7):
- a frame is accepted only from the Attach stream whose certificate identity is the session's
  device; anything else is dropped and raised as an alarm;
- each watcher has a bounded queue: a slow watcher loses its oldest frames, memory stays flat;
- a frame for a session nobody watches makes the camera stop that stream;
- ending a session (revocation, expiry, watcher leaving) wakes its watcher with a reason and
  stops the camera's stream;
- a camera is sent StopStream at most once per session, whichever of these happens first.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from broker.audit.chain import AuditEvent
from broker.clock import Clock, unix
from broker.errors import FailedPrecondition
from broker.protocol.spiffe_id import SpiffeId
from broker.sessions.presence import Presence

DEFAULT_QUEUE_FRAMES = 64
RESTART_REASON = "broker restarted"  # the reason the store gives sessions a restart ended
STOPPED_MEMORY = 65_536  # stopped sessions remembered; the oldest are forgotten first


@dataclass(frozen=True, slots=True)
class StartStreamCommand:
    """Tell a camera to start a session (it verifies the token itself)."""

    session_id: str
    token: str
    app_ephemeral: bytes


@dataclass(frozen=True, slots=True)
class StopStreamCommand:
    """Tell a camera to stop sending a session's frames."""

    session_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """The camera's signed handshake, plus the certificate chain of the stream that sent it."""

    device_ephemeral: bytes
    signature: bytes
    device_chain_pem: str


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str


class FrameVerdict(enum.Enum):
    DELIVERED = "delivered"
    MISROUTED = "misrouted"  # sent by a camera that is not the session's device (alarm)
    NO_WATCHER = "no_watcher"


@dataclass(eq=False)
class LiveSession:
    """One watcher's view of one session."""

    session_id: str
    device_id: str
    user_id: str
    app_id: str
    expires_at: int
    queue_frames: int = DEFAULT_QUEUE_FRAMES
    frames: deque[tuple[int, bytes]] = field(init=False)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    handshake: asyncio.Future[Accepted | Rejected] = field(init=False)
    end_reason: str | None = None
    bytes_relayed: int = 0
    frames_relayed: int = 0
    dropped: int = 0

    def __post_init__(self) -> None:
        self.frames = deque(maxlen=self.queue_frames)
        self.handshake = asyncio.get_running_loop().create_future()

    def push(self, sequence: int, ciphertext: bytes) -> None:
        if len(self.frames) == self.frames.maxlen:
            self.dropped += 1  # the deque drops the oldest frame
        self.frames.append((sequence, ciphertext))
        self.bytes_relayed += len(ciphertext)
        self.frames_relayed += 1
        self.wake.set()

    def take(self) -> list[tuple[int, bytes]]:
        """Everything queued, oldest first."""
        batch = list(self.frames)
        self.frames.clear()
        self.wake.clear()
        return batch

    @property
    def ended(self) -> bool:
        return self.end_reason is not None


AlarmSink = Callable[[str, str, str], None]
# Alarm reasons (the relay's rules that fired); a bounded set, so metrics may label by them.
MISROUTED_HANDSHAKE = "handshake from a device that is not the session's"
MISROUTED_FRAME = "frame from a device that is not the session's"


@dataclass
class RelayStats:
    """Running totals since this relay started, read by a metrics exporter (plain ints: the
    core imports no metrics library). Written on the event loop only; a reader on another
    thread may see a value one frame old, never a torn one."""

    frames_relayed: int = 0  # accepted from the session's camera and queued for its watcher
    frames_overrun: int = 0  # queued frames a slow watcher lost (its oldest)
    frames_unwatched: int = 0  # frames for a session nobody watches (the camera is told to stop)
    frames_misrouted: int = 0  # frames from a camera that is not the session's (alarm, I6)
    handshakes_misrouted: int = 0  # handshakes from a camera that is not the session's (alarm)


def alarm_event(trust_domain: str, device_id: str, session_id: str, reason: str) -> AuditEvent:
    """The audit entry for a relay rule that fired (I6, I12), attributed to the sending camera."""
    return AuditEvent(
        str(SpiffeId.device(trust_domain, device_id)),
        "relay.alarm",
        device_id,
        {"session_id": session_id[:64], "reason": reason},
    )


class Relay:
    """All live sessions of this broker process (lost on restart, by design)."""

    def __init__(
        self,
        presence: Presence,
        clock: Clock,
        on_alarm: AlarmSink,
        queue_frames: int = DEFAULT_QUEUE_FRAMES,
    ) -> None:
        self._presence = presence
        self._clock = clock
        self._on_alarm = on_alarm
        self._queue_frames = queue_frames
        self._sessions: dict[str, LiveSession] = {}
        self.stats = RelayStats()
        # Told of every watcher detached (its Watch has written its last event): metrics.
        self.on_detach: Callable[[LiveSession], None] | None = None
        # (device, session) pairs already sent StopStream; insertion-ordered, bounded
        self._stopped: dict[tuple[str, str], None] = {}

    # -- watchers --------------------------------------------------------------------------------
    def open(
        self, session_id: str, device_id: str, user_id: str, app_id: str, expires_at: int
    ) -> LiveSession:
        """Register a watcher for a verified session (one watcher per session)."""
        if session_id in self._sessions:
            raise FailedPrecondition("this session is already being watched; open a new session")
        live = LiveSession(session_id, device_id, user_id, app_id, expires_at, self._queue_frames)
        self._sessions[session_id] = live
        return live

    def start(self, live: LiveSession, token: str, app_ephemeral: bytes) -> bool:
        """Ask the session's camera to start; False when the camera is not attached."""
        handle = self._presence.handle(live.device_id)
        if handle is None:
            return False
        handle.send(StartStreamCommand(live.session_id, token, app_ephemeral))
        return True

    def get(self, session_id: str) -> LiveSession | None:
        return self._sessions.get(session_id)

    def live_count(self) -> int:
        return len(self._sessions)

    # -- from cameras ------------------------------------------------------------------------
    def on_accept(self, device_id: str, session_id: str, accepted: Accepted) -> FrameVerdict:
        return self._handshake(device_id, session_id, accepted)

    def on_reject(self, device_id: str, session_id: str, reason: str) -> FrameVerdict:
        verdict = self._handshake(device_id, session_id, Rejected(reason[:200]))
        live = self._sessions.get(session_id)
        if verdict is FrameVerdict.DELIVERED and live is not None:
            # The camera's refusal is why the session ended (access log, I12), not "watcher left".
            self._finish(live, reason[:200], notify_device=False)
        return verdict

    def _handshake(
        self, device_id: str, session_id: str, outcome: Accepted | Rejected
    ) -> FrameVerdict:
        live = self._sessions.get(session_id)
        if live is None:
            return FrameVerdict.NO_WATCHER
        if live.device_id != device_id:
            self.stats.handshakes_misrouted += 1
            self._on_alarm(device_id, session_id, MISROUTED_HANDSHAKE)
            return FrameVerdict.MISROUTED
        if not live.handshake.done():
            live.handshake.set_result(outcome)
        return FrameVerdict.DELIVERED

    def on_frame(
        self, device_id: str, session_id: str, sequence: int, ciphertext: bytes
    ) -> FrameVerdict:
        """Route one frame from the Attach stream of device_id (its certificate identity, I6)."""
        live = self._sessions.get(session_id)
        stats = self.stats
        if live is None or live.ended:
            stats.frames_unwatched += 1
            self._stop(device_id, session_id, "nobody is watching this session")
            return FrameVerdict.NO_WATCHER
        if live.device_id != device_id:
            stats.frames_misrouted += 1
            self._on_alarm(device_id, session_id, MISROUTED_FRAME)
            return FrameVerdict.MISROUTED
        dropped = live.dropped
        live.push(sequence, ciphertext)
        stats.frames_relayed += 1
        stats.frames_overrun += live.dropped - dropped
        return FrameVerdict.DELIVERED

    def on_closed(self, device_id: str, session_id: str, reason: str) -> None:
        live = self._sessions.get(session_id)
        if live is not None and live.device_id == device_id:
            self._finish(live, f"camera closed the stream: {reason}"[:200], notify_device=False)

    def on_device_gone(self, device_id: str) -> None:
        """The camera's Attach stream ended: its sessions cannot continue."""
        for live in [s for s in self._sessions.values() if s.device_id == device_id]:
            self._finish(live, "camera disconnected", notify_device=False)

    # -- teardown ----------------------------------------------------------------------------
    def end(self, session_id: str, reason: str) -> bool:
        live = self._sessions.get(session_id)
        if live is None:
            return False
        self._finish(live, reason, notify_device=True)
        return True

    def end_many(self, session_ids: list[str], reason: str) -> int:
        return sum(self.end(sid, reason) for sid in session_ids)

    def end_where(
        self, reason: str, *, device_id: str = "", user_id: str = "", app_id: str = ""
    ) -> list[str]:
        """End every live session matching all given fields; returns their ids."""
        hit = [
            s
            for s in self._sessions.values()
            if (not device_id or s.device_id == device_id)
            and (not user_id or s.user_id == user_id)
            and (not app_id or s.app_id == app_id)
        ]
        for live in hit:
            self._finish(live, reason, notify_device=True)
        return [s.session_id for s in hit]

    def detach(self, live: LiveSession) -> None:
        """The watcher's RPC is over: forget the session, stop the camera if still streaming."""
        if not live.ended:
            self._finish(live, "watcher left", notify_device=True)
        if self._sessions.get(live.session_id) is live:
            del self._sessions[live.session_id]
        if self.on_detach is not None:
            self.on_detach(live)

    def _finish(self, live: LiveSession, reason: str, *, notify_device: bool) -> None:
        if live.ended:
            return
        live.end_reason = reason
        live.wake.set()
        if not live.handshake.done():
            live.handshake.set_result(Rejected(reason))
        if notify_device:
            self._stop(live.device_id, live.session_id, reason)

    def _stop(self, device_id: str, session_id: str, reason: str) -> None:
        """Tell the attached camera to stop a session, unless it was told already: a watcher
        leaving and the frames still in flight from the camera must not stop it twice."""
        key = (device_id, session_id)
        if key in self._stopped:
            return
        handle = self._presence.handle(device_id)
        if handle is None:
            return
        self._stopped[key] = None
        if len(self._stopped) > STOPPED_MEMORY:
            del self._stopped[next(iter(self._stopped))]
        handle.send(StopStreamCommand(session_id, reason))

    def expire(self) -> list[str]:
        """End sessions whose token has expired (I7); returns their ids."""
        now = unix(self._clock.now())
        expired = [s for s in self._sessions.values() if not s.ended and s.expires_at <= now]
        for live in expired:
            self._finish(live, "session token expired", notify_device=True)
        return [s.session_id for s in expired]

    async def run_expiry(self, interval: float = 0.2) -> None:
        """Background task for the broker's serving lifetime: expire sessions every interval
        seconds. Cancelling it (the broker is stopping) ends every live session with
        RESTART_REASON, so watchers get an end event and their close is recorded with the real
        cause before the listeners go away (the next start ends the rest in the store)."""
        try:
            while True:
                await asyncio.sleep(interval)
                self.expire()
        finally:
            self.end_where(RESTART_REASON)
