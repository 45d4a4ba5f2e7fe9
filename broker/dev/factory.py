"""Simulated factory: birth certificates for a batch of cameras (``make factory-batch``)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from broker.clock import Clock
from broker.identity.spiffe import validate_device_id
from broker.pemfile import (
    cert_pem,
    read_certificates,
    read_private_key,
    write_atomic,
    write_private_key,
)
from broker.pki.ca import PkiFiles, make_birth_certificate, new_key


@dataclass(frozen=True, slots=True)
class BirthCredential:
    device_id: str
    cert_path: Path
    key_path: Path


def make_batch(
    files: PkiFiles, count: int, clock: Clock, prefix: str = "cam"
) -> list[BirthCredential]:
    """Create count birth certificates (key made 'on the device', i.e. in its own folder, 0600)."""
    if not 1 <= count <= 100_000:
        raise ValueError("count must be between 1 and 100000")
    factory_key = read_private_key(files.factory_key)
    factory_cert = read_certificates(files.factory_cert)[0]
    batch: list[BirthCredential] = []
    for _ in range(count):
        device_id = validate_device_id(f"{prefix}-{secrets.token_hex(6)}")
        folder = files.factory_batches / device_id
        key = new_key()
        cert = make_birth_certificate(
            key.public_key(), factory_key, factory_cert, device_id, clock.now()
        )
        write_private_key(folder / "birth.key", key)
        write_atomic(folder / "birth.pem", cert_pem(cert))
        batch.append(BirthCredential(device_id, folder / "birth.pem", folder / "birth.key"))
    return batch
