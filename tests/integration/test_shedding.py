"""Load shedding (issue 12): while the core thread is too far behind, a new call of a camera, an
app or an enrollment is refused before any work, with RESOURCE_EXHAUSTED and a RetryInfo delay
(so that clients spread their retries), and writes nothing; an operator's call (who may be
revoking something, I7) is never shed.

The backlog is made real: core calls that block on an event are queued through Runtime.run, as
the handlers queue theirs, until the configured limit is reached.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc, device_pb2, device_pb2_grpc
from tests.conftest import start_broker, stop_broker
from tests.helpers import (
    DeviceCreds,
    RunningBroker,
    claim_device,
    create_token,
    csr_for,
    enroll,
    enroll_camera,
    key_pem,
    new_user,
    open_session,
    operator_channel_of,
    p256,
    read_store,
    retry_delay,
    rpc_error,
    session_rows,
    token_used_at,
)
from tests.pg import fresh_database, integration_backend

LIMIT = 2


@pytest.fixture
def small_broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A broker that sheds once LIMIT core calls are queued."""
    with ExitStack() as stack:
        store_url = ""
        if integration_backend() == "postgres":
            store_url = stack.enter_context(fresh_database())
        running = start_broker(tmp_path, store_url=store_url, core_queue_limit=LIMIT)
        try:
            yield running
        finally:
            stop_broker(running)


class Backlog:
    """LIMIT core calls that wait on one event, queued on the broker's loop."""

    def __init__(self, broker: RunningBroker) -> None:
        self.release = threading.Event()
        rt = broker.server.runtime
        self.calls: list[Future[bool]] = [
            asyncio.run_coroutine_threadsafe(rt.run(self.release.wait, 30), broker.loop)
            for _ in range(LIMIT)
        ]

    def finish(self) -> None:
        self.release.set()
        assert all(call.result(30) for call in self.calls)


def test_busy_core_sheds_new_app_and_device_calls_with_retry_info_and_writes_nothing(
    small_broker: RunningBroker,
) -> None:
    broker = small_broker
    with operator_channel_of(broker) as operator:
        owner = new_user(broker, "shed-owner")
        _, code = enroll_camera(broker, operator, "cam-shed")
        claim_device(broker, owner, "cam-shed", code)
        token = create_token(operator, "cam-late")

        backlog = Backlog(broker)
        try:
            error = rpc_error(open_session, broker, owner, "cam-shed")
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert "broker busy" in (error.details() or ""), error.details()
            assert 1 <= retry_delay(error) <= 3
            error = rpc_error(enroll, broker, token, csr_for(p256()))
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert 1 <= retry_delay(error) <= 3
        finally:
            backlog.finish()

        # Nothing was written: no session row, the enrollment token is still unused.
        assert session_rows(broker, "cam-shed") == []
        assert token_used_at(broker, token) is None
        # Once the backlog is gone the same calls succeed.
        assert open_session(broker, owner, "cam-shed").session_id
        assert enroll(broker, token, csr_for(p256())).device_id == "cam-late"


def test_i7_operator_calls_are_never_shed(small_broker: RunningBroker) -> None:
    """With the backlog full (an app's call is shed at that moment), the operator's call is
    queued, not refused, and answers once the core gets to it."""
    broker = small_broker
    with operator_channel_of(broker) as operator:
        owner = new_user(broker, "shed-op-owner")
        enroll_camera(broker, operator, "cam-op")
        stub = admin_pb2_grpc.AdminServiceStub(operator)
        backlog = Backlog(broker)
        try:
            pending = stub.ListDevices.future(admin_pb2.ListDevicesRequest(), timeout=30)
            shed = rpc_error(open_session, broker, owner, "cam-op")
            assert shed.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, shed
        finally:
            backlog.finish()
        listed = pending.result(timeout=30)
        assert [d.device_id for d in listed.devices] == ["cam-op"]


async def _attach_attempts(broker: RunningBroker, creds: DeviceCreds, count: int) -> Counter[str]:
    """count Attach calls written to at once (hello, then read), as grpc.aio cameras do: how each
    ended, as "CODE: details"."""
    credentials = grpc.ssl_channel_credentials(
        broker.pki.ca_pem, key_pem(creds.key), creds.chain_pem.encode()
    )
    outcomes: Counter[str] = Counter()
    async with grpc.aio.secure_channel(broker.main, credentials) as channel:
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        hello = device_pb2.DeviceMessage(hello=device_pb2.Hello(trust_bundle_version="test"))
        for _ in range(count):
            call = stub.Attach(timeout=10)
            try:
                await call.write(hello)
                await call.read()
                outcomes["attached"] += 1
            except grpc.aio.AioRpcError as error:
                outcomes[f"{error.code().name}: {error.details()}"] += 1
            finally:
                call.cancel()
    return outcomes


def test_a_camera_refused_at_attach_sees_the_refusal_not_internal(
    small_broker: RunningBroker,
) -> None:
    """A camera writes its hello as soon as Attach opens; refused at admission (here: busy), it
    must get RESOURCE_EXHAUSTED with the reason, never grpc.aio's INTERNAL "Internal error from
    Core" that a write racing the server's status turns into (grpc/grpc#36066). No attachment
    is recorded."""
    broker = small_broker
    with operator_channel_of(broker) as operator:
        camera, _ = enroll_camera(broker, operator, "cam-race")
    backlog = Backlog(broker)
    try:
        outcomes = asyncio.run(_attach_attempts(broker, camera, 40))
    finally:
        backlog.finish()
    busy = [o for o in outcomes if o.startswith("RESOURCE_EXHAUSTED: broker busy")]
    assert sum(outcomes[o] for o in busy) == 40, outcomes
    assert read_store(broker, lambda tx: tx.get_attachment("cam-race")) is None
