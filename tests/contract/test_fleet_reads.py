"""The store's fleet-audit reads (broker.store.base), on every backend: audit entries by action
and time, failure counts per key, device certificates expiring in a range, session fan-out."""

from __future__ import annotations

from dataclasses import replace

from broker.audit.chain import AuditEvent
from broker.identity.spiffe import Kind
from broker.store.base import CertStatus, FailureCount, SessionOutcome, Store
from tests.contract.test_store_contract import T0, TD, cert, session


def test_audit_entries_since_filters_by_action_and_time(store: Store) -> None:
    with store.transaction() as tx:
        tx.append_audit(AuditEvent("a", "relay.alarm", "cam-1", {"n": 1}), 1_000)
        tx.append_audit(AuditEvent("a", "relay.alarm.other", "cam-1"), 2_000)  # no prefix match
        tx.append_audit(AuditEvent("a", "device.attach.replaced", "cam-2"), 2_000)
        tx.append_audit(AuditEvent("a", "relay.alarm", "cam-3", {"n": 2}), 3_000)
        tx.append_audit(AuditEvent("a", "session.opened", "cam-3"), 4_000)
    with store.read() as tx:
        both = tx.audit_entries_since(2_000, ("relay.alarm", "device.attach.replaced"))
        assert [(e.seq, e.action, e.subject) for e in both] == [
            (3, "device.attach.replaced", "cam-2"),
            (4, "relay.alarm", "cam-3"),
        ]
        assert both[1].detail == {"n": 2}
        assert [e.seq for e in tx.audit_entries_since(0, ("relay.alarm",))] == [1, 4]
        assert tx.audit_entries_since(0, ()) == []
        assert tx.audit_entries_since(5_000, ("relay.alarm",)) == []


def test_failure_counts_per_key_since(store: Store) -> None:
    with store.transaction() as tx:
        for key, at in (("s-1", 100), ("s-1", 200), ("s-1", 300), ("s-2", 250), ("s-0", 50)):
            tx.record_failure("revoked.attempt", key, at, 0)
        tx.record_failure("login.user", "s-1", 300, 0)  # another scope: not counted
    with store.read() as tx:
        assert tx.failure_counts("revoked.attempt", 200) == [
            FailureCount("s-1", 2, 200, 300),
            FailureCount("s-2", 1, 250, 250),
        ]
        assert tx.failure_counts("revoked.attempt", 301) == []
        assert [c.key for c in tx.failure_counts("revoked.attempt", 0)] == ["s-0", "s-1", "s-2"]


def test_device_certificates_expiring_in_a_range(store: Store) -> None:
    app = replace(cert("c-app", f"{TD}/user/u-1/app/a-1", "k9", not_after=T0 + 50), kind=Kind.APP)
    with store.transaction() as tx:
        tx.insert_certificate(cert("c-late", f"{TD}/device/cam-2", "k2", not_after=T0 + 90))
        tx.insert_certificate(cert("c-soon", f"{TD}/device/cam-1", "k1", not_after=T0 + 50))
        tx.insert_certificate(cert("c-edge", f"{TD}/device/cam-3", "k3", not_after=T0 + 100))
        tx.insert_certificate(cert("c-past", f"{TD}/device/cam-4", "k4", not_after=T0))
        tx.insert_certificate(
            cert("c-rev", f"{TD}/device/cam-5", "k5", not_after=T0 + 60, status=CertStatus.REVOKED)
        )
        tx.insert_certificate(app)
    with store.read() as tx:
        expiring = tx.device_certificates_expiring(T0, T0 + 100)
    # after < not_after <= before; active device certificates only; soonest first.
    assert [c.serial for c in expiring] == ["c-soon", "c-late", "c-edge"]
    assert expiring[0] == cert("c-soon", f"{TD}/device/cam-1", "k1", not_after=T0 + 50)


def test_fanout_sessions_only_for_users_over_the_threshold(store: Store) -> None:
    with store.transaction() as tx:
        # u-1: three devices (one denied) since T0; u-2: two sessions on one device.
        tx.insert_session(session("s-3", "cam-3", opened_at=T0 + 20))
        tx.insert_session(session("s-1", "cam-1", opened_at=T0))
        tx.insert_session(session("s-2", "cam-2", opened_at=T0 + 10, outcome=SessionOutcome.DENIED))
        tx.insert_session(session("s-old", "cam-9", opened_at=T0 - 1))
        tx.insert_session(session("s-4", "cam-1", user_id="u-2", opened_at=T0))
        tx.insert_session(session("s-5", "cam-1", user_id="u-2", opened_at=T0 + 1))
    with store.read() as tx:
        assert [s.session_id for s in tx.fanout_sessions(T0, 3)] == ["s-1", "s-2", "s-3"]
        assert [s.session_id for s in tx.fanout_sessions(T0, 1)] == [
            "s-1",
            "s-2",
            "s-3",
            "s-4",
            "s-5",
        ]
        # Before T0 u-1 has a fourth device; since T0 + 1 only two remain.
        assert len(tx.fanout_sessions(T0 - 1, 4)) == 4
        assert tx.fanout_sessions(T0 + 1, 3) == []
