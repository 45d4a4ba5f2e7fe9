"""Choosing a backend from a URL: ``sqlite:///<path>`` (the default) or ``postgresql://...``."""

from __future__ import annotations

from pathlib import Path

from broker.config import Config
from broker.errors import ConfigurationError
from broker.store.base import Store

SQLITE_PREFIX = "sqlite://"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def store_url(config: Config) -> str:
    """The store this config names: ``config.store_url``, else SQLite at ``config.database``."""
    return config.store_url or f"{SQLITE_PREFIX}/{config.database}"


def sqlite_path(url: str, home: Path) -> Path:
    """The file a ``sqlite:///<path>`` URL names: relative to home, or absolute with a fourth
    slash (``sqlite:////var/lib/broker/broker.db``), as in SQLAlchemy."""
    rest = url.removeprefix(SQLITE_PREFIX)
    if not rest.startswith("/") or rest == "/":
        raise ConfigurationError(
            f"store URL {url!r}: write sqlite:///<path relative to the broker home> "
            "or sqlite:////<absolute path>"
        )
    path = Path(rest[1:])
    return path if path.is_absolute() else home / path


def open_store(config: Config, *, migrate: bool = True) -> Store:
    """Open the configured store; with migrate, bring its schema up to date first.

    Either backend refuses a schema newer than this broker knows (``SchemaTooNew``)."""
    url = store_url(config)
    if url.startswith(SQLITE_PREFIX):
        from broker.store.sqlite import SqliteStore

        return SqliteStore(
            sqlite_path(url, config.home), migrate=migrate, synchronous=config.sqlite_synchronous
        )
    if url.startswith(POSTGRES_PREFIXES):
        from broker.store.postgres import PostgresStore

        return PostgresStore(url, migrate=migrate)
    scheme = url.split(":", 1)[0]
    raise ConfigurationError(
        f"unknown store URL scheme {scheme!r}: use sqlite:///<path> or postgresql://..."
    )
