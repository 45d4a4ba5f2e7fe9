"""DeviceAuthority against a real SQLite file: single-use tokens (I8), renewal, per-call checks (I7),
and the dev PKI's key handling (I11)."""

from __future__ import annotations

import datetime as dt
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from broker.clock import FakeClock
from broker.devices.enrollment import DeviceAuthority, Enrollment
from broker.devices.onetime import secret_hash
from broker.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from broker.identity.spiffe import Identity, device, operator
from broker.pki.ca import IssuedCertificate, init_pki, load_authority
from broker.store import CertStatus, DeviceState
from broker.store.sqlite import SqliteStore
from tests.helpers import csr_for, p256
from tests.unit.conftest import DevPki, make_dev_pki

TD = "camera.local"
TOKEN_REFUSED = "enrollment token is invalid, expired or already used"


@pytest.fixture
def authority(unit_pki: DevPki, unit_store: SqliteStore) -> DeviceAuthority:
    return DeviceAuthority(unit_pki.config, unit_pki.authority, unit_store, unit_pki.clock)


@pytest.fixture
def admin() -> Identity:
    return operator(TD, "admin")


def _csr() -> str:
    return csr_for(p256())


def _enroll(authority: DeviceAuthority, admin: Identity, device_id: str = "cam-0001") -> Enrollment:
    token = authority.create_enrollment_token(admin, device_id).token
    return authority.enroll_with_token(_csr(), token)


def _actions(store: SqliteStore) -> list[str]:
    return [e.action for e in store.audit_entries()]


def _check(authority: DeviceAuthority, issued: IssuedCertificate, identity: Identity) -> None:
    authority.check_presented(identity, issued.certificate, issued.serial, issued.fingerprint)


# -- enrollment tokens are single use (I8) ---------------------------------------------------------


def test_token_is_single_use(
    authority: DeviceAuthority, admin: Identity, unit_store: SqliteStore
) -> None:
    token = authority.create_enrollment_token(admin, "cam-0001")
    assert token.token.startswith("bet_")

    enrollment = authority.enroll_with_token(_csr(), token.token)
    assert enrollment.identity == device(TD, "cam-0001")
    assert enrollment.claim_code

    with pytest.raises(PermissionDenied) as info:
        authority.enroll_with_token(_csr(), token.token)
    assert info.value.message == TOKEN_REFUSED

    with unit_store.read() as tx:
        record = tx.get_enrollment_token(secret_hash(token.token))
        assert record is not None
        assert record.used_at is not None
        assert tx.get_enrollment_token(token.token) is None  # only the hash is stored (I11)
        assert len(tx.certificates_of(enrollment.identity.spiffe_id)) == 1
    entries = list(unit_store.audit_entries())
    assert [e.action for e in entries] == [
        "enrollment_token.created",
        "device.enrolled",
        "device.enroll.denied",
    ]
    assert entries[-1].detail["reason"] == "token already used"
    assert all(token.token not in repr(e) for e in entries)


def test_expired_unknown_and_malformed_tokens_are_refused_alike(
    authority: DeviceAuthority, admin: Identity, unit_pki: DevPki, unit_store: SqliteStore
) -> None:
    token = authority.create_enrollment_token(admin, "cam-0001", ttl_seconds=60)
    unit_pki.clock.advance(61)
    for candidate in (token.token, "bet_" + "A" * 43, "not-a-token", "bet_" + "x" * 200):
        with pytest.raises(PermissionDenied) as info:
            authority.enroll_with_token(_csr(), candidate)
        assert info.value.message == TOKEN_REFUSED
    with unit_store.read() as tx:
        assert tx.list_devices() == []
        record = tx.get_enrollment_token(secret_hash(token.token))
        assert record is not None
        assert record.used_at is None
    reasons = [
        e.detail["reason"] for e in unit_store.audit_entries() if e.action == "device.enroll.denied"
    ]
    assert reasons == ["token expired", "unknown token", "malformed token", "malformed token"]


def test_bad_csr_does_not_consume_the_token(
    authority: DeviceAuthority, admin: Identity, unit_store: SqliteStore
) -> None:
    token = authority.create_enrollment_token(admin, "cam-0001")
    with pytest.raises(InvalidArgument):
        authority.enroll_with_token("garbage", token.token)
    with pytest.raises(InvalidArgument):
        authority.enroll_with_token(csr_for(ec.generate_private_key(ec.SECP256K1())), token.token)
    with unit_store.read() as tx:
        record = tx.get_enrollment_token(secret_hash(token.token))
        assert record is not None
        assert record.used_at is None
    assert authority.enroll_with_token(_csr(), token.token).identity.name == "cam-0001"


@pytest.mark.parametrize("device_id", ["Cam-1", "ab", "cam/1", "cam.1", "cam%2f1", "caméra"])
def test_token_creation_validates_the_device_id(
    authority: DeviceAuthority, admin: Identity, unit_store: SqliteStore, device_id: str
) -> None:
    with pytest.raises(InvalidArgument):
        authority.create_enrollment_token(admin, device_id)
    assert _actions(unit_store) == []


def test_concurrent_consumption_has_exactly_one_winner(unit_pki: DevPki, admin: Identity) -> None:
    """I8: 16 threads, each with its own connection and authority, race for one token."""
    config, clock = unit_pki.config, unit_pki.clock
    setup = SqliteStore(config.database)
    token = DeviceAuthority(config, unit_pki.authority, setup, clock).create_enrollment_token(
        admin, "cam-0001"
    )
    threads = 16
    csrs = [_csr() for _ in range(threads)]
    stores = [SqliteStore(config.database) for _ in range(threads)]
    authorities = [DeviceAuthority(config, load_authority(config, clock), s, clock) for s in stores]
    barrier = threading.Barrier(threads)
    outcomes: list[object] = [None] * threads

    def race(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = authorities[i].enroll_with_token(csrs[i], token.token)
        except Exception as exc:  # collected and asserted below
            outcomes[i] = exc

    workers = [threading.Thread(target=race, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    try:
        winners = [o for o in outcomes if isinstance(o, Enrollment)]
        losers = [o for o in outcomes if isinstance(o, PermissionDenied)]
        assert len(winners) == 1, outcomes
        assert len(losers) == threads - 1, outcomes
        assert all(e.message == TOKEN_REFUSED for e in losers)

        with setup.read() as tx:
            certs = tx.certificates_of(device(TD, "cam-0001").spiffe_id)
            assert [c.serial for c in certs] == [winners[0].issued.serial]
            assert [d.device_id for d in tx.list_devices()] == ["cam-0001"]
        actions = _actions(setup)
        assert actions.count("device.enrolled") == 1
        assert actions.count("device.enroll.denied") == threads - 1
    finally:
        for s in [*stores, setup]:
            s.close()


# -- renewal ---------------------------------------------------------------------------------------


def test_renewal_supersedes_the_old_certificate(
    authority: DeviceAuthority, admin: Identity, unit_pki: DevPki, unit_store: SqliteStore
) -> None:
    first = _enroll(authority, admin)
    unit_pki.clock.advance(3600)
    renewed = authority.renew(first.identity, _csr())
    assert renewed.serial != first.issued.serial
    assert renewed.certificate.subject == first.issued.certificate.subject

    with unit_store.read() as tx:
        old = tx.get_certificate(first.issued.serial)
        new = tx.get_certificate(renewed.serial)
    assert old is not None
    assert new is not None
    assert old.status is CertStatus.SUPERSEDED
    assert old.superseded_by == renewed.serial
    assert old.superseded_at == int(unit_pki.clock.now().timestamp())
    assert new.status is CertStatus.ACTIVE
    assert [
        s.current_certificate.serial for s in authority.list_devices() if s.current_certificate
    ] == [renewed.serial]
    assert _actions(unit_store)[-1] == "certificate.renewed"


def test_renewal_refusals(
    authority: DeviceAuthority, admin: Identity, unit_store: SqliteStore
) -> None:
    first = _enroll(authority, admin, "cam-0001")
    _enroll(authority, admin, "cam-0002")
    with pytest.raises(PermissionDenied):
        authority.renew(admin, _csr())  # operators are not renewed here
    other_key = p256()
    authority.renew(device(TD, "cam-0002"), csr_for(other_key))
    with pytest.raises(PermissionDenied, match="already belongs to another identity"):
        authority.renew(first.identity, csr_for(other_key))
    authority.revoke_device(admin, "cam-0001", "lost")
    with pytest.raises(Unauthenticated, match="not active"):
        authority.renew(first.identity, _csr())
    with unit_store.read() as tx:
        assert len(tx.certificates_of(first.identity.spiffe_id)) == 1


# -- check_presented (I1, I7) -------------------------------------------------------------------------


def test_fresh_certificate_is_accepted(authority: DeviceAuthority, admin: Identity) -> None:
    enrollment = _enroll(authority, admin)
    _check(authority, enrollment.issued, enrollment.identity)


def test_revoked_certificate_is_refused(authority: DeviceAuthority, admin: Identity) -> None:
    enrollment = _enroll(authority, admin)
    assert authority.revoke_device(admin, "cam-0001", "stolen").serials == (
        enrollment.issued.serial,
    )
    with pytest.raises(Unauthenticated, match="certificate has been revoked"):
        _check(authority, enrollment.issued, enrollment.identity)


def test_revoked_device_is_refused_even_with_an_active_certificate_record(
    authority: DeviceAuthority, admin: Identity, unit_store: SqliteStore
) -> None:
    enrollment = _enroll(authority, admin)
    with unit_store.transaction() as tx:
        tx.revoke_device("cam-0001", 1)  # device row only; certificate stays 'active'
    with pytest.raises(Unauthenticated, match="device has been revoked"):
        _check(authority, enrollment.issued, enrollment.identity)


def test_superseded_certificate_is_honoured_only_during_the_grace_period(
    authority: DeviceAuthority, admin: Identity, unit_pki: DevPki
) -> None:
    first = _enroll(authority, admin)
    renewed = authority.renew(first.identity, _csr())
    grace = unit_pki.config.superseded_grace_seconds

    unit_pki.clock.advance(grace)
    _check(authority, first.issued, first.identity)  # still inside the grace period
    unit_pki.clock.advance(1)
    with pytest.raises(Unauthenticated, match="replaced by a renewal"):
        _check(authority, first.issued, first.identity)
    _check(authority, renewed, first.identity)


def test_expired_certificate_is_refused(
    authority: DeviceAuthority, admin: Identity, unit_pki: DevPki
) -> None:
    enrollment = _enroll(authority, admin)
    not_after = enrollment.issued.certificate.not_valid_after_utc
    unit_pki.clock.advance((not_after - unit_pki.clock.now()).total_seconds() - 1)
    _check(authority, enrollment.issued, enrollment.identity)
    unit_pki.clock.advance(1)
    with pytest.raises(Unauthenticated, match="certificate has expired"):
        _check(authority, enrollment.issued, enrollment.identity)


def test_not_yet_valid_certificate_is_refused(
    authority: DeviceAuthority, admin: Identity, unit_pki: DevPki, unit_store: SqliteStore
) -> None:
    enrollment = _enroll(authority, admin)
    not_before = enrollment.issued.certificate.not_valid_before_utc
    early_clock = FakeClock(not_before - dt.timedelta(seconds=1))
    early = DeviceAuthority(unit_pki.config, unit_pki.authority, unit_store, early_clock)
    with pytest.raises(Unauthenticated, match="not yet valid"):
        _check(early, enrollment.issued, enrollment.identity)
    early_clock.advance(1)
    _check(early, enrollment.issued, enrollment.identity)


def test_unknown_serial_is_refused(authority: DeviceAuthority, admin: Identity) -> None:
    enrollment = _enroll(authority, admin)
    with pytest.raises(Unauthenticated, match="not issued by this broker"):
        authority.check_presented(
            enrollment.identity,
            enrollment.issued.certificate,
            "1" * 32,
            enrollment.issued.fingerprint,
        )


def test_fingerprint_mismatch_is_refused(authority: DeviceAuthority, admin: Identity) -> None:
    """Same serial, different certificate (e.g. a forgery from another CA): refused."""
    enrollment = _enroll(authority, admin)
    with pytest.raises(Unauthenticated, match="not issued by this broker"):
        authority.check_presented(
            enrollment.identity, enrollment.issued.certificate, enrollment.issued.serial, "0" * 64
        )


def test_certificate_of_another_identity_is_refused(
    authority: DeviceAuthority, admin: Identity
) -> None:
    enrollment = _enroll(authority, admin)
    with pytest.raises(Unauthenticated, match="not issued by this broker"):
        _check(authority, enrollment.issued, device(TD, "cam-0002"))


def test_revoked_device_cannot_get_a_new_token(authority: DeviceAuthority, admin: Identity) -> None:
    _enroll(authority, admin)
    authority.revoke_device(admin, "cam-0001", "retired")
    with pytest.raises(FailedPrecondition, match="revoked"):
        authority.create_enrollment_token(admin, "cam-0001")
    states = [s.record.state for s in authority.list_devices()]
    assert states == [DeviceState.REVOKED]


# -- the dev PKI on disk (I11) ------------------------------------------------------------------------

KEY_FILES = ("root.key", "issuing.key", "factory.key", "server.key", "operator.key")


@pytest.fixture
def wide_umask() -> Iterator[None]:
    """Prove the 0600 mode is set explicitly, not inherited from a strict umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_private_keys_are_written_0600(tmp_path: Path, wide_umask: None) -> None:
    pki = make_dev_pki(tmp_path)
    top_level = sorted(p.name for p in pki.files.root.glob("*.key"))
    assert top_level == sorted(KEY_FILES)
    # Every file holding a private key, wherever init_pki put it (e.g. session-token keys).
    holders = [
        p
        for p in pki.files.root.rglob("*")
        if p.is_file() and (p.suffix == ".key" or b"PRIVATE KEY" in p.read_bytes())
    ]
    assert len(holders) >= len(KEY_FILES)
    for path in holders:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, f"{path.relative_to(pki.files.root)} has mode {mode:o}"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_init_pki_is_idempotent(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path)
    assert pki.report.created
    before = _snapshot(pki.files.root)

    pki.clock.advance(86_400)
    again = init_pki(pki.config, pki.clock)
    assert again.created == ()
    assert again.server is None
    assert again.operator is None
    assert _snapshot(pki.files.root) == before


def test_reissued_leaf_keeps_its_key(tmp_path: Path) -> None:
    """Deleting a certificate re-issues just that certificate; no key is ever replaced."""
    pki = make_dev_pki(tmp_path)
    before = _snapshot(pki.files.root)
    pki.files.server_chain.unlink()

    report = init_pki(pki.config, pki.clock)
    assert report.created == (pki.files.server_chain,)
    assert report.server is not None
    after = _snapshot(pki.files.root)
    assert {k for k in after if after[k] != before[k]} == {"server.pem"}
