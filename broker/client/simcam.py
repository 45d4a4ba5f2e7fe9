"""A simulated camera for the demo, tests and benchmarks.

Every frame's plaintext names the camera and the session (``device_id|session_id|sequence|``), so an
oracle can check that each frame a watcher decrypts came from the camera of its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import grpc

from broker.client.device import AttachSession, DeviceClient, OutgoingStream
from broker.client.reconnect import AttachEnd, Backoff, Reconnector, Sleep, Stopped
from broker.clock import Clock
from broker.errors import PermissionDenied


def frame_payload(device_id: str, session_id: str, sequence: int, size: int) -> bytes:
    """The oracle-readable plaintext of one frame, padded to size bytes."""
    head = f"{device_id}|{session_id}|{sequence}|".encode()
    return head + b"." * max(0, size - len(head))


def parse_payload(plaintext: bytes) -> tuple[str, str, int]:
    """(device_id, session_id, sequence) written into a frame by a simulated camera."""
    device_id, session_id, sequence, _ = plaintext.split(b"|", 3)
    return device_id.decode(), session_id.decode(), int(sequence)


@dataclass
class CameraStats:
    attached: int = 0
    streams_started: int = 0
    streams_refused: int = 0
    streams_stopped: int = 0
    frames_sent: int = 0
    refusals: list[str] = field(default_factory=list)


class SimulatedCamera:
    """Attaches, answers StartStream after verifying the token, streams frames at fps."""

    def __init__(
        self,
        client: DeviceClient,
        fps: float = 30.0,
        frame_bytes: int = 1024,
        clock: Clock | None = None,
        heartbeat_interval: float = 15.0,
    ) -> None:
        self.client = client
        self.fps = fps
        self.frame_bytes = frame_bytes
        self.clock = clock
        self.heartbeat_interval = heartbeat_interval
        self.stats = CameraStats()
        self.attached = asyncio.Event()
        self.ended: grpc.aio.AioRpcError | None = None
        self.attached_at: float | None = None  # time.monotonic() of the last "accepted"
        self.reconnector = Reconnector()
        self._streams: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Attach and serve until the stream ends (error kept in ``ended``) or the task is cancelled."""
        self.attached.clear()
        self.ended = None
        self.attached_at = None
        try:
            async with self.client.attach(self.heartbeat_interval) as session:
                await self._serve(session)
        except grpc.aio.AioRpcError as error:
            self.ended = error
        finally:
            self.attached.clear()
            for task in self._streams.values():
                task.cancel()
            self._streams.clear()

    async def run_forever(
        self,
        stop: asyncio.Event,
        *,
        backoff: Backoff | None = None,
        sleep: Sleep | None = None,
        stable_after: float | None = None,
    ) -> Stopped:
        """Stay attached until stop is set: after any end of the Attach stream (a replica that
        crashed or drains, a network failure) wait with exponential backoff and full jitter
        (uniform(0, min(30 s, 0.5 s * 2**n)), reset after an attach that lasted ``stable_after``;
        at least the broker's RetryInfo pushback) and attach again, to whichever replica of the
        endpoints takes the connection.

        Returns why it stopped: "stopped" (the event), "replaced" (another instance of this
        camera attached: the broker ended ours as replaced, so do not fight it), "refused"
        (PERMISSION_DENIED / UNAUTHENTICATED: revoked, expired) or "reenroll" (a TLS handshake
        only a new enrollment can fix). Counters: ``reconnector.stats``.
        """
        reconnector = Reconnector(
            backoff or self.reconnector.backoff,
            sleep=sleep,
            stable_after=self.reconnector.stable_after if stable_after is None else stable_after,
        )
        reconnector.stats = self.reconnector.stats  # one set of counters per camera
        self.reconnector = reconnector
        return await reconnector.run(self._attach_once, stop)

    async def _attach_once(self) -> AttachEnd:
        await self.run()
        attached_for = None if self.attached_at is None else time.monotonic() - self.attached_at
        return AttachEnd(self.ended, attached_for)

    async def _serve(self, session: AttachSession) -> None:
        while True:
            message = await session.receive()
            if message is None:
                return
            kind = message.WhichOneof("kind")
            if kind == "accepted":
                self.stats.attached += 1
                self.attached_at = time.monotonic()
                self.attached.set()
            elif kind == "trust_bundle_update":
                session.adopt_bundle(message.trust_bundle_update)
                await session.heartbeat()  # acknowledge the new bundle at once
            elif kind == "start_stream":
                await self._start(session, message.start_stream)
            elif kind == "stop_stream":
                task = self._streams.pop(message.stop_stream.session_id, None)
                if task is not None:
                    task.cancel()
                    self.stats.streams_stopped += 1

    async def _start(self, session: AttachSession, start: object) -> None:
        try:
            stream = await session.accept_stream(start, self.clock)  # type: ignore[arg-type]
        except PermissionDenied as refused:
            self.stats.streams_refused += 1
            self.stats.refusals.append(refused.message)
            return
        self.stats.streams_started += 1
        self._streams[stream.session_id] = asyncio.create_task(self._stream(session, stream))

    async def _stream(self, session: AttachSession, stream: OutgoingStream) -> None:
        interval = 1.0 / self.fps
        device_id = self.client.state.device_id
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while True:
                sequence = stream.sealer.sequence + 1
                await session.send_frame(
                    stream, frame_payload(device_id, stream.session_id, sequence, self.frame_bytes)
                )
                self.stats.frames_sent += 1
                await asyncio.sleep(interval)
