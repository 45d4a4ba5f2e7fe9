"""Enrollment throughput benchmark: Bootstrap.EnrollDevice against a real broker.

The broker runs in its own process (own GIL) on a temporary home with a fresh dev PKI; the load comes
from separate client processes using grpc.aio over real TLS. Enrollment tokens and CSRs are made before
the clock starts, so only EnrollDevice calls are timed. Two modes:

- reused:   a few long-lived TLS channels, many calls in flight;
- new-conn: a new channel (a full TLS handshake) for every enrollment, as a fleet of cameras does.

A reference run of Bootstrap.GetTrustBundle over the reused channels (no core work, no store) shows
what the gRPC aio + TLS path alone costs per call.

Each mode runs several times; the median enrollments/s is the headline figure. Around the remote runs
the script also times the in-process core path (CSR check, IssuingAuthority.issue, the store
transaction, fsync) and reads the server's per-thread CPU and the core thread's busy time, so the
bottleneck shows. It ends by checking the store: one certificate row per successful enrollment.

    .venv/bin/python bench/enroll.py            # full: 5 runs x 2000 reused, 5 x 500 new-conn
    .venv/bin/python bench/enroll.py --quick    # < 60 s
    .venv/bin/python bench/enroll.py --profile /tmp/prof   # extra py-spy runs, not timed

What-if flags (--server-sync, --inline-core, --group-commit, --workers, --switch-interval) change
only the bench's broker process, never broker/: they exist to measure a proposed change before
anyone makes it, and the output says WHAT-IF when one is on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc

from broker._proto.broker.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from broker.audit.chain import verify_chain
from broker.client.device import make_csr
from broker.clock import SystemClock
from broker.config import Config
from broker.devices.enrollment import DeviceAuthority
from broker.identity.spiffe import device, operator
from broker.pki.ca import IssuedCertificate, init_pki, load_authority, new_key
from broker.pki.csr import public_key_from_csr
from broker.service.server import BrokerServer
from broker.store.sqlite import SqliteStore, SqliteTransaction

Item = tuple[str, str, str]  # (device_id, enrollment token, CSR PEM)
CORE_THREAD = "broker-core"


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def bench_config(home: Path, **overrides: Any) -> Config:
    return Config(
        home=home,
        bootstrap_address="127.0.0.1:0",
        main_address="127.0.0.1:0",
        factory_address="127.0.0.1:0",
    ).with_overrides(**overrides)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values by nearest rank; 0 for an empty list."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def machine_cpu() -> tuple[float, float, float]:
    """(busy, steal, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return float(busy), float(steal), float(busy + idle + iowait + steal)


def process_cpu() -> float:
    t = os.times()
    return t.user + t.system


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread of this process, grouped by a readable thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = float(os.sysconf("SC_CLK_TCK"))
    totals: dict[str, float] = defaultdict(float)
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick
        totals[_thread_group(names.get(int(tid)), comm)] += seconds
    return dict(totals)


def _thread_group(py_name: str | None, comm: str) -> str:
    if py_name == "MainThread":
        return "event loop (MainThread)"
    if py_name and py_name.startswith(CORE_THREAD):
        return "core thread (broker-core)"
    if py_name and "_poll_wrapper" in py_name:
        return "grpc aio poller (py thread)"
    if py_name:
        return f"py thread {py_name.split(' ')[0]}"
    return f"grpc/native {comm}"


# ---------------------------------------------------------------------------------------------
# server process
# ---------------------------------------------------------------------------------------------
class TimedExecutor(Executor):
    """Wraps the broker's core executor (as shipped: group commit on one thread) without changing
    what it does: counts each call's time in the core thread and its wait in the queue."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.calls = 0
        self.busy = 0.0  # seconds inside the calls themselves
        self.waited = 0.0

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

        return self.inner.submit(timed)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.inner.shutdown(wait, cancel_futures=cancel_futures)


class InlineExecutor(Executor):
    """What-if: run each core call at once on the event loop thread (no thread hop, no GIL
    hand-off, a COMMIT per call; the loop blocks for the call, fsync included)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to the awaiting handler, as the executor would
            future.set_exception(error)
        return future


class BatchTimer:
    """Times the store's group-commit blocks (BEGIN IMMEDIATE ... COMMIT) when the broker has them."""

    def __init__(self, store: SqliteStore) -> None:
        self.batches = 0
        self.seconds = 0.0
        inner = getattr(store, "batch", None)
        if inner is None:
            return

        @contextlib.contextmanager
        def timed_batch() -> Iterator[None]:
            started = time.perf_counter()
            try:
                with inner():
                    yield
            finally:
                self.batches += 1
                self.seconds += time.perf_counter() - started

        store.batch = timed_batch  # type: ignore[method-assign]


def force_subject_index() -> None:
    """What-if: supersede_certificates searching by the subject index. (With the v5 index on
    certificates(status, not_after) SQLite picks that one for `status = 'active'` and scans every
    active certificate on each enrollment and renewal.) Same statement, `+status` stops the planner
    from using the status index."""

    def supersede(self: SqliteTransaction, subject: str, by_serial: str, at: int) -> list[str]:
        rows = self._conn.execute(
            "UPDATE certificates SET status = 'superseded', superseded_by = ?, superseded_at = ? "
            "WHERE subject = ? AND +status = 'active' AND serial != ? RETURNING serial",
            (by_serial, at, subject, by_serial),
        ).fetchall()
        return sorted(r[0] for r in rows)

    SqliteTransaction.supersede_certificates = supersede  # type: ignore[method-assign]


class ReusePortServer(BrokerServer):
    """What-if: the broker with SO_REUSEPORT on, so several processes can share its listeners."""

    def _options(self) -> list[tuple[str, Any]]:
        return [(k, 1 if k == "grpc.so_reuseport" else v) for k, v in super()._options()]


def serve(home: str, conn: Connection, what_if: dict[str, Any], ports: dict[str, int]) -> None:
    """Server process: run a broker and answer 'stats' / 'stop' over the pipe. It binds port 0,
    or the given ports when joining a first worker. what_if holds the experiment knobs (none by
    default: the broker exactly as configured)."""
    if what_if.get("switch_interval"):
        sys.setswitchinterval(what_if["switch_interval"])
    asyncio.run(_serve(Path(home), conn, what_if, ports))


async def _serve(home: Path, conn: Connection, what_if: dict[str, Any], ports: dict[str, int]) -> None:
    config = bench_config(home)
    if ports:
        config = config.with_overrides(**{f"{name}_address": f"127.0.0.1:{port}"
                                          for name, port in ports.items()})
    server = (ReusePortServer if what_if.get("workers") else BrokerServer)(config)
    if what_if.get("sync"):
        server.store._conn.execute(f"PRAGMA synchronous = {what_if['sync']}")
    if what_if.get("force_subject_index"):
        force_subject_index()
    inner: Executor = server.runtime.executor  # as shipped
    if what_if.get("per_call_commit"):
        inner = ThreadPoolExecutor(max_workers=1, thread_name_prefix=CORE_THREAD)
    elif what_if.get("inline_core"):
        inner = InlineExecutor()
    elif what_if.get("max_batch"):
        from broker.store.groupcommit import GroupCommitExecutor

        inner = GroupCommitExecutor(server.store, what_if["max_batch"])
    if inner is not server.runtime.executor:
        server.runtime.executor.shutdown()
    core = TimedExecutor(inner)
    server.runtime.executor = core  # type: ignore[assignment]
    batches = BatchTimer(server.store)
    conn.send(("ready", os.getpid(), await server.start()))
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command == "stats":
            conn.send(
                {
                    "process": process_cpu(),
                    "threads": thread_cpu(),
                    "core_calls": core.calls,
                    "core_busy": batches.seconds or core.busy,
                    "core_waited": core.waited,
                    "batches": batches.batches,
                }
            )
        elif command == "stop":
            break
    await server.stop(0.5)
    conn.send("stopped")


# ---------------------------------------------------------------------------------------------
# client processes
# ---------------------------------------------------------------------------------------------
def _channel(target: str, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    # Like broker.client.channels.tls_channel, plus a local subchannel pool: without it grpc shares
    # one TCP/TLS connection between all channels to the same target, and "new connection per
    # enrollment" or "4 channels" would not be what they say.
    options = [
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return grpc.aio.secure_channel(target, credentials, options=options)


def client(conn: Connection, target: str, ca_pem: bytes) -> None:
    """Client process: wait for jobs, run each on signal, report latencies and outcomes."""
    asyncio.run(_client(conn, target, ca_pem))


async def _client(conn: Connection, target: str, ca_pem: bytes) -> None:
    loop = asyncio.get_running_loop()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    while True:
        job = await loop.run_in_executor(None, conn.recv)
        if job is None:
            return
        mode, items, channels, concurrency = job
        reused = [_channel(target, credentials) for _ in range(channels)] if mode != "new-conn" else []
        await asyncio.gather(*(ch.channel_ready() for ch in reused))  # handshakes before the clock
        conn.send("ready")
        go = await loop.run_in_executor(None, conn.recv)
        assert go == "go"
        result = await _run(mode, items, reused, concurrency, target, credentials)
        for ch in reused:
            await ch.close()
        conn.send(result)


async def _run(
    mode: str,
    items: list[Item],
    reused: list[grpc.aio.Channel],
    concurrency: int,
    target: str,
    credentials: grpc.ChannelCredentials,
) -> dict[str, Any]:
    stubs = [bootstrap_pb2_grpc.BootstrapStub(ch) for ch in reused]
    queue: Iterator[Item] = iter(items)
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def enroll(stub: bootstrap_pb2_grpc.BootstrapStub, item: Item) -> None:
        device_id, token, csr = item
        request = bootstrap_pb2.EnrollDeviceRequest(csr_pem=csr, enrollment_token=token)
        response = await stub.EnrollDevice(request, timeout=60)
        if response.device_id != device_id or not response.certificate_chain_pem.startswith(
            "-----BEGIN CERTIFICATE-----"
        ):
            raise ValueError("response names another device or carries no certificate")

    async def trust_bundle(stub: bootstrap_pb2_grpc.BootstrapStub) -> None:
        response = await stub.GetTrustBundle(bootstrap_pb2.GetTrustBundleRequest(), timeout=60)
        if not response.trust_bundle.ByteSize():
            raise ValueError("empty trust bundle")

    async def worker(index: int) -> None:
        for item in queue:
            started = time.monotonic()
            try:
                if mode == "baseline":
                    await trust_bundle(stubs[index % len(stubs)])
                elif mode == "reused":
                    await enroll(stubs[index % len(stubs)], item)
                else:
                    async with _channel(target, credentials) as channel:
                        await enroll(bootstrap_pb2_grpc.BootstrapStub(channel), item)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
                continue
            except ValueError:
                errors["BAD_RESPONSE"] += 1
                continue
            latencies.append(time.monotonic() - started)

    cpu0 = process_cpu()
    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    ended = time.monotonic()
    return {
        "start": started,
        "end": ended,
        "latencies": latencies,
        "errors": dict(errors),
        "cpu": process_cpu() - cpu0,
    }


# ---------------------------------------------------------------------------------------------
# parent: preparation
# ---------------------------------------------------------------------------------------------
def make_items(config: Config, prefix: str, count: int, fast_store: bool = True) -> list[Item]:
    """Tokens written straight into the store with the core API, and one fresh key's CSR each."""
    store = SqliteStore(config.database)
    if fast_store:
        # Only this preparation connection skips fsync; the broker's own connection keeps FULL.
        store._conn.execute("PRAGMA synchronous = OFF")
    clock = SystemClock()
    authority = DeviceAuthority(config, load_authority(config, clock), store, clock)
    actor = operator(config.trust_domain, "bench")
    items = []
    for i in range(count):
        device_id = f"{prefix}-{i:06d}"
        token = authority.create_enrollment_token(actor, device_id).token
        items.append((device_id, token, make_csr(new_key())))
    store.close()
    return items


# ---------------------------------------------------------------------------------------------
# parent: in-process costs of the core path
# ---------------------------------------------------------------------------------------------
class PreIssued:
    """Stands in for IssuingAuthority with certificates signed beforehand (store-only timing)."""

    def __init__(self, issued: list[IssuedCertificate]) -> None:
        self._issued = iter(issued)

    def issue(self, *_args: Any, **_kwargs: Any) -> IssuedCertificate:
        return next(self._issued)


@dataclasses.dataclass(frozen=True)
class Cost:
    name: str
    median: float
    mean: float
    cpu: float  # mean CPU seconds per call (process time: this thread only does the work)
    note: str

    def minus(self, other: Cost, name: str, note: str) -> Cost:
        return Cost(name, self.median - other.median, self.mean - other.mean, self.cpu - other.cpu, note)


def measure(name: str, note: str, fn: Callable[[int], object], count: int) -> Cost:
    samples = []
    cpu = time.process_time()
    for i in range(count):
        started = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - started)
    cpu = (time.process_time() - cpu) / count
    return Cost(name, statistics.median(samples), statistics.fmean(samples), cpu, note)


ISSUE = "IssuingAuthority.issue (sign leaf)"
STORE_FULL = "store tx, FULL, COMMIT per call"
STORE_NORMAL = "store tx, NORMAL, COMMIT per call"
STORE_GROUP = "store tx, FULL, 32 per COMMIT (as shipped)"
GROW_EMPTY = "enroll_with_token, empty store"
GROW_FULL = "enroll_with_token, after"
CORE = "DeviceAuthority.enroll_with_token"
BATCH = 32


def core_costs(home: Path, count: int, grow: int) -> list[Cost]:
    """Per-call cost of each piece of the enrollment core path, in this process, no gRPC."""
    clock = SystemClock()
    config = bench_config(home)
    ca = load_authority(config, clock)
    total = count + grow
    keys = [new_key() for _ in range(total)]
    csrs = [make_csr(k) for k in keys]
    public = [k.public_key() for k in keys]
    lifetime = dt.timedelta(days=config.device_cert_days)
    actor = operator(config.trust_domain, "bench")

    def setup(prefix: str, synchronous: str, pre_issued: bool, n: int = count
              ) -> tuple[DeviceAuthority, SqliteStore, list[str]]:
        cfg = bench_config(home, db_path=home / "var" / f"micro-{prefix}.db")
        store = SqliteStore(cfg.database)
        store._conn.execute("PRAGMA synchronous = OFF")  # token preparation only
        tokens = [DeviceAuthority(cfg, ca, store, clock).create_enrollment_token(
            actor, f"{prefix}-{i:06d}").token for i in range(n)]
        store._conn.execute(f"PRAGMA synchronous = {synchronous}")
        issuer: Any = ca
        if pre_issued:
            issuer = PreIssued([ca.issue(public[i], device(cfg.trust_domain, f"{prefix}-{i:06d}"), lifetime)
                                for i in range(n)])
        return DeviceAuthority(cfg, issuer, store, clock), store, tokens

    csr = measure("CSR parse + signature check", "broker.pki.csr.public_key_from_csr",
                  lambda i: public_key_from_csr(csrs[i]), count)
    identities = [device(config.trust_domain, f"micro-{i:06d}") for i in range(count)]
    issue = measure(ISSUE, "P-256 ECDSA, fixed profile, chain PEM",
                    lambda i: ca.issue(public[i], identities[i], lifetime), count)
    rows = [csr, issue]

    for sync, name, note in (("FULL", STORE_FULL, "enroll_with_token, pre-signed certs, less CSR"),
                             ("NORMAL", STORE_NORMAL, "WAL + NORMAL, COMMIT per call")):
        authority, store, tokens = setup(f"s{sync.lower()}", sync, pre_issued=True)
        cost = measure("", "", lambda i, a=authority, t=tokens: a.enroll_with_token(csrs[i], t[i]), count)
        store.close()
        rows.append(cost.minus(csr, name, note))

    authority, store, tokens = setup("group", "FULL", pre_issued=True)
    if hasattr(store, "batch"):  # the broker's group commit (broker.store.groupcommit)
        def batch(b: int) -> None:
            with store.batch():
                for i in range(b * BATCH, min(count, (b + 1) * BATCH)):
                    authority.enroll_with_token(csrs[i], tokens[i])

        batches = (count + BATCH - 1) // BATCH
        cost = measure("", "", batch, batches)
        per = Cost("", cost.median / BATCH, cost.mean * batches / count, cost.cpu * batches / count, "")
        rows.append(per.minus(csr, STORE_GROUP, "store.batch(): savepoint per call, one COMMIT"))
    store.close()

    authority, store, tokens = setup("core", "FULL", pre_issued=False)
    fresh = [make_csr(new_key()) for _ in range(count)]
    rows.append(measure(CORE, "the whole core call, COMMIT per call",
                        lambda i: authority.enroll_with_token(fresh[i], tokens[i]), count))
    store.close()

    # Does the store transaction stay flat as the certificates table grows? (synchronous=OFF, so
    # only the SQL shows.) First `count` enrollments into an empty store, then `grow` more, then
    # `count` again.
    authority, store, tokens = setup("grow", "OFF", pre_issued=False, n=total + count)
    more = [make_csr(new_key()) for _ in range(count)]
    first = measure("", "", lambda i: authority.enroll_with_token(csrs[i], tokens[i]), count)
    for i in range(count, total):
        authority.enroll_with_token(csrs[i], tokens[i])
    last = measure("", "", lambda i: authority.enroll_with_token(more[i], tokens[total + i]), count)
    store.close()
    rows.append(dataclasses.replace(first, name=GROW_EMPTY, note="synchronous=OFF: SQL and Python only"))
    rows.append(dataclasses.replace(last, name=f"{GROW_FULL} {total:,} certs",
                                    note="should equal the line above"))

    fd = os.open(home / "var" / "fsync.probe", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        def write_sync(_i: int) -> None:
            os.pwrite(fd, b"x" * 4096, 0)
            os.fsync(fd)

        rows.append(measure("fsync of a 4 KiB write", "same filesystem as the database",
                            write_sync, min(count, 200)))
    finally:
        os.close(fd)
    return rows


# ---------------------------------------------------------------------------------------------
# parent: running the load
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    mode: str
    n: int
    ok: int
    errors: dict[str, int]
    wall: float
    latencies: list[float]
    server_cpu: float
    threads: dict[str, float]
    core_calls: int
    core_busy: float
    core_waited: float
    client_cpu: float
    machine_busy: float  # cores busy, 0..ncpu
    steal: float
    processes: int = 1  # broker processes
    batches: int = 0  # group-commit transactions (0: the core executor does not batch)

    @property
    def rate(self) -> float:
        return self.ok / self.wall if self.wall else 0.0

    @property
    def python_cpu(self) -> float:
        """CPU of the broker's Python threads: work that needs the one GIL, so cannot overlap."""
        return sum(v for k, v in self.threads.items() if not k.startswith("grpc/native"))


class Harness:
    """The server process, the client processes, and the pipes to them."""

    def __init__(self, home: Path, clients: int, what_if: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        self._servers: list[tuple[mp.process.BaseProcess, Connection]] = []
        self.server_pids: list[int] = []
        self.ports: dict[str, int] = {}
        for i in range(what_if.get("workers") or 1):
            parent_end, child_end = ctx.Pipe()
            args = (str(home), child_end, what_if, self.ports)
            proc = ctx.Process(target=serve, args=args, name=f"broker{i}", daemon=True)
            proc.start()
            deadline = time.monotonic() + 60
            while not parent_end.poll(0.2):
                if not proc.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("broker process did not start (see its traceback above)")
            _, pid, self.ports = parent_end.recv()
            self._servers.append((proc, parent_end))
            self.server_pids.append(pid)
        self.server_pid = self.server_pids[0]
        target = f"127.0.0.1:{self.ports['bootstrap']}"
        ca_pem = (home / "certs" / "ca-bundle.pem").read_bytes()
        self._clients: list[tuple[mp.process.BaseProcess, Connection]] = []
        for i in range(clients):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=client, args=(child_end, target, ca_pem), name=f"client{i}", daemon=True)
            proc.start()
            self._clients.append((proc, parent_end))

    def _server_stats(self) -> dict[str, Any]:
        """The counters of every broker process, summed."""
        total: dict[str, Any] = {"threads": Counter()}
        for _, conn in self._servers:
            conn.send("stats")
            stats = conn.recv()
            total["threads"].update(stats.pop("threads"))
            for key, value in stats.items():
                total[key] = total.get(key, 0) + value
        return total

    def _recv(self, conn: Connection, timeout: float = 600) -> Any:
        if not conn.poll(timeout):
            raise RuntimeError("a client process did not answer")
        return conn.recv()

    def run(self, mode: str, items: list[Item], channels: int, concurrency: int) -> RunResult:
        count = len(self._clients)
        for i, (_, conn) in enumerate(self._clients):
            share = items[i::count]
            conn.send((mode, share, max(1, channels // count), max(1, concurrency // count)))
        for _, conn in self._clients:
            if self._recv(conn, 120) != "ready":
                raise RuntimeError("client not ready")
        before = self._server_stats()
        machine0 = machine_cpu()
        for _, conn in self._clients:
            conn.send("go")
        results = [self._recv(conn) for _, conn in self._clients]
        machine1 = machine_cpu()
        after = self._server_stats()
        busy, steal, total = (b - a for a, b in zip(machine0, machine1, strict=True))
        ncpu = os.cpu_count() or 1
        errors: Counter[str] = Counter()
        for r in results:
            errors.update(r["errors"])
        latencies = [x for r in results for x in r["latencies"]]
        threads = {k: v - before["threads"].get(k, 0.0) for k, v in after["threads"].items()}
        return RunResult(
            mode=mode,
            n=len(items),
            ok=len(latencies),
            errors=dict(errors),
            wall=max(r["end"] for r in results) - min(r["start"] for r in results),
            latencies=latencies,
            server_cpu=after["process"] - before["process"],
            threads={k: v for k, v in threads.items() if v > 0},
            core_calls=after["core_calls"] - before["core_calls"],
            core_busy=after["core_busy"] - before["core_busy"],
            core_waited=after["core_waited"] - before["core_waited"],
            client_cpu=sum(r["cpu"] for r in results),
            machine_busy=ncpu * busy / total if total else 0.0,
            steal=ncpu * steal / total if total else 0.0,
            processes=len(self._servers),
            batches=after.get("batches", 0) - before.get("batches", 0),
        )

    def stop(self) -> None:
        for proc, conn in self._clients:
            conn.send(None)
            proc.join(10)
        for proc, conn in self._servers:
            conn.send("stop")
            if conn.poll(30):
                conn.recv()
            proc.join(10)


def py_spy_binary(explicit: str | None) -> str | None:
    return explicit or shutil.which("py-spy")


PROFILES = (
    ("threads", ["--threads", "--nonblocking"]),  # every running (not blocked) thread
    ("gil", ["--threads", "--gil"]),  # only the thread holding the GIL (pauses the process to sample)
)


def profiled_runs(
    harness: Harness, py_spy: str, out: Path, mode: str, runs: list[list[Item]], channels: int, conc: int
) -> tuple[int, int]:
    """Extra, untimed runs with py-spy sampling the broker process. Returns (successes, errors)."""
    out.mkdir(parents=True, exist_ok=True)
    ok = errors = 0
    for (flavour, flags), items in zip(PROFILES, runs, strict=True):
        raw = out / f"{mode}-{flavour}.txt"
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(harness.server_pid), "--rate", "250", "--format", "raw",
             "--output", str(raw), *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        result = harness.run(mode, items, channels, conc)
        ok += result.ok
        errors += sum(result.errors.values())
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
        print(f"\n  profile {mode} / {flavour} (py-spy {' '.join(flags)}): {result.rate:,.0f} enroll/s "
              f"under the profiler, stacks in {raw}")
        if raw.exists():
            summarize_profile(raw)
    return ok, errors


BORING = ("threading.py", "concurrent/futures", "asyncio/base_events.py", "asyncio/runners.py",
          "multiprocessing/", "<module>", "bench/enroll.py", "asyncio/events.py", "selectors.py")


def summarize_profile(raw: Path, top: int = 10) -> None:
    """Per thread: its share of samples, its hottest frames (inclusive) and leaves (self)."""
    threads: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    leaves: dict[str, Counter[str]] = defaultdict(Counter)
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = "?"
        if frames[0].startswith("thread ("):
            thread = frames.pop(0).split(": ", 1)[-1]
            thread = "core thread" if thread.startswith(CORE_THREAD) else thread
        threads[thread] += count
        total += count
        if frames:
            leaves[thread][frames[-1][:100]] += count
        for frame in {f.split(" (")[0] for f in frames if not any(b in f for b in BORING)}:
            inclusive[thread][frame[:80]] += count
    if not total:
        print("    (no samples)")
        return
    for thread, count in threads.most_common(4):
        print(f"    {thread}: {100 * count / total:.0f}% of samples")
        for frame, n in inclusive[thread].most_common(top):
            print(f"      incl {100 * n / total:5.1f}%  {frame}")
        for frame, n in leaves[thread].most_common(5):
            print(f"      self {100 * n / total:5.1f}%  {frame}")


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def print_run(index: int, r: RunResult, unit: str = "enroll/s") -> None:
    errors = sum(r.errors.values())
    print(
        f"  run {index}: {r.rate:8,.0f} {unit}  ok={r.ok}/{r.n} err={errors}"
        f"  p50={ms(pct(r.latencies, 0.5))} p99={ms(pct(r.latencies, 0.99))}"
        f"  server {us(r.server_cpu / max(r.ok, 1))} CPU/call"
        f"  core busy {100 * r.core_busy / r.wall:3.0f}%"
        f"  machine {r.machine_busy:.2f}/{os.cpu_count()} cores (steal {r.steal:.2f})"
    )
    if r.errors:
        print(f"         errors: {r.errors}")


def print_breakdown(mode: str, runs: list[RunResult]) -> None:
    ok = sum(r.ok for r in runs) or 1
    threads: Counter[str] = Counter()
    for r in runs:
        threads.update(r.threads)
    server = sum(r.server_cpu for r in runs)
    client_cpu = sum(r.client_cpu for r in runs)
    core_busy = sum(r.core_busy for r in runs)
    core_calls = sum(r.core_calls for r in runs) or 1
    wall = sum(r.wall for r in runs)
    print(f"\n  where the time goes ({mode}, all runs):")
    print(f"    server process CPU      {us(server / ok):>10} per call")
    for name, seconds in threads.most_common():
        if seconds / ok >= 1e-6:
            print(f"      {name:<28}{us(seconds / ok):>10}  ({100 * seconds / wall:3.0f}% of one core)")
    print(f"    client processes CPU    {us(client_cpu / ok):>10} per call")
    print(f"    core thread wall busy   {us(core_busy / core_calls):>10} per call; "
          f"queue wait {us(sum(r.core_waited for r in runs) / core_calls)} per call; "
          f"busy {100 * core_busy / wall:.0f}% of wall")
    batches = sum(r.batches for r in runs)
    if batches:
        print(f"    group commit: {core_calls:,} core calls in {batches:,} COMMITs "
              f"({core_calls / batches:.1f} per COMMIT)")
    ncpu = os.cpu_count() or 1
    cpu_bound = ncpu / ((server + client_cpu) / ok)
    core = f"core thread alone {core_calls / core_busy:,.0f}/s; " if core_busy else ""
    gil = sum(r.python_cpu for r in runs) / ok
    procs = runs[0].processes
    print(f"    ceilings: {core}{procs} GIL(s) ({us(gil)} Python CPU/call) {procs / gil:,.0f}/s; "
          f"{ncpu} cores / (server+client CPU) {cpu_bound:,.0f}/s")


def verify_store(home: Path, expected: int) -> list[str]:
    """Return the problems found; empty when the store holds exactly one cert per enrollment."""
    problems = []
    conn = sqlite3.connect(home / "var" / "broker.db")
    try:
        certs = conn.execute("SELECT COUNT(*) FROM certificates WHERE kind = 'device'").fetchone()[0]
        used = conn.execute(
            "SELECT COUNT(*) FROM enrollment_tokens WHERE used_at IS NOT NULL").fetchone()[0]
        devices = conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
        enrolled = conn.execute(
            "SELECT COUNT(*) FROM audit_log WHERE action = 'device.enrolled'").fetchone()[0]
    finally:
        conn.close()
    for what, value in (("device certificate rows", certs), ("used tokens", used),
                        ("device rows", devices), ("device.enrolled audit entries", enrolled)):
        status = "ok" if value == expected else "MISMATCH"
        print(f"  {what:<32}{value:>8}  (successful enrollments {expected})  {status}")
        if value != expected:
            problems.append(f"{what}: {value} != {expected}")
    store = SqliteStore(home / "var" / "broker.db", migrate=False)
    try:
        result = verify_chain(store.audit_entries())
    finally:
        store.close()
    print(f"  audit hash chain                {result.entries:>8}  {'ok' if result.ok else 'BROKEN'}")
    if not result.ok:
        problems.append(f"audit chain broken at {result.first_bad_seq}: {result.reason}")
    return problems


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="3 short runs per mode (< 60 s)")
    p.add_argument("--runs", type=int, help="runs per mode (default 5, quick 3)")
    p.add_argument("--n", type=int, help="enrollments per reused-channel run (default 2000, quick 1000)")
    p.add_argument("--n-new", type=int, help="enrollments per new-connection run (default 500, quick 300)")
    p.add_argument("--concurrency", type=int, default=64, help="in-flight calls, reused mode (64)")
    p.add_argument("--channels", type=int, default=4, help="TLS channels, reused mode (4)")
    p.add_argument("--new-concurrency", type=int, default=16, help="in-flight calls, new-conn mode (16)")
    p.add_argument("--clients", type=int, default=1, help="client processes (1)")
    p.add_argument("--mode", choices=["both", "reused", "new-conn"], default="both")
    p.add_argument("--no-baseline", action="store_true", help="skip the GetTrustBundle reference run")
    p.add_argument("--micro", type=int, help="samples per in-process measurement (default 500, quick 150)")
    p.add_argument("--grow", type=int,
                   help="certificates added between the two table-growth samples (default 5000, quick 2000)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="after the timed runs, one extra run per mode under py-spy; raw stacks to DIR")
    p.add_argument("--py-spy", help="py-spy executable (default: from PATH)")
    p.add_argument("--keep", action="store_true", help="keep the temporary broker home")
    w = p.add_argument_group("what-if experiments (change the broker process only, for evidence)")
    w.add_argument("--server-sync", choices=["FULL", "NORMAL", "OFF"],
                   help="PRAGMA synchronous on the broker's store connection (broker: FULL)")
    w.add_argument("--switch-interval", type=float, metavar="S",
                   help="sys.setswitchinterval in the broker process (Python default 0.005)")
    w.add_argument("--inline-core", action="store_true",
                   help="run core calls on the event loop instead of the broker-core thread")
    w.add_argument("--per-call-commit", action="store_true",
                   help="a plain one-thread core executor: one COMMIT (fsync) per call, no group commit")
    w.add_argument("--max-batch", type=int, metavar="N",
                   help="group commit with at most N calls per COMMIT (broker default 128)")
    w.add_argument("--force-subject-index", action="store_true",
                   help="supersede_certificates with `+status` so SQLite searches by subject")
    w.add_argument("--workers", type=int, metavar="K",
                   help="K broker processes sharing the listeners with SO_REUSEPORT and one database")
    args = p.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 5)
    args.n = args.n or (1000 if args.quick else 2000)
    args.n_new = args.n_new or (300 if args.quick else 500)
    args.micro = args.micro or (150 if args.quick else 500)
    args.grow = args.grow if args.grow is not None else (2000 if args.quick else 5000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = ["reused", "new-conn"] if args.mode == "both" else [args.mode]
    plan = {
        "reused": (args.n, args.channels, args.concurrency),
        "new-conn": (args.n_new, 0, args.new_concurrency),
    }
    home = Path(tempfile.mkdtemp(prefix="bench-enroll-"))
    t0 = time.monotonic()
    print(f"enrollment benchmark: grpcio {grpc.__version__}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, home {home}")
    try:
        config = bench_config(home)
        init_pki(config, SystemClock())

        print(f"\nin-process core path ({args.micro} calls each, no gRPC, one thread):")
        print(f"  {'':<40}{'median':>10}{'mean':>10}{'CPU':>10}")
        costs = core_costs(home, args.micro, args.grow)
        for c in costs:
            print(f"  {c.name:<40}{us(c.median):>10}{us(c.mean):>10}{us(c.cpu):>10}   {c.note}")

        profile_py_spy = py_spy_binary(args.py_spy) if args.profile else None
        if args.profile and not profile_py_spy:
            print("  (--profile: py-spy not found; pass --py-spy PATH)")
        items: dict[str, list[list[Item]]] = {}
        warm = 64
        prep0 = time.monotonic()
        warmup = make_items(config, "warm", warm)
        for mode in modes:
            n = plan[mode][0]
            extra = len(PROFILES) if profile_py_spy else 0
            items[mode] = [make_items(config, f"{mode[0]}{r}", n) for r in range(args.runs + extra)]
        total_items = warm + sum(len(x) for runs in items.values() for x in runs)
        print(f"\nprepared {total_items} tokens (in the store) and CSRs in "
              f"{time.monotonic() - prep0:.1f} s, before any timing")

        what_if = {"sync": args.server_sync, "switch_interval": args.switch_interval,
                   "inline_core": args.inline_core, "workers": args.workers,
                   "per_call_commit": args.per_call_commit, "max_batch": args.max_batch,
                   "force_subject_index": args.force_subject_index}
        if any(what_if.values()):
            print(f"WHAT-IF broker tweaks (not the broker as shipped): "
                  f"{ {k: v for k, v in what_if.items() if v} }")
        harness = Harness(home, args.clients, what_if)
        results: dict[str, list[RunResult]] = {}
        try:
            print(f"broker pid {' '.join(map(str, harness.server_pids))} ports {harness.ports}; "
                  f"{args.clients} client process(es)")
            warm_result = harness.run("reused", warmup, args.channels, args.concurrency)
            successes = warm_result.ok
            errors = sum(warm_result.errors.values())
            for mode in modes:
                n, channels, conc = plan[mode]
                desc = (f"{channels} channels, {conc} in flight" if mode == "reused"
                        else f"new TLS connection per call, {conc} in flight")
                print(f"\n{mode}: {args.runs} runs x {n} enrollments ({desc})")
                results[mode] = []
                for r in range(args.runs):
                    result = harness.run(mode, items[mode][r], channels, conc)
                    results[mode].append(result)
                    successes += result.ok
                    errors += sum(result.errors.values())
                    print_run(r + 1, result)
                print_breakdown(mode, results[mode])
            if not args.no_baseline:
                n, channels, conc = plan["reused"]
                print(f"\nbaseline: 1 run x {n} GetTrustBundle calls "
                      f"({channels} channels, {conc} in flight; no core thread, no store)")
                result = harness.run("baseline", [("", "", "")] * n, channels, conc)
                errors += sum(result.errors.values())
                print_run(1, result, "calls/s ")
                print_breakdown("baseline", [result])
                results["baseline"] = [result]
            if profile_py_spy:
                print("\nprofiles (extra runs, not in the figures above):")
                for mode in modes:
                    n, channels, conc = plan[mode]
                    ok, failed = profiled_runs(harness, profile_py_spy, args.profile, mode,
                                               items[mode][args.runs:], channels, conc)
                    successes += ok
                    errors += failed
        finally:
            harness.stop()

        print("\nstore check after the broker stopped:")
        problems = verify_store(home, successes)
        if errors:
            problems.append(f"{errors} failed enrollments")

        print("\nSUMMARY")
        print(f"  {'mode':<10}{'runs':>5}{'median/s':>10}{'min/s':>9}{'max/s':>9}"
              f"{'p50':>10}{'p99':>10}{'srv CPU/call':>13}{'GIL cap/s':>10}{'errors':>8}")
        for mode, runs in results.items():
            rates = [r.rate for r in runs]
            lat = [x for r in runs for x in r.latencies]
            ok = sum(r.ok for r in runs) or 1
            print(f"  {mode:<10}{len(runs):>5}{statistics.median(rates):>10,.0f}{min(rates):>9,.0f}"
                  f"{max(rates):>9,.0f}{ms(pct(lat, 0.5)):>10}{ms(pct(lat, 0.99)):>10}"
                  f"{us(sum(r.server_cpu for r in runs) / ok):>13}"
                  f"{runs[0].processes * ok / sum(r.python_cpu for r in runs):>10,.0f}"
                  f"{sum(sum(r.errors.values()) for r in runs):>8}")
        print("  (baseline = GetTrustBundle, not an enrollment; GIL cap = calls per second of the broker's"
              "\n   Python-thread CPU, the ceiling while one process serves everything)")
        by_name = {c.name: c for c in costs}
        print(f"  in-process medians: issue {us(by_name[ISSUE].median)}, "
              f"store tx {us(by_name[STORE_FULL].median)} (FULL) / "
              f"{us(by_name[STORE_NORMAL].median)} (NORMAL) / "
              + (f"{us(by_name[STORE_GROUP].median)} (32 per COMMIT), " if STORE_GROUP in by_name else "")
              + f"whole core call {us(by_name[CORE].median)}")
        grown = [c for c in costs if c.name.startswith(GROW_FULL)]
        if grown:
            ratio = grown[0].mean / by_name[GROW_EMPTY].mean
            print(f"  store scaling: enroll_with_token {us(by_name[GROW_EMPTY].mean)} on an empty store, "
                  f"{us(grown[0].mean)} {grown[0].name[len('enroll_with_token, '):]} "
                  f"(x{ratio:.1f}{'; should be flat' if ratio > 1.3 else ''})")
        print(f"  correctness: {'OK' if not problems else 'FAILED: ' + '; '.join(problems)}")
        print(f"  total time {time.monotonic() - t0:.0f} s")
        return 0 if not problems else 1
    finally:
        if args.keep:
            print(f"kept {home}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(home)


if __name__ == "__main__":
    sys.exit(main())
