"""Cameras coming back after their certificate expired (holiday home, a camera in a drawer).

The policy ``broker.pki.expired`` applies to cameras: the window (``device_expired_renewal_days``,
180 days by default), the lifetime of the new certificate, and that only an active (not revoked)
camera may renew. The camera keeps its id, its owner and its shares: only its certificate changes.
"""

from __future__ import annotations

import datetime as dt

from broker.accounts.expired import app_policy
from broker.clock import Clock
from broker.config import Config
from broker.identity.spiffe import Identity, Kind
from broker.pki.ca import IssuingAuthority
from broker.pki.expired import ExpiredRenewals, KindPolicy
from broker.store import DeviceState, Store, Transaction

COME_BACK = (
    "re-enroll with a new enrollment token from the operator (or the factory birth certificate)"
)


def device_refusal(tx: Transaction, identity: Identity) -> str | None:
    """Why this camera may not renew (unknown or revoked), or None."""
    record = tx.get_device(identity.device_id)
    if record is None:
        return "device unknown"
    if record.state is not DeviceState.ACTIVE:
        return "device revoked"
    return None


def device_policy(config: Config) -> KindPolicy:
    """Renewal after expiry for cameras, from the broker's configuration."""
    return KindPolicy(
        kind=Kind.DEVICE,
        window_days=config.device_expired_renewal_days,
        lifetime=dt.timedelta(days=config.device_cert_days),
        come_back=COME_BACK,
        refusal=device_refusal,
        audit_subject=lambda identity: identity.device_id,
    )


def expired_renewals(
    config: Config, ca: IssuingAuthority, store: Store, clock: Clock
) -> ExpiredRenewals:
    """Renewal after expiry for cameras and app instances, each with its own window."""
    return ExpiredRenewals(
        config.trust_domain,
        ca,
        store,
        clock,
        {Kind.DEVICE: device_policy(config), Kind.APP: app_policy(config)},
    )
