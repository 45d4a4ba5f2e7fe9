"""Relay: frames/s delivered and ADDED latency p50/p99 for 1 -> 1 and 100 -> 100 live streams at
30 fps, end-to-end encrypted, through a real broker.

Setup, before any timing (core API, before the broker starts): S cameras and S owners, each with
one app instance that claimed one camera. Processes: the broker as shipped; the cameras (the device
SDK and simcam.SimulatedCamera, all attached before the first run); the apps (the app SDK:
open_session / watch; WatchStream verifies the camera's chain and signature and decrypts every
frame). --together puts cameras and apps in one process. Each run the first K owners open a new
session and watch; every camera stamps each frame's plaintext with time.monotonic_ns() just before
the SDK seals it; each app takes the time right after the SDK decrypted it: the added latency of
camera SDK + gRPC + broker relay + gRPC + app SDK on loopback (CLOCK_MONOTONIC is system-wide).
Frames are counted for a fixed window after a warm-up. The oracle: every decrypted frame names the
watcher's camera and session; refused frames and handshake errors count as mismatches. The goal:
p99 added latency <= 2 ms at 100 streams.

    .venv/bin/python -m bench.relay                  # 5 runs x 10 s per stream count
    .venv/bin/python -m bench.relay --quick          # 3 runs x 3 s
    .venv/bin/python -m bench.relay --profile DIR    # + py-spy of each process (not timed)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from collections import Counter
from typing import Any

import grpc

from bench.harness.broker import BrokerChild
from bench.harness.cli import bench_parser, parse
from bench.harness.fleet import (
    Clients,
    app_client,
    device_client,
    measured_window,
    parse_stamp,
    stamped_camera,
)
from bench.harness.profiling import PROFILES, Spy, py_spy_binary
from bench.harness.provision import CHEAP_ARGON2, App, Camera, bench_home, elapsed, provision
from bench.harness.stats import NCPU, median, pct, pid_memory, wait_quiet


# ---------------------------------------------------------------------------------------------
# client process: cameras, apps, or both
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Watcher:
    """One app watching its camera for one run."""

    frames: int = 0
    mismatches: int = 0
    rejected: int = 0
    dropped: int = 0
    error: str = ""


async def relay_client(
    addresses: tuple[str, str],
    ca_pem: bytes,
    cams: list[Camera],
    apps: list[App],
    fps: float,
    frame_bytes: int,
    aligned: bool,
) -> dict[str, Any]:
    cameras = [
        stamped_camera(
            device_client(c, addresses, ca_pem), fps, frame_bytes, random_phase=not aligned
        )
        for c in cams
    ]
    tasks = [asyncio.create_task(cam.run()) for cam in cameras]
    if cameras:
        await asyncio.wait_for(asyncio.gather(*(cam.attached.wait() for cam in cameras)), 120)
    clients = [(app_client(a, addresses, ca_pem), a.device_id) for a in apps]

    def camera_stats() -> dict[str, Any]:
        late = [x for cam in cameras for x in cam.late]
        for cam in cameras:
            cam.late = []
        return {
            "late": late,
            "ended": [str(c.ended.code()) for c in cameras if c.ended]
            + ["run() cancelled" for t in tasks if t.done() and t.cancelled()],
        }

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def watch(k: int, warmup: float, duration: float, pids: list[int]) -> dict[str, Any]:
        return await watch_run(clients[:k], warmup, duration, pids)

    return {"camera-stats": camera_stats, "watch": watch, "close": close}


async def watch_run(
    clients: list[tuple[Any, str]], warmup: float, duration: float, pids: list[int]
) -> dict[str, Any]:
    """Every client opens a session on its camera and watches; returns the window's figures."""
    from broker.client.simcam import parse_payload
    from broker.protocol.e2e import HandshakeError

    window = [float("inf"), float("inf")]
    latencies: list[int] = []
    watchers = [Watcher() for _ in clients]
    waiting = {id(w) for w in watchers}
    everyone = asyncio.Event()

    def first(w: Watcher) -> None:
        waiting.discard(id(w))
        if not waiting:
            everyone.set()

    async def watch(app: Any, device_id: str, w: Watcher) -> None:
        try:
            ticket = await app.open_session(device_id)
            async with app.watch(ticket) as stream:
                async for plaintext in stream.frames():
                    now = time.monotonic_ns()
                    seen_device, seen_session, _ = parse_payload(plaintext)
                    w.mismatches += (seen_device, seen_session) != (device_id, ticket.session_id)
                    first(w)
                    if window[0] <= now / 1e9 < window[1]:
                        latencies.append(now - parse_stamp(plaintext))
                        w.frames += 1
                    elif now / 1e9 >= window[1]:
                        break
                w.rejected, w.dropped = stream.rejected, stream.dropped
        except grpc.aio.AioRpcError as error:
            w.error = f"{error.code().name}: {error.details()}"
        except HandshakeError as error:
            w.error = f"handshake: {error.message}"
            w.mismatches += 1
        finally:
            first(w)  # failed before its first frame: do not hold the others up

    started = time.monotonic()
    tasks = [
        asyncio.create_task(watch(app, device_id, w))
        for (app, device_id), w in zip(clients, watchers, strict=True)
    ]
    return await measured_window(
        tasks, everyone, started, warmup, duration, window, pids, latencies, watchers
    )


# ---------------------------------------------------------------------------------------------
# one run, reporting
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    streams: int
    wall: float
    latencies: list[int]  # ns
    frames: int
    mismatches: int
    rejected: int
    dropped: int
    errors: list[str]
    setup: float
    cpu: dict[str, float]  # seconds of CPU per process role during the window
    machine: float
    steal: float
    late: list[float]
    online: int
    cameras_ended: list[str]

    @property
    def rate(self) -> float:
        return self.frames / self.wall if self.wall else 0.0

    @property
    def others(self) -> float:
        return max(0.0, self.machine - sum(self.cpu.values()) / self.wall)

    def q(self, quantile: float) -> float:
        return pct([x / 1e6 for x in self.latencies], quantile)  # ms


class Relay:
    def __init__(self, broker: BrokerChild, clients: Clients) -> None:
        self.broker, self.clients = broker, clients
        self.roles = dict(zip(clients.names, clients.pids, strict=True))
        self.cam, self.app = (0, 0) if len(clients) == 1 else (0, 1)

    def run(self, streams: int, warmup: float, duration: float) -> RunResult:
        pids = {"broker": self.broker.pid, **self.roles}
        self.clients.ask(self.cam, "camera-stats")  # reset the pacing samples
        out = self.clients.ask(self.app, "watch", streams, warmup, duration, list(pids.values()))
        cams = self.clients.ask(self.cam, "camera-stats")
        ws = out["watchers"]
        return RunResult(
            streams=streams,
            wall=out["wall"],
            latencies=out["latencies"],
            **{k: sum(w[k] for w in ws) for k in ("frames", "mismatches", "rejected", "dropped")},
            errors=[w["error"] for w in ws if w["error"]],
            setup=out["setup"],
            cpu={role: out["cpu"][pid] for role, pid in pids.items()},
            machine=out["machine"],
            steal=out["steal"],
            late=cams["late"],
            online=self.broker.stats()["online"],
            cameras_ended=cams["ended"],
        )


def print_run(index: int, r: RunResult, fps: float) -> None:
    cpu = "  ".join(f"{role} {100 * sec / r.wall:3.0f}%" for role, sec in r.cpu.items())
    print(
        f"  run {index}: {r.rate:7,.0f} frames/s (of {r.streams * fps:,.0f})"
        f"  added latency p50 {r.q(0.5):5.2f} ms  p99 {r.q(0.99):5.2f} ms"
        f"  p99.9 {r.q(0.999):5.2f} ms  max {r.q(1.0):6.2f} ms"
        f"  mismatches {r.mismatches}  rejected {r.rejected}  dropped {r.dropped}"
    )
    print(
        f"         CPU of a core: {cpu}; machine {r.machine:.2f}/{NCPU} cores busy, of which "
        f"{r.others:.2f} by other processes (steal {r.steal:.2f}); camera pacing late p99 "
        f"{1e3 * pct(r.late, 0.99):.2f} ms; all {r.streams} watchers streaming after "
        f"{r.setup:.2f} s"
    )
    if r.errors:
        print(
            f"         watcher errors: {Counter(r.errors).most_common(3)}; cameras online at the "
            f"broker {r.online}; camera Attach calls ended: {Counter(r.cameras_ended)}"
        )


def print_median(runs: list[RunResult]) -> None:
    p99s = [r.q(0.99) for r in runs]
    wall = sum(r.wall for r in runs)
    cpu = Counter[str]()
    for r in runs:
        cpu.update(r.cpu)
    frames = sum(r.frames for r in runs) or 1
    per_frame = "  ".join(f"{role} {1e6 * sec / frames:,.0f} µs" for role, sec in cpu.items())
    print(
        f"  MEDIAN of {len(runs)}: {median([r.rate for r in runs]):,.0f} frames/s  added latency "
        f"p50 {median([r.q(0.5) for r in runs]):.2f} ms  p99 {median(p99s):.2f} ms  (p99 range "
        f"{min(p99s):.2f}-{max(p99s):.2f} ms)  mismatches "
        f"{sum(r.mismatches + r.rejected for r in runs)}"
    )
    print(
        f"  CPU per delivered frame: {per_frame};  machine busy "
        f"{median([r.machine for r in runs]):.2f}/{NCPU} cores "
        f"({median([r.others for r in runs]):.2f} by other processes);  broker "
        f"{100 * cpu['broker'] / wall:.0f}% of a core"
    )


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(
        __doc__,
        "3 runs x 3 s per stream count",
        "after the timed runs, py-spy runs at the largest stream count",
        "run",
        runs="stream count",
    )
    p.add_argument("--duration", type=float, help="measured seconds per run (default 10, quick 3)")
    p.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds after all watchers got their first frame, before the window (1.0)",
    )
    p.add_argument("--streams", default="1,100", help="stream counts, comma list (1,100)")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second per camera (30)")
    p.add_argument("--frame-bytes", type=int, default=1024, help="plaintext bytes per frame")
    p.add_argument(
        "--aligned",
        action="store_true",
        help="every camera sends in step (worst case; default: random phases)",
    )
    p.add_argument(
        "--together",
        action="store_true",
        help="cameras and apps in one client process (default: one process each)",
    )
    args = parse(p, argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.streams = [int(x) for x in args.streams.split(",") if x]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    results: dict[int, list[RunResult]] = {}
    size = max(args.streams)
    with bench_home("relay", args.keep, **CHEAP_ARGON2) as config:
        print(
            f"relay benchmark: grpcio {grpc.__version__}, Python {sys.version.split()[0]}, "
            f"{NCPU} CPUs, home {config.home}"
        )
        prep = time.monotonic()
        fleet = provision(config, size, size)
        print(
            f"setup: {size} cameras enrolled, {size} owners each with an app instance that "
            f"claimed one camera (core API, before the broker starts) in {elapsed(prep)}"
        )
        broker = BrokerChild(config.home, CHEAP_ARGON2)
        clients: Clients | None = None
        try:
            prep = time.monotonic()
            common = (args.fps, args.frame_bytes, args.aligned)
            roles = (
                [("clients", fleet.cameras, fleet.owners)]
                if args.together
                else [("cameras", fleet.cameras, []), ("apps", [], fleet.owners)]
            )
            clients = Clients(
                relay_client,
                [
                    ((broker.bootstrap, broker.main), fleet.ca_pem, c, a, *common)
                    for _, c, a in roles
                ],
                [r[0] for r in roles],
            )
            relay = Relay(broker, clients)
            layout = ", ".join(f"{role} pid {pid}" for role, pid in relay.roles.items())
            print(
                f"broker pid {broker.pid} (main port {broker.ports['main']}); {layout}; "
                f"{size} cameras attached in {elapsed(prep)}"
            )
            phase = "all in step (--aligned)" if args.aligned else "each camera at a random phase"
            print(
                f"frames: {args.frame_bytes} B plaintext, {args.fps:g} fps per camera ({phase}),"
                f" AES-256-GCM end to end; window {args.duration:g} s after a {args.warmup:g} s "
                "warm-up"
            )
            relay.run(size, 0.5, 1.0)  # warm-up run (not reported)
            for streams in args.streams:
                print(
                    f"\n{streams} -> {streams} streams ({streams} cameras each watched by its "
                    f"owner's app), {args.runs} runs"
                )
                results[streams] = []
                for r in range(args.runs):
                    waited, load = wait_quiet(
                        [broker.pid, *clients.pids], args.quiet_below, args.wait_quiet
                    )
                    results[streams].append(relay.run(streams, args.warmup, args.duration))
                    print_run(r + 1, results[streams][-1], args.fps)
                    if waited >= 0.5:
                        print(
                            f"         (waited {waited:.0f} s for other processes to calm down; "
                            f"they used {load:.2f} cores just before the run)"
                        )
                print_median(results[streams])
            py_spy = py_spy_binary(args.py_spy) if args.profile else None
            if args.profile and not py_spy:
                print("  (--profile: py-spy not found; pass --py-spy PATH)")
            for flavour, flags in PROFILES if py_spy else ():
                assert py_spy is not None and args.profile is not None
                spy = Spy(
                    py_spy,
                    args.profile,
                    "relay",
                    {"broker": broker.pid, **relay.roles},
                    flags,
                    flavour,
                    rate=200,
                )
                run = relay.run(size, args.warmup, min(args.duration, 5.0))
                print(
                    f"\n  profile {flavour} ({size} streams, not in the figures): "
                    f"{run.rate:,.0f} frames/s, p50 {run.q(0.5):.2f} ms, p99 {run.q(0.99):.2f} ms"
                )
                spy.stop(top=10, threads_shown=3)
            broker_memory = pid_memory(broker.pid)
        finally:
            if clients is not None:
                clients.stop()
            broker.stop()

    print(
        f"\nSUMMARY (medians over runs; goal: p99 added latency <= 2 ms at 100 streams; "
        f"{NCPU} cores shared by broker, cameras and apps)"
    )
    print(
        f"  {'streams':>8}{'runs':>5}{'frames/s':>10}{'of':>7}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'p99.9 ms':>9}{'broker CPU':>11}{'machine':>9}{'mismatch':>9}{'dropped':>8}"
        f"{'errors':>7}"
    )
    problems = []
    for streams, runs in results.items():
        wall = sum(r.wall for r in runs)
        bad = sum(r.mismatches + r.rejected for r in runs)
        errors = sum(len(r.errors) for r in runs)
        print(
            f"  {streams:>8}{len(runs):>5}{median([r.rate for r in runs]):>10,.0f}"
            f"{streams * args.fps:>7,.0f}{median([r.q(0.5) for r in runs]):>8.2f}"
            f"{median([r.q(0.99) for r in runs]):>8.2f}"
            f"{median([r.q(0.999) for r in runs]):>9.2f}"
            f"{100 * sum(r.cpu['broker'] for r in runs) / wall:>10.0f}%"
            f"{median([r.machine for r in runs]):>6.2f}/{NCPU}{bad:>9}"
            f"{sum(r.dropped for r in runs):>8}{errors:>7}"
        )
        if bad:
            problems.append(f"{bad} oracle mismatches at {streams} streams")
        if errors:
            problems.append(f"{errors} watcher errors at {streams} streams")
    print(f"  broker memory: VmHWM {broker_memory.get('VmHWM', 0) / 1024:.0f} MiB")
    print(
        "  oracle: "
        + (
            "OK, every decrypted frame named its session and camera"
            if not problems
            else "FAILED: " + "; ".join(problems)
        )
    )
    print(f"  total time {time.monotonic() - t0:.0f} s")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
