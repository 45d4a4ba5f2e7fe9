"""Choosing the store of record from the command line (issue 10): `broker db migrate` on either
backend, and a broker that refuses, with a message saying so, a schema newer than it knows."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from broker.store.schema import LATEST_VERSION
from tests.pg import fresh_database

BACKENDS = ["sqlite", "postgres"]


def broker_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with ExitStack() as stack:
        if request.param == "postgres":
            yield stack.enter_context(fresh_database())
        else:
            yield "sqlite:///var/cli.db"


def bump_schema_version(store_url: str, home: Path) -> None:
    """What a newer broker's migration would leave behind: one more schema version."""
    if store_url.startswith("sqlite:///"):
        conn = sqlite3.connect(home / store_url.removeprefix("sqlite:///"))
        with conn:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (LATEST_VERSION + 1,))
        conn.close()
        return
    import psycopg

    with psycopg.connect(store_url, autocommit=True) as pg:
        pg.execute(
            "INSERT INTO schema_version (version, note) VALUES (%s, 'from the future')",
            (LATEST_VERSION + 1,),
        )


def test_db_migrate_brings_a_new_store_to_the_latest_version_once(
    store_url: str, tmp_path: Path
) -> None:
    first = broker_cli(tmp_path, "db", "migrate", "--store", store_url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().endswith(f"schema v0 -> v{LATEST_VERSION}")
    again = broker_cli(tmp_path, "db", "migrate", "--store", store_url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().endswith(f"schema v{LATEST_VERSION}, up to date")


def test_a_broker_refuses_a_schema_newer_than_it_knows_and_says_so(
    store_url: str, tmp_path: Path
) -> None:
    assert broker_cli(tmp_path, "db", "migrate", "--store", store_url).returncode == 0
    bump_schema_version(store_url, tmp_path)
    newer = f"schema v{LATEST_VERSION + 1} is newer than this broker (v{LATEST_VERSION})"
    for args in (["db", "migrate"], ["serve", "--init-pki"]):
        refused = broker_cli(tmp_path, *args, "--store", store_url)
        assert refused.returncode == 1, (args, refused.stdout, refused.stderr)
        assert newer in refused.stderr, (args, refused.stderr)
        assert "upgrade the broker" in refused.stderr
        assert "Traceback" not in refused.stderr
