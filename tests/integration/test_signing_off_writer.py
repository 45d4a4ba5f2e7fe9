"""The store's writer thread holds only SQL (issue 12, item 3).

Every certificate the broker signs for a request (token and birth-certificate enrollment, device
and app renewal, app enrollment) is signed on the signing thread before the transaction that
records it; the transaction only records it, or drops it unseen when it refuses. A token that is
not live costs no signature. A CA rotated between signing and recording is honoured: the
transaction re-signs with the CA now issuing, so nothing is recorded under a CA that was replaced.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from broker._proto.broker.v1 import bootstrap_pb2
from broker.client.device import DeviceClient, Endpoints
from broker.devices.enrollment import DeviceAuthority
from broker.identity.spiffe import device, operator
from broker.pemfile import read_certificates, read_private_key
from broker.pki.ca import IssuingAuthority, load_authority, subject_key_id
from broker.store.sqlite import SqliteStore
from tests.helpers import (
    birth_credentials,
    bootstrap_stub,
    cert_rows,
    create_token,
    csr_for,
    enroll,
    enroll_device,
    new_user,
    p256,
    renew_app,
    renew_device,
    rpc_error,
    token_used_at,
)
from tests.unit.conftest import make_dev_pki


@pytest.fixture
def signing_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the threads IssuingAuthority.issue runs on, from now on."""
    names: list[str] = []
    real = IssuingAuthority.issue

    def recording(self: IssuingAuthority, *args: Any, **kwargs: Any) -> Any:
        names.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(IssuingAuthority, "issue", recording)
    yield names


def test_every_request_certificate_is_signed_on_the_signing_thread(
    broker: Any, operator_channel: grpc.Channel, tmp_path: Path, signing_threads: list[str]
) -> None:
    camera = enroll_device(broker, operator_channel, "cam-sign-1")
    renew_device(broker, camera)
    key_pem, cert_pem = birth_credentials(broker, "cam-sign-2")
    client = DeviceClient(
        tmp_path / "birth",
        Endpoints(broker.bootstrap, broker.main, factory=broker.factory),
        broker.pki.ca_pem,
    )
    asyncio.run(client.enroll_with_birth_certificate(cert_pem, key_pem))
    phone = new_user(broker, "signer")
    renew_app(broker, phone)

    # token enrollment, device renewal, birth enrollment, app enrollment, app renewal
    assert len(signing_threads) == 5
    assert all(name.startswith("broker-sign") for name in signing_threads), signing_threads
    assert len(cert_rows(broker, "cam-sign-1")) == 2 and len(cert_rows(broker, "cam-sign-2")) == 1


def test_a_token_that_is_not_live_costs_no_signature_and_writes_nothing(
    broker: Any, operator_channel: grpc.Channel, signing_threads: list[str]
) -> None:
    token = create_token(operator_channel, "cam-sign-3")
    enroll(broker, token, csr_for(p256()))
    [first] = cert_rows(broker, "cam-sign-3")
    used_at = token_used_at(broker, token)
    signed = len(signing_threads)

    channel, stub = bootstrap_stub(broker)
    with channel:
        error = rpc_error(
            stub.EnrollDevice,
            bootstrap_pb2.EnrollDeviceRequest(csr_pem=csr_for(p256()), enrollment_token=token),
            timeout=10,
        )

    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "already used" in (error.details() or "")
    assert len(signing_threads) == signed  # nothing signed for a used token
    assert cert_rows(broker, "cam-sign-3") == [first]
    assert token_used_at(broker, token) == used_at


def test_a_refused_enrollment_drops_its_presigned_certificate(
    broker: Any, operator_channel: grpc.Channel, signing_threads: list[str]
) -> None:
    """The key belongs to another device (I2): the certificate signed before the transaction
    is never recorded nor returned, and the token stays unused."""
    owner = enroll_device(broker, operator_channel, "cam-sign-4")
    token = create_token(operator_channel, "cam-sign-5")
    signed = len(signing_threads)

    error = rpc_error(enroll, broker, token, csr_for(owner.key))

    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(signing_threads) == signed + 1  # signed, then refused by the transaction
    assert cert_rows(broker, "cam-sign-5") == []
    assert token_used_at(broker, token) is None


def test_a_ca_rotated_between_signing_and_recording_is_honoured(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "a")
    other = make_dev_pki(tmp_path / "b")
    store = SqliteStore(pki.config.database)
    try:
        authority = load_authority(pki.config, pki.clock)
        devices = DeviceAuthority(pki.config, authority, store, pki.clock)
        token = devices.create_enrollment_token(operator(pki.config.trust_domain, "admin"), "c-1")
        subject = devices.token_subject(token.token)
        assert subject == device(pki.config.trust_domain, "c-1")
        key, presigned = devices.check_and_presign(csr_for(p256()), subject)
        assert presigned is not None
        new_cert = read_certificates(other.files.issuing_cert)[0]
        authority.replace(read_private_key(other.files.issuing_key), new_cert)

        enrollment = devices.enroll_key_with_token(key, token.token, presigned)

        assert enrollment.issued.serial != presigned.issued.serial
        assert enrollment.issued.issuer_ski == subject_key_id(new_cert)
        leaf = x509.load_pem_x509_certificate(enrollment.issued.chain_pem.encode())
        assert leaf.issuer == new_cert.subject
        [row] = [r for r in cert_rows_of(store, subject.spiffe_id)]
        assert row.serial == enrollment.issued.serial
    finally:
        store.close()


def cert_rows_of(store: SqliteStore, spiffe_id: str) -> list[Any]:
    with store.read() as tx:
        return tx.certificates_of(spiffe_id)
