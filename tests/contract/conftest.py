"""One store contract, every backend: fixtures that open a fresh store of each kind.

PostgreSQL tests read the server's address from ``BROKER_TEST_POSTGRES`` (for example
``postgresql://postgres@127.0.0.1:5432/postgres``) and skip, saying so, when it is unset. Each test
gets its own database (``broker_test_<random>``, dropped afterwards), so pytest-xdist workers never
share state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.store.base import Store
from broker.store.sqlite import SqliteStore
from tests.pg import fresh_database


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty database on the test server; dropped after the test."""
    with fresh_database() as url:
        yield url


StoreFactory = Callable[..., Any]


BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def store_factory(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[StoreFactory]:
    """Opens another store (its own connection or pool) on the same database; all are closed
    after the test."""
    opened: list[Any] = []
    if backend == "sqlite":
        path = tmp_path / "var" / "broker.db"

        def make(**kwargs: Any) -> SqliteStore:
            store = SqliteStore(path, **kwargs)
            opened.append(store)
            return store

    else:
        url = request.getfixturevalue("postgres_url")
        from broker.store.postgres import PostgresStore

        def make(**kwargs: Any) -> PostgresStore:  # type: ignore[misc]
            kwargs.setdefault("min_size", 1)
            kwargs.setdefault("max_size", 2)
            store = PostgresStore(url, **kwargs)
            opened.append(store)
            return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(store_factory: StoreFactory) -> Store:
    made: Store = store_factory()
    return made
