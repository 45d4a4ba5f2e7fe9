"""The test PostgreSQL server: its address from ``BROKER_TEST_POSTGRES`` and a fresh database per
test (``broker_test_<random>``, dropped afterwards), so pytest-xdist workers never share state.

Integration tests run against PostgreSQL instead of SQLite when ``BROKER_TEST_BACKEND=postgres``
(``make test`` runs them a second time that way when a server is configured).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import pytest

POSTGRES_ENV = "BROKER_TEST_POSTGRES"
BACKEND_ENV = "BROKER_TEST_BACKEND"
NO_POSTGRES = (
    f"PostgreSQL store tests need {POSTGRES_ENV}=postgresql://user@host:port/db "
    "(a server where that user may CREATE DATABASE); it is not set"
)


def postgres_server() -> str:
    """The admin URL of the test PostgreSQL server, or skip the test."""
    url = os.environ.get(POSTGRES_ENV, "")
    if not url:
        pytest.skip(NO_POSTGRES)
    return url


def integration_backend() -> str:
    """'postgres' when the integration suite should run its brokers on PostgreSQL."""
    backend = os.environ.get(BACKEND_ENV, "sqlite")
    if backend not in ("sqlite", "postgres"):
        raise RuntimeError(f"{BACKEND_ENV} must be sqlite or postgres, not {backend!r}")
    return backend


def with_database(url: str, name: str) -> str:
    """url with its database name replaced."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database on the test server (skips without one); dropped afterwards."""
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
