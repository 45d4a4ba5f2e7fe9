"""`make fleet-audit` / AdminService.FleetAudit (issue 13 item 5): every category created for real
against a running broker over mutual TLS, and asserted exactly (ids, counts, times).

Findings come only from the store of record (audit log, failure counters, certificates,
attachments, sessions), so they are the same on every replica. The broker runs on a FakeClock:
steps happen at known offsets from T, so first/last-seen times are exact.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from broker.audit.fleet import CATEGORIES, DAY, Finding, FleetReport
from broker.cli import main as cli_main
from broker.clock import now_ms
from broker.devices import enrollment
from broker.service.fleet import report_from_pb, report_json
from broker.store.base import CertStatus
from tests.helpers import (
    PASSWORD,
    RunningBroker,
    audit_entries,
    cert_rows,
    claim_device,
    create_account,
    create_token,
    csr_for,
    device_row,
    enroll,
    enroll_app,
    enroll_camera,
    enroll_device,
    eventually,
    new_user,
    open_session,
    p256,
    read_store,
    renew_device,
    rpc_error,
    sdk_app,
    sdk_camera,
    start_camera,
    stop_task,
)

HOUR = 3_600


def audit(
    broker: RunningBroker, operator_channel: grpc.Channel, **request: int
) -> admin_pb2.FleetAuditResponse:
    stub = admin_pb2_grpc.AdminServiceStub(operator_channel)
    response: admin_pb2.FleetAuditResponse = stub.FleetAudit(
        admin_pb2.FleetAuditRequest(**request), timeout=20
    )
    return response


def report(broker: RunningBroker, operator_channel: grpc.Channel, **request: int) -> FleetReport:
    return report_from_pb(audit(broker, operator_channel, **request))


def call_renew(broker: RunningBroker, creds_channel: grpc.Channel) -> grpc.RpcError:
    stub = device_pb2_grpc.DeviceServiceStub(creds_channel)
    request = device_pb2.RenewCertificateRequest(csr_pem=csr_for(p256()))
    return rpc_error(stub.RenewCertificate, request, timeout=10)


def failures_of(broker: RunningBroker, scope: str) -> list[tuple[str, int]]:
    return read_store(broker, lambda tx: [(c.key, c.count) for c in tx.failure_counts(scope, 0)])


def active_serial(broker: RunningBroker, device_id: str) -> tuple[str, int]:
    active = [c for c in cert_rows(broker, device_id) if c.status is CertStatus.ACTIVE]
    assert len(active) == 1, active
    return active[0].serial, active[0].not_after


async def clone_attach(broker: RunningBroker, operator_channel: grpc.Channel, home: Path) -> str:
    """Two Attach streams with one device certificate: the newer one replaces the older.
    Returns the camera's claim code."""
    cam = await sdk_camera(broker, operator_channel, home, "cam-clone")
    async with cam.client.attach() as first:
        assert (await first.receive(10)).WhichOneof("kind") == "accepted"  # type: ignore[union-attr]
        async with cam.client.attach() as second:
            assert (await second.receive(10)).WhichOneof("kind") == "accepted"  # type: ignore[union-attr]
            with pytest.raises(grpc.aio.AioRpcError) as replaced:
                while await first.receive(10) is not None:
                    pass
            assert replaced.value.code() is grpc.StatusCode.UNAUTHENTICATED
    return cam.client.state.claim_code


async def relay_alarm(broker: RunningBroker, operator_channel: grpc.Channel, home: Path) -> str:
    """A rogue camera sends a frame into another camera's live session: one relay alarm."""
    owner = await sdk_app(broker, home / "owner", "owner-alarm")
    rogue = await sdk_camera(broker, operator_channel, home / "rogue", "cam-rogue")
    victim = await sdk_camera(broker, operator_channel, home / "b", "cam-b", owner=owner)
    task = await start_camera(victim)
    ticket = await owner.open_session("cam-b")
    async with owner.watch(ticket) as stream, rogue.client.attach() as attach:
        frames = stream.frames()
        await asyncio.wait_for(frames.__anext__(), 10)
        assert (await attach.receive(10)).WhichOneof("kind") == "accepted"  # type: ignore[union-attr]
        await attach.send_raw_frame(ticket.session_id, 10**6, b"\x00" * 64)
        await eventually(lambda: audit_entries(broker, "relay.alarm"), timeout=10)
    await stop_task(task)
    return ticket.session_id


def test_fleet_audit_reports_each_category_exactly(
    broker: RunningBroker, operator_channel: grpc.Channel, tmp_path: Path
) -> None:
    clock = broker.clock
    t0 = now_ms(clock)
    live = _LiveCamera(broker, operator_channel, tmp_path / "live")

    # 1. A cloned camera: two live Attach streams of one certificate (T + 0).
    clone_code = asyncio.run(clone_attach(broker, operator_channel, tmp_path / "clone"))

    # 2. Key reuse (T + 60 s): an enrollment, a renewal and an app enrollment with cam-victim's key.
    clock.advance(60)
    t_enroll = now_ms(clock)
    victim, victim_code = enroll_camera(broker, operator_channel, "cam-victim")
    other, other_code = enroll_camera(broker, operator_channel, "cam-x")
    victim_key = victim.key
    stolen = csr_for(victim_key)
    thief_token = create_token(operator_channel, "cam-thief")
    denied = rpc_error(enroll, broker, thief_token, stolen)
    assert denied.code() is grpc.StatusCode.PERMISSION_DENIED
    assert device_row(broker, "cam-thief") is None
    clock.advance(1)
    t_renew = now_ms(clock)
    with pytest.raises(grpc.RpcError) as renewal:
        renew_device(broker, other, key=victim_key)
    assert renewal.value.code() is grpc.StatusCode.PERMISSION_DENIED
    user_id = create_account(broker, "keythief")
    with pytest.raises(grpc.RpcError) as app_enroll:
        enroll_app(broker, "keythief", PASSWORD, key=victim_key)
    assert app_enroll.value.code() is grpc.StatusCode.PERMISSION_DENIED

    # 3. A revoked camera calling again: three refusals this hour, one audit entry for them.
    clock.advance(60)  # T + 121 s
    t_revoked = now_ms(clock)
    revoked = enroll_device(broker, operator_channel, "cam-revoked")
    admin_pb2_grpc.AdminServiceStub(operator_channel).RevokeDevice(
        admin_pb2.RevokeDeviceRequest(device_id="cam-revoked", reason="stolen"), timeout=10
    )
    with revoked.channel(broker) as channel:
        for _ in range(3):
            assert call_renew(broker, channel).code() is grpc.StatusCode.UNAUTHENTICATED
    attempts = audit_entries(broker, "identity.revoked.attempt")
    assert [
        (e.subject, e.detail["serial"], e.detail["attempts_previous_hour"]) for e in attempts
    ] == [("cam-revoked", revoked.serial, 0)]

    # 4. A relay alarm (T + 181 s), and a viewer fanning out over four cameras, one denied.
    clock.advance(60)
    t_alarm = now_ms(clock)
    session_id = asyncio.run(relay_alarm(broker, operator_channel, tmp_path / "alarm"))
    clock.advance(60)  # T + 241 s
    fan = new_user(broker, "fan")
    for device_id, code in (
        ("cam-clone", clone_code),
        ("cam-victim", victim_code),
        ("cam-x", other_code),
    ):
        claim_device(broker, fan, device_id, code)
    t_fan = (now_ms(clock) // 1000 + 1) * 1000  # sessions are stamped in whole seconds
    for device_id in ("cam-clone", "cam-victim", "cam-x"):
        clock.advance(1)
        open_session(broker, fan, device_id)
    clock.advance(1)  # T + 245 s
    refused = rpc_error(open_session, broker, fan, "cam-b")  # owner-alarm's camera
    assert refused.code() is grpc.StatusCode.PERMISSION_DENIED

    # 5. In the next clock hour the revoked camera calls once more: a second audit entry,
    # carrying the previous hour's count; the counter now holds four. (Hours are clock hours:
    # move to 1 s into the one after the first attempts', wherever the clock started.)
    first_attempt_ms = attempts[0].at_ms
    next_hour_ms = (first_attempt_ms // (HOUR * 1000) + 1) * HOUR * 1000
    clock.advance((next_hour_ms - now_ms(clock)) / 1000 + 1)
    with revoked.channel(broker) as channel:
        assert call_renew(broker, channel).code() is grpc.StatusCode.UNAUTHENTICATED
    attempts = audit_entries(broker, "identity.revoked.attempt")
    assert [e.detail["attempts_previous_hour"] for e in attempts] == [0, 3]
    t_last_attempt = now_ms(clock)

    found = report(broker, operator_channel, fanout_min_devices=3)
    assert found.possible_clones == (Finding("device", "cam-clone", 1, t0, t0, "r1"),)
    assert found.key_reuse == (
        Finding("device", "cam-thief", 1, t_enroll, t_enroll, "enroll"),
        Finding("device", "cam-x", 1, t_renew, t_renew, "renew"),
        Finding("user", user_id, 1, t_renew, t_renew, "enroll"),
    )
    assert found.revoked_attempts == (
        Finding("device", "cam-revoked", 4, t_revoked, t_last_attempt, revoked.serial),
    )
    assert found.relay_alarms == (
        Finding(
            "device",
            "cam-rogue",
            1,
            t_alarm,
            t_alarm,
            "frame from a device that is not the session's",
        ),
    )
    assert audit_entries(broker, "relay.alarm")[0].detail["session_id"] == session_id
    # fan: cam-clone, cam-victim, cam-x opened, cam-b denied, within one 24 h window. owner-alarm
    # opened one session only: below the threshold.
    assert found.session_fanout == (
        Finding("user", fan.user_id, 4, t_fan, t_fan + 3_000, "1 denied", 4),
    )
    # Within 7 days nothing expires yet (device certificates last 30 days).
    assert found.expiring_offline == ()
    # Four distinct devices are below a threshold of five: not flagged.
    assert report(broker, operator_channel, fanout_min_devices=5).session_fanout == ()

    # 6. 24 days on, every device certificate expires within 7 days: the offline cameras are
    # reported (not the revoked one, not one attached and heartbeating).
    live.attach()
    try:
        clock.advance(24 * DAY)
        # The live camera's next heartbeat renews its lease under the advanced clock.
        asyncio.run(eventually(lambda: _lease_live(broker, "cam-live"), timeout=15))
        expiring = report(broker, operator_channel, since_seconds=31 * DAY).expiring_offline
        # The default window (7 days) no longer reaches back to the events above; expiring
        # certificates are a state, not events: still reported.
        recent = report(broker, operator_channel)
    finally:
        live.stop()
    expected = []
    for device_id in ("cam-b", "cam-clone", "cam-rogue", "cam-victim", "cam-x"):
        serial, not_after = active_serial(broker, device_id)
        row = device_row(broker, device_id)
        assert row is not None
        seen = (row.last_seen_at or 0) * 1000
        expected.append(Finding("device", device_id, 1, seen, seen, serial, not_after))
    assert expiring == tuple(expected)
    assert {f.id for f in expiring}.isdisjoint({"cam-live", "cam-revoked"})
    assert recent.expiring_offline == expiring and recent.total() == len(expected)
    # cam-live was left out for being online: its certificate expires within the window too.
    assert active_serial(broker, "cam-live")[1] <= now_ms(clock) // 1000 + 7 * DAY


def test_empty_fleet_gives_empty_sections_and_the_cli_prints_them(
    broker: RunningBroker, operator_channel: grpc.Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    response = audit(broker, operator_channel)
    found = report_from_pb(response)
    assert found.total() == 0
    assert (found.thresholds.since_seconds, found.thresholds.fanout_min_devices) == (7 * DAY, 20)
    assert found.thresholds.fanout_window_seconds == DAY
    assert found.since_ms == found.generated_at_ms - 7 * DAY * 1000

    # `broker fleet-audit --json` (what `make fleet-audit JSON=1` runs) prints exactly the RPC's
    # result (the FakeClock has not moved, so even generated_at_ms is the same).
    base = ["--home", str(broker.home), "fleet-audit", "--broker", broker.main]
    assert cli_main([*base, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(report_json(found))
    assert printed["possible_clones"] == [] and printed["session_fanout"] == []
    assert printed["thresholds"]["since_seconds"] == 7 * DAY

    assert cli_main(base) == 0
    text = capsys.readouterr().out
    for _, heading in CATEGORIES:
        assert f"{heading}: 0\n  none\n" in text
    assert text.rstrip().endswith("0 finding(s)")


def test_cli_json_equals_the_rpc_with_findings(
    broker: RunningBroker, operator_channel: grpc.Channel, capsys: pytest.CaptureFixture[str]
) -> None:
    revoked = enroll_device(broker, operator_channel, "cam-gone")
    admin_pb2_grpc.AdminServiceStub(operator_channel).RevokeDevice(
        admin_pb2.RevokeDeviceRequest(device_id="cam-gone"), timeout=10
    )
    with revoked.channel(broker) as channel:
        for _ in range(2):
            assert call_renew(broker, channel).code() is grpc.StatusCode.UNAUTHENTICATED
    found = report(broker, operator_channel, since_seconds=HOUR)
    assert [(f.id, f.count, f.detail) for f in found.revoked_attempts] == [
        ("cam-gone", 2, revoked.serial)
    ]
    base = ["--home", str(broker.home), "fleet-audit", "--broker", broker.main]
    assert cli_main([*base, "--json", "--since", str(HOUR)]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(report_json(found))
    assert cli_main([*base, "--since", str(HOUR)]) == 0
    text = capsys.readouterr().out
    assert "revoked identities still connecting: 1\n" in text
    assert f"  device cam-gone: 2 refused call(s) with revoked certificate {revoked.serial}" in text


def test_i3_only_operators_may_run_the_fleet_audit_and_nothing_is_written(
    broker: RunningBroker, operator_channel: grpc.Channel
) -> None:
    camera = enroll_device(broker, operator_channel, "cam-nosy")
    app = new_user(broker, "nosy")
    before = audit_entries(broker)
    for channel in (camera.channel(broker), app.channel(broker)):
        with channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            error = rpc_error(stub.FleetAudit, admin_pb2.FleetAuditRequest(), timeout=10)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "operator" in (error.details() or "")
    assert audit_entries(broker) == before
    assert failures_of(broker, "revoked.attempt") == []


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("since_seconds", 31 * DAY + 1, "since_seconds must be between 60 and 2678400"),
        ("since_seconds", 59, "since_seconds must be between 60"),
        ("fanout_min_devices", 1, "fanout_min_devices must be between 2"),
        ("fanout_window_seconds", 30, "fanout_window_seconds must be at least 60"),
        ("expiring_within_seconds", 366 * DAY, "expiring_within_seconds must be between 60"),
    ],
)
def test_out_of_range_thresholds_are_invalid_arguments(
    broker: RunningBroker, operator_channel: grpc.Channel, field: str, value: int, words: str
) -> None:
    before = audit_entries(broker)
    stub = admin_pb2_grpc.AdminServiceStub(operator_channel)
    error = rpc_error(stub.FleetAudit, admin_pb2.FleetAuditRequest(**{field: value}), timeout=10)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert words in (error.details() or "")
    assert audit_entries(broker) == before


def test_i10_a_revoked_caller_is_refused_even_when_its_attempt_cannot_be_recorded(
    broker: RunningBroker, operator_channel: grpc.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recording the attempt is best effort: a store failure there never turns the refusal into
    anything but UNAUTHENTICATED (nor lets the call through)."""
    revoked = enroll_device(broker, operator_channel, "cam-broken-audit")
    admin_pb2_grpc.AdminServiceStub(operator_channel).RevokeDevice(
        admin_pb2.RevokeDeviceRequest(device_id="cam-broken-audit"), timeout=10
    )

    def broken(*args: object) -> None:
        raise RuntimeError("store unavailable")

    monkeypatch.setattr(enrollment, "record_revoked_attempt", broken)
    with revoked.channel(broker) as channel:
        error = call_renew(broker, channel)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "certificate has been revoked"
    assert failures_of(broker, "revoked.attempt") == []
    assert [c.status for c in cert_rows(broker, "cam-broken-audit")] == [CertStatus.REVOKED]


class _LiveCamera:
    """cam-live on a loop of its own thread, so it stays attached (heartbeating every 0.2 s)
    while the test calls the broker synchronously. Enrolled at once, while the FakeClock is
    still near real time (a certificate issued later would be "not yet valid" to TLS)."""

    def __init__(self, broker: RunningBroker, operator_channel: grpc.Channel, home: Path) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="cam-live", daemon=True).start()
        self.camera = self._on_loop(sdk_camera(broker, operator_channel, home, "cam-live"))
        self.camera.heartbeat_interval = 0.2
        self.task: asyncio.Task[None] | None = None

    def _on_loop(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def attach(self) -> None:
        self.task = self._on_loop(start_camera(self.camera))

    def stop(self) -> None:
        if self.task is not None:
            self._on_loop(stop_task(self.task))
        self.loop.call_soon_threadsafe(self.loop.stop)


def _lease_live(broker: RunningBroker, device_id: str) -> bool:
    now = broker.clock.now().timestamp()
    attachment = read_store(broker, lambda tx: tx.get_attachment(device_id))
    return attachment is not None and attachment.live_at(int(now))
