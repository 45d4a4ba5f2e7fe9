"""Password hashing with argon2id (argon2-cffi) (I11). Passwords are never logged or returned."""

from __future__ import annotations

import argon2

from broker.config import Config
from broker.errors import InvalidArgument

MIN_PASSWORD = 10
MAX_PASSWORD = 1024  # bounds the hashing cost an attacker can ask for


class PasswordHasher:
    """Hashes and verifies passwords; verifying an unknown user costs the same as a known one."""

    def __init__(self, config: Config) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=config.argon2_time_cost,
            memory_cost=config.argon2_memory_kib,
            parallelism=config.argon2_parallelism,
            type=argon2.Type.ID,
        )
        # Compared against when the user does not exist, so timing does not reveal usernames.
        self._dummy = self._hasher.hash("dummy password for unknown users")

    def hash(self, password: str) -> str:
        """An argon2id hash of password, after checking its length."""
        check_password_policy(password)
        return self._hasher.hash(password)

    def verify(self, stored_hash: str | None, password: str) -> bool:
        """Whether password matches stored_hash (None = unknown user: always False, same cost)."""
        if not password or len(password) > MAX_PASSWORD:
            return False
        try:
            return (
                self._hasher.verify(stored_hash or self._dummy, password)
                and stored_hash is not None
            )
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False


def check_password_policy(password: str) -> None:
    """Refuse passwords that are too short or too long."""
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidArgument(f"password must be {MIN_PASSWORD}-{MAX_PASSWORD} characters")
