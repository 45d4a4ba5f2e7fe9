"""A simulated camera for the demo, tests and benchmarks.

Every frame's plaintext names the camera and the session (``device_id|session_id|sequence|``), so an
oracle can check that each frame a watcher decrypts came from the camera of its session.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import grpc

from broker.client.device import AttachSession, DeviceClient, OutgoingStream
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
        self._streams: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Attach and serve until the stream ends (error kept in ``ended``) or the task is cancelled."""
        self.attached.clear()
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

    async def _serve(self, session: AttachSession) -> None:
        while True:
            message = await session.receive()
            if message is None:
                return
            kind = message.WhichOneof("kind")
            if kind == "accepted":
                self.stats.attached += 1
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
