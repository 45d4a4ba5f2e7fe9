"""Keeping a camera attached across replica crashes and drains.

After any end of its Attach stream a camera waits and attaches again, to whichever replica takes
the new connection. The wait is exponential backoff with *full jitter*: before retry n (counted
from 0 since the last stable attach) it sleeps ``uniform(0, min(cap, base * 2**n))``, so a fleet
that lost its replica at the same moment comes back spread out instead of as a storm. A retry
delay the broker pushed back (google.rpc.RetryInfo in the ``grpc-status-details-bin`` trailer) is
a floor: the camera waits that long plus its jitter.

It stops for good when the broker refuses the camera itself: PERMISSION_DENIED or UNAUTHENTICATED
(revoked, expired, or the stream was *replaced by a newer Attach* of the same device, i.e. another
instance of this camera is live and must not be fought), or a TLS handshake that can only be
fixed by re-enrolling.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field

import grpc

BASE_DELAY = 0.5
MAX_DELAY = 30.0
STABLE_AFTER = 10.0  # an attach that lasted this long resets the backoff
REPLACED_MARKERS = ("replaced by a newer attach", "superseded")


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And
    Jitter"): delay n is uniform(0, min(cap, base * 2**n))."""

    def __init__(
        self,
        base: float = BASE_DELAY,
        cap: float = MAX_DELAY,
        rng: random.Random | None = None,
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()  # noqa: S311 (spreading load, not a secret)

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # 2**attempt grows without bound; stop doubling once past the cap.
        return min(self.cap, self.base * float(2 ** min(self.attempt, 64)))

    def next_delay(self, pushback: float = 0.0) -> float:
        """The delay before the next attempt (counts the attempt): the jitter, plus the server's
        pushback when it sent one."""
        delay = self._rng.uniform(0, self.ceiling())
        self.attempt += 1
        return max(0.0, pushback) + delay

    def reset(self) -> None:
        self.attempt = 0


def retry_pushback(error: grpc.RpcError) -> float:
    """Seconds the broker asked us to wait (google.rpc.RetryInfo in the status details), or 0."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    if not trailing:
        return 0.0
    from google.protobuf.message import DecodeError
    from google.rpc import error_details_pb2, status_pb2

    for key, value in trailing:
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return 0.0
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                delay = info.retry_delay
                return max(0.0, float(delay.seconds) + float(delay.nanos) / 1e9)
    return 0.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do after an Attach stream ended."""

    retry: bool
    reason: str  # "reconnect", "replaced", "refused" or "reenroll"
    pushback: float = 0.0


def judge(error: grpc.RpcError | None) -> Verdict:
    """Retry or stop, after an Attach stream ended with error (None: the broker closed it)."""
    if error is None:
        return Verdict(True, "reconnect")
    from broker.client.device import TlsHandshakeFailed

    if isinstance(error, TlsHandshakeFailed):
        return Verdict(False, "reenroll")  # the trust bundle or certificate must be replaced
    code = error.code()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        details = (error.details() or "").lower()
        if any(marker in details for marker in REPLACED_MARKERS):
            return Verdict(False, "replaced")
        return Verdict(False, "refused")
    return Verdict(True, "reconnect", retry_pushback(error))


@dataclass
class ReconnectStats:
    """Counters for tests and dashboards."""

    attaches: int = 0  # Attach attempts
    stable_attaches: int = 0  # attaches that lasted STABLE_AFTER (each reset the backoff)
    delays: list[float] = field(default_factory=list)  # every reconnect delay chosen
    ends: list[str] = field(default_factory=list)  # "CODE: details" of every end
    stop_reason: str = ""  # "stopped", "replaced", "refused" or "reenroll"


@dataclass(frozen=True, slots=True)
class AttachEnd:
    """How one attach ended: the error (None when the broker closed the stream cleanly) and how
    long it had been accepted (None when it never was)."""

    error: grpc.RpcError | None
    attached_for: float | None


@dataclass(frozen=True, slots=True)
class Stopped:
    """Why run_forever returned: "stopped" (the stop event) or a Verdict reason, with the error."""

    reason: str
    error: grpc.RpcError | None = None


Sleep = Callable[[float], Awaitable[None]]


class Reconnector:
    """Runs attach_once until stop is set or the broker refuses the camera."""

    def __init__(
        self,
        backoff: Backoff | None = None,
        *,
        sleep: Sleep | None = None,
        stable_after: float = STABLE_AFTER,
    ) -> None:
        self.backoff = backoff or Backoff()
        self.stable_after = stable_after
        self.stats = ReconnectStats()
        self._sleep = sleep

    async def _wait(self, delay: float, stop: asyncio.Event) -> None:
        if self._sleep is not None:
            await self._sleep(delay)
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)

    async def run(
        self, attach_once: Callable[[], Awaitable[AttachEnd]], stop: asyncio.Event
    ) -> Stopped:
        """Attach, and after every end wait (backoff) and attach again, until stop or refusal."""
        while not stop.is_set():
            self.stats.attaches += 1
            attempt = asyncio.ensure_future(attach_once())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({attempt, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                if not attempt.done():
                    attempt.cancel()
                    with suppress(asyncio.CancelledError):
                        await attempt
            if stop.is_set() and (attempt.cancelled() or attempt.exception() is None):
                break
            end = attempt.result()
            error = end.error
            self.stats.ends.append(
                "closed" if error is None else f"{error.code().name}: {error.details()}"
            )
            if end.attached_for is not None and end.attached_for >= self.stable_after:
                self.stats.stable_attaches += 1
                self.backoff.reset()
            verdict = judge(error)
            if not verdict.retry:
                self.stats.stop_reason = verdict.reason
                return Stopped(verdict.reason, error)
            delay = self.backoff.next_delay(verdict.pushback)
            self.stats.delays.append(delay)
            await self._wait(delay, stop)
        self.stats.stop_reason = "stopped"
        return Stopped("stopped")
