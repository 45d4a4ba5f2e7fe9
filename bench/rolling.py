"""Rolling restart: replicas drained and restarted one at a time under a live fleet.

The broker as shipped, ``broker serve --workers R`` (R replicas r1..rR sharing the public ports
with SO_REUSEPORT, one PostgreSQL database created for the run and dropped after it). Setup
before any timing (core API): N cameras, a fraction watched by their owner's app instance. The
storm's client processes (device SDK + simcam cameras, app SDK watchers; reconnect with full
jitter) attach and watch. Then, for each replica in turn: SIGTERM to that replica (drain: health
NOT_SERVING, its cameras told to reconnect elsewhere at times spread over --drain-window, its
sessions ended "broker draining"), it exits, the supervisor starts it again, its serving line is
awaited, then --pause seconds, as ``make rolling-restart`` does.

Measured: re-attaches per second over the whole restart, overall (the cameras' own clocks, 1 s
bins) and per replica (the store's attachment rows, replica and attached_at in whole seconds,
read between steps through the store contract); the peak of each. Sessions lost: watcher sessions
whose store row ended with a reason other than drain's ("broker draining"), all reasons listed.
Every camera must be back at the end; the storm's oracle checks every decrypted frame.

    .venv/bin/python -m bench.rolling                  # 2,000 cameras, 10 % watched, 3 replicas
    .venv/bin/python -m bench.rolling --quick          # 300 cameras
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from collections import Counter
from typing import Any

import grpc

from bench.harness import stores as backends
from bench.harness.broker import ServeChild, replica_names
from bench.harness.cli import add_pg_url, bench_parser, parse
from bench.harness.provision import CHEAP_ARGON2, elapsed, provision, read_store
from bench.harness.stats import NCPU, MachineWindow
from bench.storm import Fleet, check_store, cold_start, wait_until
from broker.config import Config

DRAIN_REASONS = ("broker draining",)
Snapshot = dict[str, tuple[str, int, int]]  # device -> (replica, epoch, attached_at)


def attachments(config: Config, devices: list[str]) -> Snapshot:
    """Every device's attachment row (replica, epoch, attached_at), one read transaction."""

    def read(tx: Any) -> Snapshot:
        rows = {d: tx.get_attachment(d) for d in devices}
        return {d: (r.replica, r.epoch, r.attached_at) for d, r in rows.items() if r}

    snapshot: Snapshot = read_store(config, read)
    return snapshot


def moved(before: Snapshot, after: Snapshot) -> tuple[list[tuple[str, int]], int]:
    """(replica, attached_at) of each device whose epoch grew, and how many attaches in between
    the snapshots cannot show (a device attached twice between them)."""
    out, hidden = [], 0
    for device, (replica, epoch, at) in after.items():
        old = before.get(device, ("", 0, 0))[1]
        if epoch > old:
            out.append((replica, at))
            hidden += epoch - old - 1
    return out, hidden


def peak(times: list[float]) -> tuple[int, float]:
    """The largest count in a 1 s bin, and the bin's start."""
    bins = Counter(math.floor(t) for t in times)
    return max(((n, float(t)) for t, n in bins.items()), default=(0, 0.0))


def session_ends(config: Config, devices: list[str]) -> Counter[str]:
    """Watched cameras' session rows by outcome and end reason."""

    def read(tx: Any) -> Counter[str]:
        return Counter(
            s.outcome.value + (f": {s.reason}" if s.reason else "")
            for d in devices
            for s in tx.sessions_of_device(d)
        )

    found: Counter[str] = read_store(config, read)
    return found


def gone(pid: int) -> bool:
    """pid has exited (reaped, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def roll(broker: ServeChild, name: str, timeout: float) -> tuple[float, float]:
    """SIGTERM replica name, wait until it exited and its successor serves; (drain s, back s)."""
    pid = broker.replicas()[name]
    offset = broker.log.stat().st_size
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    while not gone(pid):
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"replica {name} still draining after {timeout:g} s")
        time.sleep(0.05)
    drained = time.monotonic() - started
    marker = f"(replica {name};"
    while not any(marker in line for line in broker.serving_lines(offset)):
        if time.monotonic() - started > timeout + 60:
            raise RuntimeError(f"replica {name} did not come back; see {broker.log}")
        time.sleep(0.05)
    return drained, time.monotonic() - started


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__, "300 cameras", "(not supported: replicas restart)")
    add_pg_url(p)
    p.add_argument("--cameras", type=int, help="cameras (default 2,000, quick 300)")
    p.add_argument("--watched", type=float, default=0.10, help="fraction watched (0.10)")
    p.add_argument("--replicas", type=int, default=3, help="broker serve --workers R (3)")
    p.add_argument("--drain-window", type=float, default=10.0, help="broker --drain-window (10)")
    p.add_argument("--pause", type=float, default=3.0, help="s between replicas (3)")
    p.add_argument("--camera-procs", type=int, default=2, help="camera client processes (2)")
    p.add_argument("--fps", type=float, default=1.0, help="frames/s of a watched camera (1)")
    p.add_argument("--frame-bytes", type=int, default=1024, help="plaintext bytes per frame")
    p.add_argument("--backoff-base", type=float, default=0.5, help="reconnect backoff (0.5 s)")
    p.add_argument("--backoff-cap", type=float, default=2.0, help="largest window (2.0 s)")
    p.add_argument("--settle", type=float, default=5.0, help="s of steady streaming before (5)")
    p.add_argument("--timeout", type=float, default=300.0, help="give up after (300 s)")
    args = parse(p, argv)
    args.cameras = args.cameras or (300 if args.quick else 2000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    n, problems = args.cameras, list[str]()
    w = round(n * args.watched)
    names = replica_names(args.replicas)
    pg = backends.POSTGRES
    with backends.store_home("rolling", args.keep, pg, args.pg_url, **CHEAP_ARGON2) as config:
        print(
            f"rolling restart benchmark: grpcio {grpc.__version__}, Python "
            f"{sys.version.split()[0]}, {NCPU} CPUs, home {config.home}"
        )
        prep = time.monotonic()
        setup = provision(config, n, w)
        devices = [c.device_id for c in setup.cameras]
        watched = [a.device_id for a in setup.owners]
        print(f"setup: {n:,} cameras, {w:,} watched (core API, untimed) in {elapsed(prep)}")
        broker = ServeChild(config, args.replicas, drain_window=args.drain_window)
        print(
            f"broker serve --workers {args.replicas} --drain-window {args.drain_window:g} "
            f"(supervisor pid {broker.pid}, replicas {broker.replicas()}); "
            f"{args.camera_procs} camera processes, 1 watcher process"
        )
        fleet: Fleet | None = None
        try:
            fleet = Fleet.on(broker, setup, args)
            cold_start(fleet, n, w, args.timeout, problems)
            time.sleep(args.settle)
            snap = attachments(config, devices)
            ends0 = session_ends(config, watched)
            spread = Counter(r for r, *_ in snap.values())
            print(f"  cameras per replica before: {dict(sorted(spread.items()))}")
            wall0, mono0 = time.time(), time.monotonic()
            machine = MachineWindow()
            per_replica: dict[str, list[float]] = {name: [] for name in names}
            hidden = 0
            print(f"\nrolling restart of {args.replicas} replicas, one at a time:")
            for name in names:
                step = time.monotonic()
                drained, back = roll(broker, name, args.drain_window + 60)
                time.sleep(args.pause)
                new = attachments(config, devices)
                rows, missed = moved(snap, new)
                snap, hidden = new, hidden + missed
                for replica, attached in rows:
                    per_replica.setdefault(replica, []).append(float(attached))
                print(
                    f"  {name}: SIGTERM -> exited {drained:.1f} s, serving again {back:.1f} s; "
                    f"{len(rows):,} cameras re-attached in this step "
                    f"({dict(Counter(r for r, _ in rows))}); step {elapsed(step)}"
                )
            if not wait_until(fleet, mono0, n, 0, args.timeout):
                problems.append("not every camera re-attached during the rolling restart")
            busy = machine.stop().busy
            wall = time.monotonic() - mono0
            attaches = [x - mono0 for xs in fleet.cams.ask_all("attaches", mono0) for x in xs]
            ends = session_ends(config, watched) - ends0
            live = sum(1 for r, *_ in attachments(config, devices).values() if r)
            watcher = fleet.ask_watchers("stats") or {}
            sessions = fleet.ask_watchers("sessions") or []
        finally:
            if fleet is not None:
                fleet.stop()
            broker.stop()

        top, at = peak(attaches)
        print(
            f"\nre-attaches: {len(attaches):,} in {wall:.1f} s ({len(attaches) / n:.2f} per "
            f"camera); peak {top}/s overall (cameras' clocks, at +{at:.0f} s); machine "
            f"{busy:.2f}/{NCPU} cores busy"
        )
        peaks = {}
        for name, times in sorted(per_replica.items()):
            peaks[name], at = peak(times)
            print(
                f"  {name}: {len(times):,} re-attaches (store rows), peak {peaks[name]}/s at "
                f"+{at - wall0:.0f} s"
            )
        print(f"  attaches between snapshots the store rows cannot show: {hidden}")
        print(f"  cameras attached at the end (store, live rows): {live:,}/{n:,}")
        lost = sum(
            v for k, v in ends.items() if k.startswith("ended") and k[7:] not in DRAIN_REASONS
        )
        print(f"  watched cameras' session rows since the start, by outcome: {dict(ends)}")
        print(
            f"  sessions lost (ended other than by {DRAIN_REASONS}): {lost}; watcher outcomes "
            f"{Counter(watcher.get('outcomes', {})).most_common(5)}"
        )
        counts = watcher.get("counts", {})
        wrong = sum(counts.get(k, 0) for k in ("mismatched frames", "rejected frames"))
        print(f"\noracle: {counts.get('frames', 0):,} frames decrypted, {wrong} wrong")
        if wrong:
            problems.append(f"{wrong} frames naming another camera or refused")
        if live < n:
            problems.append(f"{n - live} cameras not attached at the end")
        problems += check_store(config, sessions)

    print(
        f"\nSUMMARY ({n:,} cameras, {w:,} watched, {args.replicas} replicas, drain window "
        f"{args.drain_window:g} s, pause {args.pause:g} s; {NCPU} cores shared with PostgreSQL "
        "and all clients)"
    )
    print(
        f"  peak re-attaches/s: overall {top}; per replica "
        + ", ".join(f"{k} {v}" for k, v in peaks.items())
        + f"; sessions lost {lost}; restart took {wall:.0f} s"
    )
    print(f"  correctness: {'OK' if not problems else 'FAILED: ' + '; '.join(problems)}")
    print(f"  total time {time.monotonic() - t0:.0f} s")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
