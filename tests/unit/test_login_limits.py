"""Login limits an attacker cannot turn against bystanders (issue 13 item 2), on the core Accounts
API with explicit peer addresses, on SQLite and (with BROKER_TEST_POSTGRES) PostgreSQL.

Scheme (broker.accounts.ratelimit): a hard budget per (address, username) pair; a hard budget per
username across addresses, except from an address where that user logged in before; per address
only a slowdown (store-reserved slots), refused only when the next slot is too far away. Refused
attempts are summarized in the audit log per (limit, key) and window. Tests name I8 / I12.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from broker.accounts.passwords import PasswordHasher
from broker.accounts.ratelimit import ADDRESS, PAIR, USER, LoginAdmission
from broker.accounts.users import LOGIN_FAILED, Accounts
from broker.audit.chain import AuditEntry, verify_chain
from broker.errors import ResourceExhausted, Unauthenticated
from broker.store.base import Store
from broker.store.sqlite import SqliteStore
from tests.pg import fresh_database
from tests.unit.conftest import DevPki, make_dev_pki

PASSWORD = "correct horse battery staple"
WRONG = "not the password at all"
ATTACKER = "198.51.100.7"  # the address an attacker shares with bystanders (NAT, office)
HOME = "203.0.113.10"
# Small, fast limits (the defaults are 5 / 20 / 20 with 0.5 s .. 4 s slots).
LIMITS: dict[str, object] = {
    "login_failures_per_pair": 3,
    "login_failures_per_user": 6,
    "login_failures_per_peer": 8,
    "login_slow_delay_seconds": 0.05,
    "login_slow_max_delay_seconds": 0.2,
    "login_slow_max_wait_seconds": 1.0,
    "argon2_time_cost": 1,
    "argon2_memory_kib": 8192,
    "argon2_parallelism": 1,
}


class Core:
    """Accounts over one store, with the dev PKI's FakeClock."""

    def __init__(self, pki: DevPki, store: Store) -> None:
        self.pki = pki
        self.store = store
        self.clock = pki.clock
        self.config = pki.config
        self.accounts = Accounts(
            pki.config, pki.authority, store, pki.clock, PasswordHasher(pki.config)
        )

    def login(self, username: str, password: str, peer: str) -> str:
        """The user_id, or raise (Unauthenticated / ResourceExhausted). A slowed attempt's wait
        passes on the FakeClock (as it would in real time), not by sleeping."""
        admission = self.accounts.admit_login(username, peer)
        self.clock.advance(admission.wait_seconds)
        return self.accounts.verify_login(admission, password).user_id

    def guess(self, username: str, peer: str) -> None:
        """One wrong password that the broker checks (UNAUTHENTICATED)."""
        with pytest.raises(Unauthenticated) as info:
            self.login(username, WRONG, peer)
        assert str(info.value) == LOGIN_FAILED

    def refused(self, username: str, password: str, peer: str) -> ResourceExhausted:
        with pytest.raises(ResourceExhausted) as info:
            self.login(username, password, peer)
        assert info.value.retry_after_seconds >= 1
        return info.value

    def audit(self, action: str | None = None) -> list[AuditEntry]:
        return [e for e in self.store.audit_entries() if action is None or e.action == action]

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


@pytest.fixture(params=["sqlite", "postgres"])
def core(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Core]:
    pki = make_dev_pki(tmp_path, None, **LIMITS)
    if request.param == "sqlite":
        store: Any = SqliteStore(pki.config.database)
        try:
            yield Core(pki, store)
        finally:
            store.close()
        return
    from broker.store.postgres import PostgresStore

    with fresh_database() as url:
        store = PostgresStore(url)
        try:
            yield Core(pki, store)
        finally:
            store.close()


def make_users(core: Core, *names: str) -> dict[str, str]:
    return {name: core.accounts.create_account(name, PASSWORD) for name in names}


# -- I8: the reported scenario ---------------------------------------------------------------------


def test_i8_attacker_at_shared_address_does_not_lock_out_a_bystander(core: Core) -> None:
    """I8 (issue 13 item 2): 20+ wrong passwords from one address, for xavier and for random
    usernames, and yvonne (never attacked, never logged in there) still logs in from the same
    address with her password, waiting at most one slot spacing (the cap, 0.2 s here)."""
    users = make_users(core, "xavier", "yvonne")
    for _ in range(core.config.login_failures_per_pair):
        core.guess("xavier", ATTACKER)
    for i in range(20):
        core.guess(f"random{i:03d}", ATTACKER)
    # xavier's pair is spent: refused before the password is looked at, even the right one.
    assert core.refused("xavier", PASSWORD, ATTACKER).limit == PAIR
    admission = core.accounts.admit_login("yvonne", ATTACKER)
    assert not admission.trusted
    assert 0 < admission.wait_seconds <= core.config.login_slow_max_delay_seconds
    assert core.accounts.verify_login(admission, PASSWORD).user_id == users["yvonne"]


def test_i8_unknown_username_and_wrong_password_cost_the_same_budget(core: Core) -> None:
    """I8, I11: an unknown username and a wrong password are the same UNAUTHENTICATED and use
    the same pair budget (the refusal does not say whether the user exists)."""
    make_users(core, "xavier")
    for _ in range(core.config.login_failures_per_pair):
        core.guess("xavier", ATTACKER)
        core.guess("nobody0", ATTACKER)
    known = core.refused("xavier", PASSWORD, ATTACKER)
    unknown = core.refused("nobody0", PASSWORD, ATTACKER)
    assert (known.limit, str(known)) == (unknown.limit, str(unknown))
    denied = core.audit("user.login.denied")
    assert [e.subject for e in denied].count("xavier") == [e.subject for e in denied].count(
        "nobody0"
    )


# -- I8: guesses stay bounded ----------------------------------------------------------------------


def test_i8_pair_budget_refuses_only_that_pair_until_its_window_ends(core: Core) -> None:
    """I8: login_failures_per_pair wrong passwords for xavier from one address refuse that pair
    (RESOURCE_EXHAUSTED, limit login.pair, retry within the window), even with the right
    password; xavier from another address and yvonne from the same one are not refused; the
    pair works again after the window."""
    users = make_users(core, "xavier", "yvonne")
    for _ in range(core.config.login_failures_per_pair):
        core.guess("xavier", ATTACKER)
    refused = core.refused("xavier", PASSWORD, ATTACKER)
    assert refused.limit == PAIR
    assert refused.retry_after_seconds <= core.config.login_window_seconds
    assert core.login("xavier", PASSWORD, HOME) == users["xavier"]
    assert core.login("yvonne", PASSWORD, ATTACKER) == users["yvonne"]
    assert core.refused("xavier", PASSWORD, ATTACKER).limit == PAIR
    core.advance(core.config.login_window_seconds + 1)
    assert core.login("xavier", PASSWORD, ATTACKER) == users["xavier"]


def test_i8_user_budget_spans_addresses_but_spares_where_the_user_logged_in(core: Core) -> None:
    """I8: a distributed attack (each address under its pair budget) spends xavier's username
    budget: the right password from a new address is refused (limit login.user), and nothing is
    verified for it; from HOME, where xavier logged in before (a trusted pair), it succeeds."""
    users = make_users(core, "xavier")
    assert core.login("xavier", PASSWORD, HOME) == users["xavier"]
    per_user = core.config.login_failures_per_user
    for i in range(per_user):
        core.guess("xavier", f"192.0.2.{i + 1}")
    denied_before = len(core.audit("user.login.denied"))
    refused = core.refused("xavier", PASSWORD, "192.0.2.200")
    assert refused.limit == USER
    assert len(core.audit("user.login.denied")) == denied_before  # refused, not verified
    assert core.login("xavier", PASSWORD, HOME) == users["xavier"]
    # trust is remembered for login_trust_days, then the username budget applies at HOME too
    core.advance(core.config.login_trust_days * 86_400 + 1)
    for i in range(per_user):
        core.guess("xavier", f"192.0.2.{i + 1}")
    assert core.refused("xavier", PASSWORD, HOME).limit == USER


def test_i8_address_slots_bound_the_rate_under_concurrency(core: Core) -> None:
    """I8: past the address budget, 40 concurrent attempts from it (distinct usernames, so no
    pair or user budget applies) each reserve their own slot: the admitted ones get distinct
    waits spaced by the slot spacing and no more than the maximum wait ahead; the rest are
    RESOURCE_EXHAUSTED (limit login.address). A trusted pair is not slowed."""
    users = make_users(core, "xavier")
    assert core.login("xavier", PASSWORD, ATTACKER) == users["xavier"]  # trusted there
    for i in range(core.config.login_failures_per_peer):
        core.guess(f"spray{i:03d}", ATTACKER)
    waits: list[float] = []
    refusals: list[ResourceExhausted] = []
    lock = threading.Lock()

    def attempt(i: int) -> None:
        try:
            admission = core.accounts.admit_login(f"burst{i:03d}", ATTACKER)
        except ResourceExhausted as error:
            with lock:
                refusals.append(error)
            return
        with lock:
            waits.append(admission.wait_seconds)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(attempt, range(40)))
    spacing = core.config.login_slow_delay_seconds
    max_wait = core.config.login_slow_max_wait_seconds
    assert len(waits) + len(refusals) == 40
    assert {e.limit for e in refusals} == {ADDRESS}
    ordered = sorted(waits)
    assert len(ordered) == len(set(ordered)), "two attempts got the same slot"
    assert all(b - a >= spacing - 1e-6 for a, b in itertools.pairwise(ordered))
    assert ordered[-1] <= max_wait
    # at most one attempt per spacing inside the maximum wait (+1 for the slot at 0)
    assert len(waits) <= int(max_wait / spacing) + 1
    assert refusals, "40 attempts in one instant must not all fit in the maximum wait"
    trusted = core.accounts.admit_login("xavier", ATTACKER)
    assert trusted.trusted and trusted.wait_seconds == 0


def test_i8_in_flight_attempts_count_against_the_pair_budget(core: Core) -> None:
    """I8: 30 concurrent attempts for one pair are admitted at most login_failures_per_pair times
    before any of them has finished (no overshoot by the number in flight)."""
    make_users(core, "xavier")
    admitted: list[LoginAdmission] = []
    limits: list[str] = []
    lock = threading.Lock()

    def attempt(_: int) -> None:
        try:
            admission = core.accounts.admit_login("xavier", HOME)
        except ResourceExhausted as error:
            with lock:
                limits.append(error.limit)
            return
        with lock:
            admitted.append(admission)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(attempt, range(30)))
    assert len(admitted) == core.config.login_failures_per_pair
    assert set(limits) == {PAIR} and len(limits) == 30 - len(admitted)


def test_i8_in_flight_count_is_exact_and_ends_with_the_attempt(core: Core) -> None:
    """I8: an attempt counts in flight from its admission until it ends, even when it ends
    just inside login_flight_seconds of another's start; one that never ends (a client gone)
    counts until it is login_flight_seconds old, then no longer."""
    make_users(core, "xavier")
    flight = core.config.login_flight_seconds
    first = core.accounts.admit_login("xavier", HOME)
    core.advance(flight - 1)
    core.accounts.verify_login(first, PASSWORD)  # ends (a success: no failure counted)
    for _ in range(core.config.login_failures_per_pair):
        core.accounts.admit_login("xavier", HOME)  # in flight, never finished
    core.advance(1.5)  # first's start is now older than the flight window
    assert core.refused("xavier", PASSWORD, HOME).limit == PAIR
    core.advance(flight)
    assert core.login("xavier", PASSWORD, HOME)


def test_i8_spacing_doubles_per_budget_and_is_capped(core: Core) -> None:
    """The slot spacing: the base delay at the address budget, doubled for every further
    budget's worth of failures, never above the cap."""
    limits = core.accounts._login  # the policy object Accounts built from config
    budget = core.config.login_failures_per_peer
    assert limits.spacing_ms(budget) == 50
    assert limits.spacing_ms(2 * budget) == 100
    assert limits.spacing_ms(3 * budget) == 200
    assert limits.spacing_ms(100 * budget) == 200


# -- persistence -----------------------------------------------------------------------------------


def test_i8_budgets_and_trust_survive_a_new_accounts_object(core: Core) -> None:
    """I8: budgets and trust are in the store: a new Accounts (another replica, or a restart)
    refuses the spent pair and trusts the address where the user logged in."""
    users = make_users(core, "xavier", "yvonne")
    assert core.login("yvonne", PASSWORD, ATTACKER) == users["yvonne"]
    for _ in range(core.config.login_failures_per_pair):
        core.guess("xavier", ATTACKER)
    other = Accounts(
        core.config, core.pki.authority, core.store, core.clock, PasswordHasher(core.config)
    )
    with pytest.raises(ResourceExhausted) as info:
        other.authenticate("xavier", PASSWORD, ATTACKER)
    assert info.value.limit == PAIR
    assert other.admit_login("yvonne", ATTACKER).trusted


# -- I12: throttled attempts in the audit log ------------------------------------------------------


def throttled_total(entries: list[AuditEntry]) -> int:
    return sum(int(e.detail["count"]) for e in entries if e.action == "user.login.throttled")


def test_i12_throttled_attempts_are_counted_per_window_not_one_entry_each(core: Core) -> None:
    """I12: 60 attempts (wrong passwords, then refusals by pair, user and address limits) leave
    one denied entry per verified attempt and a few throttled entries whose counts add up to
    every refused attempt once their windows are over; the hash chain verifies."""
    make_users(core, "xavier")
    attempts = [("xavier", ATTACKER)] * 10  # 3 denied, then refused by the pair budget
    attempts += [("xavier", f"192.0.2.{i}") for i in range(10)]  # 3 denied, then user budget
    attempts += [(f"spray{i:03d}", ATTACKER) for i in range(40)]  # the address is slowed
    refused = denied = 0
    for username, peer in attempts:
        try:
            core.login(username, WRONG, peer)
        except ResourceExhausted:
            refused += 1
        except Unauthenticated:
            denied += 1
    assert refused + denied == 60 and refused >= 10
    entries = core.audit()
    throttled = [e for e in entries if e.action == "user.login.throttled"]
    assert len(throttled) < refused, "one audit entry per refused attempt"
    assert len(core.audit("user.login.denied")) == denied
    # every window that opened reported its first refusal at once
    assert {e.detail["limit"] for e in throttled} >= {PAIR, USER}
    core.advance(core.config.login_audit_window_seconds + 1)
    assert core.accounts.flush_login_audit() >= 2
    entries = core.audit()
    assert throttled_total(entries) == refused
    assert len(core.audit("user.login.denied")) + throttled_total(entries) == 60
    assert verify_chain(entries).ok
    # a second flush finds nothing more to summarize
    assert core.accounts.flush_login_audit() == 0
    assert throttled_total(core.audit()) == refused


def test_i12_next_refusal_after_the_window_summarizes_it(core: Core) -> None:
    """I12: without a flush, the next refusal of the same (limit, key) after the window closes
    the old one (count = the rest) and opens a new one (count 1)."""
    make_users(core, "xavier")
    for _ in range(core.config.login_failures_per_pair):
        core.guess("xavier", ATTACKER)
    for _ in range(5):
        core.refused("xavier", WRONG, ATTACKER)
    assert [e.detail["count"] for e in core.audit("user.login.throttled")] == [1]
    core.advance(core.config.login_audit_window_seconds + 1)
    core.refused("xavier", WRONG, ATTACKER)
    counts = [
        (e.detail["count"], "summary" in e.detail) for e in core.audit("user.login.throttled")
    ]
    assert counts == [(1, False), (4, True), (1, False)]
    assert verify_chain(core.audit()).ok
