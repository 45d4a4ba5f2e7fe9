"""Group commit on the core thread: one COMMIT per batch, savepoint per call, fail closed (I8, I10)."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import wait
from pathlib import Path

import pytest

from broker.audit.chain import AuditEvent, verify_chain
from broker.store import EnrollmentTokenRecord
from broker.store.groupcommit import GroupCommitExecutor
from broker.store.sqlite import SqliteStore


def _token(i: int) -> EnrollmentTokenRecord:
    return EnrollmentTokenRecord(f"{i:064x}", f"cam-{i:04d}", 0, 10**10, "test")


def _insert(store: SqliteStore, i: int) -> str:
    with store.transaction() as tx:
        tx.insert_enrollment_token(_token(i))
        tx.append_audit(AuditEvent("t", "token", f"cam-{i:04d}"), i)
    return f"cam-{i:04d}"


def _fail_after_write(store: SqliteStore, i: int) -> None:
    with store.transaction() as tx:
        tx.insert_enrollment_token(_token(i))
        raise ValueError("refused after writing")


def _rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM enrollment_tokens").fetchone()[0])


def test_failed_call_rolls_back_only_its_own_savepoint(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    gate = threading.Event()
    executor = GroupCommitExecutor(store)
    blocker = executor.submit(gate.wait)  # holds the thread so the next calls form one batch
    futures = [
        executor.submit(_insert, store, 1),
        executor.submit(_fail_after_write, store, 2),
        executor.submit(_insert, store, 3),
    ]
    gate.set()
    wait([blocker, *futures])
    executor.shutdown()
    assert futures[0].result() == "cam-0001" and futures[2].result() == "cam-0003"
    with pytest.raises(ValueError):
        futures[1].result()
    assert _rows(tmp_path / "db") == 2
    assert executor.batches < executor.calls  # calls really were batched
    assert verify_chain(store.audit_entries()).ok


def test_results_are_released_only_after_commit_and_a_failed_commit_fails_the_batch(
    tmp_path: Path,
) -> None:
    """I10: if COMMIT fails nothing of the batch is reported as done."""
    store = SqliteStore(tmp_path / "db")
    gate = threading.Event()
    executor = GroupCommitExecutor(store)
    blocker = executor.submit(gate.wait)

    def poison(s: SqliteStore) -> None:  # makes the outer COMMIT fail (deferred FK violation)
        with s.transaction() as tx:
            tx._conn.execute("PRAGMA defer_foreign_keys = ON")  # type: ignore[attr-defined]
            tx._conn.execute(  # type: ignore[attr-defined]
                "INSERT INTO grants (device_id, user_id, role, granted_by, created_at) "
                "VALUES ('nope', 'nobody', 'owner', 't', 0)"
            )

    futures = [executor.submit(_insert, store, 1), executor.submit(poison, store)]
    gate.set()
    wait([blocker, *futures])
    executor.shutdown()
    for future in futures:
        assert isinstance(future.exception(), sqlite3.IntegrityError)
    assert _rows(tmp_path / "db") == 0


def test_i8_single_use_token_under_batching_gives_one_success(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    _insert(store, 7)
    executor = GroupCommitExecutor(store)

    def consume() -> bool:
        with store.transaction() as tx:
            return tx.consume_enrollment_token(f"{7:064x}", 1) is not None

    futures = [executor.submit(consume) for _ in range(16)]
    wait(futures)
    executor.shutdown()
    assert sum(f.result() for f in futures) == 1
