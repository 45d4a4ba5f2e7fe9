"""What the gRPC handlers share: config, core authorities, presence, and the store thread."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import random
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from broker.accounts.users import Accounts
from broker.clock import Clock
from broker.cluster.feed import EventFeed
from broker.config import Config
from broker.devices.enrollment import DeviceAuthority
from broker.devices.ownership import Ownership
from broker.errors import ResourceExhausted
from broker.pki.expired import ExpiredRenewals
from broker.pki.reload import PkiReloader
from broker.pki.trust import TrustBundle
from broker.service.gate import ClientAddresses
from broker.sessions.attachments import Attachments
from broker.sessions.presence import Presence
from broker.sessions.relay import Relay
from broker.sessions.sessions import Sessions
from broker.store import Store

CRL_CACHE_SECONDS = 60.0
P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class Runtime:
    """Shared state of one running broker. Core calls that touch the store or sign run on a
    dedicated thread so the event loop keeps serving streams while SQLite fsyncs."""

    config: Config
    clock: Clock
    devices: DeviceAuthority
    presence: Presence
    trust_bundle: TrustBundle
    accounts: Accounts
    ownership: Ownership
    sessions: Sessions
    relay: Relay
    pki: PkiReloader
    store: Store
    attachments: Attachments
    replica: str = "r1"  # this process's replica name (config.replica_name)
    feed: EventFeed | None = None  # other replicas' events; stale -> refuse new sessions (I10)
    # Renewal after expiry (Bootstrap.RenewExpiredCertificate); None: refused (UNAVAILABLE).
    expired: ExpiredRenewals | None = None
    # Store-touching and signing calls run here; the broker passes a GroupCommitExecutor.
    executor: Executor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="broker-core")
    )
    # argon2 takes tens of milliseconds and releases the GIL: keep it off the core thread.
    password_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="broker-pw")
    )

    # Store-free request work (CSR checks, certificate and session-token signing) runs here,
    # off the core thread that holds the store's writer: the writer's transactions hold SQL only.
    signing_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="broker-sign")
    )

    # Client addresses behind the connection gates (the listeners see the gates' loopback).
    clients: ClientAddresses = field(default_factory=ClientAddresses)
    crl_source: Callable[[], str] = lambda: ""
    _crl_cache: tuple[float, str] = (0.0, "")
    _queued: int = 0  # core calls submitted and not yet finished

    def current_crl_pem(self) -> str:
        """The CRLs, rebuilt at most once a minute (runs on the core thread)."""
        import time

        built_at, pem = self._crl_cache
        if time.monotonic() - built_at > CRL_CACHE_SECONDS or not pem:
            pem = self.crl_source()
            self._crl_cache = (time.monotonic(), pem)
        return pem

    def require_fresh_feed(self) -> None:
        """Fail closed (I10): refuse new sessions while other replicas' events may be missed."""
        if self.feed is not None:
            from broker.service.cluster import require_fresh_feed

            require_fresh_feed(self.feed, self.config)

    def invalidate_crl(self) -> None:
        self._crl_cache = (0.0, "")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking core call on the core thread and await its result."""
        loop = asyncio.get_running_loop()
        self._queued += 1
        try:
            return await loop.run_in_executor(self.executor, _in_context(fn, *args, **kwargs))
        finally:
            self._queued -= 1

    def shed_if_busy(self) -> None:
        """Refuse a new call cheaply, before any work, while the core thread is this far behind:
        RESOURCE_EXHAUSTED with a jittered RetryInfo spreads the retries instead of queueing
        calls that would time out half way (and be retried, each a full handshake)."""
        limit = self.config.core_queue_limit
        if limit and self._queued >= limit:
            raise ResourceExhausted(
                f"broker busy ({self._queued} calls queued); retry after the RetryInfo delay",
                retry_after_seconds=random.randint(1, 3),  # noqa: S311 (spreading, not a secret)
                limit="core_queue",
            )

    async def run_signing(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store-free check or signature on the signing thread (not the core thread)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.signing_executor, _in_context(fn, *args, **kwargs))

    async def run_slow(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a CPU-heavy call (password hashing) on its own pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.password_executor, _in_context(fn, *args, **kwargs))


def _in_context(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Callable[[], T]:
    """fn(*args) to run on another thread in a copy of this context, so lines it logs carry the
    RPC's request id (broker.logs); executors do not copy contextvars themselves."""
    return functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
