"""Three real replicas, one fleet (issue 11, item 9): `broker serve` processes r1, r2 and r3 on one
fresh PostgreSQL database and one home (the PKI made once with `broker ca init`), each on its own
ports, driven from this process through the SDKs over real mutual TLS on 127.0.0.1.

Invariants these tests name (DESIGN "Security invariants" and "Many replicas, one fleet"):
- I6 a watcher receives only frames from the device of its session: every frame a viewer decrypts
  names (in its plaintext, written by the simulated camera) the camera and the session the viewer
  asked for, and the store of record agrees that this session is that camera's and that user's;
  across a SIGKILL of a replica and a rolling restart no viewer ever decrypts another camera.
- I7 a revocation made through one replica (share, app instance, device) ends a stream whose
  camera is attached to a second replica and whose viewer watches through a third within 1 s.
- I8 single-use secrets stay single-use across replicas: 20 concurrent claims with the one
  correct code spread over r1..r3 give exactly one owner, and the wrong-claim budget is one budget
  for the whole fleet.
- I10 fail closed: a forward carrying a stale attachment epoch is refused by the holder
  (FAILED_PRECONDITION), whoever presents it.

The fleet is module-scoped (starting three processes is most of the cost); each test starts from
all three replicas serving and uses device ids of its own. Every wait is bounded; every process
is SIGKILLed in a finally block if it is still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from broker._proto.broker.internal.v1 import replica_pb2, replica_pb2_grpc
from broker._proto.broker.v1 import app_pb2, app_pb2_grpc, bootstrap_pb2, bootstrap_pb2_grpc
from broker.client.admin import AdminClient, OperatorCredentials
from broker.client.app import AppClient, SessionTicket, WatchStream
from broker.client.device import DeviceClient, Endpoints
from broker.client.reconnect import Stopped
from broker.client.simcam import SimulatedCamera, parse_payload
from broker.config import Config
from broker.devices.ownership import CLAIM_REFUSED
from broker.pki.ca import PkiFiles
from broker.service.forward import STALE_EPOCH
from broker.store import AttachmentRecord, Role, SessionOutcome, SessionRecord, Store, Transaction
from broker.store.open import open_store
from tests.helpers import PASSWORD, csr_for, key_pem, mtls_channel, p256
from tests.pg import fresh_database

T = TypeVar("T")

SERVING = re.compile(
    r"^broker serving: bootstrap \S+:(\d+), main :(\d+), factory :(\d+), internal :(\d+) "
    r"\(replica (\S+);"
)
NAMES = ("r1", "r2", "r3")
DRAIN_WINDOW = 2.0  # --drain-window of every replica
DRAIN_GRACE = 5.0  # BrokerServer.drain's default grace after the window
REVOCATION_BOUND = 1.0  # I7
FPS = 10.0
FRAME_BYTES = 128
WAIT = 15.0  # bound of any single wait in these tests


# -- the fleet: three `broker serve` processes ----------------------------------------------------


class ReplicaProcess:
    """One `python -m broker serve --replica NAME` on the shared home and store. The first start
    binds every public listener on port 0; restarts bind the same ports again (the endpoint
    lists cameras and apps hold name them), the internal listener takes a new port each time
    (replicas find it in the store)."""

    def __init__(self, name: str, home: Path, store_url: str) -> None:
        self.name = name
        self.home = home
        self.store_url = store_url
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self._ready = threading.Event()
        self.starts = 0

    @property
    def main(self) -> str:
        return f"127.0.0.1:{self.ports['main']}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.ports['bootstrap']}"

    @property
    def internal(self) -> str:
        return f"127.0.0.1:{self.ports['internal']}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def launch(self) -> None:
        assert not self.running, f"{self.name} is already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env["BROKER_STORE"] = self.store_url  # by environment, never argv (I11)
        for listener in ("bootstrap", "main", "factory"):
            env[f"BROKER_{listener.upper()}_ADDRESS"] = f"127.0.0.1:{self.ports.get(listener, 0)}"
        command = [sys.executable, "-m", "broker", "--home", str(self.home), "serve"]
        command += ["--replica", self.name, "--internal", "127.0.0.1:0"]
        command += ["--drain-window", f"{DRAIN_WINDOW:g}"]
        self._ready = ready = threading.Event()
        output = self.output
        output.append(f"---- start {self.starts + 1} of replica {self.name}\n")
        self.process = process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.starts += 1

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                output.append(line)
                match = SERVING.match(line)
                if match:
                    bootstrap, main, factory, internal, name = match.groups()
                    assert name == self.name, line
                    self.ports.update(
                        bootstrap=int(bootstrap),
                        main=int(main),
                        factory=int(factory),
                        internal=int(internal),
                    )
                    ready.set()

        threading.Thread(target=pump, name=f"broker-{self.name}-output", daemon=True).start()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if not self.running or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"replica {self.name} did not start:\n" + self.tail())

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def tail(self, lines: int = 40) -> str:
        return "".join(self.output[-lines:])

    def kill(self) -> None:
        """SIGKILL: no drain, no shutdown hook."""
        if self.running:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def terminate(self) -> None:
        """SIGTERM: the replica drains (health NOT_SERVING, cameras moved over the window)."""
        assert self.process is not None and self.running, f"{self.name} is not running"
        self.process.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"replica {self.name} did not exit within {timeout} s:\n{self.tail()}")


@dataclass
class Fleet:
    home: Path
    store_url: str
    replicas: dict[str, ReplicaProcess]

    @property
    def config(self) -> Config:
        return Config(home=self.home, store_url=self.store_url)

    @property
    def files(self) -> PkiFiles:
        return PkiFiles(self.home / "certs")

    @property
    def ca_pem(self) -> bytes:
        return self.files.ca_bundle.read_bytes()

    def __getitem__(self, name: str) -> ReplicaProcess:
        return self.replicas[name]

    def endpoints(self, *names: str) -> Endpoints:
        """The SDK's address lists for these replicas (all three when none is named)."""
        chosen = [self.replicas[n] for n in (names or NAMES)]
        return Endpoints([r.bootstrap for r in chosen], [r.main for r in chosen])

    def operator(self, name: str) -> AdminClient:
        return AdminClient(self[name].main, OperatorCredentials.from_certs_dir(self.files.root))

    def read(self, query: Callable[[Transaction], T]) -> T:
        """query in one read snapshot of a separate connection to the fleet's store."""
        store: Store = open_store(self.config, migrate=False)
        try:
            with store.read() as tx:
                return query(tx)
        finally:
            store.close()

    def ensure_running(self) -> None:
        dead = [r for r in self.replicas.values() if not r.running]
        for replica in dead:
            replica.launch()
        for replica in dead:
            replica.wait_ready()

    def kill_all(self) -> None:
        for replica in self.replicas.values():
            replica.kill()


@pytest.fixture(scope="module")
def fleet_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("fleet")
    with fresh_database() as store_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        init = subprocess.run(
            [sys.executable, "-m", "broker", "--home", str(home), "ca", "init"],
            env={**env, "BROKER_STORE": store_url},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert init.returncode == 0, (init.stdout, init.stderr)
        assert "dev PKI ready" in init.stdout, init.stdout
        fleet = Fleet(home, store_url, {n: ReplicaProcess(n, home, store_url) for n in NAMES})
        try:
            fleet["r1"].start()  # migrates the fresh database before the others race to
            fleet.ensure_running()
            yield fleet
        finally:
            fleet.kill_all()


@pytest.fixture
def fleet(fleet_module: Fleet) -> Fleet:
    """The module's fleet with all three replicas serving."""
    fleet_module.ensure_running()
    return fleet_module


# -- waiting, streams and viewers ------------------------------------------------------------------


async def until(check: Callable[[], T], what: str, timeout: float = WAIT) -> T:
    """Poll check() until truthy (bounded); fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what} (last: {value!r})")
        await asyncio.sleep(0.02)


async def until_async(check: Callable[[], Awaitable[T]], what: str, timeout: float = WAIT) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what} (last: {value!r})")
        await asyncio.sleep(0.05)


@dataclass
class StreamLog:
    """One Watch of one session: what the viewer decrypted and how the stream ended."""

    ticket: SessionTicket
    frames: list[tuple[str, str, int]] = field(default_factory=list)
    foreign: int = 0  # decrypted frames naming another camera or session (must stay 0, I6)
    stream: WatchStream | None = None
    end_reason: str | None = None  # the broker's StreamEnd reason
    error: grpc.aio.AioRpcError | None = None  # or the status the call ended with
    ended_at: float | None = None  # time.monotonic()

    @property
    def live(self) -> bool:
        return self.ended_at is None

    @property
    def rejected(self) -> int:
        """Frames that failed to decrypt or verify (counted by the SDK, never yielded)."""
        return 0 if self.stream is None else self.stream.rejected

    def how_it_ended(self) -> str:
        if self.end_reason is not None:
            return f"end: {self.end_reason}"
        if self.error is not None:
            return f"{self.error.code().name}: {self.error.details()}"
        return "live" if self.live else "cancelled"


async def watch_into(app: AppClient, log: StreamLog) -> None:
    """Watch log.ticket's session until it ends; every decrypted frame is checked against the
    ticket (the camera wrote its device id and the session id into the plaintext)."""
    try:
        async with app.watch(log.ticket) as stream:
            log.stream = stream
            async for plaintext in stream.frames():
                frame = parse_payload(plaintext)
                log.frames.append(frame)
                if frame[:2] != (log.ticket.device_id, log.ticket.session_id):
                    log.foreign += 1
            log.end_reason = stream.end_reason or "stream closed"
    except grpc.aio.AioRpcError as error:
        log.error = error
    finally:
        log.ended_at = time.monotonic()


class Viewer:
    """An app watching one camera; whenever its stream ends it opens a new session and watches
    again (OpenSession + Watch on whichever replica its endpoints reach)."""

    def __init__(self, app: AppClient, user_id: str, device_id: str) -> None:
        self.app = app
        self.user_id = user_id
        self.device_id = device_id
        self.streams: list[StreamLog] = []
        self.open_errors: list[str] = []
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Viewer:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            try:
                ticket = await self.app.open_session(self.device_id)
            except grpc.aio.AioRpcError as error:
                self.open_errors.append(f"{error.code().name}: {error.details()}")
                await asyncio.sleep(0.2)
                continue
            log = StreamLog(ticket)
            self.streams.append(log)
            await watch_into(self.app, log)
            await asyncio.sleep(0.05 if log.frames else 0.2)

    @property
    def current(self) -> StreamLog | None:
        return self.streams[-1] if self.streams else None

    def streaming(self, frames: int = 3) -> bool:
        """The current stream is live and has decrypted at least this many frames."""
        log = self.current
        return log is not None and log.live and len(log.frames) >= frames

    @property
    def foreign(self) -> int:
        """Frames from another camera or session, plus frames that failed to open (I6)."""
        return sum(s.foreign + s.rejected for s in self.streams)

    @property
    def frames(self) -> int:
        return sum(len(s.frames) for s in self.streams)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


def assert_frames_match_store(fleet: Fleet, viewers: list[Viewer]) -> int:
    """I6 against the store of record: every (device, session) a viewer decrypted is a session
    the store has on that device, for that viewer's user; returns how many frames were checked."""
    seen: dict[str, set[tuple[str, str]]] = {}
    count = 0
    for viewer in viewers:
        for log in viewer.streams:
            for device_id, session_id, _ in log.frames:
                seen.setdefault(session_id, set()).add((device_id, viewer.user_id))
                count += 1
            assert log.foreign == 0 and log.rejected == 0, (log.ticket, log.stream.mismatches)
    records = fleet.read(lambda tx: {sid: tx.get_session(sid) for sid in seen})
    for session_id, pairs in seen.items():
        record = records[session_id]
        assert record is not None, f"frames of session {session_id}, which the store lacks"
        assert pairs == {(record.device_id, record.user_id)}, (session_id, pairs, record)
    return count


@dataclass
class Camera:
    device_id: str
    camera: SimulatedCamera
    stop: asyncio.Event
    task: asyncio.Task[Stopped]


async def enroll_camera(
    fleet: Fleet, state: Path, device_id: str, via: str, owner: AppClient | None
) -> SimulatedCamera:
    """An enrolled SimulatedCamera whose endpoints name only replica `via` (claimed by owner)."""
    with fleet.operator(via) as admin:
        token = (await asyncio.to_thread(admin.create_enrollment_token, device_id)).enrollment_token
    client = DeviceClient(state / device_id, fleet.endpoints(via), fleet.ca_pem)
    enrolled = await client.enroll(token)
    if owner is not None:
        await owner.claim(device_id, enrolled.claim_code)
    return SimulatedCamera(client, fps=FPS, frame_bytes=FRAME_BYTES)


async def run_camera(camera: SimulatedCamera, device_id: str) -> Camera:
    """run_forever (full-jitter backoff) until attached."""
    stop = asyncio.Event()
    task = asyncio.create_task(camera.run_forever(stop))
    await until(camera.attached.is_set, f"{device_id} attached", WAIT)
    return Camera(device_id, camera, stop, task)


async def stop_cameras(cameras: list[Camera]) -> None:
    for cam in cameras:
        cam.stop.set()
    for cam in cameras:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(cam.task, 5)
        if not cam.task.done():
            cam.task.cancel()


async def new_app(fleet: Fleet, state: Path, username: str, *via: str) -> AppClient:
    """A fresh account with one enrolled app instance whose endpoints name replicas `via`."""
    app = AppClient(state / username, fleet.endpoints(*via), fleet.ca_pem)
    await app.create_account(username, PASSWORD)
    await app.enroll(username, PASSWORD, "phone")
    return app


def same_app(app: AppClient, fleet: Fleet, *via: str) -> AppClient:
    """The same app instance (same key and certificate), talking to other replicas."""
    return AppClient(app.dir, fleet.endpoints(*via), fleet.ca_pem)


def attachments(fleet: Fleet, device_ids: list[str]) -> dict[str, AttachmentRecord | None]:
    return fleet.read(lambda tx: {d: tx.get_attachment(d) for d in device_ids})


def sessions(fleet: Fleet, session_ids: list[str]) -> dict[str, SessionRecord | None]:
    return fleet.read(lambda tx: {s: tx.get_session(s) for s in session_ids})


async def attached_to(fleet: Fleet, device_id: str, replica: str) -> AttachmentRecord:
    """Wait until the store shows the device live on replica; its attachment."""

    async def check() -> AttachmentRecord | None:
        record = (await asyncio.to_thread(attachments, fleet, [device_id]))[device_id]
        ok = record is not None and record.replica == replica and record.lease_expires_at > 0
        return record if ok else None

    return await until_async(check, f"{device_id} attached to {replica} in the store")


# -- 1. revocation through r3 of a camera on r1 watched through r2 (I7) --------------------------


async def _ended_within(log: StreamLog, started: float, what: str) -> float:
    await until(lambda: not log.live, f"{what}: the stream ends", 5.0)
    assert log.ended_at is not None
    return log.ended_at - started


def test_i7_revocations_through_r3_end_a_stream_of_a_camera_on_r1_watched_through_r2(
    fleet, tmp_path
):
    """I7 across three replicas: the camera is attached to r1, every viewer watches through r2
    (forwarded to r1's internal listener), and each revocation is made through r3. The stream
    it concerns ends within 1 s with the revocation's reason, the others go on; a revoked device's
    own Attach stream on r1 ends UNAUTHENTICATED."""
    device_id = "fleet-rev-cam"
    latencies: dict[str, float] = {}

    async def scenario() -> None:
        owner = await new_app(fleet, tmp_path, "rev-owner", "r2")
        viewer = await new_app(fleet, tmp_path, "rev-viewer", "r2")
        second = AppClient(tmp_path / "rev-owner-2", fleet.endpoints("r2"), fleet.ca_pem)
        await second.enroll("rev-owner", PASSWORD, "tablet")  # a second app instance, same user
        camera = await enroll_camera(fleet, tmp_path, device_id, "r1", owner)
        await owner.share(device_id, "rev-viewer")
        attach = asyncio.create_task(camera.run())  # one Attach stream, on r1 (no reconnect)
        try:
            await until(camera.attached.is_set, "camera attached to r1")
            await attached_to(fleet, device_id, "r1")
            logs = {}
            for name, app in (("owner", owner), ("viewer", viewer), ("second", second)):
                logs[name] = StreamLog(await app.open_session(device_id))
                asyncio.create_task(watch_into(app, logs[name]))  # noqa: RUF006 (ends with the stream)
            await until(
                lambda: all(len(log.frames) >= 3 for log in logs.values()),
                "three viewers on r2 decrypt frames of the camera on r1",
            )

            # (a) the owner withdraws the share through r3.
            owner_on_r3 = same_app(owner, fleet, "r3")
            started = time.monotonic()
            assert await owner_on_r3.revoke_share(device_id, "rev-viewer") == 1
            latencies["share"] = await _ended_within(logs["viewer"], started, "share revoked")
            assert logs["viewer"].end_reason == "share revoked", logs["viewer"].how_it_ended()

            # (b) the operator revokes the second app instance through r3.
            with fleet.operator("r3") as admin:
                started = time.monotonic()
                await asyncio.to_thread(admin.revoke_app, second.state.app_id, "lost tablet")
            latencies["app"] = await _ended_within(logs["second"], started, "app revoked")
            assert logs["second"].end_reason == "app instance revoked", logs[
                "second"
            ].how_it_ended()

            # The owner's own stream was not touched by either.
            assert logs["owner"].live, logs["owner"].how_it_ended()
            count = len(logs["owner"].frames)
            await until(lambda: len(logs["owner"].frames) >= count + 3, "owner still streaming")

            # (c) the operator revokes the device through r3.
            with fleet.operator("r3") as admin:
                started = time.monotonic()
                await asyncio.to_thread(admin.revoke_device, device_id, "stolen")
            latencies["device"] = await _ended_within(logs["owner"], started, "device revoked")
            assert logs["owner"].end_reason == "device revoked", logs["owner"].how_it_ended()
            await asyncio.wait_for(attach, 5.0)
            assert camera.ended is not None, "the camera's Attach on r1 did not end with a status"
            assert camera.ended.code() is grpc.StatusCode.UNAUTHENTICATED, camera.ended

            for log in logs.values():
                assert log.foreign == 0 and log.rejected == 0, log.stream
            records = await asyncio.to_thread(
                sessions, fleet, [log.ticket.session_id for log in logs.values()]
            )
            reasons = {
                name: (
                    records[log.ticket.session_id].outcome,
                    records[log.ticket.session_id].reason,
                )
                for name, log in logs.items()
            }
            assert reasons == {
                "viewer": (SessionOutcome.ENDED, "share revoked"),
                # the store keeps the operator's reason; the live stream gets the kind of it
                "second": (SessionOutcome.ENDED, "lost tablet"),
                "owner": (SessionOutcome.ENDED, "device revoked"),
            }
        finally:
            attach.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await attach

    asyncio.run(scenario())
    print(
        "\nI7 revocation through r3 -> stream (camera on r1, viewer via r2) ended after: "
        + ", ".join(f"{what} {ms * 1000:.0f} ms" for what, ms in latencies.items())
    )
    for what, seconds in latencies.items():
        assert seconds < REVOCATION_BOUND, (what, seconds)


# -- 2. SIGKILL of r1 (I6) ---------------------------------------------------------------------------


def test_i6_sigkill_of_r1_moves_its_cameras_and_viewers_without_mixing_streams(fleet, tmp_path):
    """SIGKILL r1: its cameras (run_forever, endpoint list r1,r2,r3) come back on r2/r3 with a
    greater epoch; their viewers' streams end with a status and a reason and re-open through r2
    or r3; every frame any viewer decrypts comes from the camera it asked for (I6, checked
    against the store). The cameras and viewers of r2 and r3 are untouched. r1 restarted ends
    only the sessions it had opened; sessions opened on r2/r3 stay open."""
    on_r1 = ["fleet-kill-a", "fleet-kill-b"]
    elsewhere = {"fleet-kill-c": "r2", "fleet-kill-d": "r3"}
    devices = on_r1 + list(elsewhere)

    async def scenario() -> None:
        owner = await new_app(fleet, tmp_path, "kill-owner", "r2")
        guest = await new_app(fleet, tmp_path, "kill-guest", "r3")
        homes = {d: "r1" for d in on_r1} | elsewhere
        cameras: list[Camera] = []
        viewers: list[Viewer] = []
        try:
            for device_id in devices:
                camera = await enroll_camera(fleet, tmp_path, device_id, homes[device_id], owner)
                cameras.append(await run_camera(camera, device_id))
                # From now on its endpoints name the whole fleet (as one DNS name with three
                # addresses would): where it re-attaches is up to the SDK.
                camera.client.endpoints = fleet.endpoints()
            for device_id in devices:
                await attached_to(fleet, device_id, homes[device_id])
            before = await asyncio.to_thread(attachments, fleet, devices)
            for device_id in (on_r1[0], "fleet-kill-c"):
                await owner.share(device_id, "kill-guest")
            viewers = [Viewer(owner, owner.state.user_id, d).start() for d in devices]
            viewers += [
                Viewer(guest, guest.state.user_id, d).start() for d in (on_r1[0], "fleet-kill-c")
            ]
            await until(lambda: all(v.streaming() for v in viewers), "every viewer streams")
            # A session r1 opened (no Watch yet): r1's own, ended when r1 restarts.
            r1_session = (
                await same_app(owner, fleet, "r1").open_session("fleet-kill-c")
            ).session_id
            moved = [v for v in viewers if v.device_id in on_r1]
            stayed = [v for v in viewers if v.device_id not in on_r1]
            first_streams = {id(v): v.current for v in viewers}
            frames_at_kill = {id(v): len(v.current.frames) for v in stayed}

            killed_at = time.monotonic()
            await asyncio.to_thread(fleet["r1"].kill)

            # Its cameras come back on r2/r3, fenced by a greater epoch.
            async def moved_away() -> dict[str, AttachmentRecord | None] | None:
                now = await asyncio.to_thread(attachments, fleet, on_r1)
                done = all(
                    r is not None
                    and r.replica in ("r2", "r3")
                    and r.lease_expires_at > 0
                    and r.epoch > before[d].epoch
                    for d, r in now.items()
                )
                return now if done else None

            after = await until_async(moved_away, "r1's cameras re-attached to r2/r3")
            reattached_in = time.monotonic() - killed_at
            # Their viewers' streams ended with a status and a reason, and re-opened.
            for viewer in moved:
                first = first_streams[id(viewer)]
                await until(lambda f=first: not f.live, "the stream through dead r1 ends", 5.0)
                assert first.error is not None, first.how_it_ended()
                assert first.error.code() is grpc.StatusCode.UNAVAILABLE, first.how_it_ended()
                assert first.error.details(), "no reason given"
            await until(
                lambda: all(len(v.streams) >= 2 and v.streaming() for v in moved),
                "the viewers of r1's cameras watch again (new session, through r2/r3)",
            )
            reopened_in = time.monotonic() - killed_at
            # The other replicas' cameras and viewers were not touched.
            for viewer in stayed:
                log = viewer.current
                assert log is first_streams[id(viewer)] and log.live, log.how_it_ended()
                await until(
                    lambda v=viewer: len(v.current.frames) >= frames_at_kill[id(v)] + 3,
                    "viewers of r2/r3 cameras keep streaming",
                )
            now = await asyncio.to_thread(attachments, fleet, list(elsewhere))
            assert now == {d: before[d] for d in elsewhere}, (before, now)

            # The store: the dead replica's forwarded streams were closed by the replica that
            # served them, with the reason; r1's own session is still open (nobody else ends it).
            ended = await asyncio.to_thread(
                sessions, fleet, [first_streams[id(v)].ticket.session_id for v in moved]
            )
            for record in ended.values():
                assert record is not None and record.outcome is SessionOutcome.ENDED, record
                assert record.reason.startswith("the camera's replica ended the stream"), record
            live_ids = [v.current.ticket.session_id for v in viewers]
            records = await asyncio.to_thread(sessions, fleet, [r1_session, *live_ids])
            assert records[r1_session].outcome is SessionOutcome.OPENED, records[r1_session]
            assert {records[s].replica for s in live_ids} <= {"r2", "r3"}

            # r1 restarts: it ends only its own sessions.
            await asyncio.to_thread(fleet["r1"].start)
            await until_async(
                lambda: asyncio.to_thread(
                    lambda: (
                        sessions(fleet, [r1_session])[r1_session].outcome is SessionOutcome.ENDED
                    )
                ),
                "restarted r1 ends the session it had opened",
            )
            records = await asyncio.to_thread(sessions, fleet, [r1_session, *live_ids])
            assert records[r1_session].reason == "broker restarted", records[r1_session]
            for session_id in live_ids:
                assert records[session_id].outcome is SessionOutcome.OPENED, records[session_id]
            assert all(v.streaming() for v in viewers), [v.current.how_it_ended() for v in viewers]
            assert await asyncio.to_thread(attachments, fleet, devices) == {
                **after,
                **{d: before[d] for d in elsewhere},
            }
            await asyncio.sleep(0.3)
            for viewer in viewers:
                assert viewer.foreign == 0, viewer.streams
            checked = await asyncio.to_thread(assert_frames_match_store, fleet, viewers)
            print(
                f"\nSIGKILL r1: {len(on_r1)} camera(s) re-attached to "
                f"{sorted(r.replica for r in after.values() if r)} within {reattached_in:.2f} s, "
                f"their viewers' streams ended ({first_streams[id(moved[0])].how_it_ended()}) "
                f"and were watching again within {reopened_in:.2f} s; "
                f"{checked} decrypted frames checked against the store, 0 from another camera"
            )
        finally:
            for viewer in viewers:
                await viewer.stop()
            await stop_cameras(cameras)

    asyncio.run(scenario())


# -- 3. rolling restart under streaming load (I6) --------------------------------------------------


class AttachmentMonitor:
    """Polls the store's attachments (own connection, own thread): every new epoch with the
    replica that recorded it and when this monitor saw it."""

    def __init__(self, fleet: Fleet, device_ids: list[str], interval: float = 0.05) -> None:
        self.fleet = fleet
        self.device_ids = device_ids
        self.interval = interval
        self.epochs: dict[str, int] = {}
        self.reattaches: list[tuple[float, str, str]] = []  # (monotonic, replica, device_id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="attachment-monitor", daemon=True)

    def _poll(self, store: Store) -> None:
        with store.read() as tx:
            now = {d: tx.get_attachment(d) for d in self.device_ids}
        seen_at = time.monotonic()
        for device_id, record in now.items():
            if record is None or not record.replica:
                continue
            if self.epochs.get(device_id) not in (None, record.epoch):
                self.reattaches.append((seen_at, record.replica, device_id))
            self.epochs[device_id] = record.epoch

    def _run(self) -> None:
        store: Store = open_store(self.fleet.config, migrate=False)
        try:
            while not self._stop.is_set():
                self._poll(store)
                self._stop.wait(self.interval)
        finally:
            store.close()

    def __enter__(self) -> AttachmentMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def peak_per_second(self) -> dict[str, int]:
        """Per replica: the most re-attaches it took within any one second."""
        peaks: dict[str, int] = {}
        for replica in {r for _, r, _ in self.reattaches}:
            times = sorted(t for t, r, _ in self.reattaches if r == replica)
            peaks[replica] = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
        return peaks


def test_i6_rolling_restart_under_streaming_load_keeps_every_binding(fleet, tmp_path):
    """A rolling restart (SIGTERM r1, wait for its exit, start it again; then r2; then r3; drain
    window 2 s) while 4 cameras (run_forever, endpoint list r1,r2,r3) stream to 2 viewers each
    (endpoint lists too, re-opening whenever a stream ends): every camera is attached again at
    the end, no viewer ever decrypts a frame of another camera (0 mismatches, I6, checked against
    the store), viewers of a draining replica's cameras get the reason "broker draining", and
    each drain moves each of its cameras exactly once, spread over the window: every re-attach
    lands within the window plus the cameras' full-jitter backoff (reported: the most re-attaches
    one replica took within one second)."""
    devices = [f"fleet-roll-{i}" for i in range(4)]
    report: dict[str, object] = {}

    async def scenario() -> None:
        owner = await new_app(fleet, tmp_path, "roll-owner")
        guest = await new_app(fleet, tmp_path, "roll-guest")
        cameras: list[Camera] = []
        viewers: list[Viewer] = []
        try:
            for device_id in devices:
                camera = await enroll_camera(fleet, tmp_path, device_id, "r1", owner)
                camera.client.endpoints = fleet.endpoints()
                cameras.append(await run_camera(camera, device_id))
                await owner.share(device_id, "roll-guest")
            viewers = [Viewer(owner, owner.state.user_id, d).start() for d in devices]
            viewers += [Viewer(guest, guest.state.user_id, d).start() for d in devices]
            await until(lambda: all(v.streaming() for v in viewers), "every viewer streams")
            drains: dict[str, float] = {}
            moved: dict[str, int] = {}
            terminated_at: dict[str, float] = {}
            with AttachmentMonitor(fleet, devices) as monitor:
                for name in NAMES:
                    replica = fleet[name]
                    held = await asyncio.to_thread(attachments, fleet, devices)
                    moved[name] = sum(1 for r in held.values() if r and r.replica == name)
                    terminated_at[name] = time.monotonic()
                    replica.terminate()
                    code = await asyncio.to_thread(replica.wait_exit, DRAIN_WINDOW + 15)
                    drains[name] = time.monotonic() - terminated_at[name]
                    assert code == 0, replica.tail()
                    await asyncio.to_thread(replica.start)
                    await until_async(
                        lambda: asyncio.to_thread(
                            lambda: all(
                                r is not None and r.lease_expires_at > 0
                                for r in attachments(fleet, devices).values()
                            )
                        ),
                        f"every camera attached again after {name}'s restart",
                    )
                await until(
                    lambda: all(v.streaming() for v in viewers),
                    "every viewer streams again after the rolling restart",
                )
            final = await asyncio.to_thread(attachments, fleet, devices)
            assert all(r is not None and r.replica in NAMES for r in final.values()), final
            for cam in cameras:
                assert cam.camera.attached.is_set() and not cam.task.done(), cam.device_id
            mismatches = sum(v.foreign for v in viewers)
            assert mismatches == 0, [s.stream.mismatches for v in viewers for s in v.streams]
            # The restarts ended no session that is still being watched (each replica ends only
            # its own at start): every live stream's session is open in the store.
            live_ids = [v.current.ticket.session_id for v in viewers]
            records = await asyncio.to_thread(sessions, fleet, live_ids)
            for session_id in live_ids:
                assert records[session_id].outcome is SessionOutcome.OPENED, records[session_id]
            checked = await asyncio.to_thread(assert_frames_match_store, fleet, viewers)
            reasons = Counter(s.how_it_ended() for v in viewers for s in v.streams if not s.live)
            assert reasons["end: broker draining"] > 0, reasons

            # The spread. A draining replica tells each of its cameras to go at a uniform time
            # in the window; each waits its full-jitter backoff (ceiling 0.5 s, doubling for a
            # camera moved again within STABLE_AFTER: at most 2 s after two earlier moves) and
            # attaches elsewhere, once.
            latest = DRAIN_WINDOW + 2.0 + 1.0  # + 1 s for the monitor's polling and commits
            starts = [terminated_at[n] for n in NAMES] + [math.inf]
            for index, name in enumerate(NAMES):
                begin, end = starts[index], starts[index + 1]
                times = [t for t, _, _ in monitor.reattaches if begin <= t < end]
                assert len(times) == moved[name], (name, moved, monitor.reattaches)
                late = [round(t - begin, 2) for t in times if t - begin > latest]
                assert not late, (name, late)
            peaks = monitor.peak_per_second()
            for replica, peak in peaks.items():
                assert peak <= max(moved.values()), (replica, peak, moved)
            for name, seconds in drains.items():
                assert seconds < DRAIN_WINDOW + DRAIN_GRACE + 3, (name, seconds)
            report.update(
                drains=drains,
                moved=moved,
                reattaches=len(monitor.reattaches),
                spread={
                    n: sorted(
                        round(t - terminated_at[n], 2)
                        for t, _, _ in monitor.reattaches
                        if terminated_at[n] <= t < (starts[i + 1])
                    )
                    for i, n in enumerate(NAMES)
                },
                peaks=peaks,
                reasons=dict(reasons),
                checked=checked,
                streams=sum(len(v.streams) for v in viewers),
            )
        finally:
            for viewer in viewers:
                await viewer.stop()
            await stop_cameras(cameras)

    asyncio.run(scenario())
    drains = report["drains"]
    assert isinstance(drains, dict)
    print(
        f"\nrolling restart: drain took {', '.join(f'{n} {s:.1f} s' for n, s in drains.items())}; "
        f"cameras moved per drain {report['moved']}, re-attached after SIGTERM at "
        f"{report['spread']} s; peak re-attaches per replica per second {report['peaks']}; "
        f"{report['streams']} viewer streams ({report['reasons']}); {report['checked']} "
        "decrypted frames checked against the store, 0 from another camera"
    )


def test_i10_draining_the_forwarding_replica_ends_its_viewers_with_the_reason_at_once(
    fleet, tmp_path
):
    """SIGTERM r2 while an app watches, through r2, a camera attached to r1: the forwarded Watch
    ends at once with StreamEnd "broker draining" (recorded so in the store), r2 exits without
    waiting out its drain window (it holds no camera), and r1's Attach stream is untouched."""
    device_id = "fleet-drain-fwd"
    measured: dict[str, float] = {}

    async def scenario() -> None:
        owner = await new_app(fleet, tmp_path, "drain-owner", "r2")
        camera = await enroll_camera(fleet, tmp_path, device_id, "r1", owner)
        cam = await run_camera(camera, device_id)
        try:
            before = await attached_to(fleet, device_id, "r1")
            log = StreamLog(await owner.open_session(device_id))
            watching = asyncio.create_task(watch_into(owner, log))
            await until(lambda: len(log.frames) >= 3, "the viewer on r2 decrypts frames")
            started = time.monotonic()
            fleet["r2"].terminate()
            measured["ended"] = await _ended_within(log, started, "r2 drains")
            await watching
            assert log.end_reason == "broker draining", log.how_it_ended()
            assert log.foreign == 0 and log.rejected == 0, log.stream
            code = await asyncio.to_thread(fleet["r2"].wait_exit, DRAIN_WINDOW + DRAIN_GRACE + 5)
            measured["exit"] = time.monotonic() - started
            assert code == 0, fleet["r2"].tail()
            records = await asyncio.to_thread(sessions, fleet, [log.ticket.session_id])
            record = records[log.ticket.session_id]
            assert record is not None
            assert (record.outcome, record.reason) == (SessionOutcome.ENDED, "broker draining")
            after = await attached_to(fleet, device_id, "r1")
            assert after.epoch == before.epoch, (before, after)  # the camera never moved
            assert cam.camera.attached.is_set() and not cam.task.done()
        finally:
            await stop_cameras([cam])

    asyncio.run(scenario())
    print(
        f"\ndrain of the forwarding replica: viewer ended after {measured['ended'] * 1000:.0f} ms, "
        f"r2 exited after {measured['exit']:.1f} s (window {DRAIN_WINDOW:g} s)"
    )
    assert measured["ended"] < REVOCATION_BOUND, measured
    assert measured["exit"] < DRAIN_WINDOW, measured


# -- 4. a forged forward with an old epoch (I10) ---------------------------------------------------


def test_i10_forged_forward_with_an_old_epoch_is_failed_precondition(fleet, tmp_path):
    """r2's own replica certificate (certs/replicas/r2) calls ReplicaService.ForwardWatch on r1's
    internal listener for a genuine session, with the epoch the camera had before it re-attached
    (and with others that are not the current one): r1 refuses with FAILED_PRECONDITION and
    STALE_EPOCH, relays nothing, and the session still works through the normal path."""
    device_id = "fleet-epoch-cam"

    async def scenario() -> None:
        owner = await new_app(fleet, tmp_path, "epoch-owner", "r2")
        camera = await enroll_camera(fleet, tmp_path, device_id, "r1", owner)
        first = asyncio.create_task(camera.run())
        await until(camera.attached.is_set, "first attach on r1")
        old = (await attached_to(fleet, device_id, "r1")).epoch
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        second = asyncio.create_task(camera.run())
        try:
            await until(camera.attached.is_set, "second attach on r1")
            current = await until_async(
                lambda: asyncio.to_thread(
                    lambda: (
                        (a := attachments(fleet, [device_id])[device_id]) is not None
                        and a.epoch > old
                        and a.replica == "r1"
                        and a
                    )
                ),
                "the re-attach recorded with a new epoch",
            )
            ticket = await owner.open_session(device_id)
            request = replica_pb2.ForwardWatchRequest(
                session_id=ticket.session_id,
                token=ticket.token,
                app_ephemeral_public_key=ticket.ephemeral_public,
                app_spiffe_id=owner.state.spiffe_id,
                cnf_thumbprint=owner.thumbprint(),
            )
            folder = fleet.files.root / "replicas"
            key, chain = (folder / "r2.key").read_bytes(), (folder / "r2.pem").read_bytes()

            def forge(epoch: int) -> grpc.RpcError:
                request.attach_epoch = epoch
                with mtls_channel(fleet["r1"].internal, fleet.ca_pem, key, chain) as channel:
                    call = replica_pb2_grpc.ReplicaServiceStub(channel).ForwardWatch(
                        request, timeout=10
                    )
                    with pytest.raises(grpc.RpcError) as caught:
                        next(iter(call))
                return caught.value

            for stale in (old, current.epoch - 1, current.epoch + 1, 0):
                error = await asyncio.to_thread(forge, stale)
                assert error.code() is grpc.StatusCode.FAILED_PRECONDITION, (stale, error)
                assert error.details() == STALE_EPOCH, error.details()
            # Nothing was relayed or closed: the session is still open, and watching it through
            # r2 (which forwards the current epoch) works.
            record = (await asyncio.to_thread(sessions, fleet, [ticket.session_id]))[
                ticket.session_id
            ]
            assert record is not None and record.outcome is SessionOutcome.OPENED, record
            assert camera.stats.streams_started == 0, camera.stats
            log = StreamLog(ticket)
            watching = asyncio.create_task(watch_into(owner, log))
            await until(lambda: len(log.frames) >= 3 or not log.live, "the real watch streams")
            assert log.live and log.foreign == 0 and log.rejected == 0, log.how_it_ended()
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        finally:
            second.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await second

    asyncio.run(scenario())


# -- 5. single-use claim codes across replicas (I8) ----------------------------------------------


@dataclass(frozen=True)
class SyncApp:
    user_id: str
    key: bytes
    chain: bytes


def _sync_app(fleet: Fleet, username: str) -> SyncApp:
    ca = fleet.ca_pem
    with grpc.secure_channel(fleet["r1"].bootstrap, grpc.ssl_channel_credentials(ca)) as channel:
        stub = bootstrap_pb2_grpc.BootstrapStub(channel)
        stub.CreateAccount(
            bootstrap_pb2.CreateAccountRequest(username=username, password=PASSWORD), timeout=30
        )
        key = p256()
        response = stub.EnrollApp(
            bootstrap_pb2.EnrollAppRequest(
                username=username, password=PASSWORD, csr_pem=csr_for(key), label="phone"
            ),
            timeout=30,
        )
    return SyncApp(
        str(response.user_id), key_pem(key), str(response.certificate_chain_pem).encode()
    )


def test_i8_concurrent_claims_across_replicas_give_exactly_one_owner(fleet, tmp_path):
    """20 ClaimDevice calls with the same correct code at the same moment, spread over r1, r2
    and r3 (4 users, 5 calls each): exactly one succeeds and there is exactly one owner grant.
    The rest are refused, PERMISSION_DENIED with the claim refusal while the device's wrong-claim
    budget (10 per window) lasts and RESOURCE_EXHAUSTED after: one budget for the whole fleet,
    spent exactly, however the calls were spread over the replicas."""
    device_id = "fleet-claim-cam"
    calls = 20
    config = fleet.config
    budget = config.claim_failures_per_device
    assert calls // 4 <= config.claim_failures_per_user  # the per-user budget is never reached

    async def enroll() -> str:
        camera = await enroll_camera(fleet, tmp_path, device_id, "r2", None)
        return camera.client.state.claim_code

    code = asyncio.run(enroll())
    with ThreadPoolExecutor(4) as pool:
        users = list(pool.map(lambda i: _sync_app(fleet, f"claimer{i}"), range(4)))
    plan = [(users[i % 4], NAMES[i % 3]) for i in range(calls)]
    channels = [
        mtls_channel(fleet[replica].main, fleet.ca_pem, user.key, user.chain)
        for user, replica in plan
    ]
    barrier = threading.Barrier(calls)

    def attempt(index: int) -> tuple[grpc.StatusCode, str]:
        stub = app_pb2_grpc.AppServiceStub(channels[index])
        request = app_pb2.ClaimDeviceRequest(device_id=device_id, claim_code=code)
        barrier.wait(timeout=30)
        try:
            stub.ClaimDevice(request, timeout=30)
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, ""

    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=10)
        with ThreadPoolExecutor(calls) as pool:
            results = list(pool.map(attempt, range(calls)))
    finally:
        for channel in channels:
            channel.close()
    codes = Counter(code.name for code, _ in results)
    assert codes == Counter(
        OK=1, PERMISSION_DENIED=budget, RESOURCE_EXHAUSTED=calls - 1 - budget
    ), results
    assert {d for c, d in results if c is grpc.StatusCode.PERMISSION_DENIED} == {CLAIM_REFUSED}
    winner = plan[[c for c, _ in results].index(grpc.StatusCode.OK)][0]

    def owners(tx: Transaction) -> list[tuple[str, Role]]:
        grants = [tx.get_grant(device_id, u.user_id) for u in users]
        return [(g.user_id, g.role) for g in grants if g is not None]

    assert fleet.read(owners) == [(winner.user_id, Role.OWNER)]
    device = fleet.read(lambda tx: tx.get_device(device_id))
    assert device is not None and device.claim_code_hash is None
    store: Store = open_store(fleet.config, migrate=False)
    try:
        actions = Counter(e.action for e in store.audit_entries() if e.subject == device_id)
    finally:
        store.close()
    assert actions["device.claimed"] == 1, actions
    assert actions["device.claim.denied"] == budget, actions
    by_replica = Counter(
        (replica, code.name) for (_, replica), (code, _) in zip(plan, results, strict=True)
    )
    print(
        f"\nI8 claim race over r1..r3: {dict(codes)}; by replica {dict(sorted(by_replica.items()))}"
    )
