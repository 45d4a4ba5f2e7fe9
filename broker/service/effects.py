"""Applying core outcomes on the event loop: the one place live streams are ended or pushed to.

Core calls return ``broker.outcomes.Effects`` from the core thread; handlers pass them here, on the
event loop, so relay, presence, the trust bundle and the CRL cache are only touched from the loop.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509

from broker._proto.broker.v1 import device_pb2
from broker.errors import Unavailable
from broker.outcomes import Applied, Effects, EndSessions, TrustChanged
from broker.pki.ca import subject_key_id
from broker.service.convert import trust_bundle_pb
from broker.service.runtime import Runtime

STALE_CERTIFICATE = (
    "the certificate this stream was opened with no longer chains to a trusted issuing CA "
    "(the PKI was rotated): reconnect with your current certificate"
)
TrustListener = Callable[[tuple[x509.Certificate, ...]], None]
# Told which live streams one committed change ended here ("watch": session ids, "attach":
# device ids) and how old the change already was (seconds) when it was applied here: the
# teardown-latency metric (broker.service.metrics).
EndedListener = Callable[[str, list[str], float], None]


class EffectsApplier:
    """Applies Effects to one broker's live state; must run on the event loop."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._trust_listeners: list[TrustListener] = []
        self.on_streams_ended: EndedListener | None = None

    def on_trust_changed(self, listener: TrustListener) -> None:
        """Call listener with the trusted issuing CAs after every PKI reload (peer parsers)."""
        self._trust_listeners.append(listener)

    def apply(self, effects: Effects, age: float = 0.0) -> Applied:
        """Do what effects says; returns what was done. age: seconds since the change was
        committed, when known (another replica's event); a local change is applied as soon as
        its core call returns, so 0."""
        ended: list[str] = []
        for end in effects.end_sessions:
            ended += self._end_sessions(end)
        detached = [
            e.device_id
            for e in effects.end_attach
            if self._rt.presence.end_device(e.device_id, e.error, e.epoch)
        ]
        closed = len(detached)
        if self.on_streams_ended is not None:
            if ended:
                self.on_streams_ended("watch", ended, age)
            if detached:
                self.on_streams_ended("attach", detached, age)
        notified = stale = 0
        if effects.trust is not None:
            notified, stale = self._trust(effects.trust)
        if effects.revocations_changed:
            self._rt.invalidate_crl()
        return Applied(tuple(dict.fromkeys(ended)), closed, notified, stale)

    def _end_sessions(self, end: EndSessions) -> list[str]:
        relay = self._rt.relay
        ended = [sid for sid in end.session_ids if relay.end(sid, end.reason)]
        if end.device_id or end.user_id or end.app_id:
            ended += relay.end_where(
                end.reason, device_id=end.device_id, user_id=end.user_id, app_id=end.app_id
            )
        return ended

    def _trust(self, trust: TrustChanged) -> tuple[int, int]:
        self._rt.trust_bundle = trust.bundle
        for listener in self._trust_listeners:
            listener(trust.trusted_issuing)
        # Stale streams end first: they get the new bundle when they reconnect (hello carries
        # their version), and a push racing the end would only turn their status into a write error.
        skis = {subject_key_id(c) for c in trust.trusted_issuing}
        stale = self._rt.presence.end_issued_outside(skis, Unavailable(STALE_CERTIFICATE))
        notified = 0
        if trust.changed:
            update = device_pb2.BrokerMessage(
                trust_bundle_update=device_pb2.TrustBundleUpdate(
                    trust_bundle=trust_bundle_pb(trust.bundle)
                )
            )
            notified = self._rt.presence.broadcast(update)
        return notified, stale
