"""Who may see which camera (issue 3): claim, share, reset, and the grant check of OpenSession.

Through the real server with real mTLS. Every negative case asserts the exact status code and the
store afterwards: no grant row that should not exist, no session row with outcome 'opened', and
the audit entry (actor, device, reason) of a denial (I4, I8, I12).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from broker._proto.broker.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    app_pb2,
    app_pb2_grpc,
    device_pb2,
    device_pb2_grpc,
)
from broker.clock import unix
from broker.store import SessionOutcome, SessionRecord
from tests.helpers import (
    AppCreds,
    DeviceCreds,
    RunningBroker,
    app_call,
    audit_entries,
    claim_code_hash_of,
    claim_device,
    enroll_camera,
    grant_rows,
    new_user,
    open_session,
    retry_delay,
    rpc_error,
    session_rows,
    share_device,
)


def reset_ownership(
    broker: RunningBroker, camera: DeviceCreds
) -> device_pb2.ResetOwnershipResponse:
    with camera.channel(broker) as channel:
        return device_pb2_grpc.DeviceServiceStub(channel).ResetOwnership(
            device_pb2.ResetOwnershipRequest(), timeout=10
        )


def revoke_share(broker: RunningBroker, creds: AppCreds, device_id: str, username: str) -> object:
    return app_call(
        broker,
        creds,
        "RevokeShare",
        app_pb2.RevokeShareRequest(device_id=device_id, username=username),
    )


def list_devices(broker: RunningBroker, creds: AppCreds) -> list[object]:
    return list(app_call(broker, creds, "ListDevices", app_pb2.ListMyDevicesRequest()).devices)


def assert_denied_session(
    broker: RunningBroker, creds: AppCreds, device_id: str, reason_part: str
) -> grpc.RpcError:
    """OpenSession is PERMISSION_DENIED, leaves a 'denied' session row and a 'session.denied'
    audit entry naming the caller, the device and the reason (I4, I12)."""
    before = len(audit_entries(broker, "session.denied"))
    error = rpc_error(open_session, broker, creds, device_id)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    entries = audit_entries(broker, "session.denied")
    assert len(entries) == before + 1
    entry = entries[-1]
    assert entry.actor == creds.spiffe_id
    assert entry.subject == device_id
    assert entry.detail["user_id"] == creds.user_id
    assert reason_part in entry.detail["reason"]
    rows = [
        (r.session_id, r.user_id, r.app_id, r.outcome, r.reason)
        for r in session_rows(broker, device_id)
        if r.session_id == entry.detail["session_id"]
    ]
    assert rows == [
        (
            entry.detail["session_id"],
            creds.user_id,
            creds.app_id,
            SessionOutcome.DENIED,
            entry.detail["reason"],
        )
    ]
    return error


def opened_sessions(broker: RunningBroker, device_id: str, user_id: str) -> list[SessionRecord]:
    return [
        r
        for r in session_rows(broker, device_id)
        if r.user_id == user_id and r.outcome is SessionOutcome.OPENED
    ]


# -- I4: no grant, no session ---------------------------------------------------------------------


def test_i4_stranger_cannot_open_session_on_anothers_device(broker, operator_channel):
    """User A neither owns nor was shared device B: PERMISSION_DENIED, audit (A, B, reason),
    session row 'denied', none 'opened'. An unknown device gets the very same answer."""
    _, code = enroll_camera(broker, operator_channel, "cam-b")
    owner = new_user(broker, "olga")
    claim_device(broker, owner, "cam-b", code)
    stranger = new_user(broker, "anna")

    denied = assert_denied_session(broker, stranger, "cam-b", "no access")
    unknown = assert_denied_session(broker, stranger, "cam-nope", "no access")
    assert denied.details() == unknown.details()  # no oracle for which devices exist
    assert opened_sessions(broker, "cam-b", stranger.user_id) == []
    assert [r.outcome for r in session_rows(broker, "cam-b")] == [SessionOutcome.DENIED]
    assert [d.device_id for d in list_devices(broker, stranger)] == []


def test_i4_expired_share_denies_new_sessions(broker, operator_channel):
    """A share with expires_at works until then; after the (broker) clock passes it, OpenSession
    is PERMISSION_DENIED with an 'expired' reason and ListDevices no longer shows the device."""
    _, code = enroll_camera(broker, operator_channel, "cam-b")
    owner = new_user(broker, "olga")
    viewer = new_user(broker, "vera")
    claim_device(broker, owner, "cam-b", code)
    expires_at = unix(broker.clock.now()) + 60
    share_device(broker, owner, "cam-b", "vera", expires_at)
    assert grant_rows(broker, "cam-b") == sorted(
        [(owner.user_id, "owner", None), (viewer.user_id, "viewer", expires_at)]
    )
    first = open_session(broker, viewer, "cam-b").session_id

    broker.clock.advance(61)
    assert_denied_session(broker, viewer, "cam-b", "expired")
    assert opened_sessions(broker, "cam-b", viewer.user_id) == [
        r for r in session_rows(broker, "cam-b") if r.session_id == first
    ]
    assert list_devices(broker, viewer) == []
    open_session(broker, owner, "cam-b")  # the owner is unaffected


def test_i4_revoked_share_denies_and_ends_sessions(broker, operator_channel):
    """RevokeShare deletes the viewer's grant, ends its open sessions ('ended'), is audited; the
    viewer's next OpenSession is PERMISSION_DENIED."""
    _, code = enroll_camera(broker, operator_channel, "cam-b")
    owner = new_user(broker, "olga")
    viewer = new_user(broker, "vera")
    claim_device(broker, owner, "cam-b", code)
    share_device(broker, owner, "cam-b", "vera")
    live = open_session(broker, viewer, "cam-b").session_id

    assert revoke_share(broker, owner, "cam-b", "vera").sessions_ended == 1
    assert grant_rows(broker, "cam-b") == [(owner.user_id, "owner", None)]
    assert [r.outcome for r in session_rows(broker, "cam-b") if r.session_id == live] == [
        SessionOutcome.ENDED
    ]
    (entry,) = audit_entries(broker, "share.revoked")
    assert entry.actor == owner.spiffe_id and entry.subject == "cam-b"
    assert entry.detail == {"user_id": viewer.user_id, "sessions_ended": [live]}
    assert_denied_session(broker, viewer, "cam-b", "no access")
    assert opened_sessions(broker, "cam-b", viewer.user_id) == []


def test_i4_only_the_owner_can_share_or_revoke(broker, operator_channel):
    """A viewer (or a stranger) sharing or revoking is PERMISSION_DENIED; no grant is written or
    removed and nothing is audited as granted."""
    _, code = enroll_camera(broker, operator_channel, "cam-b")
    owner = new_user(broker, "olga")
    viewer = new_user(broker, "vera")
    stranger = new_user(broker, "sam00")
    new_user(broker, "third")
    claim_device(broker, owner, "cam-b", code)
    share_device(broker, owner, "cam-b", "vera")
    before = grant_rows(broker, "cam-b")

    for caller, target in ((viewer, "third"), (viewer, "sam00"), (stranger, "sam00")):
        error = rpc_error(share_device, broker, caller, "cam-b", target)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    for caller in (viewer, stranger):
        error = rpc_error(revoke_share, broker, caller, "cam-b", "vera")
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert grant_rows(broker, "cam-b") == before
    assert len(audit_entries(broker, "share.granted")) == 1
    assert audit_entries(broker, "share.revoked") == []


def test_share_bad_input(broker, operator_channel):
    """Sharing to an unknown username is NOT_FOUND, an expiry in the past INVALID_ARGUMENT;
    neither writes a grant."""
    _, code = enroll_camera(broker, operator_channel, "cam-b")
    owner = new_user(broker, "olga")
    new_user(broker, "vera")
    claim_device(broker, owner, "cam-b", code)
    error = rpc_error(share_device, broker, owner, "cam-b", "nobody")
    assert error.code() is grpc.StatusCode.NOT_FOUND
    past = unix(broker.clock.now()) - 1
    error = rpc_error(share_device, broker, owner, "cam-b", "vera", past)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert grant_rows(broker, "cam-b") == [(owner.user_id, "owner", None)]


def test_i4_revoked_device_denies_sessions_to_its_owner(broker, operator_channel):
    """A device the operator revoked is PERMISSION_DENIED for OpenSession, even to its owner."""
    _, code = enroll_camera(broker, operator_channel, "cam-b")
    owner = new_user(broker, "olga")
    claim_device(broker, owner, "cam-b", code)
    admin_pb2_grpc.AdminServiceStub(operator_channel).RevokeDevice(
        admin_pb2.RevokeDeviceRequest(device_id="cam-b", reason="stolen"), timeout=10
    )
    assert_denied_session(broker, owner, "cam-b", "no access")
    assert opened_sessions(broker, "cam-b", owner.user_id) == []


# -- I8: claim codes ------------------------------------------------------------------------------


def test_i8_concurrent_claims_give_exactly_one_owner(broker, operator_channel):
    """Eight users claim one device with its (correct) code at the same moment: exactly one
    succeeds, seven are PERMISSION_DENIED, there is one 'owner' grant and the code is consumed."""
    _, code = enroll_camera(broker, operator_channel, "cam-race")
    users = [new_user(broker, f"user{i}") for i in range(8)]
    barrier = threading.Barrier(len(users))
    channels = [u.channel(broker) for u in users]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=10)

    def attempt(index: int) -> grpc.StatusCode:
        stub = app_pb2_grpc.AppServiceStub(channels[index])
        request = app_pb2.ClaimDeviceRequest(device_id="cam-race", claim_code=code)
        barrier.wait(timeout=10)
        try:
            stub.ClaimDevice(request, timeout=10)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    try:
        with ThreadPoolExecutor(len(users)) as pool:
            results = list(pool.map(attempt, range(len(users))))
    finally:
        for channel in channels:
            channel.close()
    assert sorted(r.name for r in results) == ["OK"] + ["PERMISSION_DENIED"] * 7
    winner = users[results.index(grpc.StatusCode.OK)]
    assert grant_rows(broker, "cam-race") == [(winner.user_id, "owner", None)]
    assert claim_code_hash_of(broker, "cam-race") is None
    assert len(audit_entries(broker, "device.claimed")) == 1
    assert len(audit_entries(broker, "device.claim.denied")) == 7


def test_i8_reset_ownership_drops_grants_ends_sessions_and_renews_code(broker, operator_channel):
    """ResetOwnership (by the camera's certificate) drops owner and shares, ends their open
    sessions ('ended'), returns a new code: the old code is dead, the new one works once."""
    camera, old_code = enroll_camera(broker, operator_channel, "cam-r")
    owner = new_user(broker, "olga")
    viewer = new_user(broker, "vera")
    claim_device(broker, owner, "cam-r", old_code)
    share_device(broker, owner, "cam-r", "vera")
    live = {open_session(broker, u, "cam-r").session_id for u in (owner, viewer)}

    response = reset_ownership(broker, camera)
    assert response.claim_code and response.claim_code != old_code
    assert response.sessions_ended == 2
    assert grant_rows(broker, "cam-r") == []
    rows = session_rows(broker, "cam-r")
    assert {r.session_id for r in rows} == live
    assert {(r.outcome, r.reason) for r in rows} == {(SessionOutcome.ENDED, "ownership reset")}
    (entry,) = audit_entries(broker, "device.ownership_reset")
    assert entry.actor == "spiffe://camera.local/device/cam-r"
    assert sorted(entry.detail["sessions_ended"]) == sorted(live)
    assert list_devices(broker, owner) == [] and list_devices(broker, viewer) == []
    assert_denied_session(broker, owner, "cam-r", "no access")

    error = rpc_error(claim_device, broker, owner, "cam-r", old_code)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert grant_rows(broker, "cam-r") == []
    claim_device(broker, viewer, "cam-r", response.claim_code)
    assert grant_rows(broker, "cam-r") == [(viewer.user_id, "owner", None)]
    error = rpc_error(claim_device, broker, owner, "cam-r", response.claim_code)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert grant_rows(broker, "cam-r") == [(viewer.user_id, "owner", None)]


def test_i8_reset_before_any_claim_kills_the_unused_code(broker, operator_channel):
    """A code that was never used is dead after ResetOwnership; the new code claims the device."""
    camera, old_code = enroll_camera(broker, operator_channel, "cam-r")
    user = new_user(broker, "anna")
    new_code = reset_ownership(broker, camera).claim_code
    error = rpc_error(claim_device, broker, user, "cam-r", old_code)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert grant_rows(broker, "cam-r") == []
    claim_device(broker, user, "cam-r", new_code)
    assert grant_rows(broker, "cam-r") == [(user.user_id, "owner", None)]


def test_i8_wrong_claim_codes_rate_limited_per_user(broker, operator_channel):
    """After claim_failures_per_user wrong codes (on any device) the user is RESOURCE_EXHAUSTED
    with RetryInfo, even with a correct code for another device: no grant, code not consumed,
    nothing audited as claimed. Other users are unaffected; the window ends."""
    limit = broker.config.claim_failures_per_user
    enroll_camera(broker, operator_channel, "cam-a")
    _, code_b = enroll_camera(broker, operator_channel, "cam-b")
    _, code_c = enroll_camera(broker, operator_channel, "cam-c")
    guesser = new_user(broker, "gus00")
    other = new_user(broker, "anna")
    for _ in range(limit):
        error = rpc_error(claim_device, broker, guesser, "cam-a", "WRONG-CODE")
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    hash_b = claim_code_hash_of(broker, "cam-b")

    for device_id, code in (("cam-a", "WRONG-CODE"), ("cam-b", code_b)):
        error = rpc_error(claim_device, broker, guesser, device_id, code)
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 1 <= retry_delay(error) <= broker.config.claim_window_seconds
    assert grant_rows(broker, "cam-b") == []
    assert claim_code_hash_of(broker, "cam-b") == hash_b
    assert audit_entries(broker, "device.claimed") == []
    assert len(audit_entries(broker, "device.claim.denied")) == limit

    claim_device(broker, other, "cam-c", code_c)
    broker.clock.advance(broker.config.claim_window_seconds + 1)
    claim_device(broker, guesser, "cam-b", code_b)
    assert grant_rows(broker, "cam-b") == [(guesser.user_id, "owner", None)]


def test_i8_wrong_claim_codes_rate_limited_per_device(broker, operator_channel):
    """claim_failures_per_device wrong codes spread over several users (none reaching its own
    limit) lock the device: even its owner-to-be with the right code gets RESOURCE_EXHAUSTED
    with RetryInfo, and nothing is written."""
    limit = broker.config.claim_failures_per_device
    per_user = broker.config.claim_failures_per_user - 1
    _, code = enroll_camera(broker, operator_channel, "cam-d")
    guessers = [new_user(broker, f"gus{i:02d}") for i in range(-(-limit // per_user))]
    failures = 0
    for guesser in guessers:
        for _ in range(per_user):
            if failures == limit:
                break
            error = rpc_error(claim_device, broker, guesser, "cam-d", f"WRONG-{failures}")
            assert error.code() is grpc.StatusCode.PERMISSION_DENIED
            failures += 1
    hash_before = claim_code_hash_of(broker, "cam-d")
    rightful = new_user(broker, "anna")
    error = rpc_error(claim_device, broker, rightful, "cam-d", code)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 1 <= retry_delay(error) <= broker.config.claim_window_seconds
    assert grant_rows(broker, "cam-d") == []
    assert claim_code_hash_of(broker, "cam-d") == hash_before
    assert audit_entries(broker, "device.claimed") == []

    broker.clock.advance(broker.config.claim_window_seconds + 1)
    claim_device(broker, rightful, "cam-d", code)
    assert grant_rows(broker, "cam-d") == [(rightful.user_id, "owner", None)]


def test_list_devices_roles(broker, operator_channel):
    """ListDevices shows owned and shared devices with their role, and nothing else."""
    _, code_a = enroll_camera(broker, operator_channel, "cam-a")
    _, code_b = enroll_camera(broker, operator_channel, "cam-b")
    anna = new_user(broker, "anna")
    ben = new_user(broker, "ben00")
    claim_device(broker, anna, "cam-a", code_a)
    claim_device(broker, ben, "cam-b", code_b)
    share_device(broker, ben, "cam-b", "anna")
    mine = {(d.device_id, d.role, d.online) for d in list_devices(broker, anna)}
    assert mine == {("cam-a", app_pb2.ROLE_OWNER, False), ("cam-b", app_pb2.ROLE_VIEWER, False)}
    assert {(d.device_id, d.role) for d in list_devices(broker, ben)} == {
        ("cam-b", app_pb2.ROLE_OWNER)
    }
