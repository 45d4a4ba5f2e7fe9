"""Reconnect storm: many cameras with live watchers, the broker restarts, everyone comes back at once.

This is the shape of the 2024 incident (every camera reconnected at once after an outage and a
cache mixed up device/user mappings). Setup, before any timing: a temporary home with a fresh dev
PKI; N cameras enrolled with one-time tokens (DeviceAuthority, keys made "on the device") and, for
a fraction of them, an owner account with one app instance that claimed the camera (Accounts,
Ownership), all with the core API on the broker's database before the broker starts.

Processes on this machine: the broker as shipped (grpc.aio, mutual TLS, one core thread) in its own
process; K camera processes (the device SDK: DeviceClient.attach / AttachSession and
simcam.SimulatedCamera, identities in memory, one mutual-TLS channel per camera); one watcher
process (the app SDK: AppClient.open_session / watch; WatchStream verifies the camera's chain and
signature and decrypts every frame). Cameras attach; each owner's app opens a session on its camera
and watches it. Then, per restart: the broker is killed (SIGKILL: an outage) and a new broker
process starts on the same home and the same ports. Cameras notice the broken Attach stream and
reconnect with exponential backoff and full jitter; watchers notice the broken Watch stream, open a
NEW session (no session survives a restart) and watch again, with the same backoff.

Measured per restart: the time until every camera is re-attached (AttachAccepted received), from
the kill and from the moment the new broker listens; the time until every watcher has a new
session delivering frames; the broker's CPU and core-thread load during the storm; and the broker's
peak memory (VmHWM). The oracle: every decrypted frame's plaintext (simcam writes its device id and
session id in each) must name the watcher's camera and session; after the run every session that
delivered frames is checked against the store of record (its device and user); the audit log must
hold no relay alarm and its hash chain must verify. Goal: 10,000 cameras re-attached <= 5 s.

    .venv/bin/python bench/storm.py                   # 10,000 cameras, 10 % watched, 3 restarts
    .venv/bin/python bench/storm.py --quick           # 500 cameras, 2 restarts (< 90 s)
    .venv/bin/python bench/storm.py --profile DIR     # + one extra restart under py-spy
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` importable as a script
from bench._common import (
    STORM_WHAT_IFS,
    AppCredentials,
    BrokerChild,
    CameraCredentials,
    ClientTrust,
    backoff_delay,
    bench_config,
    count_unretrieved,
    listen_overflows,
    machine_cpu,
    make_app_client,
    make_device_client,
    median,
    pct,
    pid_cpu,
    pid_memory,
    process_cpu,
    provision,
    py_spy_binary,
    raise_nofile,
    stamped_camera,
    summarize_profile,
    token_verifier,
    wait_quiet,
    write_trust_file,
)
from broker.audit.chain import verify_chain
from broker.client.simcam import parse_payload
from broker.clock import SystemClock
from broker.config import Config
from broker.pki.ca import init_pki
from broker.protocol.e2e import HandshakeError
from broker.store.sqlite import SqliteStore

CHEAP_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_kib": 8192, "argon2_parallelism": 1}


# ---------------------------------------------------------------------------------------------
# camera processes
# ---------------------------------------------------------------------------------------------
def cameras_main(conn: Connection, main: str, trust: ClientTrust, cams: list[CameraCredentials],
                 fps: float, frame_bytes: int, base: float, cap: float) -> None:
    raise_nofile()
    asyncio.run(_cameras(conn, main, trust, cams, fps, frame_bytes, base, cap))


async def _cameras(conn: Connection, main: str, trust: ClientTrust, cams: list[CameraCredentials],
                   fps: float, frame_bytes: int, base: float, cap: float) -> None:
    loop = asyncio.get_running_loop()
    verifier = token_verifier(trust)
    cameras = [stamped_camera(make_device_client(c, main, trust, verifier), fps, frame_bytes)
               for c in cams]
    attached_at: list[list[float]] = [[] for _ in cameras]
    attempts = Counter[str]()
    count_unretrieved(attempts, "SDK write errors nobody retrieved")

    async def life(i: int, cam: Any) -> None:
        """Attach; when the stream breaks (or never came up), back off with jitter and retry."""
        attempt = 0
        while True:
            cam.ended = None
            runner = asyncio.create_task(cam.run())
            waiter = asyncio.create_task(cam.attached.wait())
            attempts["attempts"] += 1
            done, _ = await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                attached_at[i].append(time.monotonic())
                attempt = 0
            else:
                waiter.cancel()
            await asyncio.wait({runner})
            if runner.cancelled():  # the call was cancelled under it (see stamped_camera)
                attempts["run() ended cancelled"] += 1
            elif runner.exception() is not None:  # e.g. a write on a call that already failed
                attempts[f"ended {type(runner.exception()).__name__}"] += 1
            if cam.ended is not None:
                attempts[f"ended {cam.ended.code().name}: {(cam.ended.details() or '')[:40]}"] += 1
            cam.late.clear()
            attempt += 1
            await asyncio.sleep(backoff_delay(attempt, base, cap))

    conn.send(("ready", os.getpid()))
    tasks: list[asyncio.Task[None]] = []
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command is None:
            break
        what = command[0]
        if what == "go":
            tasks = [asyncio.create_task(life(i, cam)) for i, cam in enumerate(cameras)]
            conn.send("going")
        elif what == "since":
            t = command[1]
            conn.send(sum(1 for times in attached_at if times and times[-1] >= t))
        elif what == "times":
            t = command[1]
            conn.send([next((x for x in times if x >= t), None) for times in attached_at])
        elif what == "stats":
            conn.send({"attempts": dict(attempts), "cpu": process_cpu(),
                       "frames_sent": sum(c.stats.frames_sent for c in cameras),
                       "streams_started": sum(c.stats.streams_started for c in cameras),
                       "streams_refused": sum(c.stats.streams_refused for c in cameras),
                       **pid_memory(os.getpid())})
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# watcher process
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Viewing:
    """One session of one watcher."""

    session_id: str
    opened_at: float
    first_frame: float = 0.0
    frames: int = 0
    devices_seen: set[str] = dataclasses.field(default_factory=set)


def watchers_main(conn: Connection, main: str, trust: ClientTrust, apps: list[AppCredentials],
                  base: float, cap: float, home: str) -> None:
    raise_nofile()
    asyncio.run(_watchers(conn, main, trust, apps, base, cap, Path(home)))


async def _watchers(conn: Connection, main: str, trust: ClientTrust, apps: list[AppCredentials],
                    base: float, cap: float, home: Path) -> None:
    loop = asyncio.get_running_loop()
    trust_path = write_trust_file(home / f"watchers-trust-{os.getpid()}.json", trust)
    clients = [make_app_client(a, main, trust, trust_path) for a in apps]
    viewings: list[list[Viewing]] = [[] for _ in apps]
    counts = Counter[str]()
    outcomes = Counter[str]()
    count_unretrieved(outcomes, "SDK write errors nobody retrieved")

    async def life(i: int) -> None:
        app, device_id = clients[i], apps[i].device_id
        attempt = 0
        while True:
            stream = None
            try:
                ticket = await app.open_session(device_id)
                viewing = Viewing(ticket.session_id, time.monotonic())
                viewings[i].append(viewing)
                async with app.watch(ticket) as stream:
                    async for plaintext in stream.frames():
                        seen_device, seen_session, _ = parse_payload(plaintext)
                        viewing.devices_seen.add(seen_device)
                        if seen_device != device_id or seen_session != ticket.session_id:
                            counts["mismatched frames"] += 1
                        viewing.frames += 1
                        counts["frames"] += 1
                        if not viewing.first_frame:
                            viewing.first_frame = time.monotonic()
                            attempt = 0
                outcomes[f"end: {stream.end_reason}"] += 1
            except grpc.aio.AioRpcError as error:
                outcomes[f"{error.code().name}: {(error.details() or '')[:60]}"] += 1
            except HandshakeError as error:
                counts["handshake errors"] += 1
                outcomes[f"handshake: {error.message}"] += 1
            finally:
                if stream is not None:
                    counts["rejected frames"] += stream.rejected
            attempt += 1
            await asyncio.sleep(backoff_delay(attempt, base, cap))

    conn.send(("ready", os.getpid()))
    tasks: list[asyncio.Task[None]] = []
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command is None:
            break
        what = command[0]
        if what == "go":
            tasks = [asyncio.create_task(life(i)) for i in range(len(clients))]
            conn.send("going")
        elif what == "since":  # watchers with a session opened since t that delivered a frame
            t = command[1]
            conn.send(sum(1 for vs in viewings if any(v.opened_at >= t and v.first_frame
                                                      for v in vs)))
        elif what == "times":
            t = command[1]
            out = []
            for vs in viewings:
                firsts = [v.first_frame for v in vs if v.opened_at >= t and v.first_frame]
                out.append((min(firsts) if firsts else None,
                            sum(1 for v in vs if v.opened_at >= t)))
            conn.send(out)
        elif what == "stats":
            conn.send({"counts": dict(counts), "outcomes": dict(outcomes), "cpu": process_cpu(),
                       **pid_memory(os.getpid())})
        elif what == "sessions":
            conn.send([(v.session_id, apps[i].user_id, apps[i].device_id, sorted(v.devices_seen),
                        v.frames) for i, vs in enumerate(viewings) for v in vs if v.frames])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# the fleet, from the parent
# ---------------------------------------------------------------------------------------------
class Fleet:
    """K camera processes and one watcher process."""

    def __init__(self, main: str, trust: ClientTrust, cams: list[CameraCredentials],
                 apps: list[AppCredentials], args: argparse.Namespace, home: Path) -> None:
        ctx = mp.get_context("spawn")
        self.cams: list[tuple[mp.process.BaseProcess, Connection, int]] = []
        self.watchers: tuple[mp.process.BaseProcess, Connection, int] | None = None
        for k in range(args.camera_procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=cameras_main, name=f"cameras{k}", daemon=True, args=(
                child, main, trust, cams[k::args.camera_procs], args.fps, args.frame_bytes,
                args.backoff_base, args.backoff_cap))
            proc.start()
            self.cams.append((proc, parent, 0))
        if apps:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=watchers_main, name="watchers", daemon=True, args=(
                child, main, trust, apps, args.backoff_base, args.backoff_cap, str(home)))
            proc.start()
            self.watchers = (proc, parent, 0)
        self.cams = [(p, c, self._ready(c)) for p, c, _ in self.cams]
        if self.watchers is not None:
            p, c, _ = self.watchers
            self.watchers = (p, c, self._ready(c))

    @staticmethod
    def _ready(conn: Connection) -> int:
        if not conn.poll(300):
            raise RuntimeError("a client process did not get ready")
        _, pid = conn.recv()
        return int(pid)

    @staticmethod
    def _ask(conn: Connection, command: tuple[Any, ...], timeout: float = 120) -> Any:
        conn.send(command)
        if not conn.poll(timeout):
            raise RuntimeError(f"a client process did not answer {command[0]}")
        return conn.recv()

    def pids(self) -> list[int]:
        pids = [pid for _, _, pid in self.cams]
        if self.watchers is not None:
            pids.append(self.watchers[2])
        return pids

    def go_cameras(self) -> None:
        for _, conn, _ in self.cams:
            conn.send(("go",))
        for _, conn, _ in self.cams:
            conn.recv()

    def go_watchers(self) -> None:
        if self.watchers is not None:
            self._ask(self.watchers[1], ("go",))

    def cameras_since(self, t: float) -> int:
        for _, conn, _ in self.cams:
            conn.send(("since", t))
        return sum(conn.recv() for _, conn, _ in self.cams)

    def watchers_since(self, t: float) -> int:
        return int(self._ask(self.watchers[1], ("since", t))) if self.watchers else 0

    def camera_times(self, t: float) -> list[float | None]:
        return [x for _, conn, _ in self.cams for x in self._ask(conn, ("times", t))]

    def watcher_times(self, t: float) -> list[tuple[float | None, int]]:
        return list(self._ask(self.watchers[1], ("times", t))) if self.watchers else []

    def camera_stats(self) -> list[dict[str, Any]]:
        return [self._ask(conn, ("stats",)) for _, conn, _ in self.cams]

    def watcher_stats(self) -> dict[str, Any]:
        return dict(self._ask(self.watchers[1], ("stats",))) if self.watchers else {}

    def sessions(self) -> list[tuple[str, str, str, list[str], int]]:
        return list(self._ask(self.watchers[1], ("sessions",))) if self.watchers else []

    def stop(self) -> None:
        procs = list(self.cams) + ([self.watchers] if self.watchers else [])
        for _proc, conn, _ in procs:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc, _, _ in procs:
            proc.join(15)
            if proc.is_alive():
                proc.kill()


def wait_until(fleet: Fleet, since: float, cameras: int, watchers: int, timeout: float) -> bool:
    """Poll the fleet until every camera re-attached and every watcher streams again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fleet.cameras_since(since) >= cameras and fleet.watchers_since(since) >= watchers:
            return True
        time.sleep(0.2)
    return False


@dataclasses.dataclass
class Restart:
    outage: float  # kill -> new broker listening
    camera_times: list[float]  # re-attach, seconds after the kill, for those that did
    cameras_missing: int
    watcher_times: list[float]  # first frame of a new session, seconds after the kill
    watchers_missing: int
    sessions_per_watcher: list[int]
    broker_cpu: float  # seconds, from start of the new process to all back
    clients_cpu: float
    machine: float  # busy cores, averaged kill -> all back
    others: float  # busy cores by processes outside this bench
    core_busy: float
    core_calls: int
    core_batches: int
    vm_hwm_kib: int
    storm_wall: float  # kill -> all back (or timeout)
    threads: dict[str, float]  # the new broker's CPU seconds by thread group
    core_by_fn: dict[str, tuple[int, float]]  # core-thread calls and wall busy by function
    syn_drops: int  # ListenOverflows during the storm (machine-wide)

    def cam_all(self) -> float:
        return max(self.camera_times) if self.camera_times and not self.cameras_missing else math.inf

    def watch_all(self) -> float:
        return max(self.watcher_times) if self.watcher_times and not self.watchers_missing else (
            0.0 if not self.watcher_times and not self.watchers_missing else math.inf)


def restart(broker: BrokerChild, fleet: Fleet, home: Path, cameras: int, watchers: int,
            timeout: float, what_if: tuple[str, ...], py_spy: str | None = None,
            profile: Path | None = None) -> tuple[BrokerChild, Restart]:
    ports = broker.ports
    ours = fleet.pids()
    clients0 = sum(pid_cpu(p) for p in ours)
    machine0 = machine_cpu()
    drops0 = listen_overflows()
    t_kill = time.monotonic()
    broker.kill()
    new = BrokerChild(home, CHEAP_ARGON2, ports, what_if)
    spy = None
    if py_spy and profile:
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(new.pid), "--rate", "200", "--format", "raw",
             "--output", str(profile), "--threads", "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(fleet, t_kill, cameras, watchers, timeout)
    t_back = time.monotonic()
    drops = listen_overflows() - drops0
    broker_cpu = pid_cpu(new.pid)
    clients_cpu = sum(pid_cpu(p) for p in ours) - clients0
    machine1 = machine_cpu()
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    stats = new.stats()
    cam_times = [x - t_kill for x in fleet.camera_times(t_kill) if x is not None]
    wt = fleet.watcher_times(t_kill)
    busy, _, total = (b - a for a, b in zip(machine0, machine1, strict=True))
    ncpu = os.cpu_count() or 1
    machine = ncpu * busy / total if total else 0.0
    wall = t_back - t_kill
    # the old broker's CPU is gone with it: count the new one plus clients against the wall
    others = max(0.0, machine - (broker_cpu + clients_cpu) / wall) if wall else 0.0
    return new, Restart(
        outage=new.ready_at - t_kill,
        camera_times=cam_times, cameras_missing=cameras - len(cam_times),
        watcher_times=[x - t_kill for x, _ in wt if x is not None],
        watchers_missing=sum(1 for x, _ in wt if x is None),
        sessions_per_watcher=[n for _, n in wt],
        broker_cpu=broker_cpu, clients_cpu=clients_cpu, machine=machine, others=others,
        core_busy=stats["core_busy"], core_calls=stats["core_calls"],
        core_batches=stats["core_batches"],
        vm_hwm_kib=stats.get("VmHWM", 0), storm_wall=wall, threads=stats["threads"], core_by_fn=stats["core_by_fn"],
        syn_drops=drops,
    )


def print_restart(index: int, r: Restart, cameras: int, watchers: int) -> None:
    ct = r.camera_times
    back = r.outage
    cam_all = r.cam_all()
    print(f"  restart {index}: outage (kill -> new broker listening) {back:.2f} s")
    if ct:
        print(f"    cameras re-attached {len(ct):,}/{cameras:,}: all after {cam_all:.2f} s from the "
              f"kill = {cam_all - back:.2f} s after the broker listened; p50 {pct(ct, 0.5) - back:.2f}"
              f" s  p90 {pct(ct, 0.9) - back:.2f} s  p99 {pct(ct, 0.99) - back:.2f} s after it "
              f"listened;  {len(ct) / max(1e-9, cam_all - back):,.0f} cameras/s")
    else:
        print(f"    cameras re-attached 0/{cameras}")
    if watchers:
        wt = r.watcher_times
        print(f"    watchers streaming again {len(wt):,}/{watchers:,} (new session + first frame): "
              f"all after {r.watch_all():.2f} s from the kill; p50 {pct(wt, 0.5):.2f} s  p99 "
              f"{pct(wt, 0.99):.2f} s; sessions opened per watcher median "
              f"{median([float(n) for n in r.sessions_per_watcher]):.0f} max "
              f"{max(r.sessions_per_watcher, default=0)}")
    wall = max(r.storm_wall - back, 1e-9)
    print(f"    broker: {r.broker_cpu:.1f} s CPU in {wall:.1f} s since it started "
          f"({100 * r.broker_cpu / wall:.0f}% of a core), core thread in calls "
          f"{100 * r.core_busy / wall:.0f}% of the time ({r.core_calls:,} calls in "
          f"{r.core_batches:,} group commits), VmHWM "
          f"{r.vm_hwm_kib / 1024:.0f} MiB;  clients {r.clients_cpu:.1f} s CPU;  machine "
          f"{r.machine:.2f}/{os.cpu_count()} cores busy, {r.others:.2f} by other processes")
    back_count = max(1, len(ct))
    top = sorted(r.threads.items(), key=lambda kv: -kv[1])[:4]
    print("    broker CPU by thread, per re-attached camera: " + ";  ".join(
        f"{name} {1e3 * sec / back_count:.2f} ms" for name, sec in top)
        + f";  SYNs dropped on full accept queues: {r.syn_drops:,}")
    calls = sorted(r.core_by_fn.items(), key=lambda kv: -kv[1][1])[:6]
    print("    core thread (one thread, every store call; wall in the call, commit excluded): "
          + ";  ".join(
        f"{name} {n:,}x {1e3 * busy / max(n, 1):.2f} ms" for name, (n, busy) in calls)
        + f"  = {sum(n for n, _ in r.core_by_fn.values()) / back_count:.1f} calls and "
        f"{1e3 * sum(b for _, b in r.core_by_fn.values()) / back_count:.2f} ms wall per camera")


# ---------------------------------------------------------------------------------------------
# the store check
# ---------------------------------------------------------------------------------------------
def check_store(config: Config, sessions: list[tuple[str, str, str, list[str], int]]) -> list[str]:
    """Every session that delivered frames: its store row names the watcher's user and camera,
    and the frames named that camera. No relay alarm audited; the audit chain verifies."""
    problems: list[str] = []
    conn = sqlite3.connect(config.database)
    try:
        rows = {sid: (dev, user) for sid, dev, user in conn.execute(
            "SELECT session_id, device_id, user_id FROM sessions")}
        alarms = conn.execute(
            "SELECT COUNT(*) FROM audit_log WHERE action = 'relay.alarm'").fetchone()[0]
        ended = conn.execute(
            "SELECT COUNT(*) FROM audit_log WHERE action LIKE 'session.%'").fetchone()[0]
    finally:
        conn.close()
    bad = 0
    frames = 0
    for session_id, user_id, device_id, seen, n in sessions:
        frames += n
        row = rows.get(session_id)
        if row is None or row != (device_id, user_id) or seen != [device_id]:
            bad += 1
    print(f"  sessions that delivered frames     {len(sessions):>9,}  ({frames:,} frames); "
          f"store disagrees on {bad}  {'ok' if not bad else 'MISMATCH'}")
    print(f"  relay.alarm audit entries          {alarms:>9}  {'ok' if not alarms else 'ALARM'}")
    if bad:
        problems.append(f"{bad} sessions whose frames or store row name another camera or user")
    if alarms:
        problems.append(f"{alarms} relay alarms")
    store = SqliteStore(config.database, migrate=False)
    try:
        result = verify_chain(store.audit_entries())
    finally:
        store.close()
    print(f"  audit hash chain                   {result.entries:>9,}  "
          f"{'ok' if result.ok else 'BROKEN'}  ({ended:,} session.* entries)")
    if not result.ok:
        problems.append(f"audit chain broken at {result.first_bad_seq}")
    return problems


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="500 cameras, 2 restarts (< 90 s)")
    p.add_argument("--cameras", type=int, help="cameras (default 10,000, quick 500)")
    p.add_argument("--watched", type=float, default=0.10,
                   help="fraction of cameras with a live watcher (0.10)")
    p.add_argument("--restarts", type=int, help="broker restarts (default 3, quick 2)")
    p.add_argument("--camera-procs", type=int, default=2, help="camera client processes (2)")
    p.add_argument("--fps", type=float, default=1.0, help="frames/s of a watched camera (1)")
    p.add_argument("--frame-bytes", type=int, default=1024, help="plaintext bytes per frame (1024)")
    p.add_argument("--backoff-base", type=float, default=0.5,
                   help="reconnect backoff: first window, seconds (0.5)")
    p.add_argument("--backoff-cap", type=float, default=2.0,
                   help="reconnect backoff: largest window, seconds (2.0)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds of steady streaming after each storm (3)")
    p.add_argument("--timeout", type=float, default=240.0,
                   help="give up on a storm after this many seconds (240)")
    p.add_argument("--wait-quiet", type=float, metavar="S",
                   help="shared machine: before each restart wait up to S s until other processes "
                   "use less than --quiet-below cores (default 30, quick 5)")
    p.add_argument("--quiet-below", type=float, default=0.2, help="cores (0.2)")
    p.add_argument("--what-if", default="", metavar="A,B",
                   help="broker tweaks for every broker of the run (not the broker as shipped): "
                   + "; ".join(f"{k}: {v}" for k, v in STORM_WHAT_IFS.items()))
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="one extra restart with py-spy on the new broker (not in the figures)")
    p.add_argument("--py-spy", help="py-spy executable (default: the venv's, else PATH)")
    p.add_argument("--keep", action="store_true", help="keep the temporary broker home")
    args = p.parse_args(argv)
    args.cameras = args.cameras or (500 if args.quick else 10_000)
    args.restarts = args.restarts or (2 if args.quick else 3)
    if args.wait_quiet is None:
        args.wait_quiet = 5.0 if args.quick else 30.0
    args.what_if = tuple(x for x in args.what_if.split(",") if x)
    for name in args.what_if:
        if name not in STORM_WHAT_IFS:
            p.error(f"unknown what-if {name!r}; choose from {', '.join(STORM_WHAT_IFS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    nofile = raise_nofile()
    home = Path(tempfile.mkdtemp(prefix="bench-storm-"))
    ncpu = os.cpu_count() or 1
    n = args.cameras
    w = round(n * args.watched)
    print(f"reconnect storm benchmark: grpcio {grpc.__version__}, Python "
          f"{sys.version.split()[0]}, {ncpu} CPUs, open-file limit {nofile}, home {home}")
    broker: BrokerChild | None = None
    fleet: Fleet | None = None
    restarts: list[Restart] = []
    problems: list[str] = []
    try:
        config = bench_config(home, **CHEAP_ARGON2)
        init_pki(config, SystemClock())
        prep = time.monotonic()
        cams, apps, trust = provision(config, n, w, progress=lambda m: print(f"  setup: {m}"))
        print(f"setup: {n:,} cameras enrolled with one-time tokens, {w:,} owners each with an app "
              f"instance that claimed one camera (core API, before the broker starts) in "
              f"{time.monotonic() - prep:.1f} s")
        if args.what_if:
            print("WHAT-IF (not the broker as shipped): " + "; ".join(
                f"{k}: {STORM_WHAT_IFS[k]}" for k in args.what_if))
        broker = BrokerChild(home, CHEAP_ARGON2, what_if=args.what_if)
        fleet = Fleet(broker.main, trust, cams, apps, args, home)
        print(f"broker pid {broker.pid} ports {broker.ports}; {args.camera_procs} camera "
              f"processes, 1 watcher process; reconnect backoff full jitter, window "
              f"{args.backoff_base:g} s doubling to {args.backoff_cap:g} s; watched cameras send "
              f"{args.frame_bytes} B frames at {args.fps:g} fps")

        start = time.monotonic()
        fleet.go_cameras()
        if not wait_until(fleet, 0.0, n, 0, args.timeout):
            problems.append("cold start: not every camera attached")
        cold = time.monotonic() - start
        start = time.monotonic()
        fleet.go_watchers()
        if not wait_until(fleet, 0.0, n, w, args.timeout):
            problems.append("cold start: not every watcher streams")
        print(f"cold start: {n:,} cameras attached in {cold:.1f} s ({n / cold:,.0f}/s); "
              f"{w:,} watchers opened sessions and got frames in {time.monotonic() - start:.1f} s")
        time.sleep(args.settle)
        stats = broker.stats()
        print(f"steady: broker online {stats['online']:,}, live sessions {stats['live_sessions']:,},"
              f" VmRSS {stats.get('VmRSS', 0) / 1024:.0f} MiB, VmHWM "
              f"{stats.get('VmHWM', 0) / 1024:.0f} MiB")

        print(f"\n{args.restarts} restarts (SIGKILL, new broker process on the same home and ports)")
        for r in range(args.restarts):
            waited, load = wait_quiet([broker.pid, *fleet.pids()], args.quiet_below,
                                      args.wait_quiet)
            if waited >= 0.5:
                print(f"  (waited {waited:.0f} s for other processes to calm down; they used "
                      f"{load:.2f} cores just before the kill)")
            broker, result = restart(broker, fleet, home, n, w, args.timeout, args.what_if)
            restarts.append(result)
            print_restart(r + 1, result, n, w)
            if result.cameras_missing or result.watchers_missing:
                problems.append(f"restart {r + 1}: {result.cameras_missing} cameras and "
                                f"{result.watchers_missing} watchers not back in {args.timeout:g} s")
            time.sleep(args.settle)
        if args.profile:
            py_spy = py_spy_binary(args.py_spy)
            if py_spy:
                args.profile.mkdir(parents=True, exist_ok=True)
                raw = args.profile / "storm-broker.txt"
                broker, result = restart(broker, fleet, home, n, w, args.timeout, args.what_if,
                                         py_spy, raw)
                print(f"\nprofile: one extra restart with py-spy on the new broker (not in the "
                      f"figures): all cameras back {result.cam_all() - result.outage:.2f} s after it "
                      f"listened; stacks in {raw}")
                if raw.exists():
                    summarize_profile(raw, top=14, threads_shown=4)
                time.sleep(args.settle)
            else:
                print("  (--profile: py-spy not found; pass --py-spy PATH)")

        stats = broker.stats()
        camera_stats = fleet.camera_stats()
        watcher_stats = fleet.watcher_stats()
        sessions = fleet.sessions()
        attempts = Counter[str]()
        for s in camera_stats:
            attempts.update(s["attempts"])
        counts = watcher_stats.get("counts", {})
        outcomes = Counter(watcher_stats.get("outcomes", {}))
        unretrieved = attempts.pop("SDK write errors nobody retrieved", 0)
        print(f"\nclients: camera Attach attempts {attempts.pop('attempts', 0):,}; how they ended "
              f"(most common): {attempts.most_common(4)}")
        print(f"  camera SDK: {unretrieved:,} shielded writes failed after their caller left "
              "(asyncio 'Task exception was never retrieved', counted instead of printed)")
        print(f"  watcher outcomes (most common): {outcomes.most_common(5)}")
        camera_hwm = ", ".join(f"{s.get('VmHWM', 0) / 1024:.0f}" for s in camera_stats)
        print(f"  client memory VmHWM: cameras {camera_hwm} MiB, watchers "
              f"{watcher_stats.get('VmHWM', 0) / 1024:.0f} MiB")
        fleet.stop()
        fleet = None
        broker.stop()
        broker = None

        print("\noracle:")
        mismatched = counts.get("mismatched frames", 0)
        rejected = counts.get("rejected frames", 0)
        handshakes = counts.get("handshake errors", 0)
        print(f"  frames decrypted by watchers       {counts.get('frames', 0):>9,}; naming another "
              f"camera or session {mismatched}; refused by the SDK {rejected}; handshake "
              f"errors {handshakes}  {'ok' if not mismatched + rejected + handshakes else 'MISMATCH'}")
        if mismatched + rejected + handshakes:
            problems.append(f"{mismatched} mismatched, {rejected} refused frames, "
                            f"{handshakes} handshake errors")
        problems += check_store(config, sessions)
    finally:
        if fleet is not None:
            fleet.stop()
        if broker is not None:
            broker.stop()
        if args.keep:
            print(f"kept {home}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(home)

    print(f"\nSUMMARY ({n:,} cameras, {w:,} watched; goal: 10,000 cameras re-attached <= 5 s; "
          f"{ncpu} cores shared by the broker and all clients)")
    if restarts:
        cam_after_listen = [r.cam_all() - r.outage for r in restarts]
        cam_after_kill = [r.cam_all() for r in restarts]
        watch_after_kill = [r.watch_all() for r in restarts]
        print(f"  {'restart':>8}{'outage s':>9}{'cams back s':>12}{'(from kill)':>12}"
              f"{'cams/s':>8}{'watchers back s':>16}{'broker CPU':>11}{'core calls':>11}"
              f"{'VmHWM MiB':>10}{'others':>7}{'SYN drops':>10}")
        for i, r in enumerate(restarts, 1):
            wall = max(r.storm_wall - r.outage, 1e-9)
            rate = len(r.camera_times) / max(1e-9, r.cam_all() - r.outage)
            print(f"  {i:>8}{r.outage:>9.2f}{r.cam_all() - r.outage:>12.2f}{r.cam_all():>12.2f}"
                  f"{rate:>8,.0f}{r.watch_all():>16.2f}{100 * r.broker_cpu / wall:>10.0f}%"
                  f"{100 * r.core_busy / wall:>10.0f}%{r.vm_hwm_kib / 1024:>10.0f}"
                  f"{r.others:>7.2f}{r.syn_drops:>10,}")
        print(f"  MEDIAN: all {n:,} cameras re-attached {median(cam_after_listen):.2f} s after the "
              f"new broker listened ({median(cam_after_kill):.2f} s after the kill); all {w:,} "
              f"watchers streaming again {median(watch_after_kill):.2f} s after the kill; broker "
              f"peak memory {max(r.vm_hwm_kib for r in restarts) / 1024:.0f} MiB")
    print(f"  correctness: {'OK, 0 mismatches' if not problems else 'FAILED: ' + '; '.join(problems)}")
    print(f"  total time {time.monotonic() - t0:.0f} s")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
