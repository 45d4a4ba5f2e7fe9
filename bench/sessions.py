"""OpenSession benchmark: AppService.OpenSession calls/s and p50/p99 latency against a real broker.

Setup, before any timing: a temporary home with a fresh dev PKI; a few cameras enrolled with the
core API (DeviceAuthority) before the broker starts; then, through the running broker and the app
SDK (broker.client.app.AppClient), an owner account claims every camera with its claim code, the
viewer accounts each enroll their app instance(s), and the owner shares every camera with every
viewer. argon2 runs with cheap parameters (t=1, 8 MiB, p=1) only so that this setup is quick;
OpenSession never hashes a password.

Load: the broker runs in its own process (its own GIL) on port 0, configured as shipped (WAL,
synchronous=FULL, one core thread). Client processes hold one mutual-TLS channel per app instance,
opened before the clock and reused for every call, and keep C calls in flight; every call carries
its own X25519 public key, generated before the clock. The matrix is client processes (1, 2) x
calls in flight (8, 32, 128), several runs per cell; each run prints calls/s, p50, p99 and where the
broker's CPU went (per thread, core-thread busy and queue wait, and how many cores processes outside
the benchmark used meanwhile: the machine may be shared); each cell prints the medians over its runs.

In-process (no gRPC) the pieces are timed so the bottleneck shows: ES256 signing
(TokenKeyring.sign), Sessions.open against SQLite (synchronous FULL / NORMAL / OFF, and a group-commit
what-if), the interceptor's per-call DeviceAuthority.check_presented, the event-loop -> core-thread
hop, fsync. At the end the store is checked (one opened session row and one session.opened audit
entry per successful call, audit hash chain intact) and a sample of the minted tokens is verified
the way a camera does (signature, aud, cnf = the app certificate, eph = the key that was sent).

    .venv/bin/python bench/sessions.py                  # full: 5 runs per cell
    .venv/bin/python bench/sessions.py --quick          # < 60 s
    .venv/bin/python bench/sessions.py --profile DIR    # + py-spy runs of the broker (not timed)
    .venv/bin/python bench/sessions.py --clients '' --compare group-commit sync-normal skip-check
        # what-ifs for evidence: one broker per what-if next to the matrix's broker, one cell,
        # runs interleaved round robin so that outside load hits every variant alike
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
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.serialization import Encoding

from broker._proto.broker.v1 import app_pb2, app_pb2_grpc
from broker.audit.chain import verify_chain
from broker.client.app import AppClient
from broker.client.device import Endpoints, make_csr
from broker.clock import SystemClock, unix
from broker.config import Config
from broker.devices.enrollment import DeviceAuthority
from broker.devices.ownership import require_grant
from broker.identity.spiffe import Kind, device, operator
from broker.pki.ca import init_pki, load_authority, new_key
from broker.protocol.tokens import (
    SCOPE_VIEW,
    SessionClaims,
    TokenVerifier,
    cert_thumbprint,
    key_hash,
    load_keyring,
)
from broker.service.peer import Caller, PeerParser
from broker.service.server import BrokerServer
from broker.sessions.sessions import Sessions
from broker.store.sqlite import SqliteStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` importable as a script
from bench._common import (
    PY_GROUPS,
    GroupCommitExecutor,
    GroupCommitStore,
    InlineExecutor,
    bench_config,
    machine_cpu,
    median,
    ms,
    pct,
    process_cpu,
    py_spy_binary,
    summarize_profile,
    thread_cpu,
    timed_each,
    us,
)

# Setup only: OpenSession never touches passwords.
CHEAP_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_kib": 8192, "argon2_parallelism": 1}
PASSWORD = "bench-password-long-enough-0123"
App = tuple[str, str, str, bytes, bytes]  # (username, user_id, app_id, key PEM, chain PEM)

WHAT_IFS = {
    "sync-normal": "PRAGMA synchronous=NORMAL on the broker's store connection (no fsync per commit)",
    "sync-off": "PRAGMA synchronous=OFF (no fsync at all; not durable, an upper bound)",
    "group-commit": "core thread runs every queued call in one transaction, one COMMIT per batch, "
    "answers after the commit",
    "loop-check": "interceptor's certificate check on the event loop over a 2nd read-only SQLite "
    "connection (no core-thread hop, still reads the store every call)",
    "skip-check": "no per-call certificate/revocation check at all (upper bound of any cache; "
    "breaks I7 as is)",
    "inline-core": "core calls run on the event loop thread (no thread hop; loop blocks in fsync)",
    "switch-interval": "sys.setswitchinterval(0.0005) in the broker (Python's default 0.005): the "
    "core thread waits less for the GIL",
}


# ---------------------------------------------------------------------------------------------
# broker process
# ---------------------------------------------------------------------------------------------
class ShippedExecutorTimer(Executor):
    """Counts calls, batches, busy and queue time of the broker's own core executor (group commit
    on one thread) without changing what it does."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.busy = 0.0
        self.waited = 0.0

    @property
    def batches(self) -> int:
        return int(getattr(self.inner, "batches", self.calls))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        queued = time.perf_counter()

        def timed() -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls += 1
                self.waited += started - queued
                self.busy += time.perf_counter() - started

        future: Future[Any] = self.inner.submit(timed)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.inner.shutdown(wait, cancel_futures=cancel_futures)


def serve(home: str, conn: Connection, overrides: dict[str, Any], what_if: list[str]) -> None:
    """Broker process: a BrokerServer on port 0; answers 'stats' / 'stop' over the pipe."""
    if "switch-interval" in what_if:
        sys.setswitchinterval(0.0005)
    asyncio.run(_serve(Path(home), conn, overrides, what_if))


async def _serve(home: Path, conn: Connection, overrides: dict[str, Any], what_if: list[str]) -> None:
    config = bench_config(home, **overrides)
    server = BrokerServer(config)
    store = server.store
    for name, sync in (("sync-normal", "NORMAL"), ("sync-off", "OFF")):
        if name in what_if:
            store._conn.execute(f"PRAGMA synchronous = {sync}")
    core: Any
    if "group-commit" in what_if:
        core = GroupCommitExecutor(GroupCommitStore(store))
    elif "inline-core" in what_if:
        core = InlineExecutor()
    else:
        core = ShippedExecutorTimer(server.runtime.executor)  # as shipped: group commit, counted
    if not isinstance(core, ShippedExecutorTimer):
        server.runtime.executor.shutdown()
    server.runtime.executor = core
    if "skip-check" in what_if:

        async def no_check(_caller: Caller) -> None:
            return None

        server._check_certificate = no_check  # type: ignore[method-assign]
    elif "loop-check" in what_if:
        reader = SqliteStore(config.database, migrate=False)
        reader._conn.execute("PRAGMA query_only = ON")
        checker = DeviceAuthority(config, load_authority(config, server.clock), reader, server.clock)

        async def loop_check(caller: Caller) -> None:
            assert caller.certificate is not None
            checker.check_presented(caller.identity, caller.certificate, caller.serial,
                                    caller.fingerprint)

        server._check_certificate = loop_check  # type: ignore[method-assign]
    ports = await server.start()
    conn.send(("ready", os.getpid(), ports))
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command == "stats":
            conn.send({
                "process": process_cpu(),
                "threads": thread_cpu(),
                "core_calls": core.calls,
                "core_batches": core.batches,
                "core_busy": core.busy,
                "core_waited": core.waited,
            })
        elif command == "stop":
            break
    await server.stop(0.5)
    conn.send("stopped")


class BrokerProcess:
    def __init__(self, home: Path, overrides: dict[str, Any], what_if: list[str]) -> None:
        ctx = mp.get_context("spawn")
        self.what_if = what_if
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(str(home), child, overrides, what_if),
                                name="broker", daemon=True)
        self.proc.start()
        deadline = time.monotonic() + 60
        while not self._conn.poll(0.2):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("broker process did not start (see its traceback above)")
        _, self.pid, self.ports = self._conn.recv()

    @property
    def main(self) -> str:
        return f"127.0.0.1:{self.ports['main']}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.ports['bootstrap']}"

    def stats(self) -> dict[str, Any]:
        self._conn.send("stats")
        stats: dict[str, Any] = self._conn.recv()
        return stats

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._conn.send("stop")
            if self._conn.poll(30):
                self._conn.recv()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# ---------------------------------------------------------------------------------------------
# client processes
# ---------------------------------------------------------------------------------------------
def client(conn: Connection, target: str, ca_pem: bytes, apps: list[App], devices: list[str],
           jwks: str, issuer: str, trust_domain: str) -> None:
    """Client process: one mTLS channel per app instance, kept for every run."""
    asyncio.run(_client(conn, target, ca_pem, apps, devices, jwks, issuer, trust_domain))


async def _client(conn: Connection, target: str, ca_pem: bytes, apps: list[App],
                  devices: list[str], jwks: str, issuer: str, trust_domain: str) -> None:
    loop = asyncio.get_running_loop()
    # A local subchannel pool: without it grpc may share one connection between channels to the
    # same target, and "one mTLS channel per app instance" would not be what it says.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca_pem, key, chain), options)
        for _, _, _, key, chain in apps
    ]
    await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), 180)
    stubs = [app_pb2_grpc.AppServiceStub(ch) for ch in channels]
    thumbprints = [
        cert_thumbprint(x509.load_pem_x509_certificate(chain).public_bytes(Encoding.DER))
        for *_, chain in apps
    ]
    verifier = TokenVerifier(jwks, issuer, SystemClock())
    audiences = {d: device(trust_domain, d).spiffe_id for d in devices}
    conn.send("connected")
    while True:
        job = await loop.run_in_executor(None, conn.recv)
        if job is None:
            break
        n, concurrency, offset, sample_every = job
        # Before the clock: one fresh X25519 key and one request message per call.
        keys = [x25519.X25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(n)]
        owner = [(offset + i) % len(stubs) for i in range(n)]
        dev = [devices[(owner[i] + (offset + i) // len(stubs)) % len(devices)] for i in range(n)]
        requests = [app_pb2.OpenSessionRequest(device_id=dev[i], app_ephemeral_public_key=keys[i])
                    for i in range(n)]
        conn.send("ready")
        go = await loop.run_in_executor(None, conn.recv)
        assert go == "go"
        result = await _run(stubs, requests, owner, concurrency, sample_every)
        # After the clock: check a sample of tokens as the camera would, and their bindings.
        bad = 0
        for i, session_id, token in result.pop("samples"):
            a = owner[i]
            try:
                claims = verifier.verify(token, audiences[dev[i]])
            except Exception:
                bad += 1
                continue
            if (claims.session_id != session_id or claims.user_id != apps[a][1]
                    or claims.app_id != apps[a][2] or claims.cnf_thumbprint != thumbprints[a]
                    or claims.ephemeral_key_hash != key_hash(keys[i])):
                bad += 1
        result["bad_tokens"] = bad
        conn.send(result)
    for ch in channels:
        await ch.close()


async def _run(stubs: list[app_pb2_grpc.AppServiceStub], requests: list[app_pb2.OpenSessionRequest],
               owner: list[int], concurrency: int, sample_every: int) -> dict[str, Any]:
    it = iter(range(len(requests)))
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    samples: list[tuple[int, str, str]] = []

    async def worker() -> None:
        for i in it:
            started = time.perf_counter()
            try:
                response = await stubs[owner[i]].OpenSession(requests[i], timeout=60)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
                continue
            latencies.append(time.perf_counter() - started)
            if i % sample_every == 0:
                samples.append((i, response.session_id, response.token))

    cpu0 = process_cpu()
    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    end = time.monotonic()
    return {"start": start, "end": end, "latencies": latencies, "errors": dict(errors),
            "cpu": process_cpu() - cpu0, "samples": samples, "verified": len(samples)}


@dataclasses.dataclass
class RunResult:
    n: int
    ok: int
    errors: dict[str, int]
    wall: float
    latencies: list[float]
    server_cpu: float
    threads: dict[str, float]
    core_calls: int
    core_batches: int
    core_busy: float
    core_waited: float
    client_cpu: float
    machine_busy: float
    steal: float
    verified: int
    bad_tokens: int

    @property
    def rate(self) -> float:
        return self.ok / self.wall if self.wall else 0.0

    @property
    def p50(self) -> float:
        return pct(self.latencies, 0.50)

    @property
    def p99(self) -> float:
        return pct(self.latencies, 0.99)

    @property
    def others(self) -> float:
        """Cores kept busy by processes other than this benchmark's (a shared machine)."""
        own = (self.server_cpu + self.client_cpu) / self.wall if self.wall else 0.0
        return max(0.0, self.machine_busy - own)

    @property
    def python_cpu(self) -> float:
        """CPU of the broker's Python threads: work that needs its one GIL, so cannot overlap."""
        return sum(v for k, v in self.threads.items() if k in PY_GROUPS)


class ClientSet:
    """count client processes sharing the app instances between them (one channel each)."""

    def __init__(self, count: int, target: str, ca_pem: bytes, apps: list[App],
                 devices: list[str], jwks: str, issuer: str, trust_domain: str) -> None:
        ctx = mp.get_context("spawn")
        self.count = count
        self._clients: list[tuple[mp.process.BaseProcess, Connection]] = []
        for i in range(count):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=client, name=f"client{i}", daemon=True, args=(
                child_end, target, ca_pem, apps[i::count], devices, jwks, issuer, trust_domain))
            proc.start()
            self._clients.append((proc, parent_end))
        for proc, conn in self._clients:
            if self._recv(conn, 240) != "connected":
                raise RuntimeError(f"{proc.name} did not connect")

    def _recv(self, conn: Connection, timeout: float = 600) -> Any:
        if not conn.poll(timeout):
            raise RuntimeError("a client process did not answer")
        return conn.recv()

    def run(self, broker: BrokerProcess, n: int, concurrency: int, offset: int = 0,
            sample_every: int = 50) -> RunResult:
        per = [n // self.count + (1 if i < n % self.count else 0) for i in range(self.count)]
        for i, (_, conn) in enumerate(self._clients):
            conn.send((per[i], max(1, concurrency // self.count), offset + i, sample_every))
        for _, conn in self._clients:
            if self._recv(conn, 120) != "ready":
                raise RuntimeError("client not ready")
        before = broker.stats()
        machine0 = machine_cpu()
        for _, conn in self._clients:
            conn.send("go")
        results = [self._recv(conn) for _, conn in self._clients]
        machine1 = machine_cpu()
        after = broker.stats()
        busy, steal, total = (b - a for a, b in zip(machine0, machine1, strict=True))
        ncpu = os.cpu_count() or 1
        errors: Counter[str] = Counter()
        for r in results:
            errors.update(r["errors"])
        latencies = [x for r in results for x in r["latencies"]]
        threads = {k: v - before["threads"].get(k, 0.0) for k, v in after["threads"].items()}
        return RunResult(
            n=n,
            ok=len(latencies),
            errors=dict(errors),
            wall=max(r["end"] for r in results) - min(r["start"] for r in results),
            latencies=latencies,
            server_cpu=after["process"] - before["process"],
            threads={k: v for k, v in threads.items() if v > 0},
            core_calls=after["core_calls"] - before["core_calls"],
            core_batches=after["core_batches"] - before["core_batches"],
            core_busy=after["core_busy"] - before["core_busy"],
            core_waited=after["core_waited"] - before["core_waited"],
            client_cpu=sum(r["cpu"] for r in results),
            machine_busy=ncpu * busy / total if total else 0.0,
            steal=ncpu * steal / total if total else 0.0,
            verified=sum(r["verified"] for r in results),
            bad_tokens=sum(r["bad_tokens"] for r in results),
        )

    def stop(self) -> None:
        for proc, conn in self._clients:
            with contextlib.suppress(OSError):
                conn.send(None)
            proc.join(10)
            if proc.is_alive():
                proc.kill()


# ---------------------------------------------------------------------------------------------
# setup (untimed)
# ---------------------------------------------------------------------------------------------
def enroll_devices(config: Config, count: int) -> dict[str, str]:
    """Cameras enrolled with the core API before the broker starts: device_id -> claim code."""
    clock = SystemClock()
    store = SqliteStore(config.database)
    try:
        authority = DeviceAuthority(config, load_authority(config, clock), store, clock)
        actor = operator(config.trust_domain, "bench")
        codes = {}
        for i in range(count):
            device_id = f"cam-{i:03d}"
            token = authority.create_enrollment_token(actor, device_id).token
            codes[device_id] = authority.enroll_with_token(make_csr(new_key()), token).claim_code
        return codes
    finally:
        store.close()


async def make_apps(home: Path, endpoints: Endpoints, ca_pem: bytes, codes: dict[str, str],
                    users: int, apps_per_user: int) -> list[App]:
    """Through the broker with the app SDK: owner claims every camera, viewers enroll app
    instances, the owner shares every camera with every viewer."""
    owner = AppClient(home / "apps" / "owner", endpoints, ca_pem)
    await owner.create_account("owner", PASSWORD)
    await owner.enroll("owner", PASSWORD, "bench owner")
    for device_id, code in codes.items():
        await owner.claim(device_id, code)
    gate = asyncio.Semaphore(16)

    async def viewer(u: int) -> list[App]:
        name = f"viewer{u:04d}"
        clients = [AppClient(home / "apps" / f"{name}-{a}", endpoints, ca_pem)
                   for a in range(apps_per_user)]
        async with gate:
            await clients[0].create_account(name, PASSWORD)
        for c in clients:
            async with gate:
                await c.enroll(name, PASSWORD, f"{name} phone")
        for device_id in codes:
            async with gate:
                await owner.share(device_id, name)
        return [(name, c.state.user_id, c.state.app_id, c.key_path.read_bytes(),
                 c.chain_path.read_bytes()) for c in clients]

    groups = await asyncio.gather(*(viewer(u) for u in range(users)))
    # Interleave users so consecutive calls (and each client process's share) mix users.
    return [app for a in range(apps_per_user) for group in groups for app in group[a:a + 1]]


# ---------------------------------------------------------------------------------------------
# in-process costs of the pieces (no gRPC)
# ---------------------------------------------------------------------------------------------
Row = tuple[str, float, str]


def micro_costs(config: Config, apps: list[App], devices: list[str], count: int,
                batch_sizes: tuple[int, ...] = (16, 64)) -> list[Row]:
    """Median per-call cost of each piece of the OpenSession path, on a copy of the database."""
    clock = SystemClock()
    ca = load_authority(config, clock)
    keyring = load_keyring(config.certs_dir)
    parser = PeerParser(config.trust_domain, [ca.certificate])
    callers = [parser.parse(chain, Kind.APP) for *_, chain in apps]
    thumbs = [cert_thumbprint(bytes.fromhex(c.fingerprint), prehashed=True) for c in callers]
    keys = [x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
            for _ in range(count)]

    def pick(i: int) -> tuple[Caller, str, str]:
        a = i % len(callers)
        return callers[a], thumbs[a], devices[(i // len(callers) + a) % len(devices)]

    rows: list[Row] = []
    now = unix(clock.now())

    def claims(i: int) -> SessionClaims:
        caller, thumb, device_id = pick(i)
        return SessionClaims(config.broker_spiffe_id, caller.identity.name,
                             device(config.trust_domain, device_id).spiffe_id, f"s-{i:024x}",
                             SCOPE_VIEW, now, now + 300, thumb, key_hash(keys[i]),
                             caller.identity.app_id)

    all_claims = [claims(i) for i in range(count)]
    rows.append(("TokenKeyring.sign (ES256 JWT, PyJWT)", median(
        timed_each(lambda i: keyring.sign(all_claims[i]), count)), "broker.protocol.tokens"))
    raw_key = keyring._keys[keyring.active_kid]
    assert isinstance(raw_key, ec.EllipticCurvePrivateKey)
    message = b"x" * 400
    rows.append(("  of which ECDSA P-256 sign alone", median(timed_each(
        lambda _i: raw_key.sign(message, ec.ECDSA(hashes.SHA256())), count)),
        "cryptography, same key, no JSON/base64"))
    pems = [chain for *_, chain in apps]
    rows.append(("PeerParser.parse (cached, per call)", median(timed_each(
        lambda i: parser.parse(pems[i % len(pems)], Kind.APP), count)),
        "interceptor: PEM -> Caller, parsed once per PEM"))

    def copy_db(name: str) -> SqliteStore:
        path = config.home / "var" / f"micro-{name}.db"
        src = sqlite3.connect(config.database)
        dst = sqlite3.connect(path)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        return SqliteStore(path)

    store = copy_db("check")
    checker = DeviceAuthority(config, ca, store, clock)

    def check(i: int) -> None:
        caller = pick(i)[0]
        assert caller.certificate is not None
        checker.check_presented(caller.identity, caller.certificate, caller.serial,
                                caller.fingerprint)

    rows.append(("DeviceAuthority.check_presented", median(timed_each(check, count)),
                 "interceptor, every RPC: 1 read tx, cert + app row"))

    def grant(i: int) -> None:
        caller, _, device_id = pick(i)
        with store.read() as tx:
            require_grant(tx, caller.identity.name, device_id, now)

    rows.append(("require_grant in a read tx", median(timed_each(grant, count)),
                 "the I4 check alone (device + grant rows)"))
    store.close()

    def open_cost(sync: str) -> float:
        s = copy_db(sync.lower())
        s._conn.execute(f"PRAGMA synchronous = {sync}")
        sessions = Sessions(config, s, clock, keyring)

        def one(i: int) -> None:
            caller, thumb, device_id = pick(i)
            sessions.open(caller.identity, thumb, device_id, keys[i])

        try:
            return median(timed_each(one, count))
        finally:
            s.close()

    sign = rows[0][1]
    for sync, note in (("FULL", "as shipped: WAL, fsync per commit"),
                       ("NORMAL", "what-if: WAL fsyncs only at checkpoints"),
                       ("OFF", "what-if: never fsync (not durable)")):
        cost = open_cost(sync)
        rows.append((f"Sessions.open, synchronous={sync}", cost, note))
        if sync == "FULL":
            rows.append(("  of which the store transaction", cost - sign,
                         "grant reads, session insert, audit append, COMMIT"))

    for size in batch_sizes:
        s = copy_db(f"group{size}")
        group = GroupCommitStore(s)
        sessions = Sessions(config, s, clock, keyring)

        def batch(b: int, size: int = size, sessions: Sessions = sessions,
                  group: GroupCommitStore = group) -> None:
            with group.batch():
                for i in range(b * size, (b + 1) * size):
                    caller, thumb, device_id = pick(i % count)
                    sessions.open(caller.identity, thumb, device_id, keys[i % count])

        batches = max(3, count // size)
        per = median(timed_each(batch, batches)) / size
        s.close()
        rows.append((f"Sessions.open, group commit of {size}", per,
                     "what-if: FULL, one COMMIT per batch, per session"))

    fd = os.open(config.home / "var" / "fsync.probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        def write_sync(_i: int) -> None:
            os.write(fd, b"x" * 4096)  # appended, as a WAL commit grows the -wal file
            os.fsync(fd)

        rows.append(("fsync of an appended 4 KiB write", median(timed_each(write_sync, min(count, 200))),
                     "same filesystem as the database"))
    finally:
        os.close(fd)

    async def hops(n: int) -> list[float]:
        loop = asyncio.get_running_loop()
        samples = []
        with ThreadPoolExecutor(max_workers=1) as executor:
            for _ in range(n):
                started = time.perf_counter()
                await loop.run_in_executor(executor, int)
                samples.append(time.perf_counter() - started)
        return samples

    rows.append(("loop -> core thread -> loop hop", median(asyncio.run(hops(count))),
                 "run_in_executor of a no-op, idle process; 2 per OpenSession"))
    return rows


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def print_run(index: int, r: RunResult) -> None:
    errors = sum(r.errors.values())
    print(f"  run {index}: {r.rate:7,.0f} sessions/s  ok={r.ok}/{r.n} err={errors}"
          f"  p50={ms(r.p50)} p99={ms(r.p99)}"
          f"  server {us(r.server_cpu / max(r.ok, 1))} CPU/call"
          f"  core busy {100 * r.core_busy / r.wall if r.wall else 0:3.0f}%"
          f"  machine {r.machine_busy:.2f}/{os.cpu_count()} cores"
          f" (other processes {r.others:.2f})")
    if r.errors:
        print(f"         errors: {r.errors}")


def print_cell(runs: list[RunResult]) -> None:
    rates = [r.rate for r in runs]
    print(f"  MEDIAN of {len(runs)}: {median(rates):,.0f} sessions/s  p50={ms(median([r.p50 for r in runs]))}"
          f"  p99={ms(median([r.p99 for r in runs]))}  (min {min(rates):,.0f}/s, max {max(rates):,.0f}/s)")
    ok = sum(r.ok for r in runs) or 1
    threads: Counter[str] = Counter()
    for r in runs:
        threads.update(r.threads)
    server = sum(r.server_cpu for r in runs)
    client_cpu = sum(r.client_cpu for r in runs)
    core_busy = sum(r.core_busy for r in runs)
    core_calls = sum(r.core_calls for r in runs) or 1
    batches = sum(r.core_batches for r in runs) or 1
    wall = sum(r.wall for r in runs)
    python = sum(r.python_cpu for r in runs)
    print(f"  where the time goes: server CPU {us(server / ok)}/call "
          f"({us(python / ok)} in Python threads), clients {us(client_cpu / ok)}/call")
    for name, seconds in threads.most_common():
        if seconds / ok >= 2e-6:
            print(f"      {name:<30}{us(seconds / ok):>9}/call  ({100 * seconds / wall:3.0f}% of a core)")
    print(f"    core thread: {core_calls / ok:.1f} jobs/call, {us(core_busy / core_calls)} busy per job"
          f" (wall, GIL waits included), queue wait {us(sum(r.core_waited for r in runs) / core_calls)}"
          f", {core_calls / batches:.1f} jobs/batch, busy {100 * core_busy / wall:.0f}% of wall")
    ncpu = os.cpu_count() or 1
    print(f"    ceilings: core thread alone {ok / core_busy if core_busy else 0:,.0f}/s; "
          f"one GIL ({us(python / ok)}/call) {ok / python if python else 0:,.0f}/s; "
          f"{ncpu} cores / (server+client CPU) {ncpu * ok / (server + client_cpu):,.0f}/s")


def verify_store(config: Config, expected: int) -> list[str]:
    """One session row and one session.opened audit entry per successful call, no denial, and
    the audit chain intact. Sessions opened before a broker restart are 'ended' by the restart."""
    problems = []
    conn = sqlite3.connect(config.database)
    try:
        outcomes = Counter(dict(conn.execute(
            "SELECT outcome || CASE WHEN outcome = 'ended' THEN ' (' || reason || ')' ELSE '' END,"
            " COUNT(*) FROM sessions GROUP BY 1").fetchall()))
        audited = conn.execute(
            "SELECT COUNT(*) FROM audit_log WHERE action = 'session.opened'").fetchone()[0]
    finally:
        conn.close()
    rows = outcomes["opened"] + outcomes["ended (broker restarted)"]
    unexpected = sum(outcomes.values()) - rows
    for what, value, want in (("session rows opened/ended", rows, expected),
                              ("session.opened audit entries", audited, expected),
                              ("other session rows (denied…)", unexpected, 0)):
        status = "ok" if value == want else "MISMATCH"
        print(f"  {what:<30}{value:>9}  (expected {want})  {status}")
        if value != want:
            problems.append(f"{what}: {value} != {want}")
    print(f"    by outcome: {dict(outcomes)}")
    store = SqliteStore(config.database, migrate=False)
    try:
        result = verify_chain(store.audit_entries())
    finally:
        store.close()
    print(f"  audit hash chain              {result.entries:>9}  {'ok' if result.ok else 'BROKEN'}")
    if not result.ok:
        problems.append(f"audit chain broken at {result.first_bad_seq}: {result.reason}")
    return problems


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="3 short runs per cell (< 60 s)")
    p.add_argument("--runs", type=int, help="runs per cell (default 5, quick 3)")
    p.add_argument("--n", type=int, help="OpenSession calls per run (default 5000, quick 1000)")
    p.add_argument("--concurrency", default="8,32,128", help="calls in flight, comma list (8,32,128)")
    p.add_argument("--clients", default="1,2", help="client process counts, comma list (1,2)")
    p.add_argument("--users", type=int, help="viewer accounts (default 200, quick 100)")
    p.add_argument("--apps-per-user", type=int, default=1, help="app instances per viewer (1)")
    p.add_argument("--devices", type=int, default=4, help="cameras, all shared with every viewer (4)")
    p.add_argument("--micro", type=int, help="samples per in-process measurement (default 400, quick 120)")
    p.add_argument("--what-if", default="", help=f"broker tweaks for the whole matrix: {','.join(WHAT_IFS)}")
    p.add_argument("--compare", nargs="*", default=[], metavar="WHATIF[+WHATIF]",
                   help="after the matrix, restart the broker with each what-if and measure one cell")
    p.add_argument("--compare-cell", default="1x128", help="CLIENTSxINFLIGHT for --compare (1x128)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="after the timed runs, extra runs under py-spy (raw stacks to DIR)")
    p.add_argument("--py-spy", help="py-spy executable (default: the venv's, else PATH)")
    p.add_argument("--keep", action="store_true", help="keep the temporary broker home")
    args = p.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 5)
    args.n = args.n or (1000 if args.quick else 5000)
    args.users = args.users or (100 if args.quick else 200)
    args.micro = args.micro or (120 if args.quick else 400)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    args.clients = [int(x) for x in args.clients.split(",") if x]
    args.what_if = _what_ifs(args.what_if, p)
    args.compare = [_what_ifs(c, p) for c in args.compare]
    clients, _, inflight = args.compare_cell.partition("x")
    args.compare_cell = (int(clients), int(inflight))
    return args


def _what_ifs(text: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [x for x in text.replace("+", ",").split(",") if x]
    for name in names:
        if name not in WHAT_IFS:
            parser.error(f"unknown what-if {name!r}; choose from {', '.join(WHAT_IFS)}")
    return names


@dataclasses.dataclass
class Cell:
    label: str
    clients: int
    inflight: int
    runs: list[RunResult]


def run_cell(broker: BrokerProcess, clients: ClientSet, label: str, runs: int, n: int,
             inflight: int, offset: int) -> Cell:
    print(f"\n{label}: {clients.count} client process(es), {inflight} in flight, "
          f"{runs} runs x {n} OpenSession")
    cell = Cell(label, clients.count, inflight, [])
    for r in range(runs):
        result = clients.run(broker, n, inflight, offset=offset + r * 7919)
        cell.runs.append(result)
        print_run(r + 1, result)
    print_cell(cell.runs)
    return cell


PROFILES = (
    ("threads", ["--threads", "--nonblocking"]),  # every running thread, process not paused
    ("gil", ["--threads", "--gil"]),  # only the thread holding the GIL
)


def profiled_runs(broker: BrokerProcess, clients: ClientSet, py_spy: str, out: Path, n: int,
                  inflight: int) -> int:
    """Extra, untimed runs with py-spy sampling the broker process; returns successes."""
    out.mkdir(parents=True, exist_ok=True)
    ok = 0
    for flavour, flags in PROFILES:
        raw = out / f"sessions-{flavour}.txt"
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(broker.pid), "--rate", "250", "--format", "raw",
             "--output", str(raw), *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        result = clients.run(broker, n, inflight, offset=104729)
        ok += result.ok
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
        print(f"\n  profile {flavour} (py-spy {' '.join(flags)}): {result.rate:,.0f} sessions/s "
              f"under the profiler, stacks in {raw}")
        if raw.exists():
            summarize_profile(raw)
    return ok


def compare(args: argparse.Namespace, home: Path, baseline: BrokerProcess, common: tuple[Any, ...],
            cells: list[Cell], offset: int, live: list[BrokerProcess | ClientSet]) -> int:
    """One cell, the matrix's broker against a broker per what-if, runs interleaved (round
    robin, rotating the order) so that load from other processes on a shared machine hits every
    variant alike. All brokers share the store; only the one under load does anything.
    Returns the successful calls outside the cells (warm-ups)."""
    count, inflight = args.compare_cell
    variants: list[tuple[str, BrokerProcess]] = [("+".join(baseline.what_if) or "as shipped", baseline)]
    print(f"\nCOMPARE {count} client process(es) x {inflight} in flight, runs interleaved; "
          "what-ifs are not the broker as shipped:")
    for what_if in args.compare:
        for w in what_if:
            print(f"  {w}: {WHAT_IFS[w]}")
        proc = BrokerProcess(home, CHEAP_ARGON2, what_if)
        live.append(proc)
        variants.append(("+".join(what_if), proc))
    sets = []
    warm_ok = 0
    for _, proc in variants:
        clients = ClientSet(count, proc.main, *common)
        live.append(clients)
        warm_ok += clients.run(proc, 2 * len(common[1]), inflight, offset=offset).ok
        sets.append(clients)
    results: list[list[RunResult]] = [[] for _ in variants]
    for r in range(args.runs):
        order = [(r + k) % len(variants) for k in range(len(variants))]
        for k in order:
            result = sets[k].run(variants[k][1], args.n, inflight, offset=offset + 31 * r + k)
            results[k].append(result)
            print(f"  {variants[k][0]:<28}", end="")
            print_run(r + 1, result)
    for (name, _), runs in zip(variants, results, strict=True):
        print(f"\n{name}: {count} client process(es), {inflight} in flight")
        print_cell(runs)
        cells.append(Cell(f"{name} (cmp)", count, inflight, runs))
    return warm_ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    print(f"OpenSession benchmark: grpcio {grpc.__version__}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, home {home}")
    broker: BrokerProcess | None = None
    clients: ClientSet | None = None
    live: list[BrokerProcess | ClientSet] = []  # the --compare processes, stopped at the end
    try:
        config = bench_config(home, **CHEAP_ARGON2)
        init_pki(config, SystemClock())
        codes = enroll_devices(config, args.devices)
        devices = sorted(codes)
        broker = BrokerProcess(home, CHEAP_ARGON2, args.what_if)
        ca_pem = (home / "certs" / "ca-bundle.pem").read_bytes()
        prep = time.monotonic()
        apps = asyncio.run(make_apps(home, Endpoints(broker.bootstrap, broker.main), ca_pem, codes,
                                     args.users, args.apps_per_user))
        print(f"setup: {len(devices)} cameras, {args.users} viewers x {args.apps_per_user} app "
              f"instance(s) = {len(apps)} app certificates, {args.users * len(devices)} shares, "
              f"through the SDK in {time.monotonic() - prep:.1f} s (untimed)")

        print(f"\nin-process pieces (median of {args.micro} calls, no gRPC, on a copy of the db):")
        costs = micro_costs(config, apps, devices, args.micro)
        for name, seconds, note in costs:
            print(f"  {name:<40}{us(seconds):>10}   {note}")

        jwks = load_keyring(config.certs_dir).jwks_json()
        common = (ca_pem, apps, devices, jwks, config.broker_spiffe_id, config.trust_domain)
        label = "+".join(args.what_if) or "as shipped"
        if args.what_if:
            print("\nWHAT-IF for the whole matrix (not the broker as shipped):")
            for name in args.what_if:
                print(f"  {name}: {WHAT_IFS[name]}")
        print(f"\nbroker pid {broker.pid} main port {broker.ports['main']}; {len(apps)} app "
              f"instances, each with its own mTLS channel, opened before the clock and reused")
        cells: list[Cell] = []
        successes = 0
        bad_tokens = errors = verified = 0
        offset = 0
        for count in args.clients:
            clients = ClientSet(count, broker.main, *common)
            warm = clients.run(broker, 2 * len(apps), max(args.concurrency), offset=offset)
            successes += warm.ok
            for inflight in args.concurrency:
                cell = run_cell(broker, clients, label, args.runs, args.n, inflight, offset)
                offset += 1
                cells.append(cell)
            if args.profile and count == args.clients[0]:
                py_spy = py_spy_binary(args.py_spy)
                if py_spy:
                    print(f"\nprofiles (extra runs, {count} client process(es), "
                          f"{max(args.concurrency)} in flight; not in the figures):")
                    successes += profiled_runs(broker, clients, py_spy, args.profile, args.n,
                                               max(args.concurrency))
                else:
                    print("  (--profile: py-spy not found; pass --py-spy PATH)")
            clients.stop()
            clients = None

        if args.compare:
            successes += compare(args, home, broker, common, cells, offset, live)

        for cell in cells:
            successes += sum(r.ok for r in cell.runs)
            errors += sum(sum(r.errors.values()) for r in cell.runs)
            bad_tokens += sum(r.bad_tokens for r in cell.runs)
            verified += sum(r.verified for r in cell.runs)
        for proc in live:
            proc.stop()
        live.clear()
        broker.stop()
        broker = None

        print("\nstore check after the broker stopped:")
        problems = verify_store(config, successes)
        print(f"  tokens verified like a camera {verified:>9}  bad {bad_tokens}  "
              f"{'ok' if not bad_tokens else 'BAD'}")
        if bad_tokens:
            problems.append(f"{bad_tokens} sampled tokens failed verification or binding")
        if errors:
            problems.append(f"{errors} failed OpenSession calls")

        ncpu = os.cpu_count() or 1
        print("\nSUMMARY (medians over runs; goal: 8,000 sessions/s on 2 cores, p99 < 10 ms)")
        print(f"  {'broker':<34}{'clients':>8}{'inflight':>9}{'runs':>5}{'median/s':>10}{'min/s':>8}"
              f"{'max/s':>8}{'p50':>9}{'p99':>9}{'srv CPU':>10}{'GIL cap/s':>10}{'CPU cap/s':>10}"
              f"{'errors':>7}{'others':>7}")
        for cell in cells:
            rs = cell.runs
            rates = [r.rate for r in rs]
            ok = sum(r.ok for r in rs) or 1
            python = sum(r.python_cpu for r in rs)
            print(f"  {cell.label:<34}{cell.clients:>8}{cell.inflight:>9}{len(rs):>5}"
                  f"{median(rates):>10,.0f}{min(rates):>8,.0f}{max(rates):>8,.0f}"
                  f"{ms(median([r.p50 for r in rs])):>9}{ms(median([r.p99 for r in rs])):>9}"
                  f"{us(sum(r.server_cpu for r in rs) / ok):>10}"
                  f"{ok / python if python else 0:>10,.0f}"
                  f"{ncpu * ok / (sum(r.server_cpu + r.client_cpu for r in rs) or 1):>10,.0f}"
                  f"{sum(sum(r.errors.values()) for r in rs):>7}"
                  f"{median([r.others for r in rs]):>7.2f}")
        by = {name: seconds for name, seconds, _ in costs}
        print(f"  in-process: sign {us(by['TokenKeyring.sign (ES256 JWT, PyJWT)'])}, "
              f"check_presented {us(by['DeviceAuthority.check_presented'])}, "
              f"Sessions.open {us(by['Sessions.open, synchronous=FULL'])} (FULL) / "
              f"{us(by['Sessions.open, synchronous=NORMAL'])} (NORMAL) / "
              f"{us(by['Sessions.open, group commit of 64'])} (group commit 64), "
              f"hop {us(by['loop -> core thread -> loop hop'])}")
        print("  (srv CPU = broker process CPU per call; GIL cap = calls/s if the broker's Python "
              f"threads were the only limit;\n   CPU cap = {ncpu} cores / (broker + client CPU per "
              "call), the ceiling while clients share this machine;\n   others = median cores used by "
              "processes outside this benchmark during the runs)")
        print(f"  correctness: {'OK' if not problems else 'FAILED: ' + '; '.join(problems)}")
        print(f"  total time {time.monotonic() - t0:.0f} s")
        return 0 if not problems else 1
    finally:
        if clients is not None:
            clients.stop()
        for proc in live:
            proc.stop()
        if broker is not None:
            broker.stop()
        if args.keep:
            print(f"kept {home}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(home)


if __name__ == "__main__":
    sys.exit(main())
