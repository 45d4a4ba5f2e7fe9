"""The store contract (broker.store.base), run against every backend.

Every Transaction and Store method, the typed errors for broken uniqueness rules, single-use
secrets under 20 racing writers, one public key per identity under racing writers, the audit
chain with concurrent writing processes, and run()'s unit-of-work semantics.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest

from broker.audit.chain import GENESIS, AuditEvent, verify_chain
from broker.errors import AlreadyExists, FailedPrecondition, PermissionDenied
from broker.identity.spiffe import Kind
from broker.store.base import (
    CONSTRAINTS,
    AppRecord,
    AppState,
    CertificateRecord,
    CertStatus,
    DeviceRecord,
    DeviceState,
    DuplicateKey,
    EnrollmentTokenRecord,
    GrantRecord,
    MissingReference,
    Role,
    SessionOutcome,
    SessionRecord,
    Store,
    Transaction,
    UserRecord,
)
from tests.contract.conftest import StoreFactory

T0 = 1_700_000_000
TD = "spiffe://camera.local"
WRITERS = 20


def cert(
    serial: str,
    subject: str = f"{TD}/device/cam-1",
    key: str = "k1",
    *,
    status: CertStatus = CertStatus.ACTIVE,
    issued_at: int = T0,
    not_after: int = T0 + 86_400,
    issuer_ski: str | None = "ski-a",
) -> CertificateRecord:
    return CertificateRecord(
        serial=serial,
        spiffe_id=subject,
        kind=Kind.DEVICE,
        subject=subject,
        spki_sha256=key.ljust(64, "0"),
        fingerprint=f"fp-{serial}",
        not_before=T0 - 60,
        not_after=not_after,
        status=status,
        issued_at=issued_at,
        issuer_ski=issuer_ski,
    )


def device(device_id: str = "cam-1", claim: str | None = "claim-hash") -> DeviceRecord:
    return DeviceRecord(device_id, DeviceState.ACTIVE, T0, "token", claim)


def user(user_id: str = "u-1", username: str = "alice") -> UserRecord:
    return UserRecord(user_id, username, "argon2-hash", T0)


def session(session_id: str, device_id: str = "cam-1", **kw: Any) -> SessionRecord:
    fields: dict[str, Any] = {
        "user_id": "u-1",
        "app_id": "a-1",
        "opened_at": T0,
        "expires_at": T0 + 300,
        "outcome": SessionOutcome.OPENED,
    }
    fields.update(kw)
    return SessionRecord(session_id, device_id, **fields)


def seed_owner(store: Store) -> None:
    """cam-1 with a claim code, user u-1 (alice) and her app a-1."""
    with store.transaction() as tx:
        tx.insert_device(device())
        tx.insert_user(user())
        tx.insert_app(AppRecord("a-1", "u-1", "phone", AppState.ACTIVE, T0))


# -- devices ---------------------------------------------------------------------------------


def test_devices(store: Store) -> None:
    with store.transaction() as tx:
        assert tx.get_device("cam-1") is None
        tx.insert_device(device("cam-2"))
        tx.insert_device(device("cam-1"))
    with store.read() as tx:
        assert tx.get_device("cam-1") == device("cam-1")
        assert [d.device_id for d in tx.list_devices()] == ["cam-1", "cam-2"]
    with store.transaction() as tx:
        tx.set_claim_code_hash("cam-1", "new-hash")
        tx.record_presence("cam-2", T0 + 5, "bundle-7")
    with store.read() as tx:
        one, two = tx.get_device("cam-1"), tx.get_device("cam-2")
    assert one is not None and one.claim_code_hash == "new-hash"
    assert two is not None and (two.last_seen_at, two.trust_bundle_version) == (T0 + 5, "bundle-7")
    with store.transaction() as tx:
        tx.set_claim_code_hash("cam-1", None)
        tx.revoke_device("cam-2", T0 + 9)
    with store.read() as tx:
        one, two = tx.get_device("cam-1"), tx.get_device("cam-2")
    assert one is not None and one.claim_code_hash is None
    assert two is not None
    assert (two.state, two.revoked_at, two.claim_code_hash) == (DeviceState.REVOKED, T0 + 9, None)


def test_duplicate_device_id_is_typed_and_the_transaction_stays_usable(store: Store) -> None:
    with store.transaction() as tx:
        tx.insert_device(device())
    with store.transaction() as tx:
        with pytest.raises(DuplicateKey) as caught:
            tx.insert_device(device())
        assert caught.value.constraint == "devices.device_id"
        assert isinstance(caught.value, AlreadyExists)
        tx.insert_device(device("cam-2"))  # the same transaction goes on and commits
    with store.read() as tx:
        assert [d.device_id for d in tx.list_devices()] == ["cam-1", "cam-2"]


# -- certificates ----------------------------------------------------------------------------


def test_certificates(store: Store) -> None:
    cam1, cam2 = f"{TD}/device/cam-1", f"{TD}/device/cam-2"
    with store.transaction() as tx:
        tx.insert_certificate(cert("s2", cam1, "k1", issued_at=T0 + 1))
        tx.insert_certificate(cert("s1", cam1, "k1", issued_at=T0))  # same identity, same key
        tx.insert_certificate(cert("s3", cam2, "k2", issuer_ski="ski-b"))
    with store.read() as tx:
        assert tx.get_certificate("s1") == cert("s1", cam1, "k1", issued_at=T0)
        assert tx.get_certificate("nope") is None
        assert [c.serial for c in tx.certificates_of(cam1)] == ["s1", "s2"]
        assert tx.subjects_with_key("k1".ljust(64, "0")) == {cam1}
        assert tx.subjects_with_key("zz".ljust(64, "0")) == set()
        assert [c.serial for c in tx.active_certificates_issued_by({"ski-a"})] == ["s1", "s2"]
        assert [c.serial for c in tx.active_certificates_issued_by({"ski-a", "ski-b"})] == [
            "s1",
            "s2",
            "s3",
        ]
        assert tx.active_certificates_issued_by(set()) == []
    with store.transaction() as tx:
        assert tx.supersede_certificates(cam1, "s2", T0 + 10) == ["s1"]
        assert tx.supersede_certificates(cam1, "s2", T0 + 11) == []
    with store.read() as tx:
        old = tx.get_certificate("s1")
        assert old is not None
        assert (old.status, old.superseded_by, old.superseded_at) == (
            CertStatus.SUPERSEDED,
            "s2",
            T0 + 10,
        )
        assert [c.serial for c in tx.active_certificates_issued_by({"ski-a"})] == ["s2"]
    with store.transaction() as tx:
        assert tx.revoke_certificates(cam1, T0 + 20, "keyCompromise") == ["s1", "s2"]
        assert tx.revoke_certificates(cam1, T0 + 21, "again") == []
        tx.insert_certificate(cert("s4", cam2, "k2", status=CertStatus.REVOKED, not_after=T0 - 1))
    with store.read() as tx:
        revoked = tx.revoked_unexpired(T0)
        assert [c.serial for c in revoked] == ["s1", "s2"]  # s4 expired already
        assert (revoked[0].revoked_at, revoked[0].revocation_reason) == (T0 + 20, "keyCompromise")
        assert tx.revoked_unexpired(T0 + 86_400) == []


@pytest.mark.parametrize(
    ("second", "constraint"),
    [
        (replace(cert("s1", key="k9"), fingerprint="fp-other"), "certificates.serial"),
        (replace(cert("s9", key="k9"), fingerprint="fp-s1"), "certificates.fingerprint"),
        (cert("s9", f"{TD}/device/cam-2", "k1"), "certificates.spki_sha256"),
    ],
)
def test_certificate_uniqueness(store: Store, second: CertificateRecord, constraint: str) -> None:
    with store.transaction() as tx:
        tx.insert_certificate(cert("s1"))
    with store.transaction() as tx:
        with pytest.raises(DuplicateKey) as caught:
            tx.insert_certificate(second)
        assert caught.value.constraint == constraint
        tx.insert_certificate(cert("s5", key="k5"))  # still usable
    with store.read() as tx:
        assert [c.serial for c in tx.certificates_of(f"{TD}/device/cam-1")] == ["s1", "s5"]
        assert tx.get_certificate("s9") is None


# -- enrollment tokens -----------------------------------------------------------------------


def test_enrollment_tokens(store: Store) -> None:
    live = EnrollmentTokenRecord("h-live", "cam-1", T0, T0 + 3600, "op")
    expired = EnrollmentTokenRecord("h-old", "cam-1", T0 - 7200, T0 - 1, "op")
    other = EnrollmentTokenRecord("h-other", "cam-2", T0, T0 + 3600, "op")
    with store.transaction() as tx:
        for token in (live, expired, other):
            tx.insert_enrollment_token(token)
        with pytest.raises(DuplicateKey) as caught:
            tx.insert_enrollment_token(live)
        assert caught.value.constraint == "enrollment_tokens.token_hash"
    with store.read() as tx:
        assert tx.get_enrollment_token("h-live") == live
        assert tx.get_enrollment_token("nope") is None
    with store.transaction() as tx:
        used = tx.consume_enrollment_token("h-live", T0 + 1)
        assert used == EnrollmentTokenRecord("h-live", "cam-1", T0, T0 + 3600, "op", T0 + 1)
        assert tx.consume_enrollment_token("h-live", T0 + 2) is None  # single use
        assert tx.consume_enrollment_token("h-old", T0 + 2) is None  # expired
        assert tx.consume_enrollment_token("nope", T0 + 2) is None
    with store.transaction() as tx:
        assert tx.cancel_enrollment_tokens("cam-1", T0 + 3) == 1  # only the expired one was unused
        assert tx.cancel_enrollment_tokens("cam-1", T0 + 4) == 0
        assert tx.cancel_enrollment_tokens("cam-2", T0 + 5) == 1
        assert tx.consume_enrollment_token("h-other", T0 + 6) is None
    with store.read() as tx:
        cancelled = tx.get_enrollment_token("h-other")
    assert cancelled is not None and cancelled.used_at == T0 + 5


# -- users and app instances -----------------------------------------------------------------


def test_users_and_apps(store: Store) -> None:
    with store.transaction() as tx:
        tx.insert_user(user())
        tx.insert_app(AppRecord("a-1", "u-1", "phone", AppState.ACTIVE, T0))
    with store.read() as tx:
        assert tx.get_user("u-1") == user()
        assert tx.get_user("u-2") is None
        assert tx.get_user_by_username("alice") == user()
        assert tx.get_user_by_username("bob") is None
        assert tx.get_app("a-1") == AppRecord("a-1", "u-1", "phone", AppState.ACTIVE, T0)
        assert tx.get_app("a-2") is None
    with store.transaction() as tx:
        tx.revoke_app("a-1", T0 + 7)
    with store.read() as tx:
        app = tx.get_app("a-1")
    assert app == AppRecord("a-1", "u-1", "phone", AppState.REVOKED, T0, T0 + 7)


@pytest.mark.parametrize(
    ("second", "constraint"),
    [(user("u-2", "alice"), "users.username"), (user("u-1", "bob"), "users.user_id")],
)
def test_user_uniqueness(store: Store, second: UserRecord, constraint: str) -> None:
    with store.transaction() as tx:
        tx.insert_user(user())
    with store.transaction() as tx:
        with pytest.raises(DuplicateKey) as caught:
            tx.insert_user(second)
        assert caught.value.constraint == constraint
    if constraint == "users.username":
        assert caught.value.message == "that username is taken"  # the core's own words
    with store.read() as tx:
        assert tx.get_user_by_username("bob") is None
        assert tx.get_user("u-2") is None


def test_app_of_unknown_user_is_a_missing_reference(store: Store) -> None:
    with pytest.raises(MissingReference) as caught, store.transaction() as tx:
        tx.insert_app(AppRecord("a-1", "u-404", "phone", AppState.ACTIVE, T0))
    assert caught.value.table == "app_instances"
    assert isinstance(caught.value, FailedPrecondition)
    with store.read() as tx:
        assert tx.get_app("a-1") is None


def test_duplicate_app_id(store: Store) -> None:
    seed_owner(store)
    with store.transaction() as tx, pytest.raises(DuplicateKey) as caught:
        tx.insert_app(AppRecord("a-1", "u-1", "tablet", AppState.ACTIVE, T0))
    assert caught.value.constraint == "app_instances.app_id"


# -- ownership and shares --------------------------------------------------------------------


def test_claims_and_grants(store: Store) -> None:
    seed_owner(store)
    with store.transaction() as tx:
        tx.insert_user(user("u-2", "bob"))
        tx.insert_device(device("cam-2", claim="other"))
        tx.revoke_device("cam-2", T0)
    with store.transaction() as tx:
        assert not tx.claim_device("cam-1", "wrong")
        assert not tx.claim_device("cam-2", "other")  # revoked
        assert not tx.claim_device("cam-9", "claim-hash")
        assert tx.claim_device("cam-1", "claim-hash")
        assert not tx.claim_device("cam-1", "claim-hash")  # single use
        tx.insert_grant(GrantRecord("cam-1", "u-1", Role.OWNER, "app:a-1", T0))
        tx.insert_grant(GrantRecord("cam-1", "u-2", Role.VIEWER, "app:a-1", T0, T0 + 60))
    with store.read() as tx:
        device_row = tx.get_device("cam-1")
        assert device_row is not None and device_row.claim_code_hash is None
        owner = tx.get_grant("cam-1", "u-1")
        viewer = tx.get_grant("cam-1", "u-2")
        assert owner == GrantRecord("cam-1", "u-1", Role.OWNER, "app:a-1", T0)
        assert viewer is not None and viewer.expires_at == T0 + 60
        assert owner.active_at(T0 + 10**9) and viewer.active_at(T0 + 59)
        assert not viewer.active_at(T0 + 60)
        assert tx.get_grant("cam-1", "u-9") is None
        assert [g.device_id for g in tx.grants_of_user("u-2")] == ["cam-1"]
    with store.transaction() as tx:
        with pytest.raises(DuplicateKey) as same_pair:
            tx.insert_grant(GrantRecord("cam-1", "u-2", Role.VIEWER, "x", T0))
        assert same_pair.value.constraint == "grants.device_user"
        with pytest.raises(DuplicateKey) as second_owner:
            tx.insert_grant(GrantRecord("cam-1", "u-2", Role.OWNER, "x", T0))
        assert second_owner.value.constraint in ("grants.device_user", "grants.one_owner")
        assert tx.delete_grant("cam-1", "u-2")
        assert not tx.delete_grant("cam-1", "u-2")
        with pytest.raises(DuplicateKey) as two_owners:
            tx.insert_grant(GrantRecord("cam-1", "u-2", Role.OWNER, "x", T0))
        assert two_owners.value.constraint == "grants.one_owner"
        tx.insert_grant(GrantRecord("cam-1", "u-2", Role.VIEWER, "x", T0))
    with store.transaction() as tx:
        dropped = tx.delete_grants("cam-1")
        assert sorted((g.user_id, g.role) for g in dropped) == [
            ("u-1", Role.OWNER),
            ("u-2", Role.VIEWER),
        ]
        assert tx.delete_grants("cam-1") == []
        assert tx.grants_of_user("u-1") == []


def test_grant_for_unknown_device_is_a_missing_reference(store: Store) -> None:
    seed_owner(store)
    with pytest.raises(MissingReference), store.transaction() as tx:
        tx.insert_grant(GrantRecord("cam-404", "u-1", Role.OWNER, "x", T0))


# -- sessions --------------------------------------------------------------------------------


def test_sessions(store: Store) -> None:
    with store.transaction() as tx:
        tx.insert_session(session("s-b", opened_at=T0 + 1))
        tx.insert_session(session("s-a", opened_at=T0 + 1))
        tx.insert_session(session("s-c", app_id="a-2", opened_at=T0))
        tx.insert_session(session("s-d", "cam-2", user_id="u-2", app_id="a-3"))
        tx.insert_session(session("s-x", outcome=SessionOutcome.DENIED, reason="no grant"))
        with pytest.raises(DuplicateKey) as caught:
            tx.insert_session(session("s-a"))
        assert caught.value.constraint == "sessions.session_id"
    with store.read() as tx:
        assert tx.get_session("s-a") == session("s-a", opened_at=T0 + 1)
        assert tx.get_session("nope") is None
        assert [s.session_id for s in tx.sessions_of_device("cam-1")] == [
            "s-c",
            "s-x",
            "s-a",
            "s-b",
        ]
        assert {s.session_id for s in tx.open_sessions()} == {"s-a", "s-b", "s-c", "s-d"}
        assert {s.session_id for s in tx.open_sessions(device_id="cam-1")} == {"s-a", "s-b", "s-c"}
        assert {s.session_id for s in tx.open_sessions(user_id="u-2")} == {"s-d"}
        assert {s.session_id for s in tx.open_sessions(app_id="a-2")} == {"s-c"}
        assert tx.open_sessions(device_id="cam-1", app_id="a-3") == []
    with store.transaction() as tx:
        assert tx.end_sessions(["s-b", "s-x", "nope", "s-a", "s-b"], T0 + 30, "revoked") == [
            "s-b",
            "s-a",
        ]
        assert tx.end_sessions([], T0 + 30, "none") == []
    with store.transaction() as tx:
        assert tx.close_session("s-c", T0 + 40, "viewer left", 1234)  # open -> ended
        assert tx.close_session("s-b", T0 + 41, "late close", 99)  # already ended: bytes only
        assert not tx.close_session("s-x", T0 + 42, "denied", 1)
        assert not tx.close_session("nope", T0 + 42, "x", 1)
    with store.read() as tx:
        closed, ended, denied = tx.get_session("s-c"), tx.get_session("s-b"), tx.get_session("s-x")
    assert closed is not None and ended is not None and denied is not None
    assert (closed.outcome, closed.ended_at, closed.reason, closed.bytes) == (
        SessionOutcome.ENDED,
        T0 + 40,
        "viewer left",
        1234,
    )
    assert (ended.ended_at, ended.reason, ended.bytes) == (T0 + 30, "revoked", 99)
    assert (denied.outcome, denied.bytes, denied.ended_at) == (SessionOutcome.DENIED, 0, None)
    with store.transaction() as tx:
        assert tx.end_all_open_sessions(T0 + 50, "broker stopping") == ["s-d"]
        assert tx.end_all_open_sessions(T0 + 51, "again") == []
        assert tx.open_sessions() == []


# -- audit -----------------------------------------------------------------------------------


def test_audit_chain(store: Store) -> None:
    events = [
        AuditEvent("op", "device.enrolled", "cam-1", {"serial": "s1", "n": [1, 2]}),
        AuditEvent("app", "session.opened", "cam-1", {"sid": "x"}),
        AuditEvent("app", "session.denied", "cam-2", {}),
        AuditEvent("app", "sessions%weird", "cam-1", {}),
    ]
    with store.transaction() as tx:
        first = tx.append_audit(events[0], 1000)
        assert (first.seq, first.prev_hash) == (1, GENESIS)
        assert first.detail == {"serial": "s1", "n": [1, 2]}
    with store.transaction() as tx:
        entries = [tx.append_audit(e, 1001 + i) for i, e in enumerate(events[1:])]
    assert [e.seq for e in entries] == [2, 3, 4]
    assert entries[0].prev_hash == first.hash
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.append_audit(AuditEvent("x", "rolled.back", "cam-1"), 2000)
        raise RuntimeError("boom")
    stored = list(store.audit_entries())
    assert [e.action for e in stored] == [e.action for e in events]
    assert stored[0] == first
    result = verify_chain(stored)
    assert result.ok and result.entries == 4 and result.head_hash == entries[-1].hash
    with store.read() as tx:
        assert [e.seq for e in tx.audit_entries_for("cam-1", "session")] == [2, 4]
        assert [e.seq for e in tx.audit_entries_for("cam-1", "session.")] == [2]
        assert [e.seq for e in tx.audit_entries_for("cam-1", "%")] == [1, 2, 4]  # % is literal-free
        assert tx.audit_entries_for("cam-3", "") == []
    with store.transaction() as tx:
        nxt = tx.append_audit(AuditEvent("op", "after", "cam-1"), 3000)
    assert (nxt.seq, nxt.prev_hash) == (5, entries[-1].hash)
    assert verify_chain(store.audit_entries()).ok


# -- the store -------------------------------------------------------------------------------


def test_transaction_rolls_back_on_any_exception(store: Store) -> None:
    with pytest.raises(PermissionDenied), store.transaction() as tx:
        tx.insert_device(device())
        raise PermissionDenied("no")
    with store.read() as tx:
        assert tx.get_device("cam-1") is None


def test_read_sees_committed_state(store_factory: StoreFactory) -> None:
    writer, reader = store_factory(), store_factory()
    with writer.transaction() as tx:
        tx.insert_device(device())
    with reader.read() as tx:
        assert tx.get_device("cam-1") == device()


def test_batch_commits_its_transactions(store: Store) -> None:
    with store.batch():
        with store.transaction() as tx:
            tx.insert_device(device("cam-1"))
        with pytest.raises(RuntimeError), store.transaction() as tx:
            tx.insert_device(device("cam-2"))
            raise RuntimeError("only this one is undone")
        with store.transaction() as tx:
            tx.insert_device(device("cam-3"))
    with store.read() as tx:
        assert [d.device_id for d in tx.list_devices()] == ["cam-1", "cam-3"]


def test_run_returns_the_units_result_and_commits(store: Store) -> None:
    def unit(tx: Transaction) -> str:
        tx.insert_device(device())
        return "done"

    assert store.run(unit) == "done"
    with store.read() as tx:
        assert tx.get_device("cam-1") == device()


def test_run_rolls_back_and_raises_the_units_error(store: Store) -> None:
    calls = []

    def unit(tx: Transaction) -> None:
        calls.append(1)
        tx.insert_device(device())
        raise PermissionDenied("refused")

    with pytest.raises(PermissionDenied):
        store.run(unit)
    assert calls == [1]  # a caller's error is never re-run
    with store.read() as tx:
        assert tx.get_device("cam-1") is None


def test_typed_duplicate_from_run(store: Store) -> None:
    store.run(lambda tx: tx.insert_user(user()))
    with pytest.raises(DuplicateKey) as caught:
        store.run(lambda tx: tx.insert_user(user("u-2")))
    assert caught.value.constraint == "users.username"
    assert caught.value.constraint in CONSTRAINTS


def test_schema_version_is_the_latest(store: Store, backend: str) -> None:
    if backend == "sqlite":
        from broker.store.schema import LATEST_VERSION
    else:
        from broker.store.postgres.schema import LATEST_VERSION
    assert store.schema_version() == LATEST_VERSION


# -- concurrency: 20 writers, each with its own connection ---------------------------------


def race(
    store_factory: StoreFactory,
    unit: Callable[[Transaction, int], object],
    *,
    via: str = "run",
    **options: Any,
) -> list[tuple[bool, object]]:
    """Run unit(tx, i) for i in range(WRITERS) at once, each writer on its own store; return
    (succeeded, result or exception) per writer."""
    stores = [store_factory(**options) for _ in range(WRITERS)]
    barrier = threading.Barrier(WRITERS)

    def writer(i: int) -> tuple[bool, object]:
        barrier.wait()
        try:
            if via == "run":
                return True, stores[i].run(lambda tx: unit(tx, i))
            with stores[i].transaction() as tx:
                return True, unit(tx, i)
        except Exception as error:
            return False, error

    try:
        with ThreadPoolExecutor(WRITERS) as pool:
            return list(pool.map(writer, range(WRITERS)))
    finally:
        for store in stores:
            store.close()


@pytest.fixture(params=["run", "transaction"])
def via(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def test_racing_writers_consume_one_claim_code_once(store_factory: StoreFactory, via: str) -> None:
    setup = store_factory()
    seed_owner(setup)
    with setup.transaction() as tx:
        for i in range(WRITERS):
            tx.insert_user(user(f"u-r{i}", f"racer{i}"))

    def claim(tx: Transaction, i: int) -> bool:
        if not tx.claim_device("cam-1", "claim-hash"):
            return False
        tx.insert_grant(GrantRecord("cam-1", f"u-r{i}", Role.OWNER, f"racer{i}", T0))
        tx.append_audit(AuditEvent(f"racer{i}", "device.claimed", "cam-1"), T0 * 1000 + i)
        return True

    outcomes = race(store_factory, claim, via=via)
    assert all(ok for ok, _ in outcomes), outcomes  # losers are told "no", never an error
    winners = [i for i, (_, won) in enumerate(outcomes) if won]
    assert len(winners) == 1
    with setup.read() as tx:
        owners = [g for i in range(WRITERS) if (g := tx.get_grant("cam-1", f"u-r{i}"))]
    assert [g.user_id for g in owners] == [f"u-r{winners[0]}"]
    chain = list(setup.audit_entries())
    assert [e.action for e in chain] == ["device.claimed"]
    assert verify_chain(chain).ok


def test_racing_writers_consume_one_enrollment_token_once(
    store_factory: StoreFactory, via: str
) -> None:
    setup = store_factory()
    with setup.transaction() as tx:
        tx.insert_enrollment_token(EnrollmentTokenRecord("h-1", "cam-1", T0, T0 + 3600, "op"))

    def enroll(tx: Transaction, i: int) -> bool:
        if tx.consume_enrollment_token("h-1", T0 + i) is None:
            return False
        tx.insert_device(device("cam-1"))
        tx.insert_certificate(cert(f"s-{i}", key=f"k{i}"))
        tx.append_audit(AuditEvent("anonymous", "device.enrolled", "cam-1"), T0 * 1000 + i)
        return True

    outcomes = race(store_factory, enroll, via=via)
    assert all(ok for ok, _ in outcomes), outcomes
    assert sum(1 for _, won in outcomes if won) == 1
    with setup.read() as tx:
        assert len(tx.certificates_of(f"{TD}/device/cam-1")) == 1
    assert verify_chain(setup.audit_entries()).entries == 1


def test_racing_identities_bind_one_public_key_once(store_factory: StoreFactory, via: str) -> None:
    """Two identities (ten writers each) race to bind one key: exactly one certificate is stored,
    every loser gets DuplicateKey(certificates.spki_sha256), whichever identity won."""

    def bind(tx: Transaction, i: int) -> str:
        subject = f"{TD}/device/cam-{i % 2}"
        tx.insert_certificate(cert(f"s-{i}", subject, "shared"))
        tx.append_audit(AuditEvent("anonymous", "device.enrolled", subject), T0 * 1000 + i)
        return subject

    outcomes = race(store_factory, bind, via=via)
    winners = [result for ok, result in outcomes if ok]
    losers = [result for ok, result in outcomes if not ok]
    # Writers of the winning identity may also succeed later (same key, same identity).
    assert len(set(winners)) == 1, winners
    assert losers and all(
        isinstance(e, DuplicateKey) and e.constraint == "certificates.spki_sha256" for e in losers
    ), losers
    setup = store_factory()
    with setup.read() as tx:
        assert tx.subjects_with_key("shared".ljust(64, "0")) == set(winners)
    assert verify_chain(setup.audit_entries()).entries == len(winners)


def test_racing_sign_ups_take_one_username_once(store_factory: StoreFactory, via: str) -> None:
    def sign_up(tx: Transaction, i: int) -> str:
        if tx.get_user_by_username("alice") is not None:  # the core's own check first
            raise DuplicateKey("users.username")
        tx.insert_user(user(f"u-{i}", "alice"))
        tx.append_audit(AuditEvent("anonymous", "user.created", f"u-{i}"), T0 * 1000 + i)
        return f"u-{i}"

    outcomes = race(store_factory, sign_up, via=via)
    assert sum(1 for ok, _ in outcomes if ok) == 1
    losers = [e for ok, e in outcomes if not ok]
    assert all(isinstance(e, DuplicateKey) and e.constraint == "users.username" for e in losers)
    assert verify_chain(store_factory().audit_entries()).entries == 1


def test_concurrent_writers_keep_one_audit_chain(store_factory: StoreFactory) -> None:
    per_writer = 10

    def append(tx: Transaction, i: int) -> int:
        return tx.append_audit(AuditEvent(f"w{i}", "tick", "chain"), T0 * 1000 + i).seq

    seqs: list[int] = []
    for _ in range(per_writer):
        seqs += [seq for ok, seq in race(store_factory, append) if ok]  # type: ignore[misc]
    assert sorted(seqs) == list(range(1, WRITERS * per_writer + 1))
    result = verify_chain(store_factory().audit_entries())
    assert result.ok and result.entries == WRITERS * per_writer
