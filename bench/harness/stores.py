"""The store a benchmark's broker runs on: SQLite (the embedded default) or PostgreSQL, or both in
one sitting for a fair comparison.

With ``--store both`` each store gets its own bench home (own dev PKI, own identities) and its own
broker; runs alternate between them, the order rotating each round, so outside load on a shared
machine hits both alike, and a comparison line gives the PostgreSQL / SQLite ratios of the
medians. A PostgreSQL store is a fresh database (``bench_<random>``) created on the server of
``--pg-url`` before the run and dropped afterwards. The PostgreSQL server's own CPU (its backend
processes, read from /proc) is measured around every run, since SQLite's work is inside the
broker's CPU. Everything else goes through the store contract (``broker.store.open.open_store``);
the bench never touches a backend's private state."""

from __future__ import annotations

import contextlib
import os
import secrets
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from bench.harness.broker import Broker, BrokerChild, ServeChild, WhatIf
from bench.harness.provision import bench_home
from bench.harness.stats import median, ms, pid_cpu, us
from bench.harness.unary import UnaryRun, print_breakdown, print_run
from broker.config import Config

SQLITE, POSTGRES = "sqlite", "postgres"
NAMES = {SQLITE: "SQLite", POSTGRES: "PostgreSQL"}
Runner = Callable[[int], UnaryRun]  # round index -> one timed run


def workers_key(n: int) -> str:
    """The variant `broker serve --workers n` on PostgreSQL (a key like the stores')."""
    key = f"{POSTGRES}-w{n}"
    NAMES[key] = f"PG, {n} worker{'s' if n > 1 else ''}"
    return key


def is_postgres(key: str) -> bool:
    return key.partition("-w")[0] == POSTGRES


def workers_of(key: str) -> int:
    """n for a workers_key, 0 for a store (the broker in-process, as BrokerChild)."""
    return int(key.partition("-w")[2] or 0)


def chosen(store: str, workers: list[int] | None = None) -> list[str]:
    """--store sqlite|postgres|both -> the stores, SQLite first; with --workers N,M one
    PostgreSQL variant per worker count instead."""
    if workers:
        return [workers_key(n) for n in workers]
    return [SQLITE, POSTGRES] if store == "both" else [store]


def is_sqlite(config: Config) -> bool:
    from broker.store.open import SQLITE_PREFIX, store_url

    return store_url(config).startswith(SQLITE_PREFIX)


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh, empty database on admin_url's server; yields its URL, drops it afterwards."""
    import psycopg

    name = f"bench_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield urllib.parse.urlsplit(admin_url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def store_homes(
    name: str, keep: bool, stores: list[str], pg_url: str, **overrides: Any
) -> Iterator[dict[str, Config]]:
    """A bench home (fresh dev PKI) per store, the PostgreSQL one on a fresh database."""
    with contextlib.ExitStack() as stack:
        homes: dict[str, Config] = {}
        for store in stores:
            extra = dict(overrides)
            if is_postgres(store):
                extra["store_url"] = stack.enter_context(postgres_database(pg_url))
            homes[store] = stack.enter_context(bench_home(f"{name}-{store}", keep, **extra))
            print(f"{NAMES[store]} store: {extra.get('store_url') or homes[store].database}")
        yield homes


@contextlib.contextmanager
def store_home(
    name: str, keep: bool, store: str, pg_url: str, **overrides: Any
) -> Iterator[Config]:
    """store_homes for one store."""
    with store_homes(name, keep, [store], pg_url, **overrides) as homes:
        yield homes[store]


# ---------------------------------------------------------------------------------------------
# the database server's CPU
# ---------------------------------------------------------------------------------------------
def postgres_pids() -> list[int]:
    """Every PostgreSQL server process on this machine (postmaster, backends, workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == "postgres":
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def with_db_cpu(runner: Runner) -> Runner:
    """runner, with the PostgreSQL server's CPU during the run in UnaryRun.db_cpu (backends
    started during the run count whole; one that exits during it is lost: rare, the broker's
    pool keeps its connections)."""

    def run(r: int) -> UnaryRun:
        before = {p: pid_cpu(p) for p in postgres_pids()}
        result = runner(r)
        result.db_cpu = sum(pid_cpu(p) - before.get(p, 0.0) for p in postgres_pids())
        return result

    return run


def runners(stores: list[str], make: Callable[[str], Runner]) -> dict[str, Runner]:
    """make(store) per store, PostgreSQL's with its server's CPU measured."""
    return {s: with_db_cpu(make(s)) if is_postgres(s) else make(s) for s in stores}


# ---------------------------------------------------------------------------------------------
# runs alternated between stores, and the comparison
# ---------------------------------------------------------------------------------------------
def interleave(
    runs: dict[str, Runner], rounds: int, unit: str, width: int = 12
) -> dict[str, list[UnaryRun]]:
    """`rounds` runs of each runner; in round r the order is rotated by r. Each run is printed as
    it ends, labelled with its runner's name."""
    names = list(runs)
    results: dict[str, list[UnaryRun]] = {n: [] for n in names}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            results[name].append(runs[name](r))
            print(f"  {NAMES.get(name, name):<{width}}", end="")
            print_run(r + 1, results[name][-1], unit)
    return results


def print_stores(title: str, results: dict[str, list[UnaryRun]], unit: str) -> str | None:
    """Each store's median and breakdown; with both stores, the comparison line (returned too)."""
    for store, runs in results.items():
        print(f"\n{title} on {NAMES[store]}:")
        print_breakdown(runs, unit)
        db = sum(r.db_cpu for r in runs)
        if db:
            print(f"    PostgreSQL server CPU {us(db / (sum(r.ok for r in runs) or 1))}/call")
    line = comparison(title, results, unit)
    if line:
        print(f"\n  {line}")
    return line


def _cpu(runs: list[UnaryRun], db: bool = False) -> float:
    return median([(r.server_cpu + (r.db_cpu if db else 0.0)) / r.ok for r in runs if r.ok])


def comparison(title: str, results: dict[str, list[UnaryRun]], unit: str) -> str | None:
    """PostgreSQL / SQLite (or the most workers / the fewest): median throughput, broker CPU
    per call (and with the PostgreSQL server's CPU), p99; None unless both ran."""
    if SQLITE in results and POSTGRES in results:
        new, old = POSTGRES, SQLITE
    elif len(variants := sorted((k for k in results if workers_of(k)), key=workers_of)) > 1:
        new, old = variants[-1], variants[0]
    else:
        return None
    a, b = results[new], results[old]
    rate_b, rate_a = median([r.rate for r in b]), median([r.rate for r in a])
    cpu_b, cpu_a, cpu_db = _cpu(b), _cpu(a), _cpu(a, db=True)
    db_b = _cpu(b, db=True) if is_postgres(old) else cpu_b
    return (
        f"{title}: {NAMES[new]} / {NAMES[old]} over {min(len(a), len(b))} alternated pairs: "
        f"{rate_a:,.0f} / {rate_b:,.0f} {unit} = x{rate_a / rate_b if rate_b else 0:.2f}; "
        f"broker CPU/call {us(cpu_a)} / {us(cpu_b)} = x{cpu_a / cpu_b if cpu_b else 0:.2f} "
        f"(with the PostgreSQL server's {us(cpu_db)} / {us(db_b)} = "
        f"x{cpu_db / db_b if db_b else 0:.2f}); "
        f"p99 {ms(median([r.p99 for r in a]))} / {ms(median([r.p99 for r in b]))}"
    )


def broker_on(
    config: Config,
    overrides: dict[str, Any] | None = None,
    what_if: WhatIf | None = None,
    workers: int = 0,
    ports: dict[str, int] | None = None,
) -> Broker:
    """A broker child on config's home and on the store config names; with workers, the
    shipped `broker serve --workers N` instead (overrides and what-ifs do not reach it)."""
    if workers:
        return ServeChild(config, workers, ports)
    extra = dict(overrides or {})
    if config.store_url:
        extra["store_url"] = config.store_url
    return BrokerChild(config.home, extra, ports, what_if or WhatIf())
