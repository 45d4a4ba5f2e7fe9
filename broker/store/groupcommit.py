"""The core thread, with group commit: one fsync per batch of store-touching calls.

Measured (bench/sessions.py): a per-call COMMIT with synchronous=FULL made the single core thread
the bottleneck (fsync ~0.2-3 ms); batching doubled OpenSession throughput without weakening
durability. Results are released only after the batch's COMMIT, so nothing a caller is told is
ever lost; if the COMMIT fails, every call of the batch fails (fail closed, I10).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from functools import partial
from typing import Any

from broker.store.base import Store

MAX_BATCH = 128
Job = tuple[Future[Any], Callable[[], Any]]


class GroupCommitExecutor(Executor):
    """A one-thread executor that runs queued calls inside one ``store.batch()``."""

    def __init__(self, store: Store, max_batch: int = MAX_BATCH, name: str = "broker-core") -> None:
        self._store = store
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.calls = 0
        self.batches = 0
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((future, partial(fn, *args, **kwargs)))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._queue.put(None)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _take_batch(self, first: Job) -> tuple[list[Job], bool]:
        jobs, stopping = [first], False
        while len(jobs) < self._max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stopping = True
                break
            jobs.append(job)
        return jobs, stopping

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            jobs, stopping = self._take_batch(first)
            outcomes: list[tuple[Future[Any], bool, Any]] = []
            try:
                with self._store.batch():
                    for future, fn in jobs:
                        if not future.set_running_or_notify_cancel():
                            continue  # its caller gave up before it started: nothing done
                        try:
                            outcomes.append((future, True, fn()))
                        except (
                            BaseException
                        ) as error:  # the caller's own error, its savepoint undone
                            outcomes.append((future, False, error))
            except (
                BaseException
            ) as error:  # BEGIN or COMMIT failed: nothing of the batch is durable
                outcomes = [(f, False, error) for f, _ in jobs if f.running()]
            self.calls += len(jobs)
            self.batches += 1
            for future, ok, value in outcomes:
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
