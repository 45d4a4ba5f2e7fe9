"""Connections and relay against a peer, in the same run: the broker next to mosquitto (a C MQTT
broker doing mutual TLS) and next to a trivial gRPC forwarder, runs alternated pair by pair.

Setup, before any timing (core API, before any server starts): N cameras (plus a few warm-up
cameras) enrolled with one-time tokens, written as the SDK's identity directories, S owners each
with an app instance that claimed one camera. Every server uses the same dev PKI: the broker's
P-256 ECDSA server certificate (certs/server.pem, .key), its root as the client CA, and the
cameras' own client certificates.

1. New connection burst. Each pair runs the broker and mosquitto once each (the order alternating
   per pair), each on a fresh server process. The same client processes (--client-procs) open N
   new mutual-TLS connections as fast as they can, --concurrency in flight per process:
   - broker: the unmodified device SDK (simcam.SimulatedCamera over DeviceClient: a new channel,
     so a new TLS handshake, and Attach + hello until the broker's "accepted");
   - mosquitto (Debian's /usr/sbin/mosquitto, a TLS listener with require_certificate,
     use_identity_as_username, the same cafile/certfile/keyfile): Python ssl + asyncio streams
     with the camera's key and chain (one SSLContext per camera, made before the clock), a
     hand-written MQTT 3.1.1 CONNECT (clean session, keepalive 60 s) and its CONNACK.
   Before the burst a few warm-up cameras connect and leave. Measured: connects/s (first attempt
   to last success, CLOCK_MONOTONIC across processes), the server's CPU per connection (utime +
   stime of its pid from /proc, just before "go" and when every attempt ended), and every attempt
   that did not end attached/connected, by status code and details.
2. Memory per held connection: every connection of the burst stays open (cameras attached,
   heartbeats every 15 s; MQTT clients connected), after --settle s: (server VmRSS now - VmRSS
   just before the burst) / connections held.
3. Relay added latency: S streams at --fps with --frame-bytes plaintext frames, through the broker
   (bench.relay's own clients and Relay.run: camera SDK -> broker -> app SDK, AES-256-GCM end to
   end, the stamp in the plaintext taken before sealing, read after decrypting) versus a "direct
   stream" from the same two client processes: each camera opens a client-streaming call with its
   own certificate to a trivial grpc.aio forwarder in a child process (generic handlers, raw bytes,
   mutual TLS with the broker's server certificate and the same client CA), each app a
   server-streaming call; frames are the same plaintext, stamped and sealed the same way
   (broker.protocol.e2e Sealer / Opener with a fixed key per stream), on the same schedule. The
   only difference is the broker. Measured: added latency p50/p99 in a --duration window after a
   warm-up, and each server's CPU per delivered frame.

Each pair prints broker, peer and broker / peer; the summary gives medians over pairs and their
ratio. The machine is shared: treat differences under ~10 % as noise.

    .venv/bin/python -m bench.peers_conn            # 3 pairs, 2,000 connections, 100 streams
    .venv/bin/python -m bench.peers_conn --quick    # 3 pairs, 300 connections, 20 streams
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from bench.harness.broker import BrokerChild, free_ports, stop_child
from bench.harness.cli import bench_parser, parse
from bench.harness.fleet import (
    Clients,
    Deferred,
    Handlers,
    count_unretrieved,
    device_client,
    measured_window,
    parse_stamp,
    split,
    stamped_payload,
)
from bench.harness.profiling import Spy, py_spy_binary
from bench.harness.provision import CHEAP_ARGON2, App, Camera, bench_home, elapsed, provision
from bench.harness.stats import (
    NCPU,
    MachineWindow,
    median,
    pct,
    pid_cpu,
    pid_memory,
    raise_nofile,
    wait_quiet,
)
from bench.relay import Relay, RunResult, Watcher, relay_client
from broker.config import Config

MOSQUITTO = "/usr/sbin/mosquitto"
KEEPALIVE = 60  # MQTT keepalive, seconds (the broker disconnects after 1.5 x without traffic)
CONNACK_OK = b"\x20\x02\x00\x00"  # CONNACK, remaining length 2, no session present, accepted
SEND = "/direct.Relay/Send"  # client streaming: frames of one stream (metadata "stream")
RECEIVE = "/direct.Relay/Receive"  # server streaming: request = stream id, answers its frames
DIRECT = "direct"  # the session id written into direct frames
DEVICE_TO_APP = 1  # direction byte of the sealer / opener


# ---------------------------------------------------------------------------------------------
# MQTT by hand: one CONNECT packet
# ---------------------------------------------------------------------------------------------
def remaining_length(n: int) -> bytes:
    """MQTT's variable-length integer (7 bits per byte, high bit: more follow)."""
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_connect(client_id: str, keepalive: int = KEEPALIVE) -> bytes:
    """MQTT 3.1.1 CONNECT: protocol name "MQTT", level 4, clean session, keepalive, client id
    (no username: the broker takes it from the certificate, use_identity_as_username)."""
    cid = client_id.encode()
    body = struct.pack("!H4sBBH", 4, b"MQTT", 4, 0x02, keepalive) + struct.pack("!H", len(cid))
    body += cid
    return b"\x10" + remaining_length(len(body)) + body


def client_context(ca_pem: bytes, key_path: Path, chain_path: Path) -> ssl.SSLContext:
    """A camera's TLS client context: its key and chain, the broker's root, name checked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca_pem.decode())
    ctx.load_cert_chain(chain_path, key_path)
    return ctx


# ---------------------------------------------------------------------------------------------
# client process for the burst: cameras (SDK Attach) or MQTT clients, held until released
# ---------------------------------------------------------------------------------------------
def _outcome(cam: Any, runner: asyncio.Task[None]) -> str:
    """How an Attach attempt that never got "accepted" ended."""
    if runner.cancelled():
        return "run() cancelled"
    error = runner.exception()
    if error is not None:
        return f"{type(error).__name__}: {str(error)[:100]}"
    if cam.ended is not None:
        return f"{cam.ended.code().name}: {(cam.ended.details() or '')[:100]}"
    return "stream ended before accepted (no status)"


async def conn_client(cams: list[Camera], warm: list[Camera], ca_pem: bytes) -> Handlers:
    groups = {"main": cams, "warm": warm}
    sdk_held: dict[str, list[tuple[Any, asyncio.Task[None]]]] = {"main": [], "warm": []}
    mqtt_held: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {
        "main": [],
        "warm": [],
    }
    unretrieved = Counter[str]()
    count_unretrieved(unretrieved)

    def attach(
        addresses: tuple[str, str], which: str, concurrency: int, timeout: float
    ) -> Deferred:
        """Each camera of the group: the SDK's Attach on a new channel, until "accepted"."""
        from broker.client.simcam import SimulatedCamera

        cameras = [SimulatedCamera(device_client(c, addresses, ca_pem)) for c in groups[which]]
        gate = asyncio.Semaphore(concurrency)
        attached: list[float] = []
        failures = Counter[str]()

        async def one(cam: Any) -> None:
            async with gate:
                runner = asyncio.create_task(cam.run())
                waiter = asyncio.create_task(cam.attached.wait())
                done, _ = await asyncio.wait(
                    {runner, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if waiter in done:
                    attached.append(time.monotonic())
                    sdk_held[which].append((cam, runner))
                    return
                waiter.cancel()
                if runner in done:
                    failures[_outcome(cam, runner)] += 1
                else:
                    runner.cancel()
                    await asyncio.gather(runner, return_exceptions=True)
                    failures[f"timeout: not attached after {timeout:g} s"] += 1

        async def burst() -> dict[str, Any]:
            started = time.monotonic()
            await asyncio.gather(*(one(cam) for cam in cameras))
            return {
                "start": started,
                "last": max(attached, default=started),
                "ok": len(attached),
                "attempts": len(cameras),
                "failures": dict(failures),
            }

        return Deferred(burst)

    def mqtt(port: int, which: str, concurrency: int, timeout: float) -> Deferred:
        """Each camera of the group: TLS with its certificate, CONNECT, wait for CONNACK."""
        clients = []
        for c in groups[which]:
            sdk = device_client(c, ("", ""), ca_pem)
            clients.append((c.device_id, client_context(ca_pem, sdk.key_path, sdk.chain_path)))
        gate = asyncio.Semaphore(concurrency)
        connected: list[float] = []
        failures = Counter[str]()
        sessions = Counter[str]()

        async def one(client_id: str, ctx: ssl.SSLContext) -> None:
            async with gate:
                writer: asyncio.StreamWriter | None = None
                try:
                    async with asyncio.timeout(timeout):
                        reader, writer = await asyncio.open_connection(
                            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
                        )
                        writer.write(mqtt_connect(client_id))
                        ack = await reader.readexactly(4)
                except TimeoutError:
                    failures[f"timeout: no CONNACK after {timeout:g} s"] += 1
                except asyncio.IncompleteReadError:
                    failures["connection closed before CONNACK"] += 1
                except ssl.SSLError as error:
                    failures[f"SSLError: {error.reason or error}"] += 1
                except OSError as error:
                    failures[f"{type(error).__name__}: {error}"[:100]] += 1
                else:
                    if ack == CONNACK_OK:
                        connected.append(time.monotonic())
                        mqtt_held[which].append((reader, writer))
                        tls = writer.get_extra_info("ssl_object")
                        sessions[f"{tls.version()} {tls.cipher()[0]}"] += 1
                        return
                    failures[f"CONNACK {ack.hex()}"] += 1
                if writer is not None:
                    writer.close()

        async def burst() -> dict[str, Any]:
            started = time.monotonic()
            await asyncio.gather(*(one(cid, ctx) for cid, ctx in clients))
            return {
                "start": started,
                "last": max(connected, default=started),
                "ok": len(connected),
                "attempts": len(clients),
                "failures": dict(failures),
                "tls": dict(sessions),
            }

        return Deferred(burst)

    def held(which: str) -> int:
        """Connections of the group still up: cameras attached, MQTT sockets not at EOF."""
        cams_up = sum(1 for cam, r in sdk_held[which] if cam.attached.is_set() and not r.done())
        mqtt_up = sum(1 for r, w in mqtt_held[which] if not r.at_eof() and not w.is_closing())
        return cams_up + mqtt_up

    async def release(which: str) -> int:
        """Close every connection of the group; returns how many were held."""
        count = len(sdk_held[which]) + len(mqtt_held[which])
        runners = [r for _, r in sdk_held[which]]
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        for _, writer in mqtt_held[which]:
            writer.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(
                    *(w.wait_closed() for _, w in mqtt_held[which]), return_exceptions=True
                ),
                10,
            )
        sdk_held[which].clear()
        mqtt_held[which].clear()
        return count

    async def close() -> None:
        for which in groups:
            await release(which)

    return {
        "attach": attach,
        "mqtt": mqtt,
        "held": held,
        "release": release,
        "unretrieved": lambda: unretrieved["SDK write errors nobody retrieved"],
        "close": close,
    }


# ---------------------------------------------------------------------------------------------
# the peers: mosquitto, and the direct-stream forwarder
# ---------------------------------------------------------------------------------------------
def find_mosquitto() -> tuple[str | None, str]:
    """mosquitto's path, installing the Debian package if it is missing (as root); else
    (None, why)."""
    path = MOSQUITTO if os.path.exists(MOSQUITTO) else shutil.which("mosquitto")
    if path:
        return path, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "mosquitto is not installed (apt-get install mosquitto needs root)"
    done = subprocess.run(
        ["apt-get", "install", "-y", "mosquitto"], capture_output=True, text=True, check=False
    )
    path = MOSQUITTO if os.path.exists(MOSQUITTO) else shutil.which("mosquitto")
    if path:
        return path, ""
    return None, f"apt-get install -y mosquitto failed: {done.stderr.strip()[-200:]}"


class MosquittoChild:
    """mosquitto on a free port with a TLS listener that requires client certificates issued by
    the broker's root; the broker's own server certificate and key. Output in var/."""

    starts = 0

    def __init__(self, binary: str, config: Config) -> None:
        certs = config.certs_dir
        self.port = free_ports(("mqtt",))["mqtt"]
        MosquittoChild.starts += 1
        var = config.home / "var"
        var.mkdir(parents=True, exist_ok=True)
        self.conf = var / "mosquitto.conf"
        self.log = var / f"mosquitto-{MosquittoChild.starts}.log"
        lines = [
            "persistence false",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            *(["user root"] if os.geteuid() == 0 else []),  # do not drop to user mosquitto
            f"listener {self.port} 127.0.0.1",
            "max_connections -1",
            f"cafile {certs / 'ca-bundle.pem'}",
            f"certfile {certs / 'server.pem'}",
            f"keyfile {certs / 'server.key'}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start; see {self.log}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _forward(certs: str, conn: Connection) -> None:
    raise_nofile()
    asyncio.run(_forward_async(Path(certs), conn))


async def _forward_async(certs: Path, conn: Connection) -> None:
    """A grpc.aio server with two raw-bytes methods: Send (client streaming, the stream id in
    metadata) hands each frame to the current Receive (server streaming) of that id."""
    receivers: dict[str, asyncio.Queue[bytes]] = {}

    async def send(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        stream = str(dict(context.invocation_metadata() or ()).get("stream", ""))
        async for frame in requests:
            queue = receivers.get(stream)
            if queue is not None:
                queue.put_nowait(frame)
        return b""

    async def receive(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        stream = request.decode()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        receivers[stream] = queue
        try:
            while True:
                yield await queue.get()
        finally:
            if receivers.get(stream) is queue:
                del receivers[stream]

    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "direct.Relay",
                {
                    "Send": grpc.stream_unary_rpc_method_handler(send),
                    "Receive": grpc.unary_stream_rpc_method_handler(receive),
                },
            ),
        )
    )
    credentials = grpc.ssl_server_credentials(
        [((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())],
        root_certificates=(certs / "ca-bundle.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    conn.send(("ready", os.getpid(), port))
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, conn.recv) != "stop":
        pass
    await server.stop(0.5)
    conn.send("stopped")


class ForwarderChild:
    """The direct-stream forwarder in its own spawned process (own GIL), like the broker's."""

    def __init__(self, config: Config) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_forward, args=(str(config.certs_dir), child), name="forwarder", daemon=True
        )
        self.proc.start()
        if not self._conn.poll(60):
            raise RuntimeError("forwarder process did not start (see its traceback above)")
        _, self.pid, port = self._conn.recv()
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        stop_child(self._conn, self.proc)


# ---------------------------------------------------------------------------------------------
# bursts: one server, one timed burst, held, released
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Burst:
    side: str
    attempts: int
    ok: int
    wall: float  # first attempt started -> last success
    cpu: float  # server CPU seconds, "go" -> every attempt ended
    rss_before: int  # KiB, just before the burst
    rss_held: int  # KiB, with every connection of the burst held (after --settle)
    held: int
    failures: Counter[str]
    clients: float  # cores used by the client processes during the burst
    machine: float  # cores busy on the machine during the burst
    tls: Counter[str]

    @property
    def rate(self) -> float:
        return self.ok / self.wall if self.wall > 0 else 0.0

    @property
    def cpu_per(self) -> float:  # seconds per successful connection
        return self.cpu / self.ok if self.ok else 0.0

    @property
    def mem_per(self) -> float:  # KiB per held connection
        return (self.rss_held - self.rss_before) / self.held if self.held else 0.0


def timed_burst(
    side: str,
    clients: Clients,
    server_pid: int,
    command: tuple[Any, ...],
    warm: tuple[Any, ...],
    settle: float,
) -> Burst:
    """Warm-up connections (released), then the burst, held for `settle` s, then released."""
    clients.timed([warm] * len(clients))
    clients.ask_all("release", "warm")
    time.sleep(0.5)
    sample: dict[str, Any] = {}

    def before() -> None:
        sample["rss"] = pid_memory(server_pid).get("VmRSS", 0)
        sample["clients"] = sum(pid_cpu(p) for p in clients.pids)
        sample["machine"] = MachineWindow()
        sample["cpu"] = pid_cpu(server_pid)
        sample["t"] = time.monotonic()

    results = clients.timed([command] * len(clients), before)
    cpu = pid_cpu(server_pid) - sample["cpu"]
    window = time.monotonic() - sample["t"]
    used = sum(pid_cpu(p) for p in clients.pids) - sample["clients"]
    machine = sample["machine"].stop()
    time.sleep(settle)
    rss_held = pid_memory(server_pid).get("VmRSS", 0)
    held = sum(clients.ask_all("held", "main"))
    failures = Counter[str]()
    tls = Counter[str]()
    for r in results:
        failures.update(r["failures"])
        tls.update(r.get("tls", {}))
    start = min(r["start"] for r in results)
    clients.ask_all("release", "main")
    return Burst(
        side=side,
        attempts=sum(r["attempts"] for r in results),
        ok=sum(r["ok"] for r in results),
        wall=max(r["last"] for r in results) - start,
        cpu=cpu,
        rss_before=sample["rss"],
        rss_held=rss_held,
        held=held,
        failures=failures,
        clients=used / window if window else 0.0,
        machine=machine.busy,
        tls=tls,
    )


def attach_burst(
    broker: BrokerChild, clients: Clients, args: argparse.Namespace, settle: float
) -> Burst:
    """The clients' burst of new connections + Attach against broker, timed."""
    addresses = (broker.bootstrap, broker.main)
    return timed_burst(
        "broker",
        clients,
        broker.pid,
        ("attach", addresses, "main", args.concurrency, args.attempt_timeout),
        ("attach", addresses, "warm", args.concurrency, args.attempt_timeout),
        settle,
    )


def broker_burst(config: Config, clients: Clients, args: argparse.Namespace) -> Burst:
    broker = BrokerChild(config.home, CHEAP_ARGON2)
    try:
        burst = attach_burst(broker, clients, args, args.settle)
        deadline = time.monotonic() + 15  # the cameras left: let the broker see them go
        while broker.stats()["online"] and time.monotonic() < deadline:
            time.sleep(0.2)
        return burst
    finally:
        broker.stop()


def mosquitto_burst(
    binary: str, config: Config, clients: Clients, args: argparse.Namespace
) -> Burst:
    peer = MosquittoChild(binary, config)
    try:
        return timed_burst(
            "mosquitto",
            clients,
            peer.pid,
            ("mqtt", peer.port, "main", args.concurrency, args.attempt_timeout),
            ("mqtt", peer.port, "warm", args.concurrency, args.attempt_timeout),
            args.settle,
        )
    finally:
        peer.stop()


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def print_burst_pair(index: int, first: str, b: Burst, p: Burst | None) -> None:
    print(f"  pair {index} ({first} first)")

    def conn(x: Burst) -> str:
        return (
            f"{x.side} {x.rate:7,.0f}/s  CPU {1e3 * x.cpu_per:6.3f} ms/conn  failed "
            f"{x.attempts - x.ok:,}/{x.attempts:,}  (clients {x.clients:.2f} cores, machine "
            f"{x.machine:.2f}/{NCPU})"
        )

    def mem(x: Burst) -> str:
        return (
            f"{x.side} {x.mem_per:7.1f} KiB/conn ({x.held:,} held; VmRSS "
            f"{x.rss_before / 1024:.0f} -> {x.rss_held / 1024:.0f} MiB)"
        )

    print(f"    new conn   {conn(b)}")
    if p is not None:
        print(f"               {conn(p)}")
        print(
            f"               ratio broker/mosquitto: CPU per conn {ratio(b.cpu_per, p.cpu_per)}"
            f", connects/s {ratio(b.rate, p.rate)}"
        )
    print(f"    held mem   {mem(b)}")
    if p is not None:
        print(f"               {mem(p)}")
        print(f"               ratio broker/mosquitto: {ratio(b.mem_per, p.mem_per)}")
    if b.failures:
        print(f"    broker failed attempts: {dict(b.failures.most_common(5))}")
    if p is not None and p.failures:
        print(f"    mosquitto failed attempts: {dict(p.failures.most_common(5))}")


# ---------------------------------------------------------------------------------------------
# relay: the broker (bench.relay's clients) and the direct stream, from the same processes
# ---------------------------------------------------------------------------------------------
def stream_key(stream: str) -> bytes:
    """The AES-256 key of a direct stream (fixed per stream: no handshake to measure here)."""
    return hashlib.sha256(f"direct-stream|{stream}".encode()).digest()


async def relay_peer_client(
    addresses: tuple[str, str],
    ca_pem: bytes,
    cams: list[Camera],
    apps: list[App],
    fps: float,
    frame_bytes: int,
    direct: str,
) -> Handlers:
    """bench.relay's client process (cameras attached to the broker, or apps), plus the same
    cameras / apps on direct streams through the forwarder at `direct`."""
    from broker.client.channels import mtls_channel
    from broker.client.simcam import parse_payload
    from broker.errors import BrokerError
    from broker.protocol.e2e import Opener, Sealer

    handlers: Handlers = await relay_client(addresses, ca_pem, cams, apps, fps, frame_bytes, False)
    channels: dict[str, grpc.aio.Channel] = {}
    senders: list[asyncio.Task[None]] = []
    late: list[float] = []
    interval = 1.0 / fps

    def channel(name: str, key_pem: bytes, chain_pem: bytes) -> grpc.aio.Channel:
        """One mutual-TLS channel per camera or app, kept across runs (as the Attach stream is)."""
        if name not in channels:
            channels[name] = mtls_channel(direct, ca_pem, key_pem, chain_pem)
        return channels[name]

    async def send(cam: Camera) -> None:
        sdk = device_client(cam, addresses, ca_pem)
        ch = channel(cam.device_id, sdk.key_path.read_bytes(), sdk.chain_path.read_bytes())
        sealer = Sealer(stream_key(cam.device_id), cam.device_id, DEVICE_TO_APP)
        call = ch.stream_unary(SEND)(metadata=(("stream", cam.device_id),))
        due = time.monotonic() + random.uniform(0, interval)  # independent frame clocks
        await asyncio.sleep(due - time.monotonic())
        try:
            while True:
                late.append(time.monotonic() - due)
                plaintext = stamped_payload(
                    cam.device_id, DIRECT, sealer.sequence + 1, time.monotonic_ns(), frame_bytes
                )
                sequence, ciphertext = sealer.seal(plaintext)
                await call.write(struct.pack(">Q", sequence) + ciphertext)
                due += interval
                delay = due - time.monotonic()
                if delay < -interval:  # more than a frame behind: skip, do not burst
                    due, delay = time.monotonic(), 0.0
                await asyncio.sleep(max(0.0, delay))
        finally:
            call.cancel()

    async def start(k: int) -> int:
        for cam in cams[:k]:
            sdk = device_client(cam, addresses, ca_pem)
            ch = channel(cam.device_id, sdk.key_path.read_bytes(), sdk.chain_path.read_bytes())
            await asyncio.wait_for(ch.channel_ready(), 30)
        late.clear()
        senders.extend(asyncio.create_task(send(cam)) for cam in cams[:k])
        return len(senders)

    async def stop() -> dict[str, Any]:
        for task in senders:
            task.cancel()
        outcomes = await asyncio.gather(*senders, return_exceptions=True)
        senders.clear()
        ended = [
            f"{type(o).__name__}: {o}"[:100]
            for o in outcomes
            if isinstance(o, BaseException) and not isinstance(o, asyncio.CancelledError)
        ]
        samples = list(late)
        late.clear()
        return {"late": samples, "ended": ended}

    async def watch(k: int, warmup: float, duration: float, pids: list[int]) -> dict[str, Any]:
        """watch_run's measurement over direct streams: the first k apps each receive their
        camera's stream; latency = now, right after decrypting, - the stamp in the plaintext."""
        window = [float("inf"), float("inf")]
        latencies: list[int] = []
        watchers = [Watcher() for _ in apps[:k]]
        waiting = {id(w) for w in watchers}
        everyone = asyncio.Event()

        def first(w: Watcher) -> None:
            waiting.discard(id(w))
            if not waiting:
                everyone.set()

        async def receive(app: App, w: Watcher) -> None:
            ch = channel(app.app_id, app.key_pem, app.chain_pem)
            opener = Opener(stream_key(app.device_id), app.device_id, DEVICE_TO_APP)
            call = ch.unary_stream(RECEIVE)(app.device_id.encode())
            try:
                async for message in call:
                    now = time.monotonic_ns()
                    try:
                        plaintext = opener.open(struct.unpack_from(">Q", message)[0], message[8:])
                    except BrokerError:
                        w.rejected += 1
                        continue
                    seen_device, seen_session, _ = parse_payload(plaintext)
                    w.mismatches += (seen_device, seen_session) != (app.device_id, DIRECT)
                    first(w)
                    if window[0] <= now / 1e9 < window[1]:
                        latencies.append(now - parse_stamp(plaintext))
                        w.frames += 1
                    elif now / 1e9 >= window[1]:
                        break
            except grpc.aio.AioRpcError as error:
                w.error = f"{error.code().name}: {error.details()}"
            finally:
                call.cancel()
                first(w)

        started = time.monotonic()
        tasks = [
            asyncio.create_task(receive(app, w)) for app, w in zip(apps, watchers, strict=False)
        ]
        return await measured_window(
            tasks, everyone, started, warmup, duration, window, pids, latencies, watchers
        )

    relay_close: Callable[[], Any] = handlers["close"]

    async def close() -> None:
        await stop()
        for ch in channels.values():
            await ch.close()
        await relay_close()

    handlers.update(
        {"direct-start": start, "direct-stop": stop, "direct-watch": watch, "close": close}
    )
    return handlers


def direct_run(
    forwarder: ForwarderChild, relay: Relay, streams: int, warmup: float, duration: float
) -> RunResult:
    """One run of the direct stream, the same figures as Relay.run gives for the broker."""
    clients = relay.clients
    pids = {"forwarder": forwarder.pid, **relay.roles}
    clients.ask(relay.cam, "direct-start", streams)
    out = clients.ask(relay.app, "direct-watch", streams, warmup, duration, list(pids.values()))
    cams = clients.ask(relay.cam, "direct-stop")
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
        online=0,
        cameras_ended=cams["ended"],
    )


def server_cpu_per_frame(r: RunResult) -> float:
    """Seconds of the server's (broker's or forwarder's) CPU per delivered frame."""
    server = r.cpu.get("broker", r.cpu.get("forwarder", 0.0))
    return server / r.frames if r.frames else 0.0


def print_relay_pair(index: int, first: str, b: RunResult, d: RunResult, fps: float) -> None:
    print(f"  pair {index} ({first} first)")
    for name, r in (("broker", b), ("direct", d)):
        cpu = "  ".join(f"{role} {100 * sec / r.wall:3.0f}%" for role, sec in r.cpu.items())
        print(
            f"    {name:<7}{r.rate:7,.0f} frames/s (of {r.streams * fps:,.0f})  added latency "
            f"p50 {r.q(0.5):5.2f} ms  p99 {r.q(0.99):6.2f} ms  server CPU "
            f"{1e6 * server_cpu_per_frame(r):5.0f} µs/frame  (CPU of a core: {cpu}; machine "
            f"{r.machine:.2f}/{NCPU}; pacing late p99 {1e3 * pct(r.late, 0.99):.2f} ms)"
        )
        bad = r.mismatches + r.rejected
        if bad or r.errors:
            print(
                f"           mismatches/rejected {bad}; errors {Counter(r.errors).most_common(3)}"
            )
    print(
        f"    ratio broker/direct: p50 {ratio(b.q(0.5), d.q(0.5))}  p99 "
        f"{ratio(b.q(0.99), d.q(0.99))}  server CPU per frame "
        f"{ratio(server_cpu_per_frame(b), server_cpu_per_frame(d))}"
    )


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(
        __doc__,
        "300 connections, 20 streams, 3 s windows",
        "after the pairs, one extra broker burst with py-spy on the broker (not in the figures)",
    )
    p.add_argument("--runs", type=int, default=3, help="pairs of runs, broker and peer (3)")
    p.add_argument("--cameras", type=int, help="connections per burst (default 2,000, quick 300)")
    p.add_argument("--streams", type=int, help="relay streams (default 100, quick 20)")
    p.add_argument("--client-procs", type=int, default=2, help="burst client processes (2)")
    p.add_argument(
        "--concurrency", type=int, default=200, help="attempts in flight per client process (200)"
    )
    p.add_argument(
        "--attempt-timeout",
        type=float,
        default=60.0,
        help="an attempt not attached / connected after this many seconds fails (60)",
    )
    p.add_argument("--warm", type=int, default=20, help="warm-up connections before a burst (20)")
    p.add_argument(
        "--settle", type=float, default=2.0, help="seconds held before reading VmRSS (2)"
    )
    p.add_argument("--fps", type=float, default=30.0, help="relay frames per second (30)")
    p.add_argument("--frame-bytes", type=int, default=1024, help="relay plaintext bytes (1024)")
    p.add_argument(
        "--duration", type=float, help="relay measured seconds per run (default 10, quick 3)"
    )
    p.add_argument("--warmup", type=float, default=1.0, help="relay seconds before the window")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=-1.0,  # cli.parse turns None into its own defaults (30 s)
        metavar="S",
        help="shared machine: before each run wait up to S s (3, quick 1) until other processes use "
        "less than --quiet-below cores",
    )
    p.add_argument("--quiet-below", type=float, default=0.3, help="cores (0.3)")
    p.add_argument("--skip-relay", action="store_true", help="only the connection pairs")
    p.add_argument("--skip-conn", action="store_true", help="only the relay pairs")
    args = parse(p, argv)
    args.cameras = args.cameras or (300 if args.quick else 2000)
    args.streams = args.streams or (20 if args.quick else 100)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    if args.wait_quiet < 0:
        args.wait_quiet = 1.0 if args.quick else 3.0
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def quiet(pids: list[int], args: argparse.Namespace) -> None:
    waited, load = wait_quiet(pids, args.quiet_below, args.wait_quiet)
    if waited >= 0.5:
        print(f"    (waited {waited:.0f} s for other processes; they used {load:.2f} cores)")


def conn_pairs(
    config: Config, cams: list[Camera], warm: list[Camera], ca_pem: bytes, args: argparse.Namespace
) -> tuple[list[Burst], list[Burst], str]:
    binary, skipped = find_mosquitto()
    clients = Clients(
        conn_client,
        [
            (share, warm_share, ca_pem)
            for share, warm_share in zip(
                split(cams, args.client_procs), split(warm, args.client_procs), strict=True
            )
        ],
    )
    brokers: list[Burst] = []
    peers: list[Burst] = []
    try:
        print(
            f"\n1+2. new mutual-TLS connections: {len(cams):,} per burst from "
            f"{args.client_procs} client processes, {args.concurrency} in flight each "
            f"({args.warm} warm-up connections first); then all held {args.settle:g} s"
        )
        if skipped:
            print(f"  mosquitto skipped: {skipped}")
        for i in range(args.runs):
            order = ["broker", "mosquitto"] if i % 2 == 0 else ["mosquitto", "broker"]
            runs: dict[str, Burst] = {}
            for side in order:
                if side == "mosquitto" and binary is None:
                    continue
                quiet(clients.pids, args)
                runs[side] = (
                    broker_burst(config, clients, args)
                    if side == "broker"
                    else mosquitto_burst(str(binary), config, clients, args)
                )
            brokers.append(runs["broker"])
            if "mosquitto" in runs:
                peers.append(runs["mosquitto"])
            print_burst_pair(i + 1, order[0], runs["broker"], runs.get("mosquitto"))
        if args.profile:
            py_spy = py_spy_binary(args.py_spy)
            if not py_spy:
                print("  (--profile: py-spy not found; pass --py-spy PATH)")
            else:
                broker = BrokerChild(config.home, CHEAP_ARGON2)
                try:
                    spy = Spy(
                        py_spy,
                        args.profile,
                        "peers-conn",
                        {"broker": broker.pid},
                        ["--threads", "--nonblocking"],
                        "threads",
                    )
                    burst = attach_burst(broker, clients, args, 0.5)
                    print(f"\n  profile (not in the figures): {burst.rate:,.0f} connects/s")
                    spy.stop()
                finally:
                    broker.stop()
        unretrieved = sum(clients.ask_all("unretrieved"))
        if unretrieved:
            print(f"  camera SDK: {unretrieved:,} shielded writes failed after their caller left")
    finally:
        clients.stop()
    return brokers, peers, skipped


def relay_pairs(
    config: Config, cams: list[Camera], owners: list[App], ca_pem: bytes, args: argparse.Namespace
) -> tuple[list[RunResult], list[RunResult]]:
    s = args.streams
    print(
        f"\n3. relay: {s} streams x {args.fps:g} fps, {args.frame_bytes} B plaintext frames "
        f"(AES-256-GCM end to end), window {args.duration:g} s after {args.warmup:g} s; broker "
        "(camera SDK -> broker -> app SDK) vs direct (camera -> grpc.aio forwarder -> app, "
        "raw bytes, mutual TLS)"
    )
    broker = BrokerChild(config.home, CHEAP_ARGON2)
    forwarder: ForwarderChild | None = None
    clients: Clients | None = None
    brokers: list[RunResult] = []
    directs: list[RunResult] = []
    try:
        forwarder = ForwarderChild(config)
        prep = time.monotonic()
        common = (args.fps, args.frame_bytes, forwarder.address)
        addresses = (broker.bootstrap, broker.main)
        clients = Clients(
            relay_peer_client,
            [
                (addresses, ca_pem, cams[:s], [], *common),
                (addresses, ca_pem, [], owners[:s], *common),
            ],
            ["cameras", "apps"],
        )
        relay = Relay(broker, clients)
        print(
            f"  broker pid {broker.pid}, forwarder pid {forwarder.pid}, cameras pid "
            f"{clients.pids[0]}, apps pid {clients.pids[1]}; {s} cameras attached in "
            f"{elapsed(prep)}"
        )
        relay.run(s, 0.5, 1.0)  # warm-ups, not reported
        direct_run(forwarder, relay, s, 0.5, 1.0)
        pids = [broker.pid, forwarder.pid, *clients.pids]
        for i in range(args.runs):
            order = ["broker", "direct"] if i % 2 == 0 else ["direct", "broker"]
            runs: dict[str, RunResult] = {}
            for side in order:
                quiet(pids, args)
                runs[side] = (
                    relay.run(s, args.warmup, args.duration)
                    if side == "broker"
                    else direct_run(forwarder, relay, s, args.warmup, args.duration)
                )
            brokers.append(runs["broker"])
            directs.append(runs["direct"])
            print_relay_pair(i + 1, order[0], runs["broker"], runs["direct"], args.fps)
    finally:
        if clients is not None:
            clients.stop()
        if forwarder is not None:
            forwarder.stop()
        broker.stop()
    return brokers, directs


def summary_row(name: str, broker: list[float], peer: list[float], fmt: str) -> None:
    b, p = median(broker), median(peer)
    peer_text = format(p, fmt) if peer else "-"
    print(f"  {name:<40}{format(b, fmt):>12}{peer_text:>12}{ratio(b, p) if peer else '-':>9}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    nofile = raise_nofile()
    n, s, w = args.cameras, args.streams, args.warm
    total = max(n, s) + w
    with bench_home("peers-conn", args.keep, **CHEAP_ARGON2) as config:
        print(
            f"peers benchmark (connections, memory, relay vs mosquitto and a direct stream): "
            f"grpcio {grpc.__version__}, Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, "
            f"{NCPU} CPUs, open-file limit {nofile}, home {config.home}"
        )
        prep = time.monotonic()
        setup = provision(config, total, s, progress=lambda m: print(f"  setup: {m}"))
        cams, warm = setup.cameras[:n], setup.cameras[max(n, s) :]
        print(
            f"setup: {total:,} cameras enrolled ({w} for warm-ups), {s} owners each with an app "
            f"instance that claimed one camera (core API, before any server starts) in "
            f"{elapsed(prep)}; server certificate P-256 ECDSA (certs/server.pem), client CA "
            "the broker's root"
        )
        bursts: tuple[list[Burst], list[Burst], str] = ([], [], "")
        relays: tuple[list[RunResult], list[RunResult]] = ([], [])
        if not args.skip_conn:
            bursts = conn_pairs(config, cams, warm, setup.ca_pem, args)
        if not args.skip_relay:
            relays = relay_pairs(config, setup.cameras, setup.owners, setup.ca_pem, args)

    brokers, peers, skipped = bursts
    problems: list[str] = []
    print(
        f"\nSUMMARY (medians of {args.runs} pairs, runs alternated pair by pair; ratio = broker "
        f"/ peer; {NCPU} cores shared by servers and clients)"
    )
    print(f"  {'':<40}{'broker':>12}{'peer':>12}{'ratio':>9}")
    if brokers:
        print(f"  peer: {'mosquitto' if peers else 'skipped: ' + skipped}")
        summary_row(
            f"new mTLS conn (+Attach / CONNECT) per s, {n:,}",
            [b.rate for b in brokers],
            [p.rate for p in peers],
            ",.0f",
        )
        summary_row(
            "server CPU per new connection, ms",
            [1e3 * b.cpu_per for b in brokers],
            [1e3 * p.cpu_per for p in peers],
            ".3f",
        )
        summary_row(
            "server memory per held connection, KiB",
            [b.mem_per for b in brokers],
            [p.mem_per for p in peers],
            ".1f",
        )
        summary_row(
            "failed attempts per burst",
            [float(b.attempts - b.ok) for b in brokers],
            [float(p.attempts - p.ok) for p in peers],
            ".0f",
        )
        failures = Counter[str]()
        for b in brokers:
            failures.update(b.failures)
        print(
            f"  broker failed attempts, all bursts ({sum(b.attempts for b in brokers):,} "
            f"attempts): {dict(failures.most_common(8)) or 'none'}"
        )
        peer_failures = Counter[str]()
        tls = Counter[str]()
        for p in peers:
            peer_failures.update(p.failures)
            tls.update(p.tls)
        if peers:
            print(
                f"  mosquitto failed attempts: {dict(peer_failures.most_common(5)) or 'none'}; "
                f"TLS negotiated: {dict(tls)}"
            )
    broker_relay, direct_relay = relays
    if broker_relay:
        print(f"  peer: direct stream through a grpc.aio forwarder, {s} streams x {args.fps:g} fps")
        summary_row(
            "relay added latency p50, ms",
            [r.q(0.5) for r in broker_relay],
            [r.q(0.5) for r in direct_relay],
            ".2f",
        )
        summary_row(
            "relay added latency p99, ms",
            [r.q(0.99) for r in broker_relay],
            [r.q(0.99) for r in direct_relay],
            ".2f",
        )
        summary_row(
            "server CPU per delivered frame, µs",
            [1e6 * server_cpu_per_frame(r) for r in broker_relay],
            [1e6 * server_cpu_per_frame(r) for r in direct_relay],
            ".0f",
        )
        summary_row(
            "frames/s delivered",
            [r.rate for r in broker_relay],
            [r.rate for r in direct_relay],
            ",.0f",
        )
        for name, runs in (("broker", broker_relay), ("direct", direct_relay)):
            bad = sum(r.mismatches + r.rejected for r in runs)
            errors = sum(len(r.errors) for r in runs)
            if bad or errors:
                problems.append(f"{name} relay: {bad} oracle mismatches, {errors} watcher errors")
    print(
        "  oracle (every decrypted frame names its stream): "
        + ("OK" if not problems else "FAILED: " + "; ".join(problems))
    )
    print(f"  total time {time.monotonic() - t0:.0f} s")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
