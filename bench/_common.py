"""Helpers shared by the benchmarks: config, percentiles, CPU accounting, a timed core executor,
a group-commit what-if for the SQLite store, and py-spy profile summaries.

bench/enroll.py predates this module and keeps its own copies; new benchmarks import from here.
Nothing here changes the broker: what-ifs patch one store object inside the bench's own process.
"""

from __future__ import annotations

import contextlib
import os
import queue
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
