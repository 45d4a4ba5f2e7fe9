"""The broker child process: one BrokerServer, configured as shipped unless a what-if says
otherwise, in its own spawned process (own GIL) on a bench home; it answers "stats" and "stop"
over a pipe, and can be killed (an outage) and restarted on the same ports.

What-ifs change only this process and go through public settings and classes: the core executor
(the shipped group commit with another batch size, or inline on the event loop), the GIL switch
interval, skipping the durable presence write, and SQLite's synchronous mode
(Config.sqlite_synchronous, applied by the store itself). The broker's store is whatever its
config names (``store_url``: SQLite by default, or PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Executor, Future
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from bench.harness.stats import pid_cpu, pid_memory, process_cpu, raise_nofile, thread_cpu
from broker.config import Config

LOAD_GENERATOR_CAP = 100_000  # connections per address: above any bench's client count


def bench_config(home: Path, **overrides: Any) -> Config:
    """A broker config in home with every listener on port 0."""
    return Config(
        home=home,
        bootstrap_address="127.0.0.1:0",
        main_address="127.0.0.1:0",
        factory_address="127.0.0.1:0",
        metrics_address="127.0.0.1:0",  # a free port each (several brokers per host)
        # Every simulated camera and app connects from 127.0.0.1: the gate stays in the path
        # (its cost is measured) but its per-address cap must not refuse the load generator.
        max_connections_per_address=LOAD_GENERATOR_CAP,
    ).with_overrides(**overrides)


@dataclasses.dataclass(frozen=True)
class WhatIf:
    """Broker tweaks for evidence; the default is the broker exactly as shipped."""

    switch_interval: float | None = None  # sys.setswitchinterval in the broker (Python: 0.005)
    max_batch: int | None = None  # group commit with at most N calls per COMMIT (1: per call)
    inline_core: bool = False  # core calls on the event loop thread, COMMIT per call
    no_presence_write: bool = False  # Attach skips the durable last-seen write
    synchronous: str | None = None  # SQLite synchronous mode (Config.sqlite_synchronous)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v}

    def check(self, stores: list[str] | None = None) -> None:
        """SQLite-only what-ifs (synchronous mode, group-commit batch size) refuse other stores."""
        sqlite_only = {"synchronous": self.synchronous, "max_batch": self.max_batch}
        if any(sqlite_only.values()) and any(s != "sqlite" for s in stores or ["sqlite"]):
            raise SystemExit(
                f"{', '.join(k for k, v in sqlite_only.items() if v)}: SQLite-only what-ifs "
                "(PostgreSQL commits each call on its own); run them with --store sqlite"
            )


class InlineExecutor(Executor):
    """What-if: run each core call at once on the calling (event loop) thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to the awaiting handler, as the executor would
            future.set_exception(error)
        return future


class CountingExecutor(Executor):
    """Wraps the broker's core executor without changing what it does: counts calls, the wall
    time each call runs (its batch's COMMIT not included) and waits, per core function."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.calls = 0
        self.busy = 0.0
        self.waited = 0.0
        self.by_fn: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])

    @property
    def batches(self) -> int:
        return int(getattr(self.inner, "batches", self.calls))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        # Not getattr(..., repr(fn)): the default would be built on every call, and a repr of a
        # partial of dataclasses and certificates cost the measured event loop ~4%.
        name = getattr(getattr(fn, "func", fn), "__qualname__", None) or type(fn).__name__
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


def _serve(home: str, conn: Connection, overrides: dict[str, Any], what_if: WhatIf) -> None:
    raise_nofile()
    if what_if.switch_interval:
        sys.setswitchinterval(what_if.switch_interval)
    asyncio.run(_serve_async(Path(home), conn, overrides, what_if))


async def _serve_async(
    home: Path, conn: Connection, overrides: dict[str, Any], what_if: WhatIf
) -> None:
    from broker.service.server import BrokerServer
    from broker.store.groupcommit import GroupCommitExecutor

    if what_if.synchronous:
        overrides = {**overrides, "sqlite_synchronous": what_if.synchronous}
    server = BrokerServer(bench_config(home, **overrides))
    runtime = server.runtime
    inner = runtime.executor
    if what_if.inline_core or what_if.max_batch:
        inner.shutdown()
        inner = (
            InlineExecutor()
            if what_if.inline_core
            else GroupCommitExecutor(server.store, what_if.max_batch or 1)
        )
    core = CountingExecutor(inner)
    runtime.executor = core
    if what_if.no_presence_write:
        runtime.devices.record_presence = lambda *_a, **_k: None  # type: ignore[method-assign]
    ports = await server.start()
    conn.send(("ready", os.getpid(), ports, time.monotonic()))
    loop = asyncio.get_running_loop()
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command == "stats":
            conn.send(
                {
                    "cpu": process_cpu(),
                    "threads": thread_cpu(),
                    "core_calls": core.calls,
                    "core_batches": core.batches,
                    "core_busy": core.busy,
                    "core_waited": core.waited,
                    "core_by_fn": {k: tuple(v) for k, v in core.by_fn.items()},
                    "online": runtime.presence.online_count(),
                    "live_sessions": runtime.relay.live_count(),
                    **pid_memory(os.getpid()),
                }
            )
        elif command == "stop":
            break
    await server.stop(0.5)
    conn.send("stopped")


class BrokerChild:
    """A broker in its own spawned process. ports=None binds every listener to port 0; pass
    the ports of a previous broker to restart on the same addresses."""

    def __init__(
        self,
        home: Path,
        overrides: dict[str, Any] | None = None,
        ports: dict[str, int] | None = None,
        what_if: WhatIf = WhatIf(),
    ) -> None:
        overrides = dict(overrides or {})
        for name, port in (ports or {}).items():
            overrides[f"{name}_address"] = f"127.0.0.1:{port}"
        ctx = mp.get_context("spawn")
        self.what_if = what_if
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve, args=(str(home), child, overrides, what_if), name="broker", daemon=True
        )
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
        stop_child(self._conn, self.proc, answer_within=30)


# ---------------------------------------------------------------------------------------------
# the broker as shipped from its command line: `broker serve [--workers N]`
# ---------------------------------------------------------------------------------------------
PUBLIC = ("bootstrap", "main", "factory")


def stop_child(conn: Connection, proc: BaseProcess, answer_within: float = 10) -> None:
    """Stop a server child driven over a pipe: ask it ("stop"), wait for its answer and exit,
    kill it if it does not go."""
    if not proc.is_alive():
        return
    with contextlib.suppress(OSError, EOFError, BrokenPipeError):
        conn.send("stop")
        if conn.poll(answer_within):
            conn.recv()
    proc.join(10)
    if proc.is_alive():
        proc.kill()


def free_ports(names: tuple[str, ...] = PUBLIC) -> dict[str, int]:
    """A free port per name (bound to port 0 and released): fixed ports for replicas that
    share them with SO_REUSEPORT (port 0 would give every replica a port of its own)."""
    ports: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        for name in names:
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports[name] = s.getsockname()[1]
    return ports


def child_pids(pid: int) -> list[int]:
    """Direct children of pid (/proc/<pid>/task/*/children)."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    return pids


def replica_of(pid: int) -> str:
    """The --replica argument on pid's command line ('' if none)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
    except OSError:
        return ""
    return argv[argv.index("--replica") + 1] if "--replica" in argv else ""


def replica_names(workers: int) -> list[str]:
    """The replicas a broker start runs: r1 (in-process or one worker), r1..rN (--workers N)."""
    return [f"r{i}" for i in range(1, max(1, workers) + 1)]


class ServeChild:
    """`broker serve` as an operator runs it (``-m broker.cli --home H serve``), store and public
    ports by environment (BROKER_STORE, BROKER_*_ADDRESS); with workers > 1 it is ``serve
    --workers N``: N replica processes r1..rN sharing the public ports (SO_REUSEPORT). Same
    surface as BrokerChild (pid, ports, main, bootstrap, ready_at, stats, kill, stop), but the
    broker's insides are not reachable: stats() gives the CPU and memory of every replica
    process (from /proc), no per-thread or core-thread counters. Output goes to
    ``<home>/var/serve-<n>.log``."""

    starts = 0

    def __init__(
        self,
        config: Config,
        workers: int = 1,
        ports: dict[str, int] | None = None,
        drain_window: float | None = None,
    ) -> None:
        self.config, self.workers = config, workers
        self.ports = dict(ports or free_ports())
        env = {**os.environ, **{f"BROKER_{n.upper()}_ADDRESS": self.address(n) for n in PUBLIC}}
        env.setdefault("BROKER_MAX_CONNECTIONS_PER_ADDRESS", str(LOAD_GENERATOR_CAP))
        if config.store_url:
            env["BROKER_STORE"] = config.store_url
        command = [sys.executable, "-m", "broker.cli", "--home", str(config.home), "serve"]
        if workers > 1:
            command += ["--workers", str(workers)]
        if drain_window is not None:
            command += ["--drain-window", f"{drain_window:g}"]
        ServeChild.starts += 1
        self.log = config.home / "var" / f"serve-{ServeChild.starts}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid = self.proc.pid
        self.wait_serving(workers, 0)
        self.ready_at = time.monotonic()

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    @property
    def main(self) -> str:
        return self.address("main")

    @property
    def bootstrap(self) -> str:
        return self.address("bootstrap")

    def serving_lines(self, offset: int = 0) -> list[str]:
        """The "broker serving: ..." lines the replicas printed after byte offset of the log."""
        with open(self.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        return [line for line in text.splitlines() if line.startswith("broker serving:")]

    def wait_serving(self, count: int, offset: int, timeout: float = 120) -> None:
        """Until `count` replicas printed their serving line (listeners up, health SERVING)."""
        deadline = time.monotonic() + timeout
        while len(self.serving_lines(offset)) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"broker serve did not come up; see {self.log}")
            time.sleep(0.05)

    def replicas(self) -> dict[str, int]:
        """Replica name -> pid of every live replica process."""
        if self.workers == 1:
            return {self.config.replica_name: self.pid} if self.proc.poll() is None else {}
        return {replica_of(p): p for p in child_pids(self.pid)}

    def stats(self) -> dict[str, Any]:
        pids = [self.pid, *child_pids(self.pid)]
        memory = [pid_memory(p) for p in pids]
        return {
            "cpu": sum(pid_cpu(p) for p in pids),
            "threads": {},
            "core_calls": 0,
            "core_batches": 0,
            "core_busy": 0.0,
            "core_waited": 0.0,
            "core_by_fn": {},
            "VmHWM": sum(m.get("VmHWM", 0) for m in memory),
            "VmRSS": sum(m.get("VmRSS", 0) for m in memory),
        }

    def kill(self) -> None:
        """SIGKILL every replica and the supervisor: an outage of the whole host."""
        for pid in [*child_pids(self.pid), self.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGINT: every replica stops at once (no drain)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


Broker = BrokerChild | ServeChild
