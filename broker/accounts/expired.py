"""App instances coming back after their certificate expired (a phone left in a drawer).

The policy ``broker.pki.expired`` applies to app instances: their own, shorter window
(``app_expired_renewal_days``, 30 days by default), the app certificate lifetime, and that only an
active instance (not signed out, not revoked, still its user's) may renew. The instance keeps its
app_id; past the window the user logs in again (EnrollApp, a new instance).
"""

from __future__ import annotations

import datetime as dt

from broker.config import Config
from broker.identity.spiffe import Identity, Kind
from broker.pki.expired import KindPolicy
from broker.store import AppState, Transaction

COME_BACK = "log in again (EnrollApp) to enroll this app"


def app_refusal(tx: Transaction, identity: Identity) -> str | None:
    """Why this app instance may not renew (unknown, signed out or revoked), or None."""
    record = tx.get_app(identity.app_id)
    if record is None or record.user_id != identity.user_id:
        return "app instance unknown"
    if record.state is not AppState.ACTIVE:
        return "app instance signed out or revoked"
    return None


def app_policy(config: Config) -> KindPolicy:
    """Renewal after expiry for app instances, from the broker's configuration."""
    return KindPolicy(
        kind=Kind.APP,
        window_days=config.app_expired_renewal_days,
        lifetime=dt.timedelta(days=config.app_cert_days),
        come_back=COME_BACK,
        refusal=app_refusal,
        audit_subject=lambda identity: identity.app_id,
    )
