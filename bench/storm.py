"""Reconnect storm: many cameras with live watchers, the broker restarts, everyone comes back at once.

This is the shape of the 2024 incident (every camera reconnected at once after an outage and a
cache mixed up device/user mappings). Setup, before any timing (core API, before the broker
starts): N cameras and, for a fraction of them, an owner with one app instance that claimed it.
Processes: the broker as shipped; K camera processes (the device SDK and simcam.SimulatedCamera,
one mutual-TLS channel per camera); one watcher process (the app SDK: open_session / watch, the
camera's chain and signature verified, every frame decrypted). Per restart the broker is killed
(SIGKILL: an outage) and a new one starts on the same home and ports; cameras reconnect with
exponential backoff and full jitter; watchers open a NEW session and watch again, same backoff.

Measured per restart: time until every camera is re-attached (from the kill and from the moment
the new broker listens), until every watcher has a new session delivering frames, the broker's CPU
(by thread and per core function), SYNs dropped, peak memory. The oracle: every decrypted frame
names the watcher's camera and session; every session that delivered frames names the watcher's
user and camera in the store; no relay alarm is audited; the audit chain verifies.
Goal: 10,000 cameras re-attached <= 5 s.

    .venv/bin/python -m bench.storm                   # 10,000 cameras, 10 % watched, 3 restarts
    .venv/bin/python -m bench.storm --quick           # 500 cameras, 2 restarts
    .venv/bin/python -m bench.storm --profile DIR     # + one extra restart under py-spy
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench.harness import stores as backends
from bench.harness.broker import Broker, ServeChild, WhatIf, replica_names
from bench.harness.cli import bench_parser, parse
from bench.harness.fleet import (
    Clients,
    app_client,
    backoff_delay,
    count_unretrieved,
    device_client,
    split,
    stamped_camera,
)
from bench.harness.profiling import Spy, py_spy_binary
from bench.harness.provision import (
    CHEAP_ARGON2,
    App,
    Camera,
    audit_check,
    elapsed,
    open_store,
    provision,
    read_store,
)
from bench.harness.stats import (
    NCPU,
    MachineWindow,
    listen_overflows,
    median,
    pct,
    pid_cpu,
    pid_memory,
    process_cpu,
    raise_nofile,
    wait_quiet,
)
from broker.config import Config

WHAT_IFS: dict[str, tuple[str, dict[str, Any]]] = {
    "no-presence-write": (
        "Attach skips DeviceAuthority.record_presence (the durable last-seen "
        "write per attach): the upper bound of coalescing those writes",
        {"no_presence_write": True},
    ),
    "switch-interval": (
        "sys.setswitchinterval(0.0005) in the broker (Python default 0.005)",
        {"switch_interval": 0.0005},
    ),
    "sync-normal": (
        "SQLite synchronous=NORMAL (Config.sqlite_synchronous)",
        {"synchronous": "NORMAL"},
    ),
}


# ---------------------------------------------------------------------------------------------
# client processes: cameras, watchers
# ---------------------------------------------------------------------------------------------
async def cameras_client(
    addresses: tuple[str, str],
    ca_pem: bytes,
    cams: list[Camera],
    fps: float,
    frame_bytes: int,
    base: float,
    cap: float,
) -> dict[str, Any]:
    cameras = [stamped_camera(device_client(c, addresses, ca_pem), fps, frame_bytes) for c in cams]
    attached_at: list[list[float]] = [[] for _ in cameras]
    attempts = Counter[str]()
    count_unretrieved(attempts)
    tasks: list[asyncio.Task[None]] = []

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
            if runner.cancelled():
                attempts["run() ended cancelled"] += 1
            elif runner.exception() is not None:  # e.g. a write on a call that already failed
                attempts[f"ended {type(runner.exception()).__name__}"] += 1
            if cam.ended is not None:
                attempts[f"ended {cam.ended.code().name}: {(cam.ended.details() or '')[:40]}"] += 1
            cam.late.clear()
            attempt += 1
            await asyncio.sleep(backoff_delay(attempt, base, cap))

    def go() -> str:
        tasks.extend(asyncio.create_task(life(i, cam)) for i, cam in enumerate(cameras))
        return "going"

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    return {
        "go": go,
        "close": close,
        "since": lambda t: sum(1 for times in attached_at if times and times[-1] >= t),
        "times": lambda t: [next((x for x in times if x >= t), None) for times in attached_at],
        "attaches": lambda t: [x for times in attached_at for x in times if x >= t],
        "stats": lambda: {
            "attempts": dict(attempts),
            "cpu": process_cpu(),
            **pid_memory(os.getpid()),
        },
    }


@dataclasses.dataclass
class Viewing:
    """One session of one watcher."""

    session_id: str
    opened_at: float
    first_frame: float = 0.0
    frames: int = 0
    devices_seen: set[str] = dataclasses.field(default_factory=set)


async def watchers_client(
    addresses: tuple[str, str], ca_pem: bytes, apps: list[App], base: float, cap: float
) -> dict[str, Any]:
    from broker.client.simcam import parse_payload
    from broker.protocol.e2e import HandshakeError

    clients = [app_client(a, addresses, ca_pem) for a in apps]
    viewings: list[list[Viewing]] = [[] for _ in apps]
    counts = Counter[str]()
    outcomes = Counter[str]()
    count_unretrieved(outcomes)
    tasks: list[asyncio.Task[None]] = []

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
                        if (seen_device, seen_session) != (device_id, ticket.session_id):
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

    def go() -> str:
        tasks.extend(asyncio.create_task(life(i)) for i in range(len(clients)))
        return "going"

    def times(t: float) -> list[tuple[float | None, int]]:
        out: list[tuple[float | None, int]] = []
        for vs in viewings:
            firsts = [v.first_frame for v in vs if v.opened_at >= t and v.first_frame]
            out.append((min(firsts) if firsts else None, sum(1 for v in vs if v.opened_at >= t)))
        return out

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    return {
        "go": go,
        "times": times,
        "close": close,
        # watchers with a session opened since t that delivered a frame
        "since": lambda t: sum(
            1 for vs in viewings if any(v.opened_at >= t and v.first_frame for v in vs)
        ),
        "stats": lambda: {
            "counts": dict(counts),
            "outcomes": dict(outcomes),
            "cpu": process_cpu(),
            **pid_memory(os.getpid()),
        },
        "sessions": lambda: [
            (v.session_id, apps[i].user_id, apps[i].device_id, sorted(v.devices_seen), v.frames)
            for i, vs in enumerate(viewings)
            for v in vs
            if v.frames
        ],
    }


class Fleet:
    """K camera processes and (when anything is watched) one watcher process."""

    def __init__(
        self,
        addresses: tuple[str, str],
        ca_pem: bytes,
        cams: list[Camera],
        apps: list[App],
        args: argparse.Namespace,
    ) -> None:
        backoff = (args.backoff_base, args.backoff_cap)
        self.cams = Clients(
            cameras_client,
            [
                (addresses, ca_pem, share, args.fps, args.frame_bytes, *backoff)
                for share in split(cams, args.camera_procs)
            ],
        )
        self.watchers = (
            Clients(watchers_client, [(addresses, ca_pem, apps, *backoff)], ["watchers"])
            if apps
            else None
        )

    @classmethod
    def on(cls, broker: Broker, setup: Any, args: argparse.Namespace) -> Fleet:
        """The fleet provision() made (setup), on broker's addresses."""
        return cls((broker.bootstrap, broker.main), setup.ca_pem, setup.cameras, setup.owners, args)

    def pids(self) -> list[int]:
        return self.cams.pids + (self.watchers.pids if self.watchers else [])

    def ask_watchers(self, *command: Any) -> Any:
        return self.watchers.ask(0, *command) if self.watchers else None

    def back_since(self, t: float) -> tuple[int, int]:
        return sum(self.cams.ask_all("since", t)), self.ask_watchers("since", t) or 0

    def stop(self) -> None:
        self.cams.stop()
        if self.watchers:
            self.watchers.stop()


def cold_start(fleet: Fleet, n: int, w: int, timeout: float, problems: list[str]) -> None:
    """Every camera attaches, then every watcher opens a session and gets frames."""
    start = time.monotonic()
    fleet.cams.ask_all("go")
    if not wait_until(fleet, 0.0, n, 0, timeout):
        problems.append("cold start: not every camera attached")
    cold = time.monotonic() - start
    start = time.monotonic()
    fleet.ask_watchers("go")
    if not wait_until(fleet, 0.0, n, w, timeout):
        problems.append("cold start: not every watcher streams")
    print(
        f"cold start: {n:,} cameras attached in {cold:.1f} s ({n / cold:,.0f}/s); "
        f"{w:,} watchers opened sessions and got frames in {elapsed(start)}"
    )


def wait_until(fleet: Fleet, since: float, cameras: int, watchers: int, timeout: float) -> bool:
    """Poll the fleet until every camera re-attached and every watcher streams again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cams, watching = fleet.back_since(since)
        if cams >= cameras and watching >= watchers:
            return True
        time.sleep(0.2)
    return False


# ---------------------------------------------------------------------------------------------
# one restart
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Restart:
    label: str  # which broker came back: in-process (BrokerChild) or `broker serve --workers N`
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
    stats: dict[str, Any]  # the new broker's counters (threads, core calls, memory)
    storm_wall: float  # kill -> all back (or timeout)
    syn_drops: int  # ListenOverflows during the storm (machine-wide)

    def cam_all(self) -> float:
        return (
            max(self.camera_times) if self.camera_times and not self.cameras_missing else math.inf
        )

    def watch_all(self) -> float:
        if self.watchers_missing:
            return math.inf
        return max(self.watcher_times) if self.watcher_times else 0.0


def restart(
    broker: Broker,
    fleet: Fleet,
    start: Callable[[dict[str, int]], Broker],
    cameras: int,
    watchers: int,
    timeout: float,
    py_spy: str | None = None,
    profile: Path | None = None,
) -> tuple[Broker, Restart]:
    """SIGKILL broker, start(its ports) a new one, wait until the fleet is back."""
    ours = fleet.pids()
    clients0 = sum(pid_cpu(p) for p in ours)
    machine = MachineWindow()
    drops0 = listen_overflows()
    t_kill = time.monotonic()
    broker.kill()
    new = start(broker.ports)
    spy = (
        Spy(
            py_spy,
            profile,
            "storm",
            {"broker": new.pid},
            ["--threads", "--nonblocking"],
            "threads",
            rate=200,
        )
        if py_spy and profile
        else None
    )
    wait_until(fleet, t_kill, cameras, watchers, timeout)
    wall = time.monotonic() - t_kill
    drops = listen_overflows() - drops0
    broker_cpu = new.stats()["cpu"]
    clients_cpu = sum(pid_cpu(p) for p in ours) - clients0
    machine.stop()
    if spy is not None:
        spy.stop(top=14, threads_shown=4)
    cam_times = [
        x - t_kill for times in fleet.cams.ask_all("times", t_kill) for x in times if x is not None
    ]
    wt = fleet.ask_watchers("times", t_kill) or []
    # the old broker's CPU is gone with it: count the new one plus clients against the wall
    others = max(0.0, machine.busy - (broker_cpu + clients_cpu) / wall) if wall else 0.0
    return new, Restart(
        label=f"{new.workers} worker(s)" if isinstance(new, ServeChild) else "in-process",
        outage=new.ready_at - t_kill,
        camera_times=cam_times,
        cameras_missing=cameras - len(cam_times),
        watcher_times=[x - t_kill for x, _ in wt if x is not None],
        watchers_missing=sum(1 for x, _ in wt if x is None),
        sessions_per_watcher=[n for _, n in wt],
        broker_cpu=broker_cpu,
        clients_cpu=clients_cpu,
        machine=machine.busy,
        others=others,
        stats=new.stats(),
        storm_wall=wall,
        syn_drops=drops,
    )


def print_restart(index: int, r: Restart, cameras: int, watchers: int) -> None:
    ct, back, cam_all = r.camera_times, r.outage, r.cam_all()
    print(f"  restart {index} ({r.label}): outage (kill -> new broker listening) {back:.2f} s")
    if ct:
        print(
            f"    cameras re-attached {len(ct):,}/{cameras:,}: all after {cam_all:.2f} s from the "
            f"kill = {cam_all - back:.2f} s after the broker listened; p50 "
            f"{pct(ct, 0.5) - back:.2f} s  p90 {pct(ct, 0.9) - back:.2f} s  p99 "
            f"{pct(ct, 0.99) - back:.2f} s after it listened;  "
            f"{len(ct) / max(1e-9, cam_all - back):,.0f} cameras/s"
        )
    else:
        print(f"    cameras re-attached 0/{cameras}")
    if watchers:
        wt = r.watcher_times
        print(
            f"    watchers streaming again {len(wt):,}/{watchers:,} (new session + first frame): "
            f"all after {r.watch_all():.2f} s from the kill; p50 {pct(wt, 0.5):.2f} s  p99 "
            f"{pct(wt, 0.99):.2f} s; sessions opened per watcher median "
            f"{median([float(n) for n in r.sessions_per_watcher]):.0f} max "
            f"{max(r.sessions_per_watcher, default=0)}"
        )
    s = r.stats
    wall = max(r.storm_wall - back, 1e-9)
    print(
        f"    broker: {r.broker_cpu:.1f} s CPU in {wall:.1f} s since it started "
        f"({100 * r.broker_cpu / wall:.0f}% of a core), core thread in calls "
        f"{100 * s['core_busy'] / wall:.0f}% of the time ({s['core_calls']:,} calls in "
        f"{s['core_batches']:,} group commits), VmHWM {s.get('VmHWM', 0) / 1024:.0f} MiB;  "
        f"clients {r.clients_cpu:.1f} s CPU;  machine {r.machine:.2f}/{NCPU} cores busy, "
        f"{r.others:.2f} by other processes"
    )
    n = max(1, len(ct))
    top = sorted(s["threads"].items(), key=lambda kv: -kv[1])[:4]
    print(
        "    broker CPU by thread, per re-attached camera: "
        + ";  ".join(f"{name} {1e3 * sec / n:.2f} ms" for name, sec in top)
        + f";  SYNs dropped on full accept queues: {r.syn_drops:,}"
    )
    by_fn = s["core_by_fn"]
    calls = sorted(by_fn.items(), key=lambda kv: -kv[1][1])[:6]
    print(
        "    core thread (one thread, every store call; wall in the call, commit excluded): "
        + ";  ".join(f"{name} {k:,}x {1e3 * busy / max(k, 1):.2f} ms" for name, (k, busy) in calls)
        + f"  = {sum(k for k, _ in by_fn.values()) / n:.1f} calls and "
        f"{1e3 * sum(b for _, b in by_fn.values()) / n:.2f} ms wall per camera"
    )


def check_store(config: Config, sessions: list[tuple[str, str, str, list[str], int]]) -> list[str]:
    """Every session that delivered frames: its store row names the watcher's user and camera,
    and the frames named that camera. No relay alarm audited; the audit chain verifies."""
    problems: list[str] = []
    rows = read_store(
        config,
        lambda tx: {
            sid: ((r.device_id, r.user_id) if (r := tx.get_session(sid)) else None)
            for sid, *_ in sessions
        },
    )
    bad = sum(
        1
        for sid, user_id, device_id, seen, _ in sessions
        if rows[sid] != (device_id, user_id) or seen != [device_id]
    )
    frames = sum(n for *_, n in sessions)
    print(
        f"  sessions that delivered frames     {len(sessions):>9,}  ({frames:,} frames); "
        f"store disagrees on {bad}  {'ok' if not bad else 'MISMATCH'}"
    )
    actions = audit_check(config, problems)
    alarms = actions["relay.alarm"]
    print(
        f"  relay.alarm audit entries          {alarms:>9}  {'ok' if not alarms else 'ALARM'}"
        f"  ({sum(v for k, v in actions.items() if k.startswith('session.')):,} session.* "
        "entries)"
    )
    if bad:
        problems.append(f"{bad} sessions whose frames or store row name another camera or user")
    if alarms:
        problems.append(f"{alarms} relay alarms")
    return problems


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(
        __doc__,
        "500 cameras, 2 restarts",
        "one extra restart with py-spy on the new broker (not in the figures)",
        "restart",
        stores=True,
    )
    p.add_argument("--cameras", type=int, help="cameras (default 10,000, quick 500)")
    p.add_argument(
        "--watched", type=float, default=0.10, help="fraction of cameras with a live watcher (0.10)"
    )
    p.add_argument("--restarts", type=int, help="broker restarts (default 3, quick 2)")
    p.add_argument("--camera-procs", type=int, default=2, help="camera client processes (2)")
    p.add_argument("--fps", type=float, default=1.0, help="frames/s of a watched camera (1)")
    p.add_argument("--frame-bytes", type=int, default=1024, help="plaintext bytes per frame")
    p.add_argument(
        "--backoff-base",
        type=float,
        default=0.5,
        help="reconnect backoff: first window, seconds (0.5)",
    )
    p.add_argument(
        "--backoff-cap",
        type=float,
        default=2.0,
        help="reconnect backoff: largest window, seconds (2.0)",
    )
    p.add_argument(
        "--settle", type=float, default=3.0, help="seconds of steady streaming after each storm (3)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=240.0,
        help="give up on a storm after this many seconds (240)",
    )
    p.add_argument(
        "--what-if",
        default="",
        metavar="A,B",
        help="broker tweaks for every broker of the run (not the broker as shipped): "
        + "; ".join(f"{k}: {v[0]}" for k, v in WHAT_IFS.items()),
    )
    args = parse(p, argv)
    args.cameras = args.cameras or (500 if args.quick else 10_000)
    args.restarts = args.restarts or (2 if args.quick else 3)
    names = [x for x in args.what_if.split(",") if x]
    for name in names:
        if name not in WHAT_IFS:
            p.error(f"unknown what-if {name!r}; choose from {', '.join(WHAT_IFS)}")
    args.what_ifs = names
    args.what_if = WhatIf(**{k: v for name in names for k, v in WHAT_IFS[name][1].items()})
    args.what_if.check(backends.chosen(args.store))
    if args.store == "both":
        p.error("the storm runs on one store: --store sqlite or --store postgres")
    if args.workers and args.what_ifs:
        p.error("what-ifs change the in-process broker; --workers runs `broker serve` as shipped")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    nofile = raise_nofile()
    n = args.cameras
    w = round(n * args.watched)
    restarts: list[Restart] = []
    problems: list[str] = []
    variants = args.workers or [0]  # restart r starts variants[r % len]; 0: in-process broker
    with backends.store_home("storm", args.keep, args.store, args.pg_url, **CHEAP_ARGON2) as config:
        print(
            f"reconnect storm benchmark: grpcio {grpc.__version__}, Python "
            f"{sys.version.split()[0]}, {NCPU} CPUs, open-file limit {nofile}, home "
            f"{config.home}"
        )
        prep = time.monotonic()
        setup = provision(config, n, w, progress=lambda m: print(f"  setup: {m}"))
        print(
            f"setup: {n:,} cameras enrolled with one-time tokens, {w:,} owners each with an app "
            f"instance that claimed one camera (core API, before the broker starts) in "
            f"{elapsed(prep)}"
        )
        if args.what_ifs:
            print(
                "WHAT-IF (not the broker as shipped): "
                + "; ".join(f"{k}: {WHAT_IFS[k][0]}" for k in args.what_ifs)
            )
        starts = iter(range(1_000_000))
        store = open_store(config, migrate=False)

        def start_broker(ports: dict[str, int] | None) -> Broker:
            workers = variants[next(starts) % len(variants)]
            if ports is not None:  # the broker before was killed: release its replicas that
                # this start does not bring back (2 -> 1 worker), as their own restart would
                for name in sorted(set(replica_names(previous[0])) - set(replica_names(workers))):
                    store.run(lambda tx, n=name: tx.release_attachments_of(n))
            previous[0] = workers
            return backends.broker_on(config, CHEAP_ARGON2, args.what_if, workers, ports)

        previous = [variants[0]]
        broker = start_broker(None)
        fleet: Fleet | None = None
        try:
            fleet = Fleet.on(broker, setup, args)
            print(
                f"broker pid {broker.pid} ports {broker.ports}; {args.camera_procs} camera "
                f"processes, 1 watcher process; reconnect backoff full jitter, window "
                f"{args.backoff_base:g} s doubling to {args.backoff_cap:g} s; watched cameras "
                f"send {args.frame_bytes} B frames at {args.fps:g} fps"
            )
            cold_start(fleet, n, w, args.timeout, problems)
            time.sleep(args.settle)
            stats = broker.stats()
            print(
                f"steady: broker online {stats.get('online', 'n/a')}, live sessions "
                f"{stats.get('live_sessions', 'n/a')}, VmRSS {stats.get('VmRSS', 0) / 1024:.0f} MiB, "
                f"VmHWM {stats.get('VmHWM', 0) / 1024:.0f} MiB"
            )

            print(
                f"\n{args.restarts} restarts (SIGKILL, new broker process on the same home "
                "and ports)"
            )
            for r in range(args.restarts):
                waited, load = wait_quiet(
                    [broker.pid, *fleet.pids()], args.quiet_below, args.wait_quiet
                )
                if waited >= 0.5:
                    print(
                        f"  (waited {waited:.0f} s for other processes to calm down; they used "
                        f"{load:.2f} cores just before the kill)"
                    )
                broker, result = restart(broker, fleet, start_broker, n, w, args.timeout)
                restarts.append(result)
                print_restart(r + 1, result, n, w)
                if result.cameras_missing or result.watchers_missing:
                    problems.append(
                        f"restart {r + 1}: {result.cameras_missing} cameras and "
                        f"{result.watchers_missing} watchers not back in "
                        f"{args.timeout:g} s"
                    )
                time.sleep(args.settle)
            py_spy = py_spy_binary(args.py_spy) if args.profile else None
            if args.profile and not py_spy:
                print("  (--profile: py-spy not found; pass --py-spy PATH)")
            if py_spy:
                print(
                    "\nprofile: one extra restart with py-spy on the new broker (not in the "
                    "figures):"
                )
                broker, result = restart(
                    broker, fleet, start_broker, n, w, args.timeout, py_spy, args.profile
                )
                print(
                    f"  all cameras back {result.cam_all() - result.outage:.2f} s after it listened"
                )
                time.sleep(args.settle)

            attempts = Counter[str]()
            camera_stats = fleet.cams.ask_all("stats")
            for s in camera_stats:
                attempts.update(s["attempts"])
            watcher_stats = fleet.ask_watchers("stats") or {}
            sessions = fleet.ask_watchers("sessions") or []
            counts = watcher_stats.get("counts", {})
            unretrieved = attempts.pop("SDK write errors nobody retrieved", 0)
            print(
                f"\nclients: camera Attach attempts {attempts.pop('attempts', 0):,}; how they "
                f"ended (most common): {attempts.most_common(4)}"
            )
            print(
                f"  camera SDK: {unretrieved:,} shielded writes failed after their caller left "
                "(asyncio 'Task exception was never retrieved', counted instead of printed)"
            )
            print(
                "  watcher outcomes (most common): "
                f"{Counter(watcher_stats.get('outcomes', {})).most_common(5)}"
            )
            camera_hwm = ", ".join(f"{s.get('VmHWM', 0) / 1024:.0f}" for s in camera_stats)
            print(
                f"  client memory VmHWM: cameras {camera_hwm} MiB, watchers "
                f"{watcher_stats.get('VmHWM', 0) / 1024:.0f} MiB"
            )
        finally:
            if fleet is not None:
                fleet.stop()
            broker.stop()
            store.close()

        print("\noracle:")
        wrong = {
            k: counts.get(k, 0)
            for k in ("mismatched frames", "rejected frames", "handshake errors")
        }
        print(
            f"  frames decrypted by watchers       {counts.get('frames', 0):>9,}; naming another "
            f"camera or session {wrong['mismatched frames']}; refused by the SDK "
            f"{wrong['rejected frames']}; handshake errors {wrong['handshake errors']}  "
            f"{'ok' if not sum(wrong.values()) else 'MISMATCH'}"
        )
        if sum(wrong.values()):
            problems.append(", ".join(f"{v} {k}" for k, v in wrong.items()))
        problems += check_store(config, sessions)

    print(
        f"\nSUMMARY ({n:,} cameras, {w:,} watched; goal: 10,000 cameras re-attached <= 5 s; "
        f"{NCPU} cores shared by the broker and all clients)"
    )
    if restarts:
        print(
            f"  {'restart':>8}{'outage s':>9}{'cams back s':>12}{'(from kill)':>12}"
            f"{'cams/s':>8}{'watchers back s':>16}{'broker CPU':>11}{'core calls':>11}"
            f"{'VmHWM MiB':>10}{'others':>7}{'SYN drops':>10}"
        )
        for i, rs in enumerate(restarts, 1):
            wall = max(rs.storm_wall - rs.outage, 1e-9)
            rate = len(rs.camera_times) / max(1e-9, rs.cam_all() - rs.outage)
            print(
                f"  {i:>8}{rs.outage:>9.2f}{rs.cam_all() - rs.outage:>12.2f}{rs.cam_all():>12.2f}"
                f"{rate:>8,.0f}{rs.watch_all():>16.2f}{100 * rs.broker_cpu / wall:>10.0f}%"
                f"{100 * rs.stats['core_busy'] / wall:>10.0f}%"
                f"{rs.stats.get('VmHWM', 0) / 1024:>10.0f}{rs.others:>7.2f}{rs.syn_drops:>10,}"
            )
        for label in dict.fromkeys(r.label for r in restarts):
            some = [r for r in restarts if r.label == label]
            print(
                f"  MEDIAN of {len(some)} ({label}): all {n:,} cameras re-attached "
                f"{median([r.cam_all() - r.outage for r in some]):.2f} s after the new broker "
                f"listened ({median([r.cam_all() for r in some]):.2f} s after the kill); all "
                f"{w:,} watchers streaming again {median([r.watch_all() for r in some]):.2f} s "
                f"after the kill; broker CPU {median([r.broker_cpu for r in some]):.1f} s; "
                f"broker peak memory {max(r.stats.get('VmHWM', 0) for r in some) / 1024:.0f} MiB"
            )
    print(
        "  correctness: "
        + ("OK, 0 mismatches" if not problems else "FAILED: " + "; ".join(problems))
    )
    print(f"  total time {time.monotonic() - t0:.0f} s")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
