"""Time source, injectable so tests can move the clock."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Protocol


class Clock(Protocol):
    """Returns the current time as an aware UTC datetime."""

    def now(self) -> dt.datetime: ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class FakeClock:
    """A clock tests move by hand; starts at the real time unless told otherwise."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime.now(dt.UTC)
        self._lock = threading.Lock()

    def now(self) -> dt.datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += dt.timedelta(seconds=seconds)


def unix(moment: dt.datetime) -> int:
    """Whole Unix seconds of an aware datetime."""
    return int(moment.timestamp())


def monotonic() -> float:
    """Monotonic seconds, for measuring intervals."""
    return time.monotonic()


def now_s(clock: Clock) -> int:
    """The clock's time in whole Unix seconds (what the store records)."""
    return unix(clock.now())


def now_ms(clock: Clock) -> int:
    """The clock's time in Unix milliseconds (audit entries order by it)."""
    return int(clock.now().timestamp() * 1000)
