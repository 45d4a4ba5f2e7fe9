"""Typed outcomes: what a committed change requires of live streams (shared by every core package).

Core calls run on the core thread and must not touch asyncio objects. When a change ends sessions,
closes a camera's Attach stream or changes the trust bundle, the core call returns an ``Effects``
value; ``broker.service.effects`` applies it on the event loop, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from broker.errors import BrokerError
from broker.pki.trust import TrustBundle


@dataclass(frozen=True, slots=True)
class EndSessions:
    """Live sessions to end with a reason the watcher sees. Matches the listed session ids and
    every live session matching all of device_id / user_id / app_id that are set."""

    reason: str
    session_ids: tuple[str, ...] = ()
    device_id: str = ""
    user_id: str = ""
    app_id: str = ""


@dataclass(frozen=True, slots=True)
class EndAttach:
    """End a camera's live Attach stream with error as its final status; with an epoch, only the
    stream of that attachment (a newer one of the same device is left alone)."""

    device_id: str
    error: BrokerError
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class TrustChanged:
    """A PKI reload: the new bundle (pushed to cameras when changed) and the issuing CAs that
    remain trusted; Attach streams opened with a certificate from any other issuer must end."""

    bundle: TrustBundle
    changed: bool
    trusted_issuing: tuple[x509.Certificate, ...]


@dataclass(frozen=True, slots=True)
class Effects:
    """Everything the event loop must do after one committed core call."""

    end_sessions: tuple[EndSessions, ...] = ()
    end_attach: tuple[EndAttach, ...] = ()
    trust: TrustChanged | None = None
    revocations_changed: bool = False

    def __add__(self, other: Effects) -> Effects:
        return Effects(
            self.end_sessions + other.end_sessions,
            self.end_attach + other.end_attach,
            other.trust or self.trust,
            self.revocations_changed or other.revocations_changed,
        )


NO_EFFECTS = Effects()


@dataclass(frozen=True, slots=True)
class Applied:
    """What applying Effects did (reported back to operators and apps)."""

    sessions_ended: tuple[str, ...] = ()
    attach_streams_closed: int = 0
    cameras_notified: int = 0
    stale_streams_closed: int = 0
