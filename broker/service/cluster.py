"""Applying other replicas' events on this replica's event loop, and refusing new sessions while
this replica's event feed is stale (DESIGN: many replicas, one fleet; I10 fails closed).

``EventFeed`` (broker.cluster.feed) reads the events table on its own thread and calls
``EventHandler`` on the loop; effects are applied here exactly as a local change would be.
"""

from __future__ import annotations

import asyncio
import logging

from broker.clock import now_ms
from broker.cluster.events import EFFECTS, PKI_RELOADED, EventPayloadError, payload_to_effects
from broker.cluster.feed import EventFeed
from broker.config import Config
from broker.errors import Unavailable
from broker.outcomes import Applied
from broker.service.effects import EffectsApplier
from broker.service.runtime import Runtime
from broker.store import EventRecord

log = logging.getLogger(__name__)


async def apply_event(rt: Runtime, effects: EffectsApplier, event: EventRecord) -> Applied | None:
    """Apply one event another replica appended; None when it asks nothing of this replica."""
    if event.kind == EFFECTS:
        # The change committed on another replica at_ms (its clock): teardown latency counts
        # from then, not from when this replica read the feed.
        age = max(0, now_ms(rt.clock) - event.at_ms) / 1000
        return effects.apply(payload_to_effects(event.payload, rt.config.trust_domain), age)
    if event.kind == PKI_RELOADED:
        # Re-read certs/ here (issuing CA, token keys, bundle) without announcing it again.
        reloaded = await rt.run(rt.pki.reload, rt.trust_bundle.version, announce=False)
        return effects.apply(reloaded.effects)
    log.warning("ignoring event %d of unknown kind %r from %s", event.seq, event.kind, event.origin)
    return None


class EventHandler:
    """The feed's callback: runs apply_event for each event, in feed order, on the loop."""

    def __init__(self, rt: Runtime, effects: EffectsApplier) -> None:
        self._rt = rt
        self._effects = effects
        self._tail: asyncio.Task[None] | None = None

    def __call__(self, event: EventRecord) -> None:
        previous = self._tail
        self._tail = asyncio.get_running_loop().create_task(self._apply_after(previous, event))

    async def _apply_after(self, previous: asyncio.Task[None] | None, event: EventRecord) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        try:
            applied = await apply_event(self._rt, self._effects, event)
        except EventPayloadError as exc:
            log.error("event %d from %s refused: %s", event.seq, event.origin, exc)
        except Exception:
            log.exception("event %d (%s) from %s failed", event.seq, event.kind, event.origin)
        else:
            if applied is not None:
                log.debug("event %d (%s) from %s: %s", event.seq, event.kind, event.origin, applied)

    async def drain(self) -> None:
        """Wait until every event handed over so far has been applied."""
        if self._tail is not None:
            await asyncio.gather(self._tail, return_exceptions=True)


def require_fresh_feed(feed: EventFeed, config: Config) -> None:
    """Refuse a new session when this replica may have missed a revocation (fail closed, I10)."""
    stale = feed.stale_for()
    if stale > config.event_feed_stale_seconds:
        raise Unavailable(
            f"this replica's event feed is stale ({stale:.1f} s without an update): "
            "try another replica"
        )
