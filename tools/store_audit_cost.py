"""What one audit entry costs on each store backend.

    .venv/bin/python tools/store_audit_cost.py [--postgres postgresql://postgres@127.0.0.1:5432/postgres]

For each backend it reports, in microseconds per entry:
- marginal: one more append inside a transaction that is committed anyway (500 per transaction);
- commit:   a transaction that only appends one entry (one durable commit per entry);
- N writers: N threads, each with its own store (connection), appending in their own
  transactions at once; wall time per entry, so the cost of serializing the one chain shows.
PostgreSQL gets a fresh database (dropped afterwards) and is measured with the default up-front
chain lock and with optimistic writers (writer_lock=False), whose conflicts run() re-runs.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.audit.chain import AuditEvent, verify_chain
from broker.store.base import Store

EVENT = AuditEvent("spiffe://camera.local/app/u/a", "session.opened", "cam-1", {"sid": "x" * 32})


def _marginal(store: Store, n: int) -> float:
    started = time.perf_counter()
    with store.transaction() as tx:
        for i in range(n):
            tx.append_audit(EVENT, i)
    return (time.perf_counter() - started) / n


def _commit(store: Store, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        with store.transaction() as tx:
            tx.append_audit(EVENT, i)
    return (time.perf_counter() - started) / n


def _concurrent(make: Callable[[], Any], writers: int, n: int) -> tuple[float, int]:
    stores = [make() for _ in range(writers)]
    barrier = threading.Barrier(writers + 1)

    def work(store: Any) -> None:
        barrier.wait()
        for i in range(n):
            store.run(lambda tx, i=i: tx.append_audit(EVENT, i))

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    retries = sum(getattr(s, "retries", 0) for s in stores)
    for store in stores:
        store.close()
    return elapsed / (writers * n), retries


def measure(name: str, make: Callable[[], Any], n: int, writers: int) -> None:
    store = make()
    try:
        marginal = _marginal(store, 500)
        commit = _commit(store, n)
    finally:
        store.close()
    per_entry, retries = _concurrent(make, writers, n // writers or 1)
    check = make()
    try:
        result = verify_chain(check.audit_entries())
    finally:
        check.close()
    print(
        f"{name:<28} marginal {marginal * 1e6:7.0f} us   commit {commit * 1e6:7.0f} us   "
        f"{writers} writers {per_entry * 1e6:7.0f} us/entry ({retries} re-runs)   "
        f"chain {'OK' if result.ok else 'BROKEN'} ({result.entries} entries)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="", help="admin URL of a PostgreSQL server")
    parser.add_argument("-n", type=int, default=400, help="entries per measurement")
    parser.add_argument("--writers", type=int, default=8)
    args = parser.parse_args()

    from broker.store.sqlite import SqliteStore

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "broker.db"
        measure("sqlite (synchronous=FULL)", lambda: SqliteStore(path), args.n, args.writers)
    if not args.postgres:
        print("postgresql: skipped (pass --postgres URL)")
        return

    import psycopg

    from broker.store.postgres import PostgresStore

    for label, lock in (("postgresql (chain lock)", True), ("postgresql (optimistic)", False)):
        name = f"broker_audit_cost_{secrets.token_hex(4)}"
        with psycopg.connect(args.postgres, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        url = args.postgres.rsplit("/", 1)[0] + f"/{name}"
        try:

            def make(url: str = url, lock: bool = lock) -> PostgresStore:
                return PostgresStore(url, max_size=1, writer_lock=lock, attempts=50)

            measure(label, make, args.n, args.writers)
        finally:
            with psycopg.connect(args.postgres, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
