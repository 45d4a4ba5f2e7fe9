"""Prometheus metrics (issue 13): a real broker with /metrics on port 0, driven with the SDKs,
scraped over HTTP and parsed with prometheus_client's own parser. Values are asserted exactly
where the traffic fixes them (counts of calls, the gauges while a stream lives and after it)."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker._proto.broker.v1 import admin_pb2, admin_pb2_grpc
from broker.client.device import DeviceClient, Endpoints
from broker.clock import FakeClock
from broker.config import Config
from broker.errors import ConfigurationError
from broker.service.metrics import exported_names
from broker.service.server import BrokerServer
from tests.conftest import start_broker, stop_broker
from tests.helpers import (
    PASSWORD,
    RunningBroker,
    audit_entries,
    birth_credentials,
    create_account,
    enroll_app,
    eventually,
    operator_channel_of,
    rpc_error,
    sdk_app,
    sdk_camera,
    start_camera,
    stop_task,
)
from tests.pg import fresh_database, integration_backend

DAY = 86_400
ENROLL_DEVICE = "broker.v1.Bootstrap/EnrollDevice"
ENROLL_APP = "broker.v1.Bootstrap/EnrollApp"
ATTACH = "broker.v1.DeviceService/Attach"
WATCH = "broker.v1.AppService/Watch"


@dataclass(frozen=True)
class Scrape:
    """One scrape: sample (name, labels) -> value."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    text: str

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum over every sample of name whose labels include these."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)


def scrape(port: int, host: str = "127.0.0.1") -> Scrape:
    shown = f"[{host}]" if ":" in host else host
    with urllib.request.urlopen(f"http://{shown}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return Scrape(samples, text)


def metrics_port(broker: RunningBroker) -> int:
    return broker.server.ports["metrics"]


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[RunningBroker]:
    """A broker on the suite's backend with /metrics on 127.0.0.1:0 and a login limit of 2."""
    with ExitStack() as stack:
        store_url = ""
        if integration_backend() == "postgres":
            store_url = stack.enter_context(fresh_database())
        running = start_broker(
            tmp_path / "home",
            store_url=store_url,
            metrics_address="127.0.0.1:0",
            login_failures_per_user=2,
        )
        try:
            yield running
        finally:
            stop_broker(running)


async def poll(port: int, check: object, timeout: float = 10.0) -> Scrape:
    """Scrape until check(scrape) holds (counters of ended streams land after the client
    sees the end)."""
    assert callable(check)
    latest: list[Scrape] = []

    def ok() -> bool:
        latest[:] = [scrape(port)]
        return bool(check(latest[0]))

    await eventually(ok, timeout=timeout, interval=0.05)
    return latest[0]


def test_scrape_counts_the_traffic_a_camera_and_a_viewer_make(metered, tmp_path):
    broker, port = metered, metrics_port(metered)
    before = scrape(port)
    assert before.get("broker_attach_streams") == 0
    assert before.get("broker_sessions_live") == 0

    async def scenario() -> tuple[Scrape, Scrape, Scrape, int]:
        with operator_channel_of(broker) as operator:
            owner = await sdk_app(broker, tmp_path / "owner", "owner-m")
            cam = await sdk_camera(broker, operator, tmp_path / "cam", "cam-m", owner=owner)
            await cam.client.renew()
            task = await start_camera(cam)
            ticket = await owner.open_session("cam-m")
            received = 0
            async with owner.watch(ticket) as stream:
                frames = stream.frames()
                for _ in range(3):
                    await asyncio.wait_for(frames.__anext__(), 5)
                    received += 1
                live = await asyncio.to_thread(scrape, port)
                teardowns = live.get("broker_teardown_seconds_count", stream="watch")
                await asyncio.to_thread(
                    admin_pb2_grpc.AdminServiceStub(operator).RevokeDevice,
                    admin_pb2.RevokeDeviceRequest(device_id="cam-m", reason="stolen"),
                    timeout=10,
                )
                async for _ in frames:
                    received += 1
            assert stream.end_reason == "device revoked"
            ended = await poll(
                port,
                lambda s: (
                    s.get("broker_teardown_seconds_count", stream="watch") == teardowns + 1
                    and s.get("broker_teardown_seconds_count", stream="attach") == 1
                    and s.get("broker_attach_streams") == 0
                    and s.total("broker_rpc_total", method=WATCH) == 1
                    and s.total("broker_rpc_total", method=ATTACH) == 1
                ),
            )
            await stop_task(task)
        return live, ended, await asyncio.to_thread(scrape, port), received

    live, ended, after, received = asyncio.run(scenario())

    # While attached and watched: one Attach stream, one live session, frames flowing.
    assert live.get("broker_attach_streams") == 1
    assert live.get("broker_sessions_live") == 1
    assert live.get("broker_frames_relayed_total") >= 3
    # Enrollments and renewals, by how; per-method call counts with their status code.
    assert after.get("broker_enrollments_total", via="token") == 1
    assert after.get("broker_enrollments_total", via="password") == 1
    assert after.get("broker_renewals_total", kind="device") == 1
    assert after.get("broker_rpc_total", method=ENROLL_DEVICE, code="OK") == 1
    assert after.get("broker_rpc_total", method=ENROLL_APP, code="OK") == 1
    assert after.get("broker_rpc_duration_seconds_count", method=ENROLL_DEVICE) == 1
    # The revocation ended both streams: the camera's with the revocation's status.
    assert after.get("broker_rpc_total", method=ATTACH, code="UNAUTHENTICATED") == 1
    assert after.get("broker_attach_streams") == 0
    assert after.get("broker_sessions_live") == 0
    # One Watch and one Attach stream ended by the committed revocation, each within I7's 1 s.
    assert ended.get("broker_teardown_seconds_count", stream="watch") == 1
    assert 0 < ended.get("broker_teardown_seconds_sum", stream="watch") < 1.0
    assert ended.get("broker_teardown_seconds_count", stream="attach") == 1
    assert 0 < ended.get("broker_teardown_seconds_sum", stream="attach") < 1.0
    assert after.get("broker_frames_relayed_total") >= received
    assert after.get("broker_relay_alarms_total", reason="misrouted_frame") == 0
    # Every core call went through the store's run(): timed, never re-run here.
    assert after.get("broker_store_transaction_seconds_count") > before.get(
        "broker_store_transaction_seconds_count"
    )
    assert after.get("broker_store_retries_total") == 0
    # The scrape shows exactly the series the registry declares (the dashboard test uses those).
    assert {name for name, _ in after.samples} <= exported_names(broker.server.metrics.registry)
    # Labels are bounded: no device, user or session id appears anywhere in the exposition.
    assert "cam-m" not in after.text and "owner-m" not in after.text
    assert len(audit_entries(broker, "device.revoked")) == 1


def test_failed_logins_and_the_refusal_are_counted_by_code_and_limit(metered):
    broker, port = metered, metrics_port(metered)
    create_account(broker, "rate-user")
    wrong = [rpc_error(enroll_app, broker, "rate-user", "wrong password!") for _ in range(2)]
    refused = rpc_error(enroll_app, broker, "rate-user", PASSWORD)  # right password, too late
    after = scrape(port)

    assert [e.code() for e in wrong] == [grpc.StatusCode.UNAUTHENTICATED] * 2
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert after.get("broker_rpc_total", method=ENROLL_APP, code="UNAUTHENTICATED") == 2
    assert after.get("broker_rpc_total", method=ENROLL_APP, code="RESOURCE_EXHAUSTED") == 1
    assert after.get("broker_rpc_total", method=ENROLL_APP, code="OK") == 0
    assert after.get("broker_rate_limit_refusals_total", limit="login.user") == 1
    assert after.total("broker_rate_limit_refusals_total") == 1
    assert after.get("broker_enrollments_total", via="password") == 0  # nothing issued
    with broker.store().read() as tx:
        user = tx.get_user_by_username("rate-user")
        assert user is not None
        assert tx.certificates_of(f"spiffe://camera.local/user/{user.user_id}") == []


def test_a_birth_certificate_enrollment_counts_via_birth_on_the_factory_listener(metered, tmp_path):
    broker, port = metered, metrics_port(metered)
    key, cert = birth_credentials(broker, "cam-b001")
    endpoints = Endpoints(broker.bootstrap, broker.main, factory=broker.factory)
    client = DeviceClient(tmp_path / "dev", endpoints, broker.pki.ca_pem)

    state = asyncio.run(client.enroll_with_birth_certificate(cert, key))

    after = scrape(port)
    assert state.device_id == "cam-b001"
    assert after.get("broker_enrollments_total", via="birth") == 1
    assert after.get("broker_enrollments_total", via="token") == 0
    assert after.get("broker_rpc_total", method=ENROLL_DEVICE, code="OK") == 1


def test_certificates_expiring_within_seven_days_split_online_and_offline(metered, tmp_path):
    broker, port = metered, metrics_port(metered)
    collector = broker.server.metrics.expiring
    collector.cache_seconds = 0  # the test moves the clock between scrapes

    async def scenario() -> tuple[Scrape, Scrape, Scrape]:
        with operator_channel_of(broker) as operator:
            cam = await sdk_camera(broker, operator, tmp_path / "cam", "cam-exp")
            fresh = await asyncio.to_thread(scrape, port)  # 30-day certificate: not expiring
            broker.clock.advance(24 * DAY)  # 6 days left
            offline = await asyncio.to_thread(scrape, port)
            task = await start_camera(cam)
            online = await asyncio.to_thread(scrape, port)
            await stop_task(task)
        return fresh, offline, online

    fresh, offline, online = asyncio.run(scenario())
    assert (
        fresh.get("broker_certificates_expiring", state="online"),
        fresh.get("broker_certificates_expiring", state="offline"),
    ) == (0, 0)
    assert offline.get("broker_certificates_expiring", state="offline") == 1
    assert offline.get("broker_certificates_expiring", state="online") == 0
    assert online.get("broker_certificates_expiring", state="online") == 1
    assert online.get("broker_certificates_expiring", state="offline") == 0


def test_expiring_certificates_are_read_at_most_once_per_cache_period(metered):
    port = metrics_port(metered)
    reads: list[str] = []
    store = metered.server.store
    real_read = store.read

    def counting_read():  # type: ignore[no-untyped-def]
        name = threading.current_thread().name
        if not name.startswith(("broker-", "event-feed")):  # the scrape's HTTP thread
            reads.append(name)
        return real_read()

    scrape(port)  # the first scrape reads and fills the cache
    store.read = counting_read  # type: ignore[method-assign]
    try:
        for _ in range(20):
            scrape(port)
        assert reads == []  # the 30 s cache answered every scrape
        metered.server.metrics.expiring.cache_seconds = 0
        for _ in range(3):
            scrape(port)
        assert len(reads) == 3  # without the cache every scrape reads the store
    finally:
        store.read = real_read  # type: ignore[method-assign]


def test_a_revocation_committed_on_another_replica_is_timed_where_the_stream_ends(tmp_path):
    """r2 commits the revocation; r1 (camera and viewer attached there) applies its event and
    observes the teardown from the event's commit time; r2 ended nothing, observes nothing."""
    with ExitStack() as stack:
        store_url = ""
        if integration_backend() == "postgres":
            store_url = stack.enter_context(fresh_database())
        r1 = start_broker(
            tmp_path, store_url=store_url, replica_name="r1", metrics_address="127.0.0.1:0"
        )
        stack.callback(stop_broker, r1)
        r2 = start_broker(
            tmp_path,
            r1.clock,
            store_url=store_url,
            replica_name="r2",
            metrics_address="[::1]:0" if socket.has_ipv6 and _ipv6_loopback() else "127.0.0.1:0",
        )
        stack.callback(stop_broker, r2)

        async def scenario() -> str:
            with operator_channel_of(r1) as operator:
                owner = await sdk_app(r1, tmp_path / "owner", "owner-x")
                cam = await sdk_camera(r1, operator, tmp_path / "cam", "cam-x", owner=owner)
            task = await start_camera(cam)
            ticket = await owner.open_session("cam-x")
            async with owner.watch(ticket) as stream:
                frames = stream.frames()
                await asyncio.wait_for(frames.__anext__(), 5)
                with operator_channel_of(r2) as operator_r2:
                    await asyncio.to_thread(
                        admin_pb2_grpc.AdminServiceStub(operator_r2).RevokeDevice,
                        admin_pb2.RevokeDeviceRequest(device_id="cam-x", reason="stolen"),
                        timeout=10,
                    )
                async for _ in frames:
                    pass
            await poll(
                metrics_port(r1),
                lambda s: (
                    s.get("broker_teardown_seconds_count", stream="watch") == 1
                    and s.get("broker_teardown_seconds_count", stream="attach") == 1
                ),
            )
            await stop_task(task)
            return stream.end_reason or ""

        assert asyncio.run(scenario()) == "device revoked"
        on_r1 = scrape(metrics_port(r1))
        on_r2 = _scrape_at(r2)
        for stream in ("watch", "attach"):
            assert on_r1.get("broker_teardown_seconds_count", stream=stream) == 1
            assert on_r1.get("broker_teardown_seconds_sum", stream=stream) < 5.0  # feed poll too
            assert on_r2.get("broker_teardown_seconds_count", stream=stream) == 0
        assert (
            on_r2.get("broker_rpc_total", method="broker.v1.AdminService/RevokeDevice", code="OK")
            == 1
        )
        assert (
            on_r1.get("broker_rpc_total", method="broker.v1.AdminService/RevokeDevice", code="OK")
            == 0
        )


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def _scrape_at(broker: RunningBroker) -> Scrape:
    server = broker.server._metrics_server
    assert server is not None
    return scrape(server.port, server.host)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_store_tells_on_run_each_units_time_and_re_runs(tmp_path, backend):
    """Store.on_run, the metrics hook: PostgreSQL re-runs a unit after a serialization failure
    (SQLSTATE 40001 raised by the driver) and says how many times; SQLite never re-runs."""
    told: list[tuple[float, int]] = []
    attempts: list[int] = []

    def unit(tx):  # type: ignore[no-untyped-def]
        attempts.append(1)
        if backend == "postgres" and len(attempts) < 3:
            import psycopg.errors

            raise psycopg.errors.SerializationFailure("could not serialize access")
        return tx.last_event_seq()

    with ExitStack() as stack:
        if backend == "postgres":
            from broker.store.postgres.store import PostgresStore

            store = PostgresStore(stack.enter_context(fresh_database()), backoff_seconds=0.001)
        else:
            from broker.store.sqlite import SqliteStore

            store = SqliteStore(tmp_path / "broker.db")
        stack.callback(store.close)
        store.on_run = lambda seconds, reruns: told.append((seconds, reruns))
        assert store.run(unit) == 0
    reruns = 2 if backend == "postgres" else 0
    assert len(attempts) == reruns + 1
    assert [r for _, r in told] == [reruns]
    assert told[0][0] > 0


# -- the listener -------------------------------------------------------------------------------


def listening_ports() -> set[int]:
    """TCP ports this process listens on (Linux /proc)."""
    import os

    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_listen_on_loopback_by_default_and_stop_with_the_broker(tmp_path):
    assert Config().metrics_address == "127.0.0.1:9464"
    broker = start_broker(tmp_path / "home", metrics_address="127.0.0.1:0")
    port = metrics_port(broker)
    server = broker.server._metrics_server
    assert server is not None and server.host == "127.0.0.1"
    assert port in listening_ports() and answers_http(port)
    assert scrape(port).get("broker_attach_streams") == 0
    stop_broker(broker)
    assert port not in listening_ports()
    assert not any(t.name == "broker-metrics" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def answers_http(port: int) -> bool:
    """Whether a plain-HTTP GET /metrics on port gets an HTTP response (gRPC listeners here
    speak TLS and answer nothing)."""
    with socket.create_connection(("127.0.0.1", port), 5) as conn:
        conn.settimeout(5)
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try:
            return conn.recv(5) == b"HTTP/"
        except OSError:
            return False


def test_an_empty_metrics_address_opens_no_port(tmp_path):
    before = listening_ports()
    broker = start_broker(tmp_path / "home", metrics_address="")
    try:
        opened = listening_ports() - before
        assert "metrics" not in broker.server.ports
        assert broker.server.metrics is None
        assert set(broker.server.ports.values()) <= opened
        assert 9464 not in opened
        assert [p for p in sorted(opened) if answers_http(p)] == []  # no /metrics anywhere
        assert not any(t.name == "broker-metrics" for t in threading.enumerate())
    finally:
        stop_broker(broker)


def test_a_configured_metrics_address_that_is_taken_stops_start_up(tmp_path):
    from broker.pki.ca import init_pki

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = Config(
            home=tmp_path,
            bootstrap_address="127.0.0.1:0",
            main_address="127.0.0.1:0",
            factory_address="127.0.0.1:0",
            metrics_address=address,
        )
        clock = FakeClock()
        init_pki(config, clock)

        async def attempt() -> BrokerServer:
            server = BrokerServer(config, clock)
            with pytest.raises(ConfigurationError, match=f"cannot serve metrics on {address}"):
                await server.start()
            return server

        server = asyncio.run(attempt())
        assert server.ports == {}  # nothing else was bound
        server.runtime.executor.shutdown(wait=True)
        server.store.close()
    finally:
        taken.close()
