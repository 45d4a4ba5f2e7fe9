"""Events across replicas (issue 11, item 4): two brokers in one process on one store.

- A device revoked through r2's AdminService ends the camera's Attach stream on r1 within 1 s,
  with the status a local revocation gives (UNAUTHENTICATED).
- A token-key rotation reloaded on r1 reaches a camera attached to r2 within 1 s: r2 re-reads
  certs/ itself on the pki.reloaded event and pushes the TrustBundleUpdate; r2 does not announce
  its own reload again.
- A feed that cannot read the store (or has stopped) turns require_fresh_feed into UNAVAILABLE
  with the reason once the staleness threshold has passed, and recovers when reads work again.

Both brokers share the home (certs/ and, on SQLite, the database file); on PostgreSQL they share a
fresh database. Until the lead wires the feed into BrokerServer, ``wire_feed`` does it here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc
from broker.client.device import DeviceClient, Endpoints
from broker.clock import FakeClock
from broker.cluster.events import EFFECTS, PKI_RELOADED
from broker.cluster.feed import EventFeed
from broker.config import Config
from broker.errors import Unavailable
from broker.pki.rotation import rotate_token_key
from broker.service.cluster import EventHandler, require_fresh_feed
from broker.store import EventRecord
from broker.store.sqlite import SqliteStore
from tests.conftest import start_broker, stop_broker
from tests.helpers import (
    RunningBroker,
    create_token,
    eventually,
    operator_channel_of,
    read_store,
    reload_pki,
)
from tests.pg import fresh_database


def wire_feed(broker: RunningBroker) -> tuple[EventFeed, bool]:
    """The broker's event feed, started here when server.py does not start one yet (and then
    also giving its PkiReloader the store, so a reload is announced). Returns (feed, ours)."""
    server = broker.server
    feed = getattr(server, "feed", None)
    if isinstance(feed, EventFeed):
        return feed, False
    rt = server.runtime
    if getattr(rt.pki, "_store", None) is None:
        rt.pki._store = server.store
        rt.pki._clock = server.clock
    feed = EventFeed(server.store, rt.replica, EventHandler(rt, server.effects))
    feed.start(broker.loop)
    return feed, True


class Cluster:
    def __init__(self, r1: RunningBroker, r2: RunningBroker, feeds: dict[str, EventFeed]) -> None:
        self.r1, self.r2, self.feeds = r1, r2, feeds

    def events(self, kind: str) -> list[EventRecord]:
        return [
            e for e in read_store(self.r1, lambda tx: tx.events_after(0, 10_000)) if e.kind == kind
        ]


@pytest.fixture(params=["sqlite", "postgres"])
def cluster(request: Any, tmp_path: Path) -> Iterator[Cluster]:
    with ExitStack() as stack:
        store_url = ""
        if request.param == "postgres":
            store_url = stack.enter_context(fresh_database())
        clock = FakeClock()
        home = tmp_path / "home"
        r1 = start_broker(home, clock, replica_name="r1", store_url=store_url)
        stack.callback(stop_broker, r1)
        r2 = start_broker(home, clock, replica_name="r2", store_url=store_url)
        stack.callback(stop_broker, r2)
        feeds: dict[str, EventFeed] = {}
        for name, broker in (("r1", r1), ("r2", r2)):
            feed, ours = wire_feed(broker)
            feeds[name] = feed
            if ours:
                stack.callback(feed.stop)  # runs before stop_broker closes the store
        yield Cluster(r1, r2, feeds)


async def until_ended(session: Any) -> grpc.StatusCode:
    """Read the Attach stream until it ends; its final status."""
    while True:
        try:
            message = await session.receive()
        except grpc.aio.AioRpcError as error:
            return error.code()
        if message is None:
            return grpc.StatusCode.OK


def test_device_revoked_on_r2_ends_its_attach_stream_on_r1_within_one_second(
    cluster: Cluster, tmp_path: Path
) -> None:
    r1, r2 = cluster.r1, cluster.r2
    operator_r1 = operator_channel_of(r1)
    operator_r2 = operator_channel_of(r2)
    client = DeviceClient(tmp_path / "cam", Endpoints(r1.bootstrap, r1.main), r1.pki.ca_pem)

    async def scenario() -> tuple[grpc.StatusCode, float, Any]:
        await client.enroll(create_token(operator_r1, "cam-x1"))
        async with client.attach(heartbeat_interval=3600) as session:
            first = await session.receive(timeout=5)
            assert first is not None and first.accepted.device_id == "cam-x1"
            assert r1.server.runtime.presence.is_online("cam-x1")
            ended = asyncio.create_task(until_ended(session))
            started = time.monotonic()
            response = await asyncio.to_thread(
                admin_pb2_grpc.AdminServiceStub(operator_r2).RevokeDevice,
                admin_pb2.RevokeDeviceRequest(device_id="cam-x1", reason="stolen"),
                timeout=10,
            )
            code = await asyncio.wait_for(ended, timeout=5)
            return code, time.monotonic() - started, response

    try:
        code, elapsed, response = asyncio.run(scenario())
    finally:
        operator_r1.close()
        operator_r2.close()
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert elapsed < 1.0, f"the Attach stream on r1 ended {elapsed:.3f} s after revocation on r2"
    assert response.attach_streams_closed == 0  # the stream was on r1, not on r2
    [event] = cluster.events(EFFECTS)
    assert event.origin == "r2"
    assert event.payload["end_attach"][0]["device_id"] == "cam-x1"
    assert event.payload["end_attach"][0]["error"]["code"] == "Unauthenticated"
    assert not r1.server.runtime.presence.is_online("cam-x1")


def test_pki_reload_on_r1_pushes_the_bundle_to_a_camera_attached_on_r2_within_one_second(
    cluster: Cluster, tmp_path: Path
) -> None:
    r1, r2 = cluster.r1, cluster.r2
    operator_r2 = operator_channel_of(r2)
    client = DeviceClient(tmp_path / "cam", Endpoints(r2.bootstrap, r2.main), r2.pki.ca_pem)

    async def scenario() -> tuple[Any, Any, float]:
        await client.enroll(create_token(operator_r2, "cam-x2"))
        # Heartbeats far apart: only r2's push can wake this stream.
        async with client.attach(heartbeat_interval=3600) as session:
            first = await session.receive(timeout=5)
            assert first is not None and first.WhichOneof("kind") == "accepted"
            await asyncio.to_thread(rotate_token_key, r1.config, r1.clock)
            started = time.monotonic()
            response = await asyncio.to_thread(reload_pki, r1)
            message = await session.receive(timeout=1.0)
            return response, message, time.monotonic() - started

    try:
        response, message, elapsed = asyncio.run(scenario())
    finally:
        operator_r2.close()
    assert response.bundle_changed and response.cameras_notified == 0  # no camera on r1
    assert message is not None, "no TrustBundleUpdate on r2 within 1 s of the reload on r1"
    assert message.WhichOneof("kind") == "trust_bundle_update"
    assert elapsed < 1.0, elapsed
    version = r1.server.runtime.trust_bundle.version
    assert response.trust_bundle_version == version
    assert message.trust_bundle_update.trust_bundle.version == version
    assert r2.server.runtime.trust_bundle.version == version
    # r2 reloaded because of r1's event and did not announce it again (no ping-pong).
    time.sleep(0.7)
    assert [e.origin for e in cluster.events(PKI_RELOADED)] == ["r1"]


class FlakyStore:
    """A store whose reads fail while failing is set (the database is unreachable)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.failing = False

    def read(self) -> Any:
        if self.failing:
            raise OSError("store unreachable")
        return self._store.read()

    def wait_for_events(self, timeout: float) -> bool:
        time.sleep(timeout)
        return False


def start_config(threshold: float) -> Config:
    return Config(home=Path("/nonexistent")).with_overrides(event_feed_stale_seconds=threshold)


def test_a_stale_feed_refuses_new_sessions_after_the_threshold(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "broker.db")
    flaky = FlakyStore(store)
    config = start_config(0.3)
    feed = EventFeed(flaky, "r1", lambda event: None, wait_seconds=0.05)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    try:
        feed.start(loop)
        time.sleep(0.2)
        require_fresh_feed(feed, config)  # reading fine

        flaky.failing = True
        started = time.monotonic()
        while True:
            try:
                require_fresh_feed(feed, config)
            except Unavailable as error:
                refused = error
                break
            assert time.monotonic() - started < 3, "the stale feed was never refused"
            time.sleep(0.02)
        assert time.monotonic() - started >= 0.3 - 0.06  # not before the threshold (plus a poll)
        assert refused.message.startswith("this replica's event feed is stale (")
        assert refused.message.endswith(" s without an update): try another replica")
        assert feed.stale_for() > 0.3

        flaky.failing = False
        time.sleep(0.2)
        require_fresh_feed(feed, config)  # reads again: fresh again

        feed.stop()
        time.sleep(0.4)
        with pytest.raises(Unavailable, match="event feed is stale"):
            require_fresh_feed(feed, config)
    finally:
        feed.stop()
        loop.close()
        store.close()


def test_the_feed_delivers_other_replicas_events_after_its_start_in_order(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "broker.db")
    loop = asyncio.new_event_loop()
    got: list[EventRecord] = []

    def append(kind: str, origin: str) -> int:
        return store.run(lambda tx: tx.append_event(kind, {"n": 1}, origin, 0))

    append(EFFECTS, "r2")  # history: before r1's feed started
    feed = EventFeed(store, "r1", got.append, wait_seconds=0.05, batch=2)
    try:
        feed.start(loop)
        seqs = [append(EFFECTS, "r2"), append(EFFECTS, "r1"), append(PKI_RELOADED, "r3")]
        seqs += [append(EFFECTS, "r2") for _ in range(3)]

        async def collect() -> None:
            await eventually(lambda: len(got) >= 5, timeout=5)

        loop.run_until_complete(collect())
        assert [e.seq for e in got] == [s for i, s in enumerate(seqs) if i != 1]
        assert {e.origin for e in got} == {"r2", "r3"}
        assert feed.last_seq == seqs[-1]
    finally:
        feed.stop()
        loop.close()
        store.close()
