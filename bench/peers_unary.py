"""The broker's unary paths against a peer in the same run: server CPU per operation, broker / peer.

Two comparisons, each on the same machine and in the same sitting, runs alternated pair by pair
(the order rotating each pair, so outside load on a shared machine hits both alike), medians over
the pairs (--runs, default 3):

- enroll:   the broker's Bootstrap.EnrollDevice (as bench/enroll.py drives it: P-256 CSRs and
            tokens made before the clock, 4 reused TLS channels, 64 calls in flight) against
            cfssl (``cfssl serve``, Go, Debian's golang-cfssl) signing THE SAME CSRs through
            ``POST /api/v1/cfssl/sign`` ``{"certificate_request": PEM}``, from a client process
            with 64 in flight (a thread pool over 64 keep-alive HTTPS connections, handshakes
            before the clock). cfssl gets a fresh P-256 CA (made with ``cryptography``), a
            default signing profile (720h, digital signature + client auth), the broker's own
            server certificate for TLS (as the broker's bootstrap listener: TLS, no client
            certificate) and log level warning (no line per request). If ``cfssl`` is not on
            PATH the bench runs ``apt-get update`` and ``apt-get install -y golang-cfssl``
            once; if that fails it prints "skipped: cfssl not available (...)" and runs the
            broker alone.
- sessions: the broker's AppService.OpenSession (as bench/sessions.py drives it, its client
            process unchanged: one mutual-TLS channel per app instance, opened before the clock,
            128 calls in flight) against a bare grpc.aio server in a child process with one
            unary echo method (generic handler, raw bytes, no .proto), on the broker's own
            server certificate, key and client CA (its ReloadingCredentials, mutual TLS
            required) and the broker's listener options, driven by the same app certificates,
            channel options, client processes and calls in flight. Each request is a serialized
            OpenSessionRequest (same size as the broker's); the echo sends it back padded to the
            size of a real OpenSessionResponse. Goal (the issue): broker <= 1.5x echo.

Server CPU is read from /proc (utime + stime of the server process: the broker child, the cfssl
process, the echo child) just before and after each run; CPU per operation is that over the
successful calls. Printed per run, then per comparison: broker, peer and broker / peer for CPU per
operation (median and per pair), ops/s, p50 and p99, and (sessions) the CPU per call of each
server's threads side by side.

    .venv/bin/python -m bench.peers_unary --quick     # 3 pairs x 1000 calls each
    .venv/bin/python -m bench.peers_unary             # 3 pairs x 5000 calls each
    .venv/bin/python -m bench.peers_unary --part sessions --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import multiprocessing as mp
import os
import queue
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from bench.enroll import Load as EnrollLoad
from bench.enroll import enroll_client
from bench.harness import stores as backends
from bench.harness.broker import Broker, free_ports, stop_child
from bench.harness.cli import bench_parser, parse
from bench.harness.fleet import Clients, Deferred, split
from bench.harness.profiling import profiled_runs, py_spy_binary
from bench.harness.provision import CHEAP_ARGON2, App, Item, bench_home, elapsed, make_items
from bench.harness.provision import provision as provision_fleet
from bench.harness.stats import (
    NCPU,
    PY_GROUPS,
    median,
    ms,
    pid_cpu,
    process_cpu,
    raise_nofile,
    thread_cpu,
    us,
)
from bench.harness.unary import UnaryRun, drive, print_breakdown, run_load
from bench.sessions import Load as SessionsLoad
from broker.config import Config

CFSSL_PACKAGE = "golang-cfssl"
SIGN_PATH = "/api/v1/cfssl/sign"
ECHO_SERVICE, ECHO_METHOD = "bench.Echo", "Echo"
GOAL = 1.5  # OpenSession: broker CPU per call <= 1.5 x the bare echo's (the goal)


def peer_stats(cpu: float, threads: dict[str, float] | None = None) -> dict[str, Any]:
    """A peer server's stats() as run_load reads them: no core thread, so no core counters."""
    return {
        "cpu": cpu,
        "threads": threads or {},
        "core_calls": 0,
        "core_batches": 0,
        "core_busy": 0.0,
        "core_waited": 0.0,
    }


# ---------------------------------------------------------------------------------------------
# cfssl: the binary, its CA, the server process, and the client process
# ---------------------------------------------------------------------------------------------
def find_cfssl(name: str) -> tuple[str | None, str]:
    """(path of cfssl, "") or (None, why not); installs golang-cfssl with apt-get if needed."""
    found = shutil.which(name)
    if found:
        return found, ""
    if not shutil.which("apt-get"):
        return None, f"{name!r} not on PATH and no apt-get"
    print(f"{name!r} not on PATH: apt-get update; apt-get install -y {CFSSL_PACKAGE} ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", CFSSL_PACKAGE]):
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=600, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return None, f"{' '.join(command)}: {error}"
        if done.returncode and command[1] == "install":
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return None, f"apt-get install {CFSSL_PACKAGE} exited {done.returncode}: {tail[0]}"
    found = shutil.which(name)
    return (found, "") if found else (None, f"{CFSSL_PACKAGE} installed, but no {name!r} on PATH")


def cfssl_ca(directory: Path) -> dict[str, Path]:
    """A fresh P-256 CA (certificate, key) and a minimal cfssl config in directory."""
    from cryptography.hazmat.primitives import serialization

    from broker.pki.ca import make_root, new_key

    key = new_key()
    certificate = make_root(key, "bench cfssl CA", dt.datetime.now(dt.UTC))
    paths = {n: directory / f for n, f in (("ca", "ca.pem"), ("key", "ca-key.pem"))}
    paths["config"] = directory / "cfssl-config.json"
    paths["ca"].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    paths["key"].chmod(0o600)
    profile = {"expiry": "720h", "usages": ["digital signature", "client auth"]}
    paths["config"].write_text(json.dumps({"signing": {"default": profile}}))
    return paths


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"cfssl serve did not come up; see {log}")
        time.sleep(0.05)


class CfsslServer:
    """`cfssl serve` on 127.0.0.1, TLS with the broker's server certificate; CPU from /proc."""

    def __init__(self, binary: str, config: Config) -> None:
        from broker.pki.ca import PkiFiles

        directory = config.home / "cfssl"
        directory.mkdir(parents=True, exist_ok=True)
        ca = cfssl_ca(directory)
        files = PkiFiles(config.certs_dir)
        self.port = free_ports(("cfssl",))["cfssl"]
        self.log = directory / "cfssl.log"
        command = [
            binary,
            "serve",
            "-address=127.0.0.1",
            f"-port={self.port}",
            f"-ca={ca['ca']}",
            f"-ca-key={ca['key']}",
            f"-config={ca['config']}",
            f"-tls-cert={files.server_chain}",
            f"-tls-key={files.server_key}",
            "-loglevel=2",  # warnings only: no log line per request
        ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self.pid = self.proc.pid
        wait_listening(self.port, self.proc, self.log)

    def stats(self) -> dict[str, Any]:
        return peer_stats(pid_cpu(self.pid))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def cfssl_client(port: int, ca_pem: bytes, connections: int) -> dict[str, Any]:
    """HTTPS keep-alive connections to cfssl (handshakes now, before any clock), and a thread
    pool to keep `connections` sign requests in flight."""
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    idle: queue.SimpleQueue[http.client.HTTPSConnection] = queue.SimpleQueue()
    opened = []
    for _ in range(connections):
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=60)
        conn.connect()
        opened.append(conn)
        idle.put(conn)
    pool = ThreadPoolExecutor(max_workers=connections, thread_name_prefix="cfssl-client")
    headers = {"Content-Type": "application/json"}

    def sign(body: bytes) -> None:
        conn = idle.get()
        try:
            conn.request("POST", SIGN_PATH, body, headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            conn.close()  # http.client reconnects on the next request
            raise ValueError(f"cfssl: {error!r}") from error
        finally:
            idle.put(conn)
        if response.status != 200:
            raise ValueError(f"cfssl: HTTP {response.status}")
        answer = json.loads(data)
        if not answer.get("success") or not answer["result"]["certificate"].startswith(
            "-----BEGIN CERTIFICATE-----"
        ):
            raise ValueError("cfssl: no certificate")

    def run(csrs: list[str], concurrency: int) -> Deferred:
        bodies = [json.dumps({"certificate_request": csr}).encode() for csr in csrs]
        loop = asyncio.get_running_loop()

        async def call(i: int) -> None:
            await loop.run_in_executor(pool, sign, bodies[i])

        async def timed() -> dict[str, Any]:
            return await drive(call, len(bodies), concurrency)

        return Deferred(timed)

    async def close() -> None:
        pool.shutdown()
        for conn in opened:
            conn.close()

    return {"run": run, "close": close}


class CfsslLoad:
    def __init__(self, server: CfsslServer, ca_pem: bytes, concurrency: int) -> None:
        self.server, self.concurrency = server, concurrency
        self.clients = Clients(cfssl_client, [(server.port, ca_pem, concurrency)])

    def run(self, items: list[Item]) -> UnaryRun:
        csrs = [csr for _, _, csr in items]
        return run_load(self.server, self.clients, [("run", csrs, self.concurrency)], len(csrs))


# ---------------------------------------------------------------------------------------------
# the bare echo server (own process) and its client process
# ---------------------------------------------------------------------------------------------
def listener_options(config: Config) -> list[tuple[str, Any]]:
    """The options every broker listener has (BrokerServer._options), for the echo server."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 1 if config.so_reuseport else 0),
    ]


def _echo_main(
    conn: Connection, certs: str, options: list[tuple[str, Any]], reply_bytes: int
) -> None:
    raise_nofile()
    asyncio.run(_echo_serve(conn, Path(certs), options, reply_bytes))


async def _echo_serve(
    conn: Connection, certs: Path, options: list[tuple[str, Any]], reply_bytes: int
) -> None:
    from broker.pki.ca import PkiFiles
    from broker.service.tls import ReloadingCredentials

    async def echo(request: bytes, _context: Any) -> bytes:
        return request + b"\0" * max(0, reply_bytes - len(request))

    files = PkiFiles(certs)
    credentials = ReloadingCredentials(files.server_key, files.server_chain, files.ca_bundle)
    server = grpc.aio.server(options=options)
    handler = grpc.unary_unary_rpc_method_handler(echo)  # no (de)serializers: raw bytes
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(ECHO_SERVICE, {ECHO_METHOD: handler}),)
    )
    port = server.add_secure_port("127.0.0.1:0", credentials.credentials())
    await server.start()
    conn.send(("ready", os.getpid(), port))
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, conn.recv) == "stats":
        conn.send(peer_stats(process_cpu(), thread_cpu()))
    await server.stop(0.5)
    conn.send("stopped")


class EchoServer:
    """A grpc.aio server with one unary echo method, mutual TLS with the broker's server
    certificate, key and client CA, in its own spawned process."""

    def __init__(self, config: Config, reply_bytes: int) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_echo_main,
            args=(child, str(config.certs_dir), listener_options(config), reply_bytes),
            name="echo",
            daemon=True,
        )
        self.proc.start()
        if not self._conn.poll(60):
            raise RuntimeError("echo server did not start")
        _, self.pid, self.port = self._conn.recv()

    @property
    def main(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stats(self) -> dict[str, Any]:
        self._conn.send("stats")
        if not self._conn.poll(60):
            raise RuntimeError("echo server did not answer stats")
        stats: dict[str, Any] = self._conn.recv()
        return stats

    def stop(self) -> None:
        stop_child(self._conn, self.proc)


async def echo_client(
    target: str, ca_pem: bytes, apps: list[App], devices: list[str]
) -> dict[str, Any]:
    """bench.sessions' client against the echo: one mutual-TLS channel per app instance, same
    credentials and channel options, the same requests (serialized), the same calls in flight."""
    from cryptography.hazmat.primitives.asymmetric import x25519

    from broker._proto.broker.v1 import app_pb2

    options = [("grpc.use_local_subchannel_pool", 1)]  # as bench.sessions: one connection each
    channels = [
        grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(ca_pem, a.key_pem, a.chain_pem), options
        )
        for a in apps
    ]
    await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), 180)
    echoes = [ch.unary_unary(f"/{ECHO_SERVICE}/{ECHO_METHOD}") for ch in channels]

    def run(n: int, concurrency: int, offset: int) -> Deferred:
        keys = [
            x25519.X25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(n)
        ]
        owner = [(offset + i) % len(echoes) for i in range(n)]
        dev = [devices[(owner[i] + (offset + i) // len(echoes)) % len(devices)] for i in range(n)]
        requests = [
            app_pb2.OpenSessionRequest(
                device_id=dev[i], app_ephemeral_public_key=keys[i]
            ).SerializeToString()
            for i in range(n)
        ]

        async def call(i: int) -> None:
            reply = await echoes[owner[i]](requests[i], timeout=60)
            if not reply.startswith(requests[i]):
                raise ValueError("not an echo")

        async def timed() -> dict[str, Any]:
            return await drive(call, n, concurrency)

        return Deferred(timed)

    async def close() -> None:
        for ch in channels:
            await ch.close()

    return {"run": run, "close": close}


class EchoLoad:
    """As bench.sessions.Load: `count` client processes sharing the app instances."""

    def __init__(
        self, server: EchoServer, count: int, ca_pem: bytes, apps: list[App], devices: list[str]
    ) -> None:
        self.server, self.count = server, count
        self.clients = Clients(
            echo_client, [(server.main, ca_pem, share, devices) for share in split(apps, count)]
        )

    def run(self, n: int, inflight: int, offset: int = 0) -> UnaryRun:
        per = [n // self.count + (1 if i < n % self.count else 0) for i in range(self.count)]
        commands = [
            ("run", per[i], max(1, inflight // self.count), offset + i) for i in range(self.count)
        ]
        return run_load(self.server, self.clients, commands, n)


def reply_size(broker: Broker, ca_pem: bytes, app: App, device_id: str) -> int:
    """Bytes of one real OpenSessionResponse (one call, untimed): the echo's reply size."""
    from cryptography.hazmat.primitives.asymmetric import x25519

    from broker._proto.broker.v1 import app_pb2, app_pb2_grpc

    key = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    credentials = grpc.ssl_channel_credentials(ca_pem, app.key_pem, app.chain_pem)
    stub_class: Any = app_pb2_grpc.AppServiceStub
    with grpc.secure_channel(broker.main, credentials) as channel:
        response = stub_class(channel).OpenSession(
            app_pb2.OpenSessionRequest(device_id=device_id, app_ephemeral_public_key=key),
            timeout=30,
        )
    return int(response.ByteSize())


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------
def cpu_per_op(r: UnaryRun) -> float:
    return r.server_cpu / r.ok if r.ok else 0.0


def compare(title: str, unit: str, mine: list[UnaryRun], peer: str, theirs: list[UnaryRun]) -> str:
    """broker, peer and broker / peer: CPU per op (median and per pair), ops/s, p50, p99."""
    b, p = median([cpu_per_op(r) for r in mine]), median([cpu_per_op(r) for r in theirs])
    rate_b, rate_p = median([r.rate for r in mine]), median([r.rate for r in theirs])
    pairs = ", ".join(
        f"x{cpu_per_op(x) / cpu_per_op(y):.2f}"
        for x, y in zip(mine, theirs, strict=False)
        if cpu_per_op(y)
    )
    return (
        f"{title}: server CPU/op broker {us(b)} / {peer} {us(p)} = x{b / p if p else 0:.2f} "
        f"(per pair {pairs}); {unit} {rate_b:,.0f} / {rate_p:,.0f} = "
        f"x{rate_b / rate_p if rate_p else 0:.2f}; p50 {ms(median([r.p50 for r in mine]))} / "
        f"{ms(median([r.p50 for r in theirs]))}; p99 {ms(median([r.p99 for r in mine]))} / "
        f"{ms(median([r.p99 for r in theirs]))}"
    )


def thread_table(mine: list[UnaryRun], peer: str, theirs: list[UnaryRun]) -> None:
    """CPU per call of each thread group, broker and peer side by side (summed over runs)."""
    rows: dict[str, list[float]] = {}
    for col, runs in enumerate((mine, theirs)):
        ok = sum(r.ok for r in runs) or 1
        total: Counter[str] = Counter()
        for r in runs:
            total.update(r.threads)
        for name, seconds in total.items():
            rows.setdefault(name, [0.0, 0.0])[col] = seconds / ok
    print(f"    {'thread group':<42}{'broker':>10}{peer:>10}   (CPU per call)")
    for name, (x, y) in sorted(rows.items(), key=lambda kv: -kv[1][0] - kv[1][1]):
        if max(x, y) >= 1e-6:
            py = " (Python)" if name in PY_GROUPS else ""
            print(f"    {(name + py)[:42]:<42}{us(x):>10}{us(y):>10}")


def errors_of(runs: list[UnaryRun]) -> int:
    return sum(sum(r.errors.values()) for r in runs)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(
        __doc__,
        "3 pairs x 1000 calls (default 3 x 5000)",
        "after the timed pairs, extra broker runs under py-spy (raw stacks to DIR)",
    )
    p.add_argument("--runs", type=int, default=3, help="alternated broker/peer pairs (3)")
    p.add_argument("--n", type=int, help="calls per run, both comparisons (5000, quick 1000)")
    p.add_argument("--part", choices=["both", "enroll", "sessions"], default="both")
    p.add_argument("--concurrency", type=int, default=64, help="enrollments in flight (64)")
    p.add_argument("--channels", type=int, default=4, help="broker TLS channels, enroll (4)")
    p.add_argument("--inflight", type=int, default=128, help="OpenSession/echo in flight (128)")
    p.add_argument("--clients", type=int, default=1, help="client processes, sessions (1)")
    p.add_argument("--users", type=int, help="viewer app instances, sessions (200, quick 100)")
    p.add_argument("--devices", type=int, default=4, help="cameras shared with every viewer (4)")
    p.add_argument("--cfssl", default="cfssl", help="cfssl executable (PATH, else apt-get)")
    args = parse(p, argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    args.n = args.n or (1000 if args.quick else 5000)
    args.users = args.users or (100 if args.quick else 200)
    return args


class Bench:
    def __init__(self, args: argparse.Namespace, config: Config, broker: Broker) -> None:
        self.args, self.config, self.broker = args, config, broker
        self.ca_pem = (config.certs_dir / "ca-bundle.pem").read_bytes()
        self.py_spy = py_spy_binary(args.py_spy) if args.profile else None
        if args.profile and not self.py_spy:
            print("  (--profile: py-spy not found; pass --py-spy PATH)")
        self.summary: list[str] = []
        self.problems: list[str] = []
        self.live: list[Any] = []

    def profile(self, name: str, run: backends.Runner, unit: str) -> None:
        if not self.py_spy or not self.args.profile:
            return

        def report(flavour: str, result: UnaryRun) -> None:
            print(f"\n  profile {name} / {flavour}: {result.rate:,.0f} {unit} (not in the figures)")

        profiled_runs(self.py_spy, self.args.profile, f"peers-{name}", self.broker.pid, run, report)

    def enroll(self, items: list[list[Item]], warm: list[Item]) -> None:
        args = self.args
        print(
            f"\nENROLL: {args.runs} pairs x {args.n} enrollments; broker: EnrollDevice over "
            f"{args.channels} TLS channels, {args.concurrency} in flight; cfssl: POST {SIGN_PATH} "
            f"of the same CSRs over {args.concurrency} keep-alive HTTPS connections"
        )
        clients = Clients(enroll_client, [(self.broker.bootstrap, self.ca_pem)])
        self.live.append(clients)
        load = EnrollLoad(self.broker, clients, args.channels)
        load.run("reused", warm, args.concurrency)
        runners: dict[str, backends.Runner] = {
            "broker": lambda r: load.run("reused", items[r], args.concurrency)
        }
        binary, why = find_cfssl(args.cfssl)
        peer: CfsslLoad | None = None
        if binary:
            server = CfsslServer(binary, self.config)
            self.live.append(server)
            version = subprocess.run(
                [binary, "version"], capture_output=True, text=True, check=False
            ).stdout.split()
            print(
                f"  cfssl {' '.join(version[1:2])} ({binary}) pid {server.pid} port {server.port}"
            )
            peer = CfsslLoad(server, self.ca_pem, args.concurrency)
            self.live.append(peer.clients)
            peer.run(warm)
            runners["cfssl"] = lambda r: peer.run(items[r])
        else:
            line = f"skipped: cfssl not available ({why}); broker runs only"
            print(f"  {line}")
            self.summary.append(f"enroll: {line}")
        results = backends.interleave(runners, args.runs, "enroll/s", 8)
        print("\n  broker EnrollDevice:")
        print_breakdown(results["broker"], "enroll/s")
        if peer:
            line = compare("enroll", "enroll/s", results["broker"], "cfssl", results["cfssl"])
            print(f"\n  {line}")
            self.summary.append(line)
        else:
            b = median([cpu_per_op(r) for r in results["broker"]])
            rate = median([r.rate for r in results["broker"]])
            self.summary.append(f"enroll: broker {us(b)} CPU/op, {rate:,.0f} enroll/s")
        for name, runs in results.items():
            if errors := errors_of(runs):
                self.problems.append(f"enroll, {name}: {errors} failed calls")
        extra = items[args.runs :]
        self.profile("enroll", lambda k: load.run("reused", extra[k], args.concurrency), "enroll/s")

    def sessions(self, apps: list[App], devices: list[str], jwks: str, issuer: str) -> None:
        args = self.args
        size = reply_size(self.broker, self.ca_pem, apps[0], devices[0])
        print(
            f"\nSESSIONS: {args.runs} pairs x {args.n} calls, {args.clients} client process(es) "
            f"x {args.inflight} in flight, {len(apps)} app instances (one mTLS channel each); "
            f"broker: AppService.OpenSession; echo: bare grpc.aio unary echo, reply {size} bytes "
            "(= an OpenSessionResponse)"
        )
        setup = (self.ca_pem, apps, devices, jwks, issuer, self.config.trust_domain)
        load = SessionsLoad(self.broker, args.clients, setup)
        self.live.append(load.clients)
        server = EchoServer(self.config, size)
        self.live.append(server)
        echo = EchoLoad(server, args.clients, self.ca_pem, apps, devices)
        self.live.append(echo.clients)
        print(f"  echo server pid {server.pid} port {server.port}")
        load.run(2 * len(apps), args.inflight)  # warm-up, as bench.sessions
        echo.run(2 * len(apps), args.inflight)
        runners: dict[str, backends.Runner] = {
            "broker": lambda r: load.run(args.n, args.inflight, 1 + r * 7919),
            "echo": lambda r: echo.run(args.n, args.inflight, 1 + r * 7919),
        }
        results = backends.interleave(runners, args.runs, "calls/s ", 8)
        print("\n  broker OpenSession:")
        print_breakdown(results["broker"], "sessions/s")
        print("\n  server CPU per call by thread, summed over the runs:")
        thread_table(results["broker"], "echo", results["echo"])
        line = compare("sessions", "calls/s", results["broker"], "echo", results["echo"])
        b = median([cpu_per_op(r) for r in results["broker"]])
        e = median([cpu_per_op(r) for r in results["echo"]])
        goal = f"goal broker <= {GOAL}x echo: {'met' if b <= GOAL * e else 'NOT met'}"
        print(f"\n  {line}; {goal}")
        self.summary.append(f"{line}; {goal}")
        bad = sum(r.extra.get("bad_tokens", 0) for r in results["broker"])
        verified = sum(r.extra.get("verified", 0) for r in results["broker"])
        print(f"  sampled session tokens verified like a camera: {verified}, bad {bad}")
        if bad:
            self.problems.append(f"sessions: {bad} sampled tokens failed verification")
        for name, runs in results.items():
            if errors := errors_of(runs):
                self.problems.append(f"sessions, {name}: {errors} failed calls")
        self.profile(
            "sessions", lambda k: load.run(args.n, args.inflight, 104729 + k), "sessions/s"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    parts = ["enroll", "sessions"] if args.part == "both" else [args.part]
    extra = 2 if args.profile else 0
    with bench_home("peers-unary", args.keep, **CHEAP_ARGON2) as config:
        print(
            f"broker vs peers, unary: grpcio {grpc.__version__}, Python {sys.version.split()[0]}, "
            f"{NCPU} CPUs; {args.runs} alternated pairs per comparison, {args.n} calls per run"
        )
        prep = time.monotonic()
        warm: list[Item] = []
        items: list[list[Item]] = []
        if "enroll" in parts:
            warm = make_items(config, "warm", 64)
            items = [make_items(config, f"e{r}", args.n) for r in range(args.runs + extra)]
        fleet = provision_fleet(config, args.devices, 1, args.users if "sessions" in parts else 0)
        print(
            f"prepared {len(warm) + sum(map(len, items))} tokens and CSRs, {len(fleet.viewers)} "
            f"viewer apps x {args.devices} shared cameras in {elapsed(prep)}, before any timing"
        )
        broker = backends.broker_on(config, CHEAP_ARGON2)
        bench = Bench(args, config, broker)
        print(f"broker pid {broker.pid} ports {broker.ports}")
        try:
            if "enroll" in parts:
                bench.enroll(items, warm)
            if "sessions" in parts:
                devices = [c.device_id for c in fleet.cameras]
                bench.sessions(fleet.viewers, devices, fleet.jwks_json, fleet.issuer)
        finally:
            for proc in reversed(bench.live):
                proc.stop()
            broker.stop()

    print("\nSUMMARY (broker / peer; medians over alternated pairs; same machine, same sitting)")
    for line in bench.summary:
        print(f"  {line}")
    problems = bench.problems
    print(f"  correctness: {'OK' if not problems else 'FAILED: ' + '; '.join(problems)}")
    print(f"  total time {time.monotonic() - t0:.0f} s")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
