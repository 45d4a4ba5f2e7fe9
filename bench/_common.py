"""Helpers shared by the benchmarks: config, percentiles, CPU accounting, a timed core executor,
a group-commit what-if for the SQLite store, and py-spy profile summaries; for the stream benches
(relay.py, storm.py) also a broker child process that can be killed and restarted on the same ports,
fast in-process provisioning of cameras and owners, and in-memory SDK clients with stamped frames.

bench/enroll.py predates this module and keeps its own copies; new benchmarks import from here.
Nothing here changes the broker: what-ifs patch one store object inside the bench's own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import random
import resource
import shutil
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.config import Config
from broker.store.sqlite import SqliteStore, SqliteTransaction

CORE_THREAD = "broker-core"  # the thread_name_prefix of broker.service.runtime's core executor


# ---------------------------------------------------------------------------------------------
# config and formatting
# ---------------------------------------------------------------------------------------------
def bench_config(home: Path, **overrides: Any) -> Config:
    """A broker config in home with every listener on port 0."""
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


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def timed_each(fn: Callable[[int], object], count: int) -> list[float]:
    """Wall time of fn(i) for i in range(count)."""
    samples = []
    for i in range(count):
        started = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - started)
    return samples


# ---------------------------------------------------------------------------------------------
# CPU accounting (Linux /proc)
# ---------------------------------------------------------------------------------------------
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


PY_GROUPS = ("event loop (MainThread)", "core thread (broker-core)", "grpc aio poller (py thread)")


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
        return PY_GROUPS[0]
    if py_name and py_name.startswith(CORE_THREAD):
        return PY_GROUPS[1]
    if py_name and "_poll_wrapper" in py_name:
        return PY_GROUPS[2]
    if py_name:
        return f"py thread {py_name.split(' ')[0]}"
    return f"grpc/native {comm}"


# ---------------------------------------------------------------------------------------------
# core executors (same submit/shutdown shape as the broker's one-thread ThreadPoolExecutor)
# ---------------------------------------------------------------------------------------------
class TimedExecutor(ThreadPoolExecutor):
    """The broker's one-thread core executor, counting how long each job waits and runs."""

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix=CORE_THREAD)
        self.calls = 0
        self.batches = 0
        self.busy = 0.0
        self.waited = 0.0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        queued = time.perf_counter()

        def timed() -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                done = time.perf_counter()
                self.calls += 1
                self.batches += 1
                self.waited += started - queued
                self.busy += done - started

        return super().submit(timed)


class InlineExecutor(TimedExecutor):
    """What-if: run each core call at once on the event loop thread (no thread hop; the loop
    blocks for the call, fsync included)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        started = time.perf_counter()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to the awaiting handler, as the executor would
            future.set_exception(error)
        self.calls += 1
        self.batches += 1
        self.busy += time.perf_counter() - started
        return future


class GroupCommitStore:
    """What-if group commit on one SqliteStore: inside ``batch()`` every ``transaction()`` is a
    SAVEPOINT of one outer BEGIN IMMEDIATE … COMMIT (one fsync for the batch), and ``read()``
    sees the batch's own writes. A call that raises rolls back only its savepoint. Outside a
    batch the store behaves as before. Patches the instance only."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.conn = store._conn
        self._local = threading.local()
        self._original_transaction = store.transaction
        self._original_read = store.read
        self._savepoints = 0
        store.transaction = self.transaction  # type: ignore[method-assign]
        store.read = self.read  # type: ignore[method-assign]

    def _in_batch(self) -> bool:
        return bool(getattr(self._local, "active", False))

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with self.store._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            self._local.active = True
            try:
                yield
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            else:
                self.conn.execute("COMMIT")
            finally:
                self._local.active = False

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SqliteTransaction]:
        if not self._in_batch():
            with self._original_transaction() as tx:
                yield tx
            return
        self._savepoints += 1
        name = f"gc{self._savepoints}"
        self.conn.execute(f"SAVEPOINT {name}")
        try:
            yield SqliteTransaction(self.conn)
        except BaseException:
            self.conn.execute(f"ROLLBACK TO {name}")
            self.conn.execute(f"RELEASE {name}")
            raise
        self.conn.execute(f"RELEASE {name}")

    @contextlib.contextmanager
    def read(self) -> Iterator[SqliteTransaction]:
        if not self._in_batch():
            with self._original_read() as tx:
                yield tx
            return
        yield SqliteTransaction(self.conn)


class GroupCommitExecutor(Executor):
    """What-if core thread with group commit: it takes every job queued so far (up to max_batch),
    runs them one after another inside one GroupCommitStore batch, commits once, and only then
    completes their futures, so no caller sees a result that is not durable. If the commit fails,
    every job of the batch fails (fail closed)."""

    def __init__(self, group: GroupCommitStore, max_batch: int = 128) -> None:
        self._group = group
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any], float] | None] = (
            queue.SimpleQueue()
        )
        self.calls = 0
        self.batches = 0
        self.busy = 0.0
        self.waited = 0.0
        self._thread = threading.Thread(target=self._work, name=f"{CORE_THREAD}-gc", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((future, partial(fn, *args, **kwargs), time.perf_counter()))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._queue.put(None)
        if wait:
            self._thread.join()

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            while len(jobs) < self._max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
            started = time.perf_counter()
            outcomes: list[tuple[Future[Any], bool, Any]] = []
            try:
                with self._group.batch():
                    for future, fn, queued in jobs:
                        self.waited += started - queued
                        if not future.set_running_or_notify_cancel():
                            continue
                        try:
                            outcomes.append((future, True, fn()))
                        except BaseException as error:  # goes to its own caller
                            outcomes.append((future, False, error))
            except BaseException as error:  # BEGIN or COMMIT failed: nothing of the batch is durable
                outcomes = [(f, False, error) for f, _, _ in jobs if not f.cancelled()]
            self.calls += len(jobs)
            self.batches += 1
            self.busy += time.perf_counter() - started
            for future, ok, value in outcomes:
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)


# ---------------------------------------------------------------------------------------------
# py-spy
# ---------------------------------------------------------------------------------------------
def py_spy_binary(explicit: str | None) -> str | None:
    """py-spy from --py-spy, next to this interpreter (the venv), or PATH."""
    if explicit:
        return explicit
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


BORING = ("threading.py", "concurrent/futures", "asyncio/base_events.py", "asyncio/runners.py",
          "multiprocessing/", "<module>", "bench/", "asyncio/events.py", "selectors.py",
          "contextlib.py")


def summarize_profile(raw: Path, top: int = 12, threads_shown: int = 4) -> None:
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
            leaves[thread][frames[-1][:110]] += count
        for frame in {f.split(" (")[0] for f in frames if not any(b in f for b in BORING)}:
            inclusive[thread][frame[:90]] += count
    if not total:
        print("    (no samples)")
        return
    for thread, count in threads.most_common(threads_shown):
        print(f"    {thread}: {100 * count / total:.0f}% of samples")
        for frame, n in inclusive[thread].most_common(top):
            print(f"      incl {100 * n / total:5.1f}%  {frame}")
        for frame, n in leaves[thread].most_common(6):
            print(f"      self {100 * n / total:5.1f}%  {frame}")


# ---------------------------------------------------------------------------------------------
# stream benches (relay.py, storm.py): processes
# ---------------------------------------------------------------------------------------------
def raise_nofile() -> int:
    """Raise this process's open-file limit to the hard limit (thousands of TLS connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pid_cpu(pid: int) -> float:
    """utime + stime of a process (seconds), any process of this user; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


def pid_memory(pid: int) -> dict[str, int]:
    """VmHWM (peak resident) and VmRSS of a process, in KiB; empty if it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


STORM_WHAT_IFS = {
    "no-presence-write": "Attach skips DeviceAuthority.record_presence (the durable last-seen "
    "write per attach): the upper bound of coalescing those writes",
    "switch-interval": "sys.setswitchinterval(0.0005) in the broker (Python default 0.005): "
    "shorter GIL hand-offs between the event loop and the core thread",
    "sync-normal": "PRAGMA synchronous=NORMAL on the broker's store connection (no fsync per "
    "commit; WAL still durable at checkpoints)",
}


class CountingExecutor(Executor):
    """Wraps the broker's own core executor (as shipped: group commit on one thread) without
    changing what it does; counts calls, and wall time and calls per core function (the time a
    call runs inside its batch; the batch's COMMIT is not in it)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.busy = 0.0
        self.waited = 0.0
        self.by_fn: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])

    @property
    def batches(self) -> int:
        return int(getattr(self.inner, "batches", self.calls))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        name = getattr(getattr(fn, "func", fn), "__qualname__", repr(fn))
        queued = time.perf_counter()

        def counted() -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - started
                self.calls += 1
                self.busy += spent
                self.waited += started - queued
                entry = self.by_fn[name]
                entry[0] += 1
                entry[1] += spent

        future: Future[Any] = self.inner.submit(counted)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.inner.shutdown(wait, cancel_futures=cancel_futures)


def serve_broker(home: str, conn: Any, overrides: dict[str, Any],
                 what_if: tuple[str, ...] = ()) -> None:
    """Broker child process: the broker as shipped (its own core executor, counted by
    CountingExecutor), unless what-ifs from STORM_WHAT_IFS are named; answers "stats" and "stop"
    over the pipe. Killing the process is an outage."""
    raise_nofile()
    if "switch-interval" in what_if:
        sys.setswitchinterval(0.0005)
    asyncio.run(_serve_broker(Path(home), conn, overrides, what_if))


async def _serve_broker(home: Path, conn: Any, overrides: dict[str, Any],
                        what_if: tuple[str, ...] = ()) -> None:
    from broker.service.server import BrokerServer

    server = BrokerServer(bench_config(home, **overrides))
    core = CountingExecutor(server.runtime.executor)  # the shipped executor, only counted
    server.runtime.executor = core
    if "no-presence-write" in what_if:
        server.runtime.devices.record_presence = (  # type: ignore[method-assign]
            lambda *_args, **_kwargs: None)
    if "sync-normal" in what_if:
        server.store._conn.execute("PRAGMA synchronous = NORMAL")
    ports = await server.start()
    conn.send(("ready", os.getpid(), ports, time.monotonic()))
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command == "stats":
            conn.send({
                "cpu": process_cpu(),
                "threads": thread_cpu(),
                "core_calls": core.calls,
                "core_batches": core.batches,
                "core_busy": core.busy,
                "core_waited": core.waited,
                "core_by_fn": {k: tuple(v) for k, v in core.by_fn.items()},
                "online": server.runtime.presence.online_count(),
                "live_sessions": server.runtime.relay.live_count(),
                **pid_memory(os.getpid()),
            })
        elif command == "stop":
            break
    await server.stop(0.5)
    conn.send("stopped")


class BrokerChild:
    """A broker in its own spawned process (own GIL). ports=None binds every listener to port 0;
    pass the ports of a previous broker to restart on the same addresses."""

    def __init__(self, home: Path, overrides: dict[str, Any] | None = None,
                 ports: dict[str, int] | None = None, what_if: tuple[str, ...] = ()) -> None:
        overrides = dict(overrides or {})
        if ports:
            for name in ("bootstrap", "main", "factory"):
                overrides[f"{name}_address"] = f"127.0.0.1:{ports[name]}"
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.spawned_at = time.monotonic()
        self.proc = ctx.Process(target=serve_broker,
                                args=(str(home), child, overrides, tuple(what_if)),
                                name="broker", daemon=True)
        self.proc.start()
        deadline = time.monotonic() + 120
        while not self._conn.poll(0.05):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("broker process did not start (see its traceback above)")
        _, self.pid, self.ports, self.ready_at = self._conn.recv()

    @property
    def main(self) -> str:
        return f"127.0.0.1:{self.ports['main']}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.ports['bootstrap']}"

    def stats(self) -> dict[str, Any]:
        self._conn.send("stats")
        if not self._conn.poll(60):
            raise RuntimeError("broker did not answer stats")
        stats: dict[str, Any] = self._conn.recv()
        return stats

    def kill(self) -> None:
        """SIGKILL: an outage, nothing is flushed or closed gracefully."""
        self.proc.kill()
        self.proc.join(10)

    def stop(self) -> None:
        if not self.proc.is_alive():
            return
        with contextlib.suppress(OSError, EOFError, BrokenPipeError):
            self._conn.send("stop")
            if self._conn.poll(30):
                self._conn.recv()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# ---------------------------------------------------------------------------------------------
# stream benches: provisioning before the broker starts (core API, no gRPC)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CameraCredentials:
    device_id: str
    key_pem: bytes
    chain_pem: bytes
    not_after: int
    renew_after: int


@dataclasses.dataclass(frozen=True)
class AppCredentials:
    """One app instance of one owner, and the camera that owner claimed (the one it watches)."""

    username: str
    user_id: str
    app_id: str
    spiffe_id: str
    key_pem: bytes
    chain_pem: bytes
    not_after: int
    renew_after: int
    device_id: str


@dataclasses.dataclass(frozen=True)
class ClientTrust:
    """What an SDK client holds after enrollment: roots, issuing CAs, token JWKS, bundle version."""

    ca_pem: bytes
    issuing_pem: str
    jwks_json: str
    version: str
    issuer: str
    trust_domain: str


class _FixedHasher:
    """Setup fake for PasswordHasher: every bench account gets one precomputed (real) hash."""

    def __init__(self, config: Config) -> None:
        from broker.accounts.passwords import PasswordHasher

        self._real = PasswordHasher(config)
        self._hash = self._real.hash(BENCH_PASSWORD)

    def hash(self, _password: str) -> str:
        return self._hash

    def verify(self, stored_hash: str | None, password: str) -> bool:
        return self._real.verify(stored_hash, password)


BENCH_PASSWORD = "bench-password-long-enough-0123"


def provision(config: Config, cameras: int, owners: int,
              progress: Callable[[str], None] | None = None
              ) -> tuple[list[CameraCredentials], list[AppCredentials], ClientTrust]:
    """Cameras and owners, made with the core API on the broker's database before it starts.

    Every camera enrolls with a one-time token and a key made "on the device"
    (DeviceAuthority.enroll_with_token: CSR check, issuance, store rows, audit). The first
    ``owners`` cameras each get an owner account with one app instance (Accounts) that claims the
    camera with its claim code (Ownership). Only this setup connection runs with
    synchronous=OFF; the broker opens its own connection (FULL) later.
    """
    from broker.accounts.users import Accounts
    from broker.client.device import make_csr
    from broker.clock import SystemClock, unix
    from broker.devices.enrollment import DeviceAuthority
    from broker.devices.ownership import Ownership
    from broker.identity.spiffe import operator
    from broker.pki.ca import load_authority, new_key
    from broker.pki.trust import load_trust_bundle
    from broker.protocol.tokens import load_keyring

    clock = SystemClock()
    store = SqliteStore(config.database)
    store._conn.execute("PRAGMA synchronous = OFF")
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    plain = serialization.NoEncryption()
    try:
        ca = load_authority(config, clock)
        authority = DeviceAuthority(config, ca, store, clock)
        actor = operator(config.trust_domain, "bench")
        width = max(5, len(str(cameras - 1)))
        cams: list[CameraCredentials] = []
        claim_codes: list[str] = []
        for i in range(cameras):
            device_id = f"cam-{i:0{width}d}"
            key = new_key()
            token = authority.create_enrollment_token(actor, device_id).token
            enrolled = authority.enroll_with_token(make_csr(key), token)
            issued = enrolled.issued
            cams.append(CameraCredentials(
                device_id, key.private_bytes(pem, pkcs8, plain), issued.chain_pem.encode(),
                unix(issued.not_after), unix(issued.renew_after)))
            claim_codes.append(enrolled.claim_code)
            if progress and (i + 1) % 2000 == 0:
                progress(f"{i + 1} cameras enrolled")
        accounts = Accounts(config, ca, store, clock, _FixedHasher(config))  # type: ignore[arg-type]
        ownership = Ownership(config, store, clock)
        apps: list[AppCredentials] = []
        for i in range(owners):
            username = f"owner{i:0{width}d}"
            accounts.create_account(username, BENCH_PASSWORD)
            with store.read() as tx:
                user = tx.get_user_by_username(username)
            assert user is not None
            key = new_key()
            app = accounts.issue_app_certificate(user, make_csr(key), "bench phone")
            ownership.claim(app.identity, cams[i].device_id, claim_codes[i])
            apps.append(AppCredentials(
                username, user.user_id, app.identity.app_id, app.identity.spiffe_id,
                key.private_bytes(pem, pkcs8, plain), app.issued.chain_pem.encode(),
                unix(app.issued.not_after), unix(app.issued.renew_after), cams[i].device_id))
        bundle = load_trust_bundle(config, load_keyring(config.certs_dir).jwks_json())
        trust = ClientTrust(bundle.ca_certificates_pem.encode(), bundle.issuing_certificates_pem,
                            bundle.jwks_json, bundle.version, config.broker_spiffe_id,
                            config.trust_domain)
        return cams, apps, trust
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# stream benches: the SDK clients, identities held in memory instead of state directories
# ---------------------------------------------------------------------------------------------
def _sdk() -> Any:
    """The SDK modules, imported lazily so that importing bench._common stays light."""
    import broker.client.app as app_sdk
    import broker.client.device as device_sdk
    import broker.client.simcam as simcam

    return app_sdk, device_sdk, simcam


def stamped_payload(device_id: str, session_id: str, sequence: int, stamp_ns: int,
                    size: int) -> bytes:
    """simcam.frame_payload with a CLOCK_MONOTONIC stamp (ns) as the first padding field:
    ``device_id|session_id|sequence|stamp|....``; simcam.parse_payload still reads it."""
    head = f"{device_id}|{session_id}|{sequence}|{stamp_ns}|".encode()
    return head + b"." * max(0, size - len(head))


def parse_stamp(plaintext: bytes) -> int:
    """The monotonic stamp (ns) stamped_payload wrote."""
    return int(plaintext.split(b"|", 4)[3])


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(attempt-1)))."""
    return random.uniform(0, min(cap, base * 2 ** max(0, attempt - 1)))


def make_device_client(cred: CameraCredentials, main: str, trust: ClientTrust,
                       verifier: Any) -> Any:
    """A DeviceClient (SDK) holding its enrolled identity in memory: attach, the stream
    handshake and frame sealing are the SDK's own code; only file reads are replaced."""
    _, device_sdk, _ = _sdk()
    from broker.identity.spiffe import device

    class MemoryDeviceClient(device_sdk.DeviceClient):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:  # no state directory
            self.endpoints = device_sdk.Endpoints("", main)
            spiffe_id = device(trust.trust_domain, cred.device_id).spiffe_id
            self._state = device_sdk.DeviceState(cred.device_id, spiffe_id, cred.not_after,
                                                 cred.renew_after, trust.version)
            self._verifier = device_sdk.DeviceTokenVerifier(verifier, spiffe_id)
            self._key: Any = None

        @property
        def state(self) -> Any:
            return self._state

        def channel(self) -> grpc.aio.Channel:
            from broker.client.channels import mtls_channel

            return mtls_channel(main, trust.ca_pem, cred.key_pem, cred.chain_pem)

        def token_verifier(self, clock: Any = None) -> Any:
            return self._verifier

        def private_key(self) -> Any:
            if self._key is None:
                self._key = serialization.load_pem_private_key(cred.key_pem, None)
            return self._key

        def save_trust_bundle(self, bundle: Any) -> None:
            return None

        def explained(self, error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
            # The SDK's own diagnosis of a failed handshake, from the bytes held in memory.
            reason = device_sdk.explain_handshake_failure(error, trust.ca_pem, cred.chain_pem)
            return error if reason is None else device_sdk.TlsHandshakeFailed(error, reason)

    return MemoryDeviceClient()


def make_app_client(cred: AppCredentials, main: str, trust: ClientTrust, trust_path: Path) -> Any:
    """An AppClient (SDK) with its identity in memory; open_session, watch and the hello/frame
    verification are the SDK's own code. trust_path: a bundle file written by write_trust_file."""
    app_sdk, device_sdk, _ = _sdk()
    leaf = x509.load_pem_x509_certificate(cred.chain_pem)
    from broker.protocol.tokens import cert_thumbprint

    thumb = cert_thumbprint(leaf.public_bytes(serialization.Encoding.DER))

    class MemoryAppClient(app_sdk.AppClient):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:  # no state directory
            self.endpoints = device_sdk.Endpoints("", main)
            self.dir = trust_path.parent
            self._state = app_sdk.AppState(cred.user_id, cred.app_id, cred.spiffe_id,
                                           cred.not_after, cred.renew_after)

        @property
        def state(self) -> Any:
            return self._state

        @property
        def trust_path(self) -> Path:
            return trust_path

        def channel(self) -> grpc.aio.Channel:
            from broker.client.channels import mtls_channel

            return mtls_channel(main, trust.ca_pem, cred.key_pem, cred.chain_pem)

        def thumbprint(self) -> str:
            return thumb

    return MemoryAppClient()


def write_trust_file(path: Path, trust: ClientTrust) -> Path:
    """The SDK's on-disk trust bundle (what enrollment would have saved)."""
    from broker._proto.broker.v1 import common_pb2
    from broker.client.bundle import save_bundle

    save_bundle(path, common_pb2.TrustBundle(
        ca_certificates_pem=trust.ca_pem.decode(), issuing_certificates_pem=trust.issuing_pem,
        jwks_json=trust.jwks_json, version=trust.version))
    return path


def token_verifier(trust: ClientTrust) -> Any:
    """One TokenVerifier (stateless) shared by every camera of a process."""
    from broker.clock import SystemClock
    from broker.protocol.tokens import TokenVerifier

    return TokenVerifier(trust.jwks_json, trust.issuer, SystemClock())


def stamped_camera(client: Any, fps: float, frame_bytes: int, random_phase: bool = True) -> Any:
    """simcam.SimulatedCamera whose frames carry a monotonic stamp taken just before the frame is
    handed to the SDK (AttachSession.send_frame seals and writes it), sent on a fixed schedule
    (no drift), starting at a random phase of the frame interval unless random_phase is False
    (then every stream a watcher starts at once sends in step: the worst case); ``late`` collects how late each frame left versus its schedule (seconds): when
    that grows, the client process itself is saturated."""
    _, _, simcam = _sdk()

    class StampedCamera(simcam.SimulatedCamera):  # type: ignore[misc, name-defined]
        late: list[float]

        async def _stream(self, session: Any, stream: Any) -> None:
            interval = 1.0 / self.fps
            device_id = self.client.state.device_id
            due = time.monotonic()
            if random_phase:  # independent cameras: frame clocks not in step with each other
                due += random.uniform(0, interval)
                await asyncio.sleep(due - time.monotonic())
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                while True:
                    now = time.monotonic()
                    self.late.append(now - due)
                    sequence = stream.sealer.sequence + 1
                    await session.send_frame(stream, stamped_payload(
                        device_id, stream.session_id, sequence, time.monotonic_ns(),
                        self.frame_bytes))
                    self.stats.frames_sent += 1
                    due += interval
                    delay = due - time.monotonic()
                    if delay < -interval:  # more than a frame behind: skip, do not burst
                        due = time.monotonic()
                        delay = 0.0
                    await asyncio.sleep(max(0.0, delay))

    camera = StampedCamera(client, fps=fps, frame_bytes=frame_bytes)
    camera.late = []
    return camera


def listen_overflows() -> int:
    """TcpExt ListenOverflows of this machine (/proc/net/netstat): SYNs dropped because a
    listener's accept queue was full; each costs the client a SYN retransmit (1 s, then 3 s, ...)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


def others_busy(pids: list[int], seconds: float = 1.0) -> float:
    """Cores kept busy over `seconds` by processes other than pids (and this one)."""
    ncpu = os.cpu_count() or 1
    ours0 = sum(pid_cpu(p) for p in pids) + process_cpu()
    m0 = machine_cpu()
    time.sleep(seconds)
    ours1 = sum(pid_cpu(p) for p in pids) + process_cpu()
    m1 = machine_cpu()
    busy, _, total = (b - a for a, b in zip(m0, m1, strict=True))
    machine = ncpu * busy / total if total else 0.0
    return max(0.0, machine - (ours1 - ours0) / seconds)


def wait_quiet(pids: list[int], below: float, max_wait: float) -> tuple[float, float]:
    """On a shared machine: wait (up to max_wait s) until other processes use < `below` cores.
    Returns (seconds waited, the last sample of their load in cores)."""
    started = time.monotonic()
    load = others_busy(pids, 0.5)
    while load >= below and time.monotonic() - started < max_wait:
        load = others_busy(pids, 1.0)
    return time.monotonic() - started, load


def count_unretrieved(counts: Any, key: str = "unretrieved task errors") -> None:
    """On the running loop, count (instead of printing) "Task exception was never retrieved":
    the SDK's shielded writes fail that way when their caller already left (a failed Attach).
    Every other loop error keeps the default handler."""
    loop = asyncio.get_running_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith("Task exception was never retrieved"):
            counts[key] += 1
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
