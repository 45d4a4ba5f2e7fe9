"""The store contract for renew-after-expiry nonces (schema v9), on every backend: use, read back,
prune; a used nonce is a typed DuplicateKey and the transaction stays usable; 20 racing writers
use one nonce exactly once (I8); a v8 database migrates to v9 with its rows intact."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker.audit.chain import AuditEvent, verify_chain
from broker.store.base import CONSTRAINTS, DuplicateKey, RenewalNonceRecord, Store, Transaction
from broker.store.sqlite import SqliteStore
from tests.contract.conftest import StoreFactory
from tests.contract.test_store_contract import T0, WRITERS, device, race

CAM = "spiffe://camera.local/device/cam-1"


def test_nonces_are_used_read_back_and_pruned(store: Store) -> None:
    assert "renewal_nonces.nonce_hash" in CONSTRAINTS
    with store.transaction() as tx:
        tx.use_renewal_nonce("n-old", CAM, T0)
        tx.use_renewal_nonce("n-new", CAM, T0 + 100)
        assert tx.get_renewal_nonce("n-old") == RenewalNonceRecord("n-old", CAM, T0)
        assert tx.get_renewal_nonce("n-unknown") is None
    with store.transaction() as tx:
        assert tx.forget_renewal_nonces(T0 + 100) == 1  # strictly older only
        assert tx.forget_renewal_nonces(T0 + 100) == 0
    with store.read() as tx:
        assert tx.get_renewal_nonce("n-old") is None
        assert tx.get_renewal_nonce("n-new") == RenewalNonceRecord("n-new", CAM, T0 + 100)


def test_a_used_nonce_is_a_typed_duplicate_and_the_transaction_stays_usable(store: Store) -> None:
    store.run(lambda tx: tx.use_renewal_nonce("n-1", CAM, T0))
    with store.transaction() as tx:
        with pytest.raises(DuplicateKey) as caught:
            tx.use_renewal_nonce("n-1", "spiffe://camera.local/device/cam-2", T0 + 1)
        assert caught.value.constraint == "renewal_nonces.nonce_hash"
        tx.insert_device(device("cam-2"))  # still usable after the refused insert
    with store.read() as tx:
        assert tx.get_renewal_nonce("n-1") == RenewalNonceRecord("n-1", CAM, T0)
        assert tx.get_device("cam-2") == device("cam-2")


def test_a_rolled_back_use_leaves_the_nonce_unused(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.use_renewal_nonce("n-1", CAM, T0)
        raise RuntimeError("a later check refused the renewal")
    with store.read() as tx:
        assert tx.get_renewal_nonce("n-1") is None


def test_racing_writers_use_one_nonce_once(store_factory: StoreFactory, via: str) -> None:
    """I8: 20 writers, each on its own connection, race to use one nonce: exactly one commits,
    every loser gets DuplicateKey(renewal_nonces.nonce_hash), never another error."""

    def renew(tx: Transaction, i: int) -> int:
        tx.use_renewal_nonce("n-race", CAM, T0 + i)
        tx.append_audit(AuditEvent(CAM, "certificate.renewed_after_expiry", "cam-1"), T0 * 1000 + i)
        return i

    outcomes = race(store_factory, renew, via=via)
    winners = [result for ok, result in outcomes if ok]
    losers = [error for ok, error in outcomes if not ok]
    assert len(winners) == 1, outcomes
    assert len(losers) == WRITERS - 1
    assert all(
        isinstance(e, DuplicateKey) and e.constraint == "renewal_nonces.nonce_hash" for e in losers
    ), losers
    winner = winners[0]
    assert isinstance(winner, int)
    setup = store_factory()
    with setup.read() as tx:
        assert tx.get_renewal_nonce("n-race") == RenewalNonceRecord("n-race", CAM, T0 + winner)
    assert verify_chain(setup.audit_entries()).entries == 1


@pytest.fixture(params=["run", "transaction"])
def via(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


# -- migration v8 -> v9 keeps the data ---------------------------------------------------------


def _seed_v8(store: Any) -> None:
    with store.transaction() as tx:
        tx.insert_device(device("cam-1"))
        tx.append_audit(AuditEvent("anonymous", "device.enrolled", "cam-1"), T0 * 1000)


def _check_v9(store: Store) -> None:
    with store.read() as tx:
        assert tx.get_device("cam-1") == device("cam-1")
        assert tx.get_renewal_nonce("n-1") is None
    store.run(lambda tx: tx.use_renewal_nonce("n-1", CAM, T0))  # today's code works
    with pytest.raises(DuplicateKey):
        store.run(lambda tx: tx.use_renewal_nonce("n-1", CAM, T0))
    assert verify_chain(store.audit_entries()).ok


def test_sqlite_v8_database_migrates_to_v9(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    old = SqliteStore(path, migrate=False)
    assert old.migrate(target=8) == 8
    _seed_v8(old)
    old.close()
    with sqlite3.connect(path) as conn:
        assert not conn.execute(
            "SELECT name FROM sqlite_master WHERE name = 'renewal_nonces'"
        ).fetchall()
    store = SqliteStore(path)
    try:
        assert store.schema_version() == 9
        _check_v9(store)
    finally:
        store.close()


def test_postgres_v8_database_migrates_to_v9(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import broker.store.postgres.store as pg_store
    from broker.store.postgres import PostgresStore
    from broker.store.postgres.schema import STEPS

    with monkeypatch.context() as v8_broker:
        v8_broker.setattr(pg_store, "STEPS", {7: STEPS[7], 8: STEPS[8]})
        v8_broker.setattr(pg_store, "LATEST_VERSION", 8)
        old = PostgresStore(postgres_url, max_size=2)
        try:
            assert old.schema_version() == 8
            _seed_v8(old)
        finally:
            old.close()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT to_regclass('renewal_nonces')").fetchone() == (None,)
    store = PostgresStore(postgres_url, max_size=2)
    try:
        assert store.schema_version() == 9
        _check_v9(store)
    finally:
        store.close()
