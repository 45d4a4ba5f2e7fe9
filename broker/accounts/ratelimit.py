"""Failure counters over a sliding window, for login and claim-code throttling (I8)."""

from __future__ import annotations

import threading
from collections import deque

from broker.clock import Clock
from broker.errors import ResourceExhausted

MAX_KEYS = 200_000


class FailureLimiter:
    """Allows at most ``limit`` failures per key within ``window`` seconds."""

    def __init__(self, clock: Clock, limit: int, window: float, what: str) -> None:
        self._clock = clock
        self._limit = limit
        self._window = window
        self._what = what
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        events = self._failures.get(key)
        if events is None:
            return deque()
        while events and events[0] <= now - self._window:
            events.popleft()
        if not events:
            del self._failures[key]
        return events

    def check(self, key: str) -> None:
        """Raise ResourceExhausted (with a retry delay) when key has used up its failures."""
        now = self._clock.now().timestamp()
        with self._lock:
            events = self._recent(key, now)
            if len(events) >= self._limit:
                retry = max(1.0, events[0] + self._window - now)
                raise ResourceExhausted(f"too many {self._what}; retry in {int(retry)} s", retry)

    def fail(self, key: str) -> None:
        """Count one failure for key."""
        now = self._clock.now().timestamp()
        with self._lock:
            if len(self._failures) >= MAX_KEYS:
                self._failures.pop(next(iter(self._failures)))
            self._failures.setdefault(key, deque()).append(now)

    def reset(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)
