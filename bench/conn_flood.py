"""A connection flood from one address against legitimate calls from another (issue 13, item 3).

The attacker (its own process, source address 127.0.0.2) opens 3,000 idle TCP connections and
500 half-finished TLS handshakes (a ClientHello cut short) to the bootstrap and main listeners
and re-opens whatever the broker closes, for --flood seconds; then it stops opening new ones
and holds what it has. Meanwhile a legitimate client (127.0.0.1) enrolls a camera over a new
connection and opens a session on a held app connection every 50 ms. Reported per broker:
p50/p99 of both calls before and during the flood, the broker's open descriptors (baseline, peak,
and seconds after the flood stops until they are back within 5 of the baseline), and what the
gates refused. Two brokers in the same run: as shipped (per-address cap 256, handshake timeout
10 s) and with the gate off and grpc's own handshake timeout (120 s), the behaviour before.

    .venv/bin/python -m bench.conn_flood [--idle 3000] [--half-open 500] [--flood 15]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path
from typing import Any

from bench.harness.broker import BrokerChild
from bench.harness.fleet import app_client
from bench.harness.provision import bench_home, make_items, provision
from bench.harness.stats import ms, pct, raise_nofile
from broker.config import Config

ATTACKER = "127.0.0.2"
HALF_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
BACK_WITHIN = 5  # descriptors above the baseline still counted as "back"

SHIPPED = Config()
SHAPES = {
    "as shipped (cap 256/address, handshake 10 s)": {
        # the defaults, explicitly: the bench harness raises the cap for its load generators
        "max_connections_per_address": SHIPPED.max_connections_per_address,
        "handshake_timeout_seconds": SHIPPED.handshake_timeout_seconds,
        "idle_connection_seconds": SHIPPED.idle_connection_seconds,
    },
    "gate off, grpc handshake timeout 120 s (before)": {
        "max_connections_per_address": 0,
        "handshake_timeout_seconds": 120.0,
        "idle_connection_seconds": 120.0,
    },
}


def _attacker(
    ports: list[int], idle: int, half_open: int, rate: float, flood: float, hold: float
) -> None:
    """Keep idle + half_open connections open for flood seconds, re-opening what the broker
    closes at up to rate per second; then hold what is left without re-opening."""
    raise_nofile()
    wanted = [(ports[i % len(ports)], b"") for i in range(idle)]
    wanted += [(ports[i % len(ports)], HALF_HELLO) for i in range(half_open)]
    held: dict[int, socket.socket] = {}
    start = time.monotonic()
    opened = 0
    while time.monotonic() < start + flood:
        for slot, (port, first) in enumerate(wanted):
            sock = held.get(slot)
            if sock is not None and _alive(sock):
                continue
            if sock is not None:
                sock.close()
            while opened > rate * (time.monotonic() - start) + len(wanted):
                time.sleep(0.005)  # the first pass opens all at once, then at the rate
            held[slot] = _open(port, first)
            opened += 1
        time.sleep(0.05)
    time.sleep(hold)  # the flood has stopped: hold what is left, open nothing new
    for sock in held.values():
        sock.close()


def _open(port: int, first: bytes) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(2.0)
    sock.bind((ATTACKER, 0))
    with contextlib.suppress(OSError):  # refused or reset: the next pass re-opens it
        sock.connect(("127.0.0.1", port))
        if first:
            sock.sendall(first)
    sock.setblocking(False)
    return sock


def _alive(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _legit(
    broker: BrokerChild, items: list[Any], app: Any, camera: str, seconds: float, home: Path
) -> tuple[list[float], list[float]]:
    """Every 50 ms: a camera enrolls over a new connection, the app opens a session."""
    from broker.client.device import DeviceClient, Endpoints

    enrolls: list[float] = []
    sessions: list[float] = []
    end = time.monotonic() + seconds
    ca_pem = (home / "certs" / "ca-bundle.pem").read_bytes()
    endpoints = Endpoints(broker.bootstrap, broker.main)
    while time.monotonic() < end and items:
        device_id, token, _ = items.pop()
        client = DeviceClient(home / "legit" / device_id, endpoints, ca_pem)
        start = time.perf_counter()
        await client.enroll(token)
        enrolls.append(time.perf_counter() - start)
        start = time.perf_counter()
        await app.open_session(camera)
        sessions.append(time.perf_counter() - start)
        await asyncio.sleep(0.05)
    return enrolls, sessions


def run_shape(name: str, overrides: dict[str, Any], args: argparse.Namespace) -> None:
    """One broker shape: calm, flood, and the descriptors' way back."""
    with bench_home("conn_flood", args.keep, **overrides) as config:
        made = provision(config, cameras=1, owners=1)
        items = make_items(config, "legit", 2000)
        broker = BrokerChild(config.home, overrides)
        try:
            owner = made.owners[0]
            camera = owner.device_id
            app = app_client(owner, (broker.bootstrap, broker.main), made.ca_pem)
            loop = asyncio.new_event_loop()
            calm = loop.run_until_complete(
                _legit(broker, items, app, camera, args.calm, config.home)
            )
            baseline = descriptors(broker.pid)
            ports = [broker.ports["bootstrap"], broker.ports["main"]]
            attacker = mp.get_context("spawn").Process(
                target=_attacker,
                args=(ports, args.idle, args.half_open, args.rate, args.flood, args.hold),
                daemon=True,
            )
            attacker.start()
            time.sleep(1.0)  # let the flood build up before measuring under it
            flooded = loop.run_until_complete(
                _legit(broker, items, app, camera, args.flood - 1.5, config.home)
            )
            peak = descriptors(broker.pid)
            stopped_at = time.monotonic() + 0.5  # the attacker stops re-opening about now
            time.sleep(0.5)
            back_after = None
            while time.monotonic() < stopped_at + args.hold:
                if descriptors(broker.pid) <= baseline + BACK_WITHIN:
                    back_after = time.monotonic() - stopped_at
                    break
                time.sleep(0.1)
            attacker.join(args.hold + 10)
            loop.close()
        finally:
            broker.stop()
    _report(name, calm, flooded, baseline, peak, back_after, args.hold)


def _report(
    name: str,
    calm: tuple[list[float], list[float]],
    flooded: tuple[list[float], list[float]],
    baseline: int,
    peak: int,
    back_after: float | None,
    hold: float,
) -> None:
    print(f"\n{name}")
    for label, (enrolls, sessions) in (("before the flood", calm), ("during the flood", flooded)):
        print(
            f"  {label:<17} EnrollDevice (new connection) n={len(enrolls):<4} "
            f"p50 {ms(pct(enrolls, 0.5))} p99 {ms(pct(enrolls, 0.99))} | "
            f"OpenSession n={len(sessions):<4} p50 {ms(pct(sessions, 0.5))} "
            f"p99 {ms(pct(sessions, 0.99))}"
        )
    back = f"{back_after:.1f} s" if back_after is not None else f"not within {hold:.0f} s"
    print(
        f"  broker descriptors: baseline {baseline}, under the flood {peak}, "
        f"back to baseline(+{BACK_WITHIN}) {back} after the flood stopped"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--idle", type=int, default=3000, help="idle TCP connections (3000)")
    p.add_argument("--half-open", type=int, default=500, help="stalled TLS handshakes (500)")
    p.add_argument(
        "--rate", type=float, default=1000.0, help="re-opens per second once closed (1000)"
    )
    p.add_argument("--flood", type=float, default=15.0, help="seconds the flood lasts (15)")
    p.add_argument("--calm", type=float, default=5.0, help="seconds measured before it (5)")
    p.add_argument("--hold", type=float, default=25.0, help="seconds held after it (25)")
    p.add_argument("--keep", action="store_true", help="keep the temporary broker homes")
    args = p.parse_args(argv)
    raise_nofile()
    print(
        f"connection flood: {args.idle} idle + {args.half_open} half-open from {ATTACKER}, "
        f"re-opened at up to {args.rate:.0f}/s for {args.flood:.0f} s; "
        "legitimate calls from 127.0.0.1 every 50 ms"
    )
    for name, overrides in SHAPES.items():
        run_shape(name, overrides, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
