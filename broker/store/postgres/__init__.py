"""PostgreSQL backend: the store of record shared by a fleet of broker replicas."""

from broker.store.postgres.store import PostgresStore, PostgresTransaction, SerializationFailure

__all__ = ["PostgresStore", "PostgresTransaction", "SerializationFailure"]
