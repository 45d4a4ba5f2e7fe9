"""Backend-specific parts of the store contract: migrations from every earlier schema version,
refusal of a newer schema, run()'s retries on PostgreSQL serialization failures, concurrent
writing processes on one audit chain, and open_store() choosing a backend from a URL."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from broker.audit.chain import AuditEvent, verify_chain
from broker.config import Config, from_environment
from broker.errors import ConfigurationError, Contention, Unavailable
from broker.service.status import status_for, trailing_details
from broker.store.base import DeviceRecord, DeviceState, SchemaTooNew, Transaction
from broker.store.open import open_store, sqlite_path, store_url
from broker.store.postgres.schema import STEPS
from broker.store.sqlite import SqliteStore
from tests.contract.conftest import StoreFactory
from tests.contract.test_store_contract import WRITERS, device, race
from tests.unit.test_store_migrations import CERT, TOKEN, UNUSED_TOKEN, _make_v1_database

T0 = 1_700_000_000


def _postgres_store(url: str, **kwargs: Any) -> Any:
    from broker.store.postgres import PostgresStore

    kwargs.setdefault("max_size", 2)
    return PostgresStore(url, **kwargs)


# -- SQLite: every earlier version migrates; a newer one is refused ---------------------------


@pytest.mark.parametrize("start", range(1, 9))  # v1 .. v8: every version before v9
def test_sqlite_migrates_from_every_earlier_version(tmp_path: Path, start: int) -> None:
    from broker.store.schema import LATEST_VERSION

    assert start < LATEST_VERSION
    path = tmp_path / "broker.db"
    _make_v1_database(path)  # v1 rows in every v1 table
    old = SqliteStore(path, migrate=False)
    assert old.migrate(target=start) == start
    old.close()

    store = SqliteStore(path)
    try:
        assert store.schema_version() == LATEST_VERSION
        with store.read() as tx:
            assert tx.get_certificate(CERT.serial) == CERT
            assert tx.get_enrollment_token(TOKEN.token_hash) == TOKEN
            assert tx.get_enrollment_token(UNUSED_TOKEN.token_hash) == UNUSED_TOKEN
        with store.transaction() as tx:
            tx.record_presence("cam-0001", T0, "bundle-2")
            tx.append_audit(AuditEvent("broker", "device.attached", "cam-0001"), T0 * 1000)
        assert verify_chain(store.audit_entries()).ok
    finally:
        store.close()


def test_sqlite_refuses_a_newer_schema_with_a_typed_error(tmp_path: Path) -> None:
    from broker.store.schema import LATEST_VERSION

    path = tmp_path / "broker.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (LATEST_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match="newer than this broker") as caught:
        SqliteStore(path)
    assert (caught.value.found, caught.value.known) == (LATEST_VERSION + 1, LATEST_VERSION)
    assert isinstance(caught.value, RuntimeError | ConfigurationError)


# -- PostgreSQL: baseline, future steps, concurrent migrators, refusal -----------------------


def _versions(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version, note FROM schema_version ORDER BY version")
        return [(int(v), str(n)) for v, n in rows]


def test_postgres_fresh_database_starts_at_the_baseline(postgres_url: str) -> None:
    from broker.store.postgres.schema import BASELINE_VERSION, LATEST_VERSION

    store = _postgres_store(postgres_url, migrate=False)
    try:
        assert store.schema_version() == 0
        assert store.migrate() == LATEST_VERSION
        assert store.migrate() == LATEST_VERSION  # idempotent
        assert store.migrate(target=1) == LATEST_VERSION  # never goes backwards
    finally:
        store.close()
    assert _versions(postgres_url) == [(BASELINE_VERSION, "baseline")] + [
        (version, "") for version in sorted(STEPS)
    ]


def test_postgres_database_at_the_baseline_migrates_to_every_later_version(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database a v6 broker created (baseline only) is brought to the latest schema on open,
    with its rows intact (issue 10: migration from every earlier schema version)."""
    import broker.store.postgres.store as pg_store
    from broker.store.postgres.schema import BASELINE_VERSION, LATEST_VERSION

    with monkeypatch.context() as old_broker:
        old_broker.setattr(pg_store, "STEPS", {})
        old_broker.setattr(pg_store, "LATEST_VERSION", BASELINE_VERSION)
        store = _postgres_store(postgres_url)
        store.run(lambda tx: tx.insert_device(device()))
        store.close()
    assert [v for v, _ in _versions(postgres_url)] == [BASELINE_VERSION]
    store = _postgres_store(postgres_url)
    try:
        assert store.schema_version() == LATEST_VERSION
        with store.read() as tx:
            assert tx.get_device("cam-1") == device()
            assert tx.count_failures("login.user", "anna", 0) == (0, None)
    finally:
        store.close()
    assert [v for v, _ in _versions(postgres_url)] == list(
        range(BASELINE_VERSION, LATEST_VERSION + 1)
    )


def test_postgres_replicas_migrating_at_once_apply_the_baseline_once(postgres_url: str) -> None:
    stores: list[Any] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            stores.append(_postgres_store(postgres_url, max_size=1))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert errors == []
    assert len(_versions(postgres_url)) == 1 + len(STEPS)


def test_postgres_applies_later_steps_in_order(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Future steps (as a later release will add) are applied on open, once, in order."""
    import broker.store.postgres.store as pg_store
    from broker.store.postgres.schema import BASELINE_VERSION, LATEST_VERSION

    _postgres_store(postgres_url).close()  # a database at the baseline, with a row
    store = _postgres_store(postgres_url)
    with store.transaction() as tx:
        tx.insert_device(device())
    store.close()

    steps = {
        **STEPS,
        LATEST_VERSION + 1: ("ALTER TABLE devices ADD COLUMN note TEXT",),
        LATEST_VERSION + 2: ("UPDATE devices SET note = 'migrated'",),
    }
    monkeypatch.setattr(pg_store, "STEPS", steps)
    monkeypatch.setattr(pg_store, "LATEST_VERSION", LATEST_VERSION + 2)
    store = _postgres_store(postgres_url)
    try:
        assert store.schema_version() == LATEST_VERSION + 2
        with store.read() as tx:
            assert tx.get_device("cam-1") == device()
    finally:
        store.close()
    assert [v for v, _ in _versions(postgres_url)] == list(
        range(BASELINE_VERSION, LATEST_VERSION + 3)
    )
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT note FROM devices").fetchall() == [("migrated",)]


def test_postgres_refuses_a_newer_schema(postgres_url: str) -> None:
    from broker.store.postgres.schema import BASELINE_VERSION, LATEST_VERSION

    _postgres_store(postgres_url).close()
    with psycopg.connect(postgres_url) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (LATEST_VERSION + 1,))
    for migrate in (True, False):
        with pytest.raises(SchemaTooNew, match=rf"v{LATEST_VERSION + 1} is newer than this broker"):
            _postgres_store(postgres_url, migrate=migrate)
    assert [v for v, _ in _versions(postgres_url)] == [
        *range(BASELINE_VERSION, LATEST_VERSION + 1),
        LATEST_VERSION + 1,
    ]


def test_postgres_unreachable_is_unavailable() -> None:
    with pytest.raises(Unavailable, match="cannot connect"):
        _postgres_store("postgresql://nobody@127.0.0.1:1/none", connect_timeout=1.0)


# -- PostgreSQL: run() re-runs a unit that lost a serialization conflict ---------------------


def _seed(store: Any) -> None:
    with store.transaction() as tx:
        tx.insert_device(device("cam-1"))
        tx.insert_device(device("cam-2"))


def _interfere(url: str, device_id: str) -> None:
    """Another process changes a row and commits."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE devices SET last_seen_at = COALESCE(last_seen_at, 0) + 1 WHERE device_id = %s",
            (device_id,),
        )


def test_run_retries_a_serialization_failure_and_counts_it(postgres_url: str) -> None:
    store = _postgres_store(postgres_url)
    try:
        _seed(store)
        attempts: list[int] = []

        def unit(tx: Transaction) -> int:
            attempts.append(1)
            seen = tx.get_device("cam-1")  # the snapshot is taken here
            assert seen is not None
            if len(attempts) == 1:
                _interfere(postgres_url, "cam-1")  # commits after our snapshot
            tx.record_presence("cam-1", T0, "bundle-9")  # 40001 on the first attempt
            return len(attempts)

        assert store.run(unit) == 2
        assert (store.retries, store.exhausted) == (1, 0)
        with store.read() as tx:
            row = tx.get_device("cam-1")
        assert row is not None and row.trust_bundle_version == "bundle-9"
    finally:
        store.close()


def test_crossed_reads_and_writes_one_is_rerun(postgres_url: str) -> None:
    """Write skew between two optimistic writers (no chain lock): PostgreSQL aborts one with a
    serialization failure, run() re-runs it, both changes land."""
    stores = [_postgres_store(postgres_url, writer_lock=False) for _ in range(2)]
    _seed(stores[0])
    barrier = threading.Barrier(2)
    results: list[object] = [None, None]

    def worker(i: int) -> None:
        mine, other = ("cam-1", "cam-2") if i == 0 else ("cam-2", "cam-1")
        calls = 0

        def unit(tx: Transaction) -> str:
            nonlocal calls
            calls += 1
            row = tx.get_device(other)  # read what the other one writes
            assert row is not None
            if calls == 1:
                barrier.wait()
            tx.record_presence(mine, T0 + (row.last_seen_at or 0), f"from-{i}")
            return f"{i}:{calls}"

        try:
            results[i] = stores[i].run(unit)
        except BaseException as error:
            results[i] = error

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        calls = sorted(int(str(r).split(":")[1]) for r in results)  # raises if one failed
        assert calls[0] == 1 and calls[1] >= 2, results  # one committed first time, one re-ran
        assert sum(s.retries for s in stores) == calls[1] - 1, results
        with stores[0].read() as tx:
            one, two = tx.get_device("cam-1"), tx.get_device("cam-2")
        assert one is not None and two is not None
        assert (one.trust_bundle_version, two.trust_bundle_version) == ("from-0", "from-1")
        # Serial: whichever ran second saw the first one's write.
        assert {one.last_seen_at, two.last_seen_at} == {T0, 2 * T0}
    finally:
        for store in stores:
            store.close()


def test_run_gives_up_with_contention_carrying_retry_info(postgres_url: str) -> None:
    store = _postgres_store(postgres_url, attempts=3, backoff_seconds=0.001)
    try:
        _seed(store)
        calls: list[int] = []

        def unit(tx: Transaction) -> None:
            calls.append(1)
            tx.get_device("cam-1")
            _interfere(postgres_url, "cam-1")  # every attempt loses
            tx.record_presence("cam-1", T0, "never")

        with pytest.raises(Contention, match="after 3 attempts") as caught:
            store.run(unit)
        assert len(calls) == 3
        assert (store.retries, store.exhausted) == (2, 1)
        assert status_for(caught.value) is grpc.StatusCode.UNAVAILABLE
        assert caught.value.retry_after_seconds > 0
        ((key, value),) = trailing_details(caught.value)
        assert key == "grpc-status-details-bin"
        from google.rpc import error_details_pb2, status_pb2

        status = status_pb2.Status.FromString(value)
        assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry) and retry.retry_delay.seconds >= 1
    finally:
        store.close()


def test_transaction_cannot_rerun_so_it_raises_contention(postgres_url: str) -> None:
    store = _postgres_store(postgres_url)
    try:
        _seed(store)
        with pytest.raises(Contention), store.transaction() as tx:
            tx.get_device("cam-1")
            _interfere(postgres_url, "cam-1")
            tx.record_presence("cam-1", T0, "never")
        with store.read() as tx:
            row = tx.get_device("cam-1")
        assert row is not None and row.trust_bundle_version is None
    finally:
        store.close()


def test_optimistic_writers_race_to_the_same_single_outcomes(postgres_url: str) -> None:
    """Without the up-front chain lock, racing writers conflict; run() re-runs the losers (with
    the lock) and the outcome is the sequential one: one claim, one audit chain."""
    from broker.store.base import EnrollmentTokenRecord

    setup = _postgres_store(postgres_url)
    try:
        with setup.transaction() as tx:
            tx.insert_enrollment_token(EnrollmentTokenRecord("h-1", "cam-1", T0, T0 + 3600, "op"))

        def enroll(tx: Transaction, i: int) -> bool:
            if tx.consume_enrollment_token("h-1", T0 + i) is None:
                return False
            tx.insert_device(DeviceRecord("cam-1", DeviceState.ACTIVE, T0, "token"))
            tx.append_audit(AuditEvent("anonymous", "device.enrolled", "cam-1"), T0 * 1000 + i)
            return True

        def factory(**kwargs: Any) -> Any:
            return _postgres_store(postgres_url, max_size=1, attempts=10, **kwargs)

        outcomes = race(factory, enroll, writer_lock=False)
        assert all(ok for ok, _ in outcomes), outcomes
        assert sum(1 for _, won in outcomes if won) == 1
        assert verify_chain(setup.audit_entries()).entries == 1
    finally:
        setup.close()


# -- one audit chain, several writing processes ----------------------------------------------

_WRITER = """
import sys
from broker.audit.chain import AuditEvent
kind, where, name, count, lock = sys.argv[1:6]
if kind == "sqlite":
    from pathlib import Path
    from broker.store.sqlite import SqliteStore
    store = SqliteStore(Path(where))
else:
    from broker.store.postgres import PostgresStore
    store = PostgresStore(where, max_size=1, writer_lock=lock == "1", attempts=20)
for i in range(int(count)):
    store.run(lambda tx: tx.append_audit(AuditEvent(name, "tick", "chain", {"i": i}), i))
print(getattr(store, "retries", 0))
store.close()
"""


@pytest.mark.parametrize("mode", ["sqlite", "postgres", "postgres-optimistic"])
def test_writing_processes_extend_one_chain(
    mode: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    processes, per_process = 4, 25
    if mode == "sqlite":
        where = str(tmp_path / "broker.db")
        SqliteStore(Path(where)).close()
    else:
        where = request.getfixturevalue("postgres_url")
        _postgres_store(where).close()
    lock = "0" if mode.endswith("optimistic") else "1"
    kind = mode.split("-", maxsplit=1)[0]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, kind, where, f"p{n}", str(per_process), lock],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(processes)
    ]
    outputs = [child.communicate(timeout=120)[0] for child in children]
    assert [child.returncode for child in children] == [0] * processes, outputs
    if kind == "sqlite":
        store: Any = SqliteStore(Path(where))
    else:
        store = _postgres_store(where)
    try:
        entries = list(store.audit_entries())
    finally:
        store.close()
    result = verify_chain(entries)
    assert result.ok, result
    assert result.entries == processes * per_process
    assert sorted(e.actor for e in entries) == sorted(
        f"p{n}" for n in range(processes) for _ in range(per_process)
    )


# -- choosing the backend --------------------------------------------------------------------


def test_open_store_defaults_to_sqlite_at_the_configured_database(tmp_path: Path) -> None:
    config = Config(home=tmp_path)
    assert store_url(config) == f"sqlite:///{config.database}"  # absolute: four slashes
    assert store_url(config).startswith("sqlite:////")
    store = open_store(config)
    try:
        assert isinstance(store, SqliteStore)
        assert store.path == tmp_path / "var" / "broker.db"
    finally:
        store.close()


def test_sqlite_urls(tmp_path: Path) -> None:
    assert sqlite_path("sqlite:///var/other.db", tmp_path) == tmp_path / "var" / "other.db"
    assert sqlite_path("sqlite:////srv/b.db", tmp_path) == Path("/srv/b.db")
    for bad in ("sqlite://", "sqlite:///", "sqlite://relative.db"):
        with pytest.raises(ConfigurationError):
            sqlite_path(bad, tmp_path)


def test_open_store_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_STORE", "sqlite:///data/b.db")
    config = from_environment(tmp_path)
    assert config.store_url == "sqlite:///data/b.db"
    store = open_store(config)
    try:
        assert isinstance(store, SqliteStore)
        assert store.path == tmp_path.resolve() / "data" / "b.db"
    finally:
        store.close()
    monkeypatch.setenv("BROKER_STORE", "mysql://x")
    with pytest.raises(ConfigurationError, match="unknown store URL scheme 'mysql'"):
        open_store(from_environment(tmp_path))


def test_open_store_postgres(tmp_path: Path, postgres_url: str) -> None:
    from broker.store.postgres import PostgresStore
    from broker.store.postgres.schema import LATEST_VERSION

    store = open_store(Config(home=tmp_path, store_url=postgres_url))
    try:
        assert isinstance(store, PostgresStore)
        assert store.schema_version() == LATEST_VERSION
    finally:
        store.close()


def test_race_helper_uses_twenty_writers(store_factory: StoreFactory) -> None:
    """The concurrency tests above really run WRITERS writers at once."""
    seen: set[int] = set()
    lock = threading.Lock()

    def unit(tx: Transaction, i: int) -> None:
        with lock:
            seen.add(i)

    race(store_factory, unit)
    assert seen == set(range(WRITERS))
