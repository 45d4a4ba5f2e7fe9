"""Relay benchmark: frames/s delivered and ADDED latency p50/p99 for 1 -> 1 and 100 -> 100 live
streams at 30 fps, end-to-end encrypted, through a real broker.

Setup, before any timing: a temporary home with a fresh dev PKI; S cameras enrolled with one-time
tokens and S owners (one account, one app instance and one claimed camera each) made with the core
API on the broker's database before the broker starts. Then three processes on this machine:

- the broker, as shipped (grpc.aio, mutual TLS, one core thread), in its own process;
- the cameras: the device SDK (DeviceClient.attach / AttachSession, simcam.SimulatedCamera) with the
  identities held in memory, all S attached before the first run;
- the apps: the app SDK (AppClient.open_session / watch, WatchStream verifies the camera's chain and
  signature and decrypts every frame).

(--together puts cameras and apps in one client process.) Each run the first K owners open a new
session on their camera and watch it; every camera stamps each frame's plaintext with
time.monotonic_ns() just before it hands the frame to the SDK (which seals and writes it); each app
takes time.monotonic_ns() right after the SDK decrypted the frame. The difference is the added
latency of camera SDK + gRPC + broker relay + gRPC + app SDK on loopback (CLOCK_MONOTONIC is
system-wide on Linux, so the two processes share it). After every watcher has its first frame and a
warm-up, frames are counted for a fixed window; the run ends when the watchers leave.

Every decrypted frame goes through the oracle: simcam.parse_payload's device id and session id must
be those of the watcher's session; frames the SDK refused (wrong key, replay) and handshake errors
count as mismatches too. The goal: p99 added latency <= 2 ms at 100 streams.

    .venv/bin/python bench/relay.py                  # full: 5 runs x 10 s per stream count
    .venv/bin/python bench/relay.py --quick          # < 90 s
    .venv/bin/python bench/relay.py --profile DIR    # + py-spy of each process (not timed)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import multiprocessing as mp
import os
import shutil
import signal
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
    AppCredentials,
    BrokerChild,
    CameraCredentials,
    ClientTrust,
    bench_config,
    machine_cpu,
    make_app_client,
    make_device_client,
    median,
    parse_stamp,
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
from broker.client.simcam import parse_payload
from broker.clock import SystemClock
from broker.pki.ca import init_pki
from broker.protocol.e2e import HandshakeError

CHEAP_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_kib": 8192, "argon2_parallelism": 1}


# ---------------------------------------------------------------------------------------------
# client process: cameras, apps, or both
# ---------------------------------------------------------------------------------------------
def client_main(conn: Connection, main: str, trust: ClientTrust, cams: list[CameraCredentials],
                apps: list[AppCredentials], fps: float, frame_bytes: int, home: str,
                aligned: bool) -> None:
    raise_nofile()
    asyncio.run(_client(conn, main, trust, cams, apps, fps, frame_bytes, Path(home), aligned))


async def _client(conn: Connection, main: str, trust: ClientTrust, cams: list[CameraCredentials],
                  apps: list[AppCredentials], fps: float, frame_bytes: int, home: Path,
                  aligned: bool) -> None:
    loop = asyncio.get_running_loop()
    verifier = token_verifier(trust)
    cameras = [stamped_camera(make_device_client(c, main, trust, verifier), fps, frame_bytes,
                              random_phase=not aligned) for c in cams]
    tasks = [asyncio.create_task(cam.run()) for cam in cameras]
    if cameras:
        await asyncio.wait_for(asyncio.gather(*(cam.attached.wait() for cam in cameras)), 120)
    trust_path = write_trust_file(home / f"trust-{os.getpid()}.json", trust)
    clients = [(make_app_client(a, main, trust, trust_path), a.device_id) for a in apps]
    conn.send(("ready", os.getpid()))
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command is None:
            break
        if command[0] == "camera-stats":
            late = [x for cam in cameras for x in cam.late]
            for cam in cameras:
                cam.late = []
            conn.send({"late": late, "sent": sum(c.stats.frames_sent for c in cameras),
                       "refused": sum(c.stats.streams_refused for c in cameras),
                       "ended": [str(c.ended.code()) for c in cameras if c.ended is not None]
                       + ["run() cancelled" for t in tasks if t.done() and t.cancelled()]})
        elif command[0] == "watch":
            _, k, warmup, duration, pids = command
            conn.send(await _watch_run(clients[:k], warmup, duration, pids))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@dataclasses.dataclass
class Watcher:
    """One app watching its camera for one run."""

    session_id: str = ""
    first_frame: float = 0.0
    frames: int = 0
    mismatches: int = 0
    rejected: int = 0
    dropped: int = 0
    end_reason: str = ""
    error: str = ""


async def _watch_run(clients: list[tuple[Any, str]], warmup: float, duration: float,
                     pids: list[int]) -> dict[str, Any]:
    """Every client opens a session on its camera and watches; returns the window's figures."""
    window = {"start": float("inf"), "end": float("inf")}
    latencies: list[int] = []
    watchers = [Watcher() for _ in clients]
    everyone = asyncio.Event()
    got_first = 0

    async def watch(app: Any, device_id: str, w: Watcher) -> None:
        nonlocal got_first
        try:
            ticket = await app.open_session(device_id)
            w.session_id = ticket.session_id
            async with app.watch(ticket) as stream:
                async for plaintext in stream.frames():
                    now = time.monotonic_ns()
                    seen_device, seen_session, _ = parse_payload(plaintext)
                    if seen_device != device_id or seen_session != ticket.session_id:
                        w.mismatches += 1
                    if not w.first_frame:
                        w.first_frame = now / 1e9
                        got_first += 1
                        if got_first == len(clients):
                            everyone.set()
                    t = now / 1e9
                    if window["start"] <= t < window["end"]:
                        latencies.append(now - parse_stamp(plaintext))
                        w.frames += 1
                    elif t >= window["end"]:
                        break
                w.rejected = stream.rejected
                w.dropped = stream.dropped
                w.end_reason = stream.end_reason or ""
        except grpc.aio.AioRpcError as error:
            w.error = f"{error.code().name}: {error.details()}"
        except HandshakeError as error:
            w.error = f"handshake: {error.message}"
            w.mismatches += 1
        finally:
            if not w.first_frame:  # failed before its first frame: do not hold the others up
                got_first += 1
                if got_first == len(clients):
                    everyone.set()

    started = time.monotonic()
    tasks = [asyncio.create_task(watch(app, device_id, w))
             for (app, device_id), w in zip(clients, watchers, strict=True)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(everyone.wait(), 60)
    all_first = time.monotonic() - started
    await asyncio.sleep(warmup)
    cpu0 = {pid: pid_cpu(pid) for pid in pids}
    own0 = process_cpu()
    machine0 = machine_cpu()
    window["start"] = time.monotonic()
    window["end"] = window["start"] + duration
    await asyncio.sleep(duration)
    wall = time.monotonic() - window["start"]
    cpu1 = {pid: pid_cpu(pid) for pid in pids}
    own1 = process_cpu()
    machine1 = machine_cpu()
    await asyncio.wait(tasks, timeout=10)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    busy, steal, total = (b - a for a, b in zip(machine0, machine1, strict=True))
    ncpu = os.cpu_count() or 1
    return {
        "latencies": latencies,
        "wall": wall,
        "setup": all_first,
        "watchers": [dataclasses.asdict(w) for w in watchers],
        "cpu": {pid: cpu1[pid] - cpu0[pid] for pid in pids},
        "own_cpu": own1 - own0,
        "own_pid": os.getpid(),
        "machine": ncpu * busy / total if total else 0.0,
        "steal": ncpu * steal / total if total else 0.0,
    }


class Clients:
    """The camera and app processes (one process for both with together=True)."""

    def __init__(self, main: str, trust: ClientTrust, cams: list[CameraCredentials],
                 apps: list[AppCredentials], fps: float, frame_bytes: int, home: Path,
                 together: bool, aligned: bool) -> None:
        ctx = mp.get_context("spawn")
        roles = [("clients", cams, apps)] if together else [("cameras", cams, []),
                                                            ("apps", [], apps)]
        self.procs: dict[str, tuple[mp.process.BaseProcess, Connection, int]] = {}
        for name, c, a in roles:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=client_main, name=name, daemon=True,
                               args=(child, main, trust, c, a, fps, frame_bytes, str(home),
                                     aligned))
            proc.start()
            if not parent.poll(180):
                raise RuntimeError(f"{name} process did not get ready")
            _, pid = parent.recv()
            self.procs[name] = (proc, parent, pid)
        self.camera_role = "clients" if together else "cameras"
        self.app_role = "clients" if together else "apps"

    def pids(self) -> dict[str, int]:
        return {name: pid for name, (_, _, pid) in self.procs.items()}

    def ask(self, role: str, command: tuple[Any, ...], timeout: float = 300) -> Any:
        _, conn, _ = self.procs[role]
        conn.send(command)
        if not conn.poll(timeout):
            raise RuntimeError(f"{role} process did not answer {command[0]}")
        return conn.recv()

    def stop(self) -> None:
        for proc, conn, _ in self.procs.values():
            with contextlib.suppress(OSError):
                conn.send(None)
            proc.join(10)
            if proc.is_alive():
                proc.kill()


# ---------------------------------------------------------------------------------------------
# one run, reporting
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    streams: int
    fps: float
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
    sent_total: int
    online: int
    cameras_ended: list[str]

    @property
    def rate(self) -> float:
        return self.frames / self.wall if self.wall else 0.0

    def q(self, quantile: float) -> float:
        return pct([x / 1e6 for x in self.latencies], quantile)  # ms


def one_run(broker: BrokerChild, clients: Clients, streams: int, fps: float, warmup: float,
            duration: float) -> RunResult:
    roles = clients.pids()
    pids = [broker.pid, *[pid for role, pid in roles.items() if role != clients.app_role]]
    clients.ask(clients.camera_role, ("camera-stats",))  # reset the pacing samples
    out = clients.ask(clients.app_role, ("watch", streams, warmup, duration, pids))
    cams = clients.ask(clients.camera_role, ("camera-stats",))
    watchers = out["watchers"]
    cpu = {"broker": out["cpu"][broker.pid]}
    for role, pid in roles.items():
        cpu[role] = out["own_cpu"] if pid == out["own_pid"] else out["cpu"][pid]
    return RunResult(
        streams=streams, fps=fps, wall=out["wall"], latencies=out["latencies"],
        frames=sum(w["frames"] for w in watchers),
        mismatches=sum(w["mismatches"] for w in watchers),
        rejected=sum(w["rejected"] for w in watchers),
        dropped=sum(w["dropped"] for w in watchers),
        errors=[w["error"] for w in watchers if w["error"]],
        setup=out["setup"], cpu=cpu, machine=out["machine"], steal=out["steal"],
        late=cams["late"], sent_total=cams["sent"], online=broker.stats()["online"],
        cameras_ended=cams["ended"],
    )


def print_run(index: int, r: RunResult) -> None:
    ncpu = os.cpu_count() or 1
    cpu = "  ".join(f"{role} {100 * sec / r.wall:3.0f}%" for role, sec in r.cpu.items())
    print(f"  run {index}: {r.rate:7,.0f} frames/s (of {r.streams * r.fps:,.0f})"
          f"  added latency p50 {r.q(0.5):5.2f} ms  p99 {r.q(0.99):5.2f} ms"
          f"  p99.9 {r.q(0.999):5.2f} ms  max {r.q(1.0):6.2f} ms"
          f"  mismatches {r.mismatches}  rejected {r.rejected}  dropped {r.dropped}")
    others = max(0.0, r.machine - sum(r.cpu.values()) / r.wall)
    print(f"         CPU of a core: {cpu}; machine {r.machine:.2f}/{ncpu} cores busy, of which "
          f"{others:.2f} by other processes (steal {r.steal:.2f}); camera pacing late p99 {1e3 * pct(r.late, 0.99):.2f} ms;"
          f" all {r.streams} watchers streaming after {r.setup:.2f} s")
    if r.errors:
        print(f"         watcher errors: {Counter(r.errors).most_common(3)}; cameras online at the "
              f"broker {r.online}; camera Attach calls ended: {Counter(r.cameras_ended)}")


def print_median(runs: list[RunResult]) -> None:
    rates = [r.rate for r in runs]
    p50s = [r.q(0.5) for r in runs]
    p99s = [r.q(0.99) for r in runs]
    wall = sum(r.wall for r in runs)
    cpu = Counter[str]()
    for r in runs:
        cpu.update(r.cpu)
    frames = sum(r.frames for r in runs) or 1
    per_frame = "  ".join(f"{role} {1e6 * sec / frames:,.0f} µs" for role, sec in cpu.items())
    print(f"  MEDIAN of {len(runs)}: {median(rates):,.0f} frames/s  added latency p50 "
          f"{median(p50s):.2f} ms  p99 {median(p99s):.2f} ms  (p99 range {min(p99s):.2f}-"
          f"{max(p99s):.2f} ms)  mismatches {sum(r.mismatches + r.rejected for r in runs)}")
    others = median([max(0.0, r.machine - sum(r.cpu.values()) / r.wall) for r in runs])
    print(f"  CPU per delivered frame: {per_frame};  machine busy {median([r.machine for r in runs]):.2f}"
          f"/{os.cpu_count()} cores ({others:.2f} by other processes);  broker "
          f"{100 * cpu['broker'] / wall:.0f}% of a core")


PROFILES = (("threads", ["--threads", "--nonblocking"]), ("gil", ["--threads", "--gil"]))


def profiled_run(broker: BrokerChild, clients: Clients, py_spy: str, out: Path, streams: int,
                 fps: float, warmup: float, duration: float) -> None:
    """One extra, untimed run per profile flavour with py-spy on the broker and client processes."""
    out.mkdir(parents=True, exist_ok=True)
    targets = {"broker": broker.pid, **clients.pids()}
    for flavour, flags in PROFILES:
        spies = {}
        for role, pid in targets.items():
            raw = out / f"relay-{role}-{flavour}.txt"
            spies[role] = (raw, subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                 "--output", str(raw), *flags],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        r = one_run(broker, clients, streams, fps, warmup, duration)
        for _, spy in spies.values():
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        print(f"\n  profile {flavour} (py-spy {' '.join(flags)}, {streams} streams): "
              f"{r.rate:,.0f} frames/s, p50 {r.q(0.5):.2f} ms, p99 {r.q(0.99):.2f} ms "
              "under the profilers")
        for role, (raw, _) in spies.items():
            print(f"   {role} ({raw}):")
            if raw.exists():
                summarize_profile(raw, top=10, threads_shown=3)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="3 runs x 3 s per stream count (< 90 s)")
    p.add_argument("--runs", type=int, help="runs per stream count (default 5, quick 3)")
    p.add_argument("--duration", type=float, help="measured seconds per run (default 10, quick 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds after all watchers got "
                   "their first frame, before the window (1.0)")
    p.add_argument("--streams", default="1,100", help="stream counts, comma list (1,100)")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second per camera (30)")
    p.add_argument("--frame-bytes", type=int, default=1024, help="plaintext bytes per frame (1024)")
    p.add_argument("--wait-quiet", type=float, metavar="S",
                   help="shared machine: before each run wait up to S s until other processes use "
                   "less than --quiet-below cores (default 30, quick 5)")
    p.add_argument("--quiet-below", type=float, default=0.2, help="cores (0.2)")
    p.add_argument("--aligned", action="store_true",
                   help="every camera sends in step (worst case; default: each camera's frame "
                   "clock starts at a random phase, as independent cameras do)")
    p.add_argument("--together", action="store_true",
                   help="cameras and apps in one client process (default: one process each)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="after the timed runs, py-spy runs at the largest stream count")
    p.add_argument("--py-spy", help="py-spy executable (default: the venv's, else PATH)")
    p.add_argument("--keep", action="store_true", help="keep the temporary broker home")
    args = p.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 5)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    if args.wait_quiet is None:
        args.wait_quiet = 5.0 if args.quick else 30.0
    args.streams = [int(x) for x in args.streams.split(",") if x]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    ncpu = os.cpu_count() or 1
    print(f"relay benchmark: grpcio {grpc.__version__}, Python {sys.version.split()[0]}, "
          f"{ncpu} CPUs, home {home}")
    broker: BrokerChild | None = None
    clients: Clients | None = None
    results: dict[int, list[RunResult]] = {}
    try:
        config = bench_config(home, **CHEAP_ARGON2)
        init_pki(config, SystemClock())
        size = max(args.streams)
        prep = time.monotonic()
        cams, apps, trust = provision(config, size, size)
        print(f"setup: {size} cameras enrolled, {size} owners each with an app instance that "
              f"claimed one camera (core API, before the broker starts) in "
              f"{time.monotonic() - prep:.1f} s")
        broker = BrokerChild(home, CHEAP_ARGON2)
        prep = time.monotonic()
        clients = Clients(broker.main, trust, cams, apps, args.fps, args.frame_bytes, home,
                          args.together, args.aligned)
        layout = ", ".join(f"{role} pid {pid}" for role, pid in clients.pids().items())
        print(f"broker pid {broker.pid} (main port {broker.ports['main']}); {layout}; "
              f"{size} cameras attached in {time.monotonic() - prep:.1f} s")
        phase = "all in step (--aligned)" if args.aligned else "each camera at a random phase"
        print(f"frames: {args.frame_bytes} B plaintext, {args.fps:g} fps per camera ({phase}), "
              f"AES-256-GCM end to end; window {args.duration:g} s after a {args.warmup:g} s warm-up")
        # Warm-up run (not reported): first sessions, JIT-free but cold caches and allocators.
        one_run(broker, clients, size, args.fps, 0.5, 1.0)
        for streams in args.streams:
            print(f"\n{streams} -> {streams} streams ({streams} cameras each watched by its "
                  f"owner's app), {args.runs} runs")
            results[streams] = []
            for r in range(args.runs):
                waited, load = wait_quiet([broker.pid, *clients.pids().values()],
                                          args.quiet_below, args.wait_quiet)
                result = one_run(broker, clients, streams, args.fps, args.warmup, args.duration)
                results[streams].append(result)
                print_run(r + 1, result)
                if waited >= 0.5:
                    print(f"         (waited {waited:.0f} s for other processes to calm down; "
                          f"they used {load:.2f} cores just before the run)")
            print_median(results[streams])
        if args.profile:
            py_spy = py_spy_binary(args.py_spy)
            if py_spy:
                print(f"\nprofiles (extra runs at {size} streams, not in the figures):")
                profiled_run(broker, clients, py_spy, args.profile, size, args.fps, args.warmup,
                             min(args.duration, 5.0))
            else:
                print("  (--profile: py-spy not found; pass --py-spy PATH)")
        broker_memory = pid_memory(broker.pid)
    finally:
        if clients is not None:
            clients.stop()
        if broker is not None:
            broker.stop()
        if args.keep:
            print(f"kept {home}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(home)

    print(f"\nSUMMARY (medians over runs; goal: p99 added latency <= 2 ms at 100 streams; "
          f"{ncpu} cores shared by broker, cameras and apps)")
    print(f"  {'streams':>8}{'runs':>5}{'frames/s':>10}{'of':>7}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'p99.9 ms':>9}{'broker CPU':>11}{'machine':>9}{'mismatch':>9}{'dropped':>8}"
          f"{'errors':>7}")
    problems = []
    for streams, runs in results.items():
        wall = sum(r.wall for r in runs)
        bad = sum(r.mismatches + r.rejected for r in runs)
        errors = sum(len(r.errors) for r in runs)
        print(f"  {streams:>8}{len(runs):>5}{median([r.rate for r in runs]):>10,.0f}"
              f"{streams * args.fps:>7,.0f}{median([r.q(0.5) for r in runs]):>8.2f}"
              f"{median([r.q(0.99) for r in runs]):>8.2f}{median([r.q(0.999) for r in runs]):>9.2f}"
              f"{100 * sum(r.cpu['broker'] for r in runs) / wall:>10.0f}%"
              f"{median([r.machine for r in runs]):>6.2f}/{ncpu}{bad:>9}"
              f"{sum(r.dropped for r in runs):>8}{errors:>7}")
        if bad:
            problems.append(f"{bad} oracle mismatches at {streams} streams")
        if errors:
            problems.append(f"{errors} watcher errors at {streams} streams")
    print(f"  broker memory: VmHWM {broker_memory.get('VmHWM', 0) / 1024:.0f} MiB")
    print(f"  oracle: {'OK, every decrypted frame named its session and camera' if not problems else 'FAILED: ' + '; '.join(problems)}")
    print(f"  total time {time.monotonic() - t0:.0f} s")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
