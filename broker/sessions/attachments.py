"""Which replica holds each camera's Attach stream, fenced by an epoch (DESIGN: many replicas).

Attaching records (device, this replica, epoch + 1, lease) in one unit of work; heartbeats renew the
lease only while the epoch is still current, so a stale or mixed-up mapping can never route a
viewer to the wrong stream (the 2024 cache incident). A second live Attach of one device, on any
replica, ends the older one and is audited as a possible clone.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.audit.chain import AuditEvent
from broker.audit.recorder import AuditRecorder
from broker.clock import Clock, now_ms, now_s
from broker.cluster.events import effects_to_payload
from broker.config import Config
from broker.errors import Unauthenticated
from broker.outcomes import NO_EFFECTS, Effects, EndAttach
from broker.protocol.spiffe_id import SpiffeId
from broker.store import Store, Transaction

REPLACED = "replaced by a newer Attach stream from the same device"


@dataclass(frozen=True, slots=True)
class Attached:
    """Outcome of recording an Attach: its fencing epoch, and the older stream to end."""

    epoch: int
    effects: Effects


class Attachments:
    """Attachment records of this replica's Attach streams."""

    def __init__(self, config: Config, store: Store, clock: Clock) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._recorder = AuditRecorder(clock)

    @property
    def replica(self) -> str:
        return self._config.replica_name

    def _lease(self, now: int) -> int:
        return now + self._config.attach_lease_seconds

    def attach(self, device_id: str, trust_bundle_version: str) -> Attached:
        """Record that this replica now holds the device's stream (epoch + 1)."""
        now = now_s(self._clock)

        def unit(tx: Transaction) -> Attached:
            new, previous = tx.attach_device(device_id, self.replica, now, self._lease(now))
            tx.record_presence(device_id, now, trust_bundle_version)
            if previous is None or not previous.live_at(now):
                return Attached(new.epoch, NO_EFFECTS)
            self._recorder.append(
                tx,
                AuditEvent(
                    str(SpiffeId.device(self._config.trust_domain, device_id)),
                    "device.attach.replaced",
                    device_id,
                    {
                        "previous_replica": previous.replica,
                        "previous_epoch": previous.epoch,
                        "replica": self.replica,
                        "epoch": new.epoch,
                        "note": "two live Attach streams of one device: possible clone",
                    },
                ),
            )
            end = EndAttach(device_id, Unauthenticated(REPLACED), previous.epoch)
            effects = Effects(end_attach=(end,))
            if previous.replica != self.replica:
                tx.append_event(
                    "effects", effects_to_payload(effects), self.replica, now_ms(self._clock)
                )
            return Attached(new.epoch, effects)

        return self._store.run(unit)

    def renew(self, device_id: str, epoch: int) -> bool:
        """Extend the lease; False when a newer attachment has fenced this one off."""
        lease = self._lease(now_s(self._clock))
        return self._store.run(lambda tx: tx.renew_attachment(device_id, epoch, lease))

    def release(self, device_id: str, epoch: int) -> bool:
        """The stream ended: the device is offline at once (unless it re-attached already)."""
        return self._store.run(lambda tx: tx.release_attachment(device_id, epoch))

    def release_all_of_this_replica(self) -> list[str]:
        """At start: forget attachments a previous run of this replica left behind."""
        return self._store.run(lambda tx: tx.release_attachments_of(self.replica))
