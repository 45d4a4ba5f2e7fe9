"""The event feed of one replica: a thread that reads other replicas' events in seq order.

Starts at the newest seq when the replica starts (earlier events are history: their changes are in
the store this replica reads). Then it loops: wait for a notification (PostgreSQL LISTEN/NOTIFY) or
the poll interval, read ``events_after(last)`` and hand every event another replica appended to a
callback on the asyncio loop via ``call_soon_threadsafe``; nothing else here touches asyncio. A read
that fails is retried on the next turn; ``stale_for()`` says how long the feed has gone without a
successful read, so the service can refuse new sessions when it cannot know about revocations
(fail closed, I10).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from broker.store import EventRecord, Store

log = logging.getLogger(__name__)

WAIT_SECONDS = 0.5
BATCH = 500
EventCallback = Callable[[EventRecord], None]


class EventFeed:
    """Delivers events whose origin is not this replica to a callback on the event loop."""

    def __init__(
        self,
        store: Store,
        replica: str,
        callback: EventCallback,
        *,
        wait_seconds: float = WAIT_SECONDS,
        batch: int = BATCH,
    ) -> None:
        self._store = store
        self._replica = replica
        self._callback = callback
        self._wait = wait_seconds
        self._batch = batch
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_seq = 0
        self._last_read = time.monotonic()

    @property
    def last_seq(self) -> int:
        """The newest seq read so far."""
        return self._last_seq

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Read the current end of the feed, then follow it on a daemon thread. Call from the
        event loop (or pass the loop the callback must run on)."""
        if self._thread is not None:
            raise RuntimeError("the event feed is already started")
        self._loop = loop or asyncio.get_running_loop()
        with self._store.read() as tx:
            self._last_seq = tx.last_event_seq()
        self._last_read = time.monotonic()
        self._thread = threading.Thread(
            target=self._follow, name=f"event-feed-{self._replica}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop following (the current wait ends within the poll interval)."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def stale_for(self) -> float:
        """Seconds since the last successful read of the feed."""
        return max(0.0, time.monotonic() - self._last_read)

    # -- the feed thread -------------------------------------------------------------------------
    def _follow(self) -> None:
        failing = False
        while not self._stopping.is_set():
            try:
                self._read_all()
                if failing:
                    log.info("event feed of %s reads again", self._replica)
                failing = False
            except Exception:
                if not failing:
                    log.exception("event feed of %s cannot read the store", self._replica)
                failing = True
            if self._stopping.is_set():
                break
            try:
                self._store.wait_for_events(self._wait)
            except Exception:
                if not failing:
                    log.exception("event feed of %s cannot wait for events", self._replica)
                failing = True
                self._stopping.wait(self._wait)

    def _read_all(self) -> None:
        while True:
            with self._store.read() as tx:
                events = tx.events_after(self._last_seq, self._batch)
            self._last_read = time.monotonic()
            for event in events:
                self._last_seq = max(self._last_seq, event.seq)
                if event.origin != self._replica:
                    self._deliver(event)
            if len(events) < self._batch or self._stopping.is_set():
                return

    def _deliver(self, event: EventRecord) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._callback, event)
        except RuntimeError:  # the loop is closed: the replica is stopping
            self._stopping.set()
