"""Fixtures for the unit suite: a dev PKI in a temp home, a fake clock, a SQLite store.

No servers here: unit tests call the core (``broker.pki.ca``, ``broker.devices.enrollment``, ``broker.store``)
directly. Fixture names are prefixed so they never shadow the integration fixtures in
``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.clock import FakeClock
from broker.config import Config
from broker.pki.ca import InitReport, IssuingAuthority, PkiFiles, init_pki, load_authority
from broker.store.sqlite import SqliteStore


@dataclass
class DevPki:
    """A freshly initialised dev PKI and what was made with it."""

    config: Config
    clock: FakeClock
    files: PkiFiles
    report: InitReport
    authority: IssuingAuthority


def make_dev_pki(home: Path, clock: FakeClock | None = None, **overrides: object) -> DevPki:
    clock = clock or FakeClock()
    config = Config(home=home).with_overrides(**overrides) if overrides else Config(home=home)
    report = init_pki(config, clock)
    return DevPki(config, clock, PkiFiles(config.certs_dir), report, load_authority(config, clock))


@pytest.fixture
def unit_pki(tmp_path: Path) -> DevPki:
    return make_dev_pki(tmp_path)


@pytest.fixture
def unit_store(unit_pki: DevPki) -> Iterator[SqliteStore]:
    store = SqliteStore(unit_pki.config.database)
    yield store
    store.close()
