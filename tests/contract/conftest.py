"""One store contract, every backend: fixtures that open a fresh store of each kind.

PostgreSQL tests read the server's address from ``BROKER_TEST_POSTGRES`` (for example
``postgresql://postgres@127.0.0.1:5432/postgres``) and skip, saying so, when it is unset. Each test
gets its own database (``broker_test_<random>``, dropped afterwards), so pytest-xdist workers never
share state.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from broker.store.base import Store
from broker.store.sqlite import SqliteStore

POSTGRES_ENV = "BROKER_TEST_POSTGRES"
NO_POSTGRES = (
    f"PostgreSQL store tests need {POSTGRES_ENV}=postgresql://user@host:port/db "
    "(a server where that user may CREATE DATABASE); it is not set"
)

StoreFactory = Callable[..., Any]


def postgres_server() -> str:
    """The admin URL of the test PostgreSQL server, or skip the test."""
    url = os.environ.get(POSTGRES_ENV, "")
    if not url:
        pytest.skip(NO_POSTGRES)
    return url


def with_database(url: str, name: str) -> str:
    """url with its database name replaced."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty database on the test server; dropped after the test."""
    import psycopg

    admin_url = postgres_server()
    name = f"broker_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield with_database(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def store_factory(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
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
