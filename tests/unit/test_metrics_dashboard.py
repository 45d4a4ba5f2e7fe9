"""Metrics (issue 13) without a network: the Grafana dashboard (docs/grafana/broker.json) cannot
drift from what the broker exports (every metric name in its PromQL exists, every family has a
panel); the core's plain hooks (relay counters, store runs, teardown timing) become the right
series; addresses and worker ports; the core never imports the metrics library."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from broker.clock import FakeClock
from broker.errors import ConfigurationError
from broker.service.metrics import (
    BrokerMetrics,
    RelayCollector,
    exported_names,
    metrics_host_port,
    offset_port,
)
from broker.sessions.presence import Presence
from broker.sessions.relay import Accepted, LiveSession, Relay
from broker.store.sqlite import SqliteStore
from tests.unit.test_layout import ALLOWED, files_of

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "broker.json"
METRIC = re.compile(r"\b(broker_[a-z_]+)\b")


@pytest.fixture
def metrics(tmp_path: Path) -> BrokerMetrics:
    store = SqliteStore(tmp_path / "broker.db")
    metrics = BrokerMetrics()
    presence = Presence()
    relay = Relay(presence, FakeClock(), lambda *_: None)
    metrics.watch(store, relay, presence, FakeClock(), "camera.local")
    return metrics


async def _live_session(session_id: str) -> LiveSession:
    return LiveSession(session_id, "cam", "user", "app", expires_at=0)


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_the_dashboard_is_a_grafana_dashboard_with_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and {"x", "y", "w", "h"} <= set(panel["gridPos"])


def test_every_metric_in_the_dashboard_is_exported(metrics: BrokerMetrics) -> None:
    exported = exported_names(metrics.registry)
    used = {
        name for expr in exprs(json.loads(DASHBOARD.read_text())) for name in METRIC.findall(expr)
    }
    assert used, "no broker_ metric in the dashboard"
    assert used - exported == set()


def test_every_metric_family_has_a_panel(metrics: BrokerMetrics) -> None:
    families = {family.name for family in metrics.registry.collect()}
    used = " ".join(exprs(json.loads(DASHBOARD.read_text())))
    assert {f for f in families if f not in used} == set()
    assert all(f.startswith("broker_") for f in families)


def test_teardown_counts_from_the_commit_of_another_replicas_change(
    metrics: BrokerMetrics,
) -> None:
    # The change committed 2 s before this replica applied it (EventRecord.at_ms).
    metrics.streams_ended("watch", ["s1"], age=2.0)
    metrics.streams_ended("watch", ["s1"], age=0.0)  # a second change keeps the first start
    live = asyncio.run(_live_session("s1"))
    metrics.session_detached(live)
    metrics.session_detached(live)  # observed once
    watch = {"stream": "watch"}
    count = metrics.registry.get_sample_value("broker_teardown_seconds_count", watch)
    total = metrics.registry.get_sample_value("broker_teardown_seconds_sum", watch)
    assert count == 1
    assert total is not None and 2.0 <= total < 2.0 + 5.0


def test_store_runs_and_reruns_are_counted(metrics: BrokerMetrics) -> None:
    metrics.observe_store_run(0.002, 0)
    metrics.observe_store_run(0.010, 2)
    value = metrics.registry.get_sample_value
    assert value("broker_store_transaction_seconds_count") == 2
    assert value("broker_store_retries_total") == 2
    assert value("broker_store_transaction_seconds_bucket", {"le": "0.0025"}) == 1


@pytest.mark.parametrize(
    ("address", "offset", "expected"),
    [
        ("127.0.0.1:9464", 0, "127.0.0.1:9464"),
        ("127.0.0.1:9464", 2, "127.0.0.1:9466"),
        ("127.0.0.1:0", 3, "127.0.0.1:0"),
        ("[::1]:9464", 1, "[::1]:9465"),
        ("", 1, ""),
    ],
)
def test_worker_replicas_get_consecutive_metrics_ports(
    address: str, offset: int, expected: str
) -> None:
    assert offset_port(address, offset) == expected


@pytest.mark.parametrize("address", ["9464", "localhost:", ":9464", "host:http", "h:70000"])
def test_a_bad_metrics_address_is_refused_with_the_expected_form(address: str) -> None:
    with pytest.raises(ConfigurationError, match="expected host:port, or '' \\(off\\)"):
        metrics_host_port(address)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_core_packages_never_import_prometheus_client(package: str) -> None:
    for path in files_of(package):
        assert "prometheus_client" not in path.read_text(), path


def test_recording_a_call_costs_microseconds(metrics: BrokerMetrics) -> None:
    import grpc

    method = metrics.for_method("/broker.v1.AppService/OpenSession", None)
    calls = 20_000
    started = time.perf_counter()
    for _ in range(calls):
        method.finished(grpc.StatusCode.OK, 0.001, True)
    per_call = (time.perf_counter() - started) / calls
    assert per_call < 50e-6, per_call  # measured ~2 µs; a loaded CI box gets 25x headroom


def test_serve_workers_give_replica_i_the_metrics_port_plus_i_minus_1() -> None:
    from broker.cli import _serve_config, _worker_command, build_parser

    args = build_parser().parse_args(
        ["--home", "/nonexistent", "serve", "--workers", "3", "--metrics-address", "127.0.0.1:9500"]
    )
    config = _serve_config(args)
    flags = [_worker_command(args, config, name)[-2:] for name in ("r1", "r2", "r3")]
    assert flags == [["--metrics-address", f"127.0.0.1:{port}"] for port in (9500, 9501, 9502)]


def test_the_metrics_address_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.config import from_environment

    monkeypatch.delenv("BROKER_METRICS_ADDRESS", raising=False)
    assert from_environment(tmp_path).metrics_address == "127.0.0.1:9464"  # loopback by default
    monkeypatch.setenv("BROKER_METRICS_ADDRESS", "")
    assert from_environment(tmp_path).metrics_address == ""  # off
    monkeypatch.setenv("BROKER_METRICS_ADDRESS", "10.0.0.5:9464")
    assert from_environment(tmp_path).metrics_address == "10.0.0.5:9464"


def test_relay_counts_become_frame_and_alarm_series() -> None:
    alarms: list[tuple[str, str, str]] = []
    relay = Relay(Presence(), FakeClock(), lambda *a: alarms.append(a), queue_frames=2)
    metrics = BrokerMetrics()
    metrics.registry.register(RelayCollector(relay))

    async def traffic() -> None:
        relay.open("s1", "cam-a", "u1", "a1", expires_at=2**40)
        for sequence in range(3):  # the watcher takes nothing: the third overruns the queue
            relay.on_frame("cam-a", "s1", sequence, b"x")
        relay.on_frame("cam-b", "s1", 0, b"x")  # another camera's frame: alarm, dropped (I6)
        relay.on_frame("cam-a", "nobody", 0, b"x")  # no watcher
        relay.on_accept("cam-b", "s1", Accepted(b"k", b"sig", ""))  # another camera's handshake

    asyncio.run(traffic())
    value = metrics.registry.get_sample_value
    assert value("broker_frames_relayed_total") == 3
    assert value("broker_frames_dropped_total", {"reason": "overrun"}) == 1
    assert value("broker_frames_dropped_total", {"reason": "misrouted"}) == 1
    assert value("broker_frames_dropped_total", {"reason": "unwatched"}) == 1
    assert value("broker_relay_alarms_total", {"reason": "misrouted_frame"}) == 1
    assert value("broker_relay_alarms_total", {"reason": "misrouted_handshake"}) == 1
    assert value("broker_sessions_live") == 1
    assert len(alarms) == 2  # the audit sink still hears each alarm
