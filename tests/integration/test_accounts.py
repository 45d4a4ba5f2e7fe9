"""Accounts and app instances (issue 3) through the real server with real mTLS.

Sign-up, password login (EnrollApp), rate limits on failed logins, sign-out and renewal of app
certificates. Negative cases assert the exact status code and that nothing was written (I11: the
password is stored only as an argon2id hash and never appears in a log line or an error).
"""

from __future__ import annotations

import logging

import grpc
import pytest

from broker._proto.broker.v1 import app_pb2, bootstrap_pb2
from broker.accounts.users import LOGIN_FAILED
from broker.identity.spiffe import from_certificate
from broker.store import CertStatus, SessionOutcome
from tests.conftest import start_broker, stop_broker
from tests.helpers import (
    PASSWORD,
    AppCreds,
    RunningBroker,
    app_call,
    app_record,
    audit_entries,
    bootstrap_stub,
    certificate,
    certificates_of,
    claim_device,
    count_rows,
    create_account,
    csr_for,
    enroll_app,
    enroll_camera,
    new_user,
    open_session,
    p256,
    renew_app,
    retry_delay,
    rpc_error,
    session_rows,
    stored_bytes,
    tamper_csr_signature,
    user_record,
)


def user_count(broker: RunningBroker) -> int:
    return count_rows(broker, "users")


def app_count(broker: RunningBroker) -> int:
    return count_rows(broker, "app_instances")


def app_cert_count(broker: RunningBroker) -> int:
    return count_rows(broker, "certificates", kind="app")


def enroll_request(username: str, password: str, csr_pem: str | None = None) -> object:
    return bootstrap_pb2.EnrollAppRequest(
        username=username,
        password=password,
        csr_pem=csr_for(p256()) if csr_pem is None else csr_pem,
        label="phone",
    )


def list_devices(broker: RunningBroker, creds: AppCreds) -> object:
    return app_call(broker, creds, "ListDevices", app_pb2.ListMyDevicesRequest())


# -- sign-up --------------------------------------------------------------------------------------


def test_duplicate_username_is_already_exists_and_writes_nothing(broker):
    """A taken username (also in another case) is ALREADY_EXISTS; the first account is untouched."""
    user_id = create_account(broker, "anna@example.com")
    assert user_count(broker) == 1
    hash_before = user_record(broker, user_id).password_hash
    channel, stub = bootstrap_stub(broker)
    with channel:
        for name in ("anna@example.com", "Anna@Example.com"):
            error = rpc_error(
                stub.CreateAccount,
                bootstrap_pb2.CreateAccountRequest(username=name, password="a different password"),
                timeout=10,
            )
            assert error.code() is grpc.StatusCode.ALREADY_EXISTS
    assert user_count(broker) == 1
    user = user_record(broker, user_id)
    assert (user.username, user.password_hash) == ("anna@example.com", hash_before)
    assert len(audit_entries(broker, "user.created")) == 1


def test_signup_switched_off_is_failed_precondition(tmp_path):
    """allow_signup=False: CreateAccount is FAILED_PRECONDITION and no users row appears."""
    running = start_broker(tmp_path, allow_signup=False)
    try:
        channel, stub = bootstrap_stub(running)
        with channel:
            error = rpc_error(
                stub.CreateAccount,
                bootstrap_pb2.CreateAccountRequest(username="anna", password=PASSWORD),
                timeout=10,
            )
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert user_count(running) == 0
        assert audit_entries(running, "user.created") == []
    finally:
        stop_broker(running)


@pytest.mark.parametrize("password", ["", "short", "9 chars!!", "x" * 1025])
def test_weak_password_is_invalid_argument(broker, password):
    """Passwords outside 10..1024 characters are INVALID_ARGUMENT; no user is created."""
    channel, stub = bootstrap_stub(broker)
    with channel:
        error = rpc_error(
            stub.CreateAccount,
            bootstrap_pb2.CreateAccountRequest(username="anna", password=password),
            timeout=10,
        )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert user_count(broker) == 0


def test_i11_password_stored_as_argon2id_hash(broker):
    """I11: users.password_hash is an argon2id PHC string; the password is nowhere in the DB."""
    anna = new_user(broker, "anna")
    stored = user_record(broker, anna.user_id).password_hash
    assert str(stored).startswith("$argon2id$")
    assert PASSWORD not in str(stored)
    for stored in stored_bytes(broker):
        assert PASSWORD.encode() not in stored


# -- login ----------------------------------------------------------------------------------------


def test_unknown_user_and_wrong_password_look_the_same(broker):
    """Unknown user and wrong password: both UNAUTHENTICATED with one message; nothing issued."""
    create_account(broker, "anna")
    channel, stub = bootstrap_stub(broker)
    with channel:
        wrong = rpc_error(stub.EnrollApp, enroll_request("anna", "not the password"), timeout=10)
        unknown = rpc_error(stub.EnrollApp, enroll_request("nobody", PASSWORD), timeout=10)
    assert wrong.code() is unknown.code() is grpc.StatusCode.UNAUTHENTICATED
    assert wrong.details() == unknown.details() == LOGIN_FAILED
    assert app_count(broker) == 0 and app_cert_count(broker) == 0
    denied = audit_entries(broker, "user.login.denied")
    assert [e.subject for e in denied] == ["anna", "nobody"]


def test_failed_logins_rate_limited_per_username_with_retry_info(broker):
    """I8: after login_failures_per_pair wrong passwords from one address the username is
    RESOURCE_EXHAUSTED there with a RetryInfo detail, even with the right password (no bypass,
    nothing issued); the window ends. (Per username across addresses: tests/unit/
    test_login_limits.py, which can use several addresses.)"""
    limit = broker.config.login_failures_per_pair
    create_account(broker, "anna")
    channel, stub = bootstrap_stub(broker)
    with channel:
        for _ in range(limit):
            error = rpc_error(stub.EnrollApp, enroll_request("anna", "wrong password!"), timeout=10)
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        limited = rpc_error(stub.EnrollApp, enroll_request("anna", "wrong password!"), timeout=10)
        assert limited.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 1 <= retry_delay(limited) <= broker.config.login_window_seconds
        right = rpc_error(stub.EnrollApp, enroll_request("anna", PASSWORD), timeout=10)
        assert right.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 1 <= retry_delay(right) <= broker.config.login_window_seconds
        assert app_count(broker) == 0 and app_cert_count(broker) == 0
        # another username from the same address is not affected by anna's limit
        create_account(broker, "ben00")
        assert stub.EnrollApp(enroll_request("ben00", PASSWORD), timeout=10).app_id
        broker.clock.advance(broker.config.login_window_seconds + 1)
        assert stub.EnrollApp(enroll_request("anna", PASSWORD), timeout=10).app_id
    assert app_count(broker) == 2


def test_failed_logins_from_one_address_slow_it_but_never_lock_out_others(broker):
    """I8 (issue 13 item 2): after login_failures_per_peer failures from one address (spread over
    usernames, so no per-user limit triggers), anna, who was never attacked, still logs in from
    it (slowed by at most one slot, not refused); every failure was checked and audited."""
    create_account(broker, "anna")
    channel, stub = bootstrap_stub(broker)
    with channel:
        for i in range(broker.config.login_failures_per_peer):
            error = rpc_error(stub.EnrollApp, enroll_request(f"guess{i}", PASSWORD), timeout=10)
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert app_count(broker) == 0 and app_cert_count(broker) == 0
        assert stub.EnrollApp(enroll_request("anna", PASSWORD), timeout=30).app_id
    assert app_count(broker) == 1 and app_cert_count(broker) == 1
    denied = audit_entries(broker, "user.login.denied")
    assert len(denied) == broker.config.login_failures_per_peer


def test_bad_csr_is_invalid_argument_and_not_a_failed_login(broker):
    """A bad CSR (garbage, tampered signature, empty) is INVALID_ARGUMENT before the password is
    looked at: more of them than the login limit, even with a wrong password, never lock the user."""
    create_account(broker, "anna")
    good = csr_for(p256())
    bad = ["not a csr", tamper_csr_signature(good), ""]
    channel, stub = bootstrap_stub(broker)
    with channel:
        for i in range(2 * broker.config.login_failures_per_pair + 2):
            password = PASSWORD if i % 2 else "wrong password!"
            error = rpc_error(
                stub.EnrollApp, enroll_request("anna", password, bad[i % len(bad)]), timeout=10
            )
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert app_count(broker) == 0
        assert audit_entries(broker, "user.login.denied") == []
        assert stub.EnrollApp(enroll_request("anna", PASSWORD, good), timeout=10).app_id


# -- I11: the password never leaks ----------------------------------------------------------------


def test_i11_password_never_in_logs_or_errors(broker, caplog):
    """I11: with every logger at DEBUG, sign-up, logins (right, wrong, limited), a weak password
    and a bad CSR never put the password in a log line, an error message or its status details."""
    caplog.set_level(logging.DEBUG)
    secret = "Quokka-Zebra-7731-secret"
    weak = "Qx7-pw!"
    errors: list[grpc.RpcError] = []
    channel, stub = bootstrap_stub(broker)
    with channel:
        stub.CreateAccount(
            bootstrap_pb2.CreateAccountRequest(username="anna", password=secret), timeout=10
        )
        for request in (
            bootstrap_pb2.CreateAccountRequest(username="anna", password=secret),  # duplicate
            bootstrap_pb2.CreateAccountRequest(username="ben00", password=weak),  # weak
            bootstrap_pb2.CreateAccountRequest(username=secret + "!", password=secret),  # bad name
        ):
            errors.append(rpc_error(stub.CreateAccount, request, timeout=10))
        assert stub.EnrollApp(enroll_request("anna", secret), timeout=10).app_id
        errors.append(rpc_error(stub.EnrollApp, enroll_request("anna", secret, "junk"), timeout=10))
        errors.append(rpc_error(stub.EnrollApp, enroll_request("nobody", secret), timeout=10))
        for _ in range(broker.config.login_failures_per_pair + 1):
            errors.append(rpc_error(stub.EnrollApp, enroll_request("anna", weak), timeout=10))
        errors.append(rpc_error(stub.EnrollApp, enroll_request("anna", secret), timeout=10))
    assert {e.code() for e in errors} >= {
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
    assert caplog.records, "expected the broker to log something at DEBUG"
    for password in (secret, weak):
        for record in caplog.records:
            assert password not in record.getMessage(), record
            assert password not in str(record.args), record
        assert password not in caplog.text
        for error in errors:
            assert password not in (error.details() or "")
            for key, value in error.trailing_metadata() or ():
                raw = value if isinstance(value, bytes) else str(value).encode()
                assert password.encode() not in raw, key
        for entry in audit_entries(broker):
            assert password not in repr(entry)


# -- sign-out and renewal -------------------------------------------------------------------------


def test_sign_out_revokes_app_and_ends_its_sessions(broker, operator_channel):
    """SignOut: the app's certificate is UNAUTHENTICATED on the next RPC (I7), its open sessions
    are 'ended', 'app.revoked' is audited; the user's other app instance keeps working."""
    _, code = enroll_camera(broker, operator_channel, "cam-out")
    phone = new_user(broker, "anna")
    tablet = enroll_app(broker, "anna", PASSWORD)
    claim_device(broker, phone, "cam-out", code)
    mine = open_session(broker, phone, "cam-out").session_id
    other = open_session(broker, tablet, "cam-out").session_id

    response = app_call(broker, phone, "SignOut", app_pb2.SignOutRequest())
    assert response.sessions_ended == 1

    for call in (
        lambda: list_devices(broker, phone),
        lambda: open_session(broker, phone, "cam-out"),
        lambda: app_call(broker, phone, "SignOut", app_pb2.SignOutRequest()),
    ):
        assert rpc_error(call).code() is grpc.StatusCode.UNAUTHENTICATED
    rows = {r.session_id: r.outcome for r in session_rows(broker, "cam-out")}
    assert rows == {mine: SessionOutcome.ENDED, other: SessionOutcome.OPENED}
    assert app_record(broker, phone.app_id).state.value == "revoked"
    assert certificate(broker, phone.serial).status is CertStatus.REVOKED
    (entry,) = audit_entries(broker, "app.revoked")
    assert entry.subject == phone.app_id and entry.actor == phone.spiffe_id
    assert entry.detail["sessions_ended"] == [mine]
    assert [d.device_id for d in list_devices(broker, tablet).devices] == ["cam-out"]


def test_renew_app_certificate_keeps_identity_and_supersedes_old(broker):
    """RenewCertificate: a new chain with the same SPIFFE ID; the old certificate is superseded
    (honoured for the grace period, UNAUTHENTICATED after it); the new one keeps working."""
    old = new_user(broker, "anna")
    new = renew_app(broker, old)
    assert from_certificate(new.leaf, "camera.local") == from_certificate(old.leaf, "camera.local")
    assert new.serial != old.serial
    statuses = {r.serial: r.status for r in certificates_of(broker, old.spiffe_id)}
    assert statuses == {old.serial: CertStatus.SUPERSEDED, new.serial: CertStatus.ACTIVE}
    assert certificate(broker, old.serial).superseded_by == new.serial
    (entry,) = audit_entries(broker, "certificate.renewed")
    assert entry.detail["superseded"] == [old.serial]

    list_devices(broker, old)  # still inside the grace period
    broker.clock.advance(broker.config.superseded_grace_seconds + 1)
    assert rpc_error(list_devices, broker, old).code() is grpc.StatusCode.UNAUTHENTICATED
    list_devices(broker, new)


def test_renew_with_another_identitys_key_is_permission_denied(broker):
    """I2: a CSR whose key already belongs to another app instance is PERMISSION_DENIED; no
    certificate is issued and the caller's certificate stays active."""
    anna = new_user(broker, "anna")
    ben = new_user(broker, "ben00")
    before = app_cert_count(broker)
    error = rpc_error(
        app_call,
        broker,
        anna,
        "RenewCertificate",
        app_pb2.RenewAppCertificateRequest(csr_pem=csr_for(ben.key)),
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert app_cert_count(broker) == before
    assert certificate(broker, anna.serial).status is CertStatus.ACTIVE
