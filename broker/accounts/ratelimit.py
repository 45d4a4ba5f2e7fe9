"""Failure budgets over a sliding window, for login and claim-code throttling (I8).

Counted in the store of record, inside the caller's transaction: every broker process shares one
budget, and a restart (or a kill -9) does not hand an attacker a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from broker.audit.chain import AuditEvent
from broker.clock import Clock, now_ms
from broker.config import Config
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
            raise ResourceExhausted(
                f"too many {self.what}; retry in {int(retry)} s", retry, limit=self.scope
            )
        return count

    def fail(self, tx: Transaction, key: str) -> None:
        """Count one failure for key (and forget this scope's failures older than the window)."""
        tx.record_failure(self.scope, key, now_ms(self.clock), self._since())

    def reset(self, tx: Transaction, key: str) -> None:
        """Forget key's failures (a success)."""
        tx.clear_failures(self.scope, key)


# -- login limits (issue 13) ------------------------------------------------------------------------
#
# Scheme (README "Login limits", PROTOCOL EnrollApp status codes):
# - per (address, username) pair: a hard budget; over it only that pair is refused;
# - per username, across addresses: a hard budget, except from an address where the user has
#   logged in before (a trusted pair, remembered for login_trust_days);
# - per address: never a refusal of its own making for a trusted pair, and no wait below budget;
#   past it each untrusted attempt takes a time slot reserved in the store (next = max(now,
#   next) + spacing, the spacing doubling as the address's failures grow), so guesses per
#   address per second stay bounded however many are sent at once. Only a slot further away
#   than login_slow_max_wait_seconds is refused.
# Attempts admitted and not yet finished count against the pair, user and address budgets, so
# concurrent guesses cannot overshoot them. Everything lives in the store's failures table:
# shared by every replica, kept across restarts.

PAIR = "login.pair"
USER = "login.user"
ADDRESS = "login.address"
TRUSTED = "login.trusted"  # one row per (address, username) that logged in: when it last did
SLOT = "login.slot"  # one row per slowed address: the next free slot's time
THROTTLED = "login.throttled"  # one row per refused attempt until its audit window is summarized
FLUSHED = "login.throttled.flush"  # one row: when closed windows were last looked for
FLUSH_EVERY_MS = 10_000


def pair_key(peer: str, name: str) -> str:
    """The failures-table key of an (address, username) pair (usernames never hold a '|')."""
    return f"{peer}|{name}"


@dataclass(frozen=True, slots=True)
class Usage:
    """What one key of a budget has used: failures in the window, attempts still in flight."""

    failed: int
    in_flight: int
    oldest_failure_ms: int | None

    @property
    def total(self) -> int:
        return self.failed + self.in_flight


@dataclass(frozen=True, slots=True)
class Budget:
    """At most ``limit`` failures (plus attempts in flight) per key within ``window_ms``.

    An attempt is counted in flight from ``begin`` until ``end``: rows in ``<scope>.start`` and
    ``<scope>.end``, both stamped with the attempt's start, over the last ``flight_ms`` (so the
    difference is exact; an attempt that never ends, e.g. cancelled, counts until it is that
    old)."""

    scope: str
    limit: int
    window_ms: int
    flight_ms: int

    def used(self, tx: Transaction, key: str, now: int) -> Usage:
        """Failures and in-flight attempts of key at now."""
        failed, oldest = tx.count_failures(self.scope, key, now - self.window_ms)
        since = now - self.flight_ms
        started, _ = tx.count_failures(self.scope + ".start", key, since)
        ended, _ = tx.count_failures(self.scope + ".end", key, since)
        return Usage(failed, max(0, started - ended), oldest)

    def retry_seconds(self, usage: Usage, now: int) -> float:
        """When the budget has room again (at least 1 s; in-flight attempts end within 1 s or
        so, so a budget full of them asks for 1 s)."""
        if usage.failed >= self.limit and usage.oldest_failure_ms is not None:
            return max(1.0, (usage.oldest_failure_ms + self.window_ms - now) / 1000)
        return 1.0

    def begin(self, tx: Transaction, key: str, now: int) -> None:
        """An attempt for key is admitted."""
        tx.record_failure(self.scope + ".start", key, now, now - self.flight_ms)

    def end(self, tx: Transaction, key: str, started: int, now: int, *, failed: bool) -> None:
        """An attempt admitted at started finished now (a failure counts in the window)."""
        tx.record_failure(self.scope + ".end", key, started, now - self.flight_ms)
        if failed:
            tx.record_failure(self.scope, key, now, now - self.window_ms)

    def reset(self, tx: Transaction, key: str) -> None:
        """Forget key's failures (a success)."""
        tx.clear_failures(self.scope, key)


@dataclass(frozen=True, slots=True)
class LoginAdmission:
    """A login attempt that may go on to the password check after waiting ``wait_seconds``
    (its reserved slot; 0 unless its address is over budget and the pair is untrusted)."""

    name: str  # normalized username, "" if it is not a valid one (it then fails like a wrong one)
    peer: str
    trusted: bool
    wait_seconds: float
    at_ms: int  # when it was admitted


REFUSALS = {
    PAIR: "too many failed logins for this username from this address",
    USER: "too many failed logins for this username",
    ADDRESS: "too many failed logins from this address",
}


@dataclass(frozen=True, slots=True)
class Throttled:
    """One refused attempt: which limit, its key in that limit, who and when."""

    limit: str  # PAIR, USER or ADDRESS
    key: str
    peer: str
    name: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class LoginRefused:
    """A login attempt refused before its password was looked at (RESOURCE_EXHAUSTED)."""

    limit: str  # PAIR, USER or ADDRESS
    message: str
    retry_seconds: float


@dataclass(frozen=True, slots=True)
class LoginLimits:
    """The login policy over the store's failures table; every method runs in the caller's
    transaction. Config fields: login_* (broker/config.py)."""

    pair: Budget
    user: Budget
    address: Budget
    trust_ms: int
    slow_delay_ms: int
    slow_max_delay_ms: int
    slow_max_wait_ms: int
    audit: ThrottleLog

    def admit(
        self, tx: Transaction, name: str, peer: str, now: int
    ) -> LoginAdmission | LoginRefused:
        """Admit an attempt (reserving its slot and counting it in flight) or refuse it (counted
        in the throttled-attempt audit)."""
        self.audit.flush(tx, now)
        key = pair_key(peer, name)
        trusted = self._trusted(tx, key, now)
        pair = self.pair.used(tx, key, now)
        if pair.total >= self.pair.limit:
            retry = self.pair.retry_seconds(pair, now)
            return self._refuse(tx, Throttled(PAIR, key, peer, name, now), retry)
        if name and not trusted:
            user = self.user.used(tx, name, now)
            if user.total >= self.user.limit:
                retry = self.user.retry_seconds(user, now)
                return self._refuse(tx, Throttled(USER, name, peer, name, now), retry)
        wait_ms = 0
        if not trusted:
            address = self.address.used(tx, peer, now)
            if address.total >= self.address.limit:
                slot = self._reserve_slot(tx, peer, now, self.spacing_ms(address.total))
                if slot is None:
                    retry = self._slot_retry(tx, peer, now)
                    return self._refuse(tx, Throttled(ADDRESS, peer, peer, name, now), retry)
                wait_ms = slot - now
        self.pair.begin(tx, key, now)
        if name:
            self.user.begin(tx, name, now)
        self.address.begin(tx, peer, now)
        return LoginAdmission(name, peer, trusted, wait_ms / 1000, now)

    def finish(self, tx: Transaction, admission: LoginAdmission, now: int, *, ok: bool) -> None:
        """Record how an admitted attempt ended: failures count; a success trusts the pair and
        forgets its failures (not the username's nor the address's)."""
        key, started = pair_key(admission.peer, admission.name), admission.at_ms
        self.pair.end(tx, key, started, now, failed=not ok)
        if admission.name:
            self.user.end(tx, admission.name, started, now, failed=not ok)
        self.address.end(tx, admission.peer, started, now, failed=not ok)
        if ok:
            self.pair.reset(tx, key)
            tx.clear_failures(TRUSTED, key)
            tx.record_failure(TRUSTED, key, now, now - self.trust_ms)

    def spacing_ms(self, address_used: int) -> int:
        """Slot spacing for an address with this many failures (and attempts in flight): the
        base delay, doubled for every further budget's worth, at most the cap."""
        doublings = min(16, (address_used - self.address.limit) // max(1, self.address.limit))
        return min(self.slow_max_delay_ms, self.slow_delay_ms << doublings)

    def _trusted(self, tx: Transaction, key: str, now: int) -> bool:
        return tx.count_failures(TRUSTED, key, now - self.trust_ms)[0] > 0

    def _reserve_slot(self, tx: Transaction, peer: str, now: int, spacing_ms: int) -> int | None:
        """The address's next free slot, reserved (next free = slot + spacing), or None when it
        is more than the maximum wait away. Atomic: writers are serialized on both backends."""
        _, next_free = tx.count_failures(SLOT, peer, 0)
        slot = max(now, next_free or now)
        if slot - now > self.slow_max_wait_ms:
            return None
        tx.clear_failures(SLOT, peer)
        tx.record_failure(SLOT, peer, slot + spacing_ms, now)  # and forget slots now past
        return slot

    def _slot_retry(self, tx: Transaction, peer: str, now: int) -> float:
        _, next_free = tx.count_failures(SLOT, peer, 0)
        return max(1.0, ((next_free or now) - now - self.slow_max_wait_ms) / 1000)

    def _refuse(self, tx: Transaction, attempt: Throttled, retry: float) -> LoginRefused:
        self.audit.count(tx, attempt)
        what = REFUSALS[attempt.limit]
        return LoginRefused(attempt.limit, f"{what}; retry in {int(retry)} s", retry)


@dataclass(frozen=True, slots=True)
class ThrottleLog:
    """Refused login attempts in the audit log, aggregated per (limit, key) and window.

    The first refusal of a window appends ``user.login.throttled`` with count 1 (an attack shows
    at once); later ones are rows in the failures table, summarized by one more entry (count =
    the rest) when the window is closed: by the next refusal of that key after the window, or by
    any login attempt once the window is over (looked for at most every 10 s). The sum of the
    counts in closed windows is the number of refused attempts."""

    window_ms: int
    append: Callable[[Transaction, AuditEvent], object]

    def count(self, tx: Transaction, attempt: Throttled) -> None:
        """Count one refused attempt."""
        row_key, now = f"{attempt.limit}|{attempt.key}", attempt.at_ms
        refused, start = tx.count_failures(THROTTLED, row_key, 0)
        if start is not None and now - start >= self.window_ms:
            self._close(tx, row_key, refused, start)
            refused = 0
        if refused == 0:
            detail: dict[str, object] = {
                "limit": attempt.limit,
                "key": attempt.key,
                "peer": attempt.peer,
                "username": attempt.name,
                "count": 1,
                "window_start_ms": now,
            }
            self._entry(tx, attempt.limit, attempt.key, detail)
        tx.record_failure(THROTTLED, row_key, now, 0)

    def flush(self, tx: Transaction, now: int, *, force: bool = False) -> int:
        """Summarize every window that is over (at most every 10 s unless forced); returns how
        many were closed."""
        _, last = tx.count_failures(FLUSHED, "", 0)
        if not force and last is not None and now - last < FLUSH_EVERY_MS:
            return 0
        closed = 0
        for window in tx.failure_counts(THROTTLED, 0):
            if now - window.first_ms >= self.window_ms:
                self._close(tx, window.key, window.count, window.first_ms)
                closed += 1
        tx.clear_failures(FLUSHED, "")
        tx.record_failure(FLUSHED, "", now, 0)
        return closed

    def _close(self, tx: Transaction, row_key: str, refused: int, start: int) -> None:
        limit, _, key = row_key.partition("|")
        if refused > 1:  # the first one was reported when the window opened
            detail: dict[str, object] = {
                "limit": limit,
                "key": key,
                "count": refused - 1,
                "summary": True,
                "window_start_ms": start,
            }
            self._entry(tx, limit, key, detail)
        tx.clear_failures(THROTTLED, row_key)

    def _entry(self, tx: Transaction, limit: str, key: str, detail: dict[str, object]) -> None:
        subject = key.rpartition("|")[2] if limit == PAIR else key
        detail["window_seconds"] = self.window_ms // 1000
        self.append(tx, AuditEvent("anonymous", "user.login.throttled", subject, detail))


def login_limits(
    config: Config, append: Callable[[Transaction, AuditEvent], object]
) -> LoginLimits:
    """The login policy from config's login_* fields; append writes an audit event."""
    window = config.login_window_seconds * 1000
    flight = int(config.login_flight_seconds * 1000)
    return LoginLimits(
        pair=Budget(PAIR, config.login_failures_per_pair, window, flight),
        user=Budget(
            USER, config.login_failures_per_user, config.login_user_window_seconds * 1000, flight
        ),
        address=Budget(ADDRESS, config.login_failures_per_peer, window, flight),
        trust_ms=config.login_trust_days * 86_400_000,
        slow_delay_ms=int(config.login_slow_delay_seconds * 1000),
        slow_max_delay_ms=int(config.login_slow_max_delay_seconds * 1000),
        slow_max_wait_ms=int(config.login_slow_max_wait_seconds * 1000),
        audit=ThrottleLog(config.login_audit_window_seconds * 1000, append),
    )
