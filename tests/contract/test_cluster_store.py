"""The fleet's side of the store contract (schema v8), on every backend: replicas, attachments
fenced by epoch, the event feed and which replica opened each session.

Racing attaches from 20 "replicas" hand out each epoch once; a stale epoch changes nothing; a
reader polling ``events_after(last)`` never misses an event committed by concurrent writers;
``wait_for_events`` wakes on another connection's append (PostgreSQL) or sleeps (SQLite); a v7
database migrates to v8 with its rows intact.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker.audit.chain import AuditEvent, verify_chain
from broker.store.base import (
    AttachmentRecord,
    EventRecord,
    ReplicaRecord,
    SessionOutcome,
    Store,
    Transaction,
)
from broker.store.sqlite import SqliteStore
from tests.contract.conftest import StoreFactory
from tests.contract.test_store_contract import WRITERS, device, race, session

T0 = 1_700_000_000
LEASE = 30


# -- replicas --------------------------------------------------------------------------------


def test_replicas(store: Store) -> None:
    with store.read() as tx:
        assert tx.get_replica("r1") is None
    with store.transaction() as tx:
        tx.upsert_replica("r1", "10.0.0.1:9443", T0)
        tx.upsert_replica("r2", "10.0.0.2:9443", T0 + 1)
        tx.heartbeat_replica("r1", T0 + 5)
        tx.heartbeat_replica("nobody", T0 + 5)  # unknown: nothing happens
    with store.read() as tx:
        assert tx.get_replica("r1") == ReplicaRecord("r1", "10.0.0.1:9443", T0, T0 + 5)
        assert tx.get_replica("r2") == ReplicaRecord("r2", "10.0.0.2:9443", T0 + 1, T0 + 1)
        assert tx.get_replica("nobody") is None
    with store.transaction() as tx:  # a restart: new address, started_at = heartbeat_at = now
        tx.upsert_replica("r1", "10.0.0.9:9443", T0 + 100)
    with store.read() as tx:
        assert tx.get_replica("r1") == ReplicaRecord("r1", "10.0.0.9:9443", T0 + 100, T0 + 100)


# -- attachments -----------------------------------------------------------------------------


def _attachment(store: Store, device_id: str = "cam-1") -> AttachmentRecord | None:
    with store.read() as tx:
        return tx.get_attachment(device_id)


def test_attach_renew_release(store: Store) -> None:
    assert _attachment(store) is None
    first, previous = store.run(lambda tx: tx.attach_device("cam-1", "r1", T0, T0 + LEASE))
    assert first == AttachmentRecord("cam-1", "r1", 1, T0, T0 + LEASE)
    assert previous is None
    assert first.live_at(T0) and first.live_at(T0 + LEASE - 1)
    assert not first.live_at(T0 + LEASE)  # an expired lease means offline

    second, previous = store.run(lambda tx: tx.attach_device("cam-1", "r2", T0 + 1, T0 + 40))
    assert second == AttachmentRecord("cam-1", "r2", 2, T0 + 1, T0 + 40)
    assert previous == first

    with store.transaction() as tx:
        assert tx.renew_attachment("cam-1", 2, T0 + 90)
        assert not tx.renew_attachment("cam-1", 1, T0 + 999)  # fenced
        assert not tx.release_attachment("cam-1", 1)  # fenced
        assert not tx.renew_attachment("cam-9", 1, T0 + 999)  # no such device
        assert not tx.release_attachment("cam-9", 1)
    renewed = AttachmentRecord("cam-1", "r2", 2, T0 + 1, T0 + 90)
    assert _attachment(store) == renewed  # the stale calls changed nothing

    with store.transaction() as tx:
        assert tx.release_attachment("cam-1", 2)
        assert not tx.release_attachment("cam-1", 2)  # already released
        assert not tx.renew_attachment("cam-1", 2, T0 + 200)  # a released lease stays released
    released = AttachmentRecord("cam-1", "", 2, T0 + 1, 0)
    assert _attachment(store) == released
    assert not released.live_at(T0)

    # The row is kept after release, so the next attach continues the epochs.
    third, previous = store.run(lambda tx: tx.attach_device("cam-1", "r1", T0 + 300, T0 + 330))
    assert third == AttachmentRecord("cam-1", "r1", 3, T0 + 300, T0 + 330)
    assert previous == released


def test_stale_epoch_inside_a_unit_changes_nothing(store: Store) -> None:
    store.run(lambda tx: tx.attach_device("cam-1", "r1", T0, T0 + LEASE))
    store.run(lambda tx: tx.attach_device("cam-1", "r2", T0 + 1, T0 + 1 + LEASE))
    before = _attachment(store)

    def stale(tx: Transaction) -> tuple[bool, bool]:
        return tx.renew_attachment("cam-1", 1, T0 + 500), tx.release_attachment("cam-1", 1)

    assert store.run(stale) == (False, False)
    assert _attachment(store) == before


def test_release_attachments_of_one_replica(store: Store) -> None:
    def attach_all(tx: Transaction) -> None:
        tx.attach_device("cam-b", "r1", T0, T0 + LEASE)
        tx.attach_device("cam-a", "r1", T0, T0 + LEASE)
        tx.attach_device("cam-c", "r2", T0, T0 + LEASE)
        tx.attach_device("cam-d", "r1", T0, T0 + LEASE)
        tx.attach_device("cam-d", "r2", T0 + 1, T0 + LEASE)  # moved to r2 (epoch 2)

    store.run(attach_all)
    assert store.run(lambda tx: tx.release_attachments_of("r1")) == ["cam-a", "cam-b"]
    assert store.run(lambda tx: tx.release_attachments_of("r1")) == []
    assert store.run(lambda tx: tx.release_attachments_of("")) == []  # never "the released"
    assert _attachment(store, "cam-a") == AttachmentRecord("cam-a", "", 1, T0, 0)
    assert _attachment(store, "cam-c") == AttachmentRecord("cam-c", "r2", 1, T0, T0 + LEASE)
    assert _attachment(store, "cam-d") == AttachmentRecord("cam-d", "r2", 2, T0 + 1, T0 + LEASE)
    again, _ = store.run(lambda tx: tx.attach_device("cam-a", "r3", T0 + 9, T0 + 99))
    assert again.epoch == 2  # epochs never repeat, even after a replica forgot its devices


@pytest.fixture(params=["run", "transaction", "optimistic"])
def attach_mode(request: pytest.FixtureRequest, backend: str) -> str:
    mode: str = request.param
    if mode == "optimistic" and backend != "postgres":
        pytest.skip("writer_lock=False is a PostgreSQL option")
    return mode


def test_racing_attaches_hand_out_each_epoch_once(
    store_factory: StoreFactory, attach_mode: str
) -> None:
    """20 replicas attach the same device at once, each on its own connection: epochs are
    exactly 1..20, each once, every 'previous' is the epoch before, and the row holds the last."""
    setup = store_factory()
    options: dict[str, Any] = {}
    if attach_mode == "optimistic":
        options = {"writer_lock": False, "attempts": 30, "max_size": 1}

    def attach(tx: Transaction, i: int) -> tuple[AttachmentRecord, AttachmentRecord | None]:
        return tx.attach_device("cam-1", f"r{i}", T0 + i, T0 + i + LEASE)

    via = "transaction" if attach_mode == "transaction" else "run"
    outcomes = race(store_factory, attach, via=via, **options)
    assert all(ok for ok, _ in outcomes), outcomes
    results = [result for _, result in outcomes]
    pairs: list[tuple[AttachmentRecord, AttachmentRecord | None]] = results  # type: ignore[assignment]
    epochs = sorted(new.epoch for new, _ in pairs)
    assert epochs == list(range(1, WRITERS + 1))
    for new, previous in pairs:
        if new.epoch == 1:
            assert previous is None
        else:
            assert previous is not None and previous.epoch == new.epoch - 1
    last = max((new for new, _ in pairs), key=lambda record: record.epoch)
    assert _attachment(setup) == last


# -- events ----------------------------------------------------------------------------------


def test_events(store: Store) -> None:
    with store.read() as tx:
        assert tx.last_event_seq() == 0
        assert tx.events_after(0) == []
    payload = {"device_id": "cam-1", "nested": {"list": [1, 2, 3], "ok": True}, "n": None}

    def append(tx: Transaction) -> list[int]:
        return [
            tx.append_event("device.revoked", payload, "r1", T0 * 1000),
            tx.append_event("share.revoked", {"user_id": "u-2"}, "r2", T0 * 1000 + 1),
        ]

    first, second = store.run(append)
    assert 0 < first < second
    third = store.run(lambda tx: tx.append_event("pki.reloaded", {}, "r3", T0 * 1000 + 2))
    assert third > second
    with store.read() as tx:
        events = tx.events_after(0)
        assert events == [
            EventRecord(first, "device.revoked", payload, "r1", T0 * 1000),
            EventRecord(second, "share.revoked", {"user_id": "u-2"}, "r2", T0 * 1000 + 1),
            EventRecord(third, "pki.reloaded", {}, "r3", T0 * 1000 + 2),
        ]
        assert tx.events_after(first) == events[1:]
        assert tx.events_after(0, limit=2) == events[:2]
        assert tx.events_after(first, limit=1) == events[1:2]
        assert tx.events_after(third) == []
        assert tx.last_event_seq() == third


def test_an_event_commits_with_its_change_or_not_at_all(store: Store) -> None:
    class Boom(Exception):
        pass

    def revoke(tx: Transaction) -> None:
        tx.insert_device(device("cam-1"))
        tx.append_event("device.revoked", {"device_id": "cam-1"}, "r1", T0)
        raise Boom

    with pytest.raises(Boom):
        store.run(revoke)
    with store.read() as tx:
        assert tx.events_after(0) == []
        assert tx.last_event_seq() == 0
        assert tx.get_device("cam-1") is None
    seq = store.run(lambda tx: tx.append_event("device.revoked", {}, "r1", T0))
    with store.read() as tx:
        assert [e.seq for e in tx.events_after(0)] == [seq]


def test_event_payload_must_be_an_object(store: Store) -> None:
    with pytest.raises(TypeError), store.transaction() as tx:
        tx.append_event("x", ["not", "an", "object"], "r1", T0)  # type: ignore[arg-type]


def test_a_poller_never_misses_an_event_from_concurrent_writers(
    store_factory: StoreFactory, backend: str
) -> None:
    """Writers on their own connections append events (some with an audit entry in the same
    transaction, some without; on PostgreSQL some without the up-front chain lock) and pause
    before committing; a poller reading ``events_after(last)`` must see every event, in
    strictly increasing seq order: a smaller seq committing after a larger one would be
    skipped for good."""
    writers, per_writer = 6, 15
    poller = store_factory()
    stores = []
    for i in range(writers):
        options: dict[str, Any] = {}
        if backend == "postgres" and i % 2:
            options = {"writer_lock": False, "attempts": 50, "max_size": 1}
        stores.append(store_factory(**options))
    done = threading.Event()
    seen: list[int] = []
    failures: list[BaseException] = []

    def poll() -> None:
        last = 0
        try:
            while True:
                finished = done.is_set()
                with poller.read() as tx:
                    batch = tx.events_after(last, limit=7)
                for event in batch:
                    assert event.seq > last
                    seen.append(event.seq)
                    last = event.seq
                if finished and not batch:
                    return
        except BaseException as error:  # pragma: no cover (reported below)
            failures.append(error)

    def write(i: int) -> list[int]:
        rng = random.Random(i)
        appended = []
        for n in range(per_writer):

            def unit(tx: Transaction, n: int = n) -> int:
                seq = tx.append_event("tick", {"writer": i, "n": n}, f"r{i}", n)
                if n % 3 == 0:
                    tx.append_audit(AuditEvent(f"r{i}", "tick", "feed", {"n": n}), n)
                time.sleep(rng.uniform(0, 0.003))  # hold the seq uncommitted for a while
                return seq

            appended.append(stores[i].run(unit))
        return appended

    poll_thread = threading.Thread(target=poll)
    poll_thread.start()
    threads_results: list[list[int]] = [[] for _ in range(writers)]

    def run_writer(i: int) -> None:
        try:
            threads_results[i] = write(i)
        except BaseException as error:  # pragma: no cover (reported below)
            failures.append(error)

    threads = [threading.Thread(target=run_writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    poll_thread.join(timeout=60)
    assert not failures, failures
    committed = sorted(seq for results in threads_results for seq in results)
    assert len(committed) == writers * per_writer
    with poller.read() as tx:
        assert [e.seq for e in tx.events_after(0, limit=10_000)] == committed
    assert seen == committed  # every event, each once, in order: nothing skipped
    assert verify_chain(poller.audit_entries()).ok


def test_wait_for_events_on_sqlite_sleeps_and_says_no(store_factory: StoreFactory) -> None:
    store = store_factory()
    if not isinstance(store, SqliteStore):
        pytest.skip("SQLite's wait_for_events")
    other = store_factory()
    other.run(lambda tx: tx.append_event("tick", {}, "r2", T0))
    started = time.monotonic()
    assert store.wait_for_events(0.3) is False
    assert time.monotonic() - started >= 0.29


def _postgres(store: Store) -> None:
    if isinstance(store, SqliteStore):
        pytest.skip("PostgreSQL's LISTEN/NOTIFY")


def _wait_in_thread(store: Store, timeout: float) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []

    def wait() -> None:
        started = time.monotonic()
        result.append(store.wait_for_events(timeout))
        result.append(time.monotonic() - started)

    thread = threading.Thread(target=wait)
    thread.start()
    return thread, result


def test_wait_for_events_wakes_on_another_connections_append(store_factory: StoreFactory) -> None:
    listener = store_factory()
    _postgres(listener)
    writer = store_factory()
    assert listener.wait_for_events(0.2) is False  # nothing yet; the LISTEN is now in place

    thread, result = _wait_in_thread(listener, 5.0)
    time.sleep(0.2)
    writer.run(lambda tx: tx.append_event("device.revoked", {"device_id": "cam-1"}, "r2", T0))
    thread.join(timeout=6)
    assert result[0] is True
    assert result[1] < 1.0 + 0.2

    # Appended while nobody waited: the next wait reports it at once.
    writer.run(lambda tx: tx.append_event("share.revoked", {}, "r2", T0))
    time.sleep(0.1)
    started = time.monotonic()
    assert listener.wait_for_events(5.0) is True
    assert time.monotonic() - started < 1.0

    # A rolled-back append notifies nobody (NOTIFY is delivered at commit).
    with pytest.raises(RuntimeError), writer.transaction() as tx:
        tx.append_event("tick", {}, "r2", T0)
        raise RuntimeError("roll back")
    started = time.monotonic()
    assert listener.wait_for_events(0.3) is False
    assert time.monotonic() - started >= 0.29


def test_wait_for_events_wakes_every_waiting_thread(store_factory: StoreFactory) -> None:
    listener = store_factory()
    _postgres(listener)
    writer = store_factory()
    assert listener.wait_for_events(0.1) is False
    waiters = [_wait_in_thread(listener, 5.0) for _ in range(4)]
    time.sleep(0.2)
    writer.run(lambda tx: tx.append_event("tick", {}, "r2", T0))
    for thread, _ in waiters:
        thread.join(timeout=6)
    assert [result[0] for _, result in waiters] == [True] * 4
    assert all(result[1] < 1.2 for _, result in waiters)


def test_wait_for_events_reconnects_after_losing_its_connection(
    store_factory: StoreFactory, postgres_url: str
) -> None:
    listener = store_factory()
    _postgres(listener)
    writer = store_factory()
    assert listener.wait_for_events(0.1) is False
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query = 'LISTEN broker_events'"
        ).fetchall()
    assert killed == [(True,)]
    # The loss is noticed, the LISTEN made again, and the first wait after it says "maybe
    # missed" (True) so the caller polls; then notifications flow again.
    deadline = time.monotonic() + 5
    while not listener.wait_for_events(0.5):
        assert time.monotonic() < deadline
    thread, result = _wait_in_thread(listener, 5.0)
    time.sleep(0.2)
    writer.run(lambda tx: tx.append_event("tick", {}, "r2", T0))
    thread.join(timeout=6)
    assert result[0] is True and result[1] < 1.2


def test_close_ends_a_wait_in_progress(store_factory: StoreFactory) -> None:
    listener = store_factory()
    _postgres(listener)
    assert listener.wait_for_events(0.1) is False
    thread, result = _wait_in_thread(listener, 10.0)
    time.sleep(0.2)
    listener.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert result[1] < 5
    assert listener.wait_for_events(0.1) is False  # closed: no new listener is made


# -- sessions and their replica --------------------------------------------------------------


def test_sessions_remember_their_replica(store: Store) -> None:
    with store.transaction() as tx:
        tx.insert_session(session("s-1", replica="r1"))
        tx.insert_session(session("s-2", replica="r1"))
        tx.insert_session(session("s-3", replica="r2"))
        tx.insert_session(session("s-4"))  # replica not known yet
        tx.insert_session(session("s-5", replica="r1", outcome=SessionOutcome.DENIED))
        tx.set_session_replica("s-4", "r2")
        tx.set_session_replica("nope", "r2")  # unknown: nothing happens
    with store.read() as tx:
        one = tx.get_session("s-1")
        four = tx.get_session("s-4")
    assert one == session("s-1", replica="r1")
    assert four is not None and four.replica == "r2"

    with store.transaction() as tx:
        assert tx.end_all_open_sessions(T0 + 10, "replica restarted", "r1") == ["s-1", "s-2"]
        assert tx.end_all_open_sessions(T0 + 11, "again", replica="r1") == []
        assert tx.end_all_open_sessions(T0 + 11, "no such replica", replica="r9") == []
    with store.read() as tx:
        assert sorted(s.session_id for s in tx.open_sessions()) == ["s-3", "s-4"]
        ended = tx.get_session("s-1")
        denied = tx.get_session("s-5")
    assert ended is not None and (ended.outcome, ended.ended_at, ended.reason) == (
        SessionOutcome.ENDED,
        T0 + 10,
        "replica restarted",
    )
    assert denied is not None and denied.outcome is SessionOutcome.DENIED
    with store.transaction() as tx:
        assert tx.end_all_open_sessions(T0 + 20, "broker stopping") == ["s-3", "s-4"]  # None: all


# -- migration v7 -> v8 keeps the data -------------------------------------------------------

_V7_SESSION = (
    "INSERT INTO sessions (session_id, device_id, user_id, app_id, opened_at, expires_at, "
    f"outcome) VALUES ('s-old', 'cam-1', 'u-1', 'a-1', {T0}, {T0 + 300}, 'opened')"
)


def _check_migrated(store: Store) -> None:
    with store.read() as tx:
        assert tx.get_device("cam-1") == device("cam-1")
        old = tx.get_session("s-old")
        assert old == session("s-old")  # replica '' for sessions from before v8
        assert tx.count_failures("login.user", "anna", 0) == (1, T0)
        assert tx.last_event_seq() == 0
        assert tx.get_attachment("cam-1") is None
    assert [e.action for e in store.audit_entries()] == ["device.enrolled"]
    assert verify_chain(store.audit_entries()).ok
    # Today's code works on the migrated database.
    new, _ = store.run(lambda tx: tx.attach_device("cam-1", "r1", T0, T0 + LEASE))
    assert new.epoch == 1
    assert store.run(lambda tx: tx.append_event("tick", {}, "r1", T0)) >= 1
    with store.transaction() as tx:
        tx.upsert_replica("r1", "127.0.0.1:1", T0)
        assert tx.end_all_open_sessions(T0, "replica restarted", replica="r1") == []
        assert tx.end_all_open_sessions(T0, "replica restarted", replica="") == ["s-old"]


def _seed_v7(store: Any, insert_session: Any) -> None:
    with store.transaction() as tx:
        tx.insert_device(device("cam-1"))
        tx.record_failure("login.user", "anna", T0, 0)
        tx.append_audit(AuditEvent("anonymous", "device.enrolled", "cam-1"), T0 * 1000)
    insert_session()


def test_sqlite_v7_database_migrates_to_v8(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    old = SqliteStore(path, migrate=False)
    assert old.migrate(target=7) == 7

    def insert_session() -> None:
        with sqlite3.connect(path, isolation_level=None) as conn:
            conn.execute(_V7_SESSION)

    _seed_v7(old, insert_session)
    old.close()
    store = SqliteStore(path)
    try:
        assert store.schema_version() >= 8  # v8, and the later versions on top
        _check_migrated(store)
    finally:
        store.close()


def test_postgres_v7_database_migrates_to_v8(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import broker.store.postgres.store as pg_store
    from broker.store.postgres import PostgresStore
    from broker.store.postgres.schema import STEPS

    with monkeypatch.context() as v7_broker:
        v7_broker.setattr(pg_store, "STEPS", {7: STEPS[7]})
        v7_broker.setattr(pg_store, "LATEST_VERSION", 7)
        old = PostgresStore(postgres_url, max_size=2)

        def insert_session() -> None:
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                conn.execute(_V7_SESSION)

        try:
            assert old.schema_version() == 7
            _seed_v7(old, insert_session)
        finally:
            old.close()
    store = PostgresStore(postgres_url, max_size=2)
    try:
        assert store.schema_version() >= 8  # v8, and the later versions on top
        _check_migrated(store)
    finally:
        store.close()
