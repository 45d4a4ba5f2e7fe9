"""Hot store queries must use their indexes, so the broker does not slow as the tables grow."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.store.sqlite import SqliteStore

CASES = [
    (
        "UPDATE certificates SET status = 'superseded' WHERE subject = ? AND status = 'active' "
        "AND serial != ?",
        ("s", "x"),
        "certificates_subject",
    ),
    ("SELECT * FROM certificates WHERE serial = ?", ("x",), "sqlite_autoindex_certificates_1"),
    ("SELECT * FROM certificates WHERE spki_sha256 = ?", ("x",), "certificates_spki"),
    (
        "SELECT * FROM certificates WHERE status = 'revoked' AND not_after > ?",
        (0,),
        "certificates_revoked",
    ),
    (
        "SELECT * FROM grants WHERE device_id = ? AND user_id = ?",
        ("d", "u"),
        "sqlite_autoindex_grants_1",
    ),
    (
        "SELECT * FROM audit_log WHERE subject = ? AND action LIKE ? ORDER BY seq",
        ("d", "s%"),
        "audit_log_subject",
    ),
]


@pytest.mark.parametrize(("sql", "args", "index"), CASES)
def test_hot_query_uses_its_index(
    tmp_path: Path, sql: str, args: tuple[object, ...], index: str
) -> None:
    store = SqliteStore(tmp_path / "db")
    plan = " ".join(str(row[-1]) for row in store._conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))
    store.close()
    assert index in plan, plan
    assert "SCAN certificates" not in plan and "SCAN grants" not in plan, plan
