"""Failure budgets over a sliding window, for login and claim-code throttling (I8).

Counted in the store of record, inside the caller's transaction: every broker process shares one
budget, and a restart (or a kill -9) does not hand an attacker a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.clock import Clock, now_ms
from broker.errors import ResourceExhausted
from broker.store import Transaction


@dataclass(frozen=True, slots=True)
class FailureLimiter:
    """At most ``limit`` failures per key of one scope within ``window`` seconds."""

    clock: Clock
    scope: str
    limit: int
    window: float
    what: str

    def _since(self) -> int:
        return now_ms(self.clock) - int(self.window * 1000)

    def check(self, tx: Transaction, key: str) -> int:
        """Raise ResourceExhausted (with a retry delay) when key has used up its failures;
        else return how many it has used."""
        count, oldest = tx.count_failures(self.scope, key, self._since())
        if count >= self.limit:
            now = now_ms(self.clock)
            retry = max(1.0, ((oldest or now) + self.window * 1000 - now) / 1000)
            raise ResourceExhausted(f"too many {self.what}; retry in {int(retry)} s", retry)
        return count

    def fail(self, tx: Transaction, key: str) -> None:
        """Count one failure for key (and forget this scope's failures older than the window)."""
        tx.record_failure(self.scope, key, now_ms(self.clock), self._since())

    def reset(self, tx: Transaction, key: str) -> None:
        """Forget key's failures (a success)."""
        tx.clear_failures(self.scope, key)
