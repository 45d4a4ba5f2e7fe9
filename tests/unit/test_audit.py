"""The hash-chained audit log (I12): a clean chain verifies; every kind of tampering is located."""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.audit.chain import (
    GENESIS,
    AuditEntry,
    AuditEvent,
    canonical_detail,
    entry_hash,
    verify_chain,
)
from broker.store.sqlite import SqliteStore

EVENTS = [
    AuditEvent(
        "spiffe://camera.local/operator/admin",
        "enrollment_token.created",
        "cam-0001",
        {"expires_at": 1},
    ),
    AuditEvent(
        "anonymous",
        "device.enrolled",
        "cam-0001",
        {"serial": "4a1f", "via": "token", "superseded": []},
    ),
    AuditEvent(
        "spiffe://camera.local/device/cam-0001",
        "certificate.renewed",
        "cam-0001",
        {"serial": "5b2e"},
    ),
    AuditEvent(
        "anonymous", "device.enroll.denied", "", {"reason": "unknown token", "via": "token"}
    ),
    AuditEvent(
        "spiffe://camera.local/operator/admin", "device.revoked", "cam-0001", {"serials": ["4a1f"]}
    ),
    AuditEvent("birth:77", "device.enrolled", "cam-0002", {"note": "caf\u00e9 \u2603", "n": 2.5}),
]
N = len(EVENTS)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "audit.db")
    for i, event in enumerate(EVENTS):
        with store.transaction() as tx:
            tx.append_audit(event, 1_700_000_000_000 + i * 1000)
    yield store
    store.close()


def _raw(store: SqliteStore) -> sqlite3.Connection:
    """A second connection, as an attacker with file access would have."""
    return sqlite3.connect(store.path, isolation_level=None)


def _verify(store: SqliteStore):  # type: ignore[no-untyped-def]
    return verify_chain(store.audit_entries())


def test_clean_chain_verifies(store: SqliteStore) -> None:
    entries = list(store.audit_entries())
    assert [e.seq for e in entries] == list(range(1, N + 1))
    assert entries[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    assert [(e.actor, e.action, e.subject, dict(e.detail)) for e in entries] == [
        (e.actor, e.action, e.subject, dict(e.detail)) for e in EVENTS
    ]
    result = verify_chain(entries)
    assert result.ok
    assert result.entries == N
    assert result.first_bad_seq is None
    assert result.head_hash == entries[-1].hash


def test_empty_chain_verifies() -> None:
    result = verify_chain([])
    assert result.ok
    assert result.entries == 0
    assert result.head_hash == GENESIS


def test_append_returns_what_is_stored(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.db")
    try:
        with store.transaction() as tx:
            first = tx.append_audit(EVENTS[0], 5)
            second = tx.append_audit(EVENTS[1], 6)
        assert list(store.audit_entries()) == [first, second]
        assert second.hash == entry_hash(
            first.hash,
            2,
            6,
            EVENTS[1].actor,
            EVENTS[1].action,
            EVENTS[1].subject,
            canonical_detail(EVENTS[1].detail),
        )
    finally:
        store.close()


def test_rolled_back_transaction_leaves_no_entry(store: SqliteStore) -> None:
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.append_audit(EVENTS[0], 1)
        raise RuntimeError("boom")
    assert len(list(store.audit_entries())) == N
    assert _verify(store).ok


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("detail", '{"expires_at":999}'),
        ("detail", "{}"),
        ("actor", "spiffe://camera.local/operator/mallory"),
        ("action", "device.unrevoked"),
        ("subject", "cam-9999"),
        ("at_ms", 1),
    ],
)
@pytest.mark.parametrize("seq", [1, 3, N])
def test_edited_row_fails_at_its_seq(
    store: SqliteStore, column: str, value: object, seq: int
) -> None:
    with _raw(store) as conn:
        conn.execute(f"UPDATE audit_log SET {column} = ? WHERE seq = ?", (value, seq))
    result = _verify(store)
    assert not result.ok
    assert result.first_bad_seq == seq
    assert result.reason == "entry content does not match its hash"


def test_detail_respelled_with_same_meaning_still_verifies(store: SqliteStore) -> None:
    """Detail is hashed in canonical form: reformatting JSON is not tampering, rewriting it is."""
    with _raw(store) as conn:
        conn.execute(
            "UPDATE audit_log SET detail = ? WHERE seq = 2",
            ('{ "via": "token", "superseded": [], "serial": "4a1f" }',),
        )
    assert _verify(store).ok


def test_deleted_middle_row_fails_where_the_gap_is(store: SqliteStore) -> None:
    with _raw(store) as conn:
        conn.execute("DELETE FROM audit_log WHERE seq = 3")
    result = _verify(store)
    assert not result.ok
    assert result.first_bad_seq == 4  # the entry found where seq 3 should be
    assert result.reason == "expected seq 3"


def test_deleted_first_row_fails_at_once(store: SqliteStore) -> None:
    with _raw(store) as conn:
        conn.execute("DELETE FROM audit_log WHERE seq = 1")
    result = _verify(store)
    assert (result.ok, result.first_bad_seq, result.reason) == (False, 2, "expected seq 1")


def test_deleted_and_renumbered_rows_fail_at_the_splice(store: SqliteStore) -> None:
    """Closing the gap by renumbering does not help: the next entry no longer links."""
    with _raw(store) as conn:
        conn.execute("DELETE FROM audit_log WHERE seq = 3")
        conn.execute("UPDATE audit_log SET seq = seq - 1 WHERE seq > 3")
    result = _verify(store)
    assert not result.ok
    assert result.first_bad_seq == 3
    assert result.reason == "prev_hash does not link"


def test_reordered_rows_fail_at_the_first_moved_seq(store: SqliteStore) -> None:
    """Swap the seq numbers of entries 2 and 3 in the table."""
    with _raw(store) as conn:
        conn.execute("UPDATE audit_log SET seq = -1 WHERE seq = 2")
        conn.execute("UPDATE audit_log SET seq = 2 WHERE seq = 3")
        conn.execute("UPDATE audit_log SET seq = 3 WHERE seq = -1")
    result = _verify(store)
    assert not result.ok
    assert result.first_bad_seq == 2
    assert result.reason == "prev_hash does not link"


def test_reordered_iteration_fails_at_the_first_out_of_place_entry(store: SqliteStore) -> None:
    entries = list(store.audit_entries())
    entries[2], entries[4] = entries[4], entries[2]
    result = verify_chain(entries)
    assert (result.ok, result.first_bad_seq, result.reason) == (False, 5, "expected seq 3")


def test_changed_prev_hash_fails_at_that_seq(store: SqliteStore) -> None:
    with _raw(store) as conn:
        conn.execute("UPDATE audit_log SET prev_hash = ? WHERE seq = 4", ("f" * 64,))
    result = _verify(store)
    assert (result.ok, result.first_bad_seq, result.reason) == (False, 4, "prev_hash does not link")


def test_rewritten_entry_with_recomputed_hash_fails_at_the_next_seq(store: SqliteStore) -> None:
    """An attacker who rewrites entry 3 and fixes up its own hash is caught by entry 4's link."""
    entries = list(store.audit_entries())
    victim = entries[2]
    forged_detail = canonical_detail({"serial": "0000"})
    forged_hash = entry_hash(
        victim.prev_hash,
        victim.seq,
        victim.at_ms,
        victim.actor,
        victim.action,
        victim.subject,
        forged_detail,
    )
    with _raw(store) as conn:
        conn.execute(
            "UPDATE audit_log SET detail = ?, hash = ? WHERE seq = 3", (forged_detail, forged_hash)
        )
    result = _verify(store)
    assert (result.ok, result.first_bad_seq, result.reason) == (False, 4, "prev_hash does not link")
    assert result.entries == 4


def test_changed_hash_column_fails_at_that_seq(store: SqliteStore) -> None:
    with _raw(store) as conn:
        conn.execute("UPDATE audit_log SET hash = ? WHERE seq = 2", ("0" * 63 + "1",))
    result = _verify(store)
    assert (result.ok, result.first_bad_seq, result.reason) == (
        False,
        2,
        "entry content does not match its hash",
    )


def test_forged_genesis_fails_at_seq_1() -> None:
    fake = AuditEntry(1, 0, "a", "b", "c", {}, "1" * 64, "")
    fake = dataclasses.replace(fake, hash=entry_hash(fake.prev_hash, 1, 0, "a", "b", "c", "{}"))
    result = verify_chain([fake])
    assert (result.ok, result.first_bad_seq, result.reason) == (False, 1, "prev_hash does not link")


def test_appending_after_verification_continues_the_chain(store: SqliteStore) -> None:
    head = _verify(store).head_hash
    with store.transaction() as tx:
        entry = tx.append_audit(EVENTS[0], 42)
    assert entry.seq == N + 1
    assert entry.prev_hash == head
    assert _verify(store).ok
