"""Prometheus metrics of one broker process, served on their own plain-HTTP listener.

The only module that imports prometheus_client. Each BrokerServer owns one ``BrokerMetrics``
with its own ``CollectorRegistry`` (never the process-global one: tests run several brokers in
one process). Core packages report through plain hooks this module wires up: ``Store.on_run``
(transaction latency and re-runs), ``Relay.stats`` (frames, alarms), ``Relay.on_detach`` and
``Presence.on_detach`` (a stream finished), ``EffectsApplier.on_streams_ended`` (a committed
change ended streams: teardown timing starts). Labels are bounded sets (RPC method, status code,
limiter scope, reason, stream kind): never a device, user or session id.

Hot path: the interceptor gets one ``MethodMetrics`` per RPC method, built once, holding the
already-resolved label children; a call costs one histogram observe and one counter inc.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from broker.clock import Clock, unix
from broker.errors import ConfigurationError
from broker.identity.spiffe import Kind, parse_spiffe_id
from broker.service.addresses import split_address
from broker.sessions.presence import AttachHandle, Presence
from broker.sessions.relay import LiveSession, Relay
from broker.store import Store

log = logging.getLogger("broker.metrics")

DAY = 86_400
EXPIRING_WINDOW_SECONDS = 7 * DAY
EXPIRING_CACHE_SECONDS = 30.0  # a scrape storm reads the store at most this often
# Unary calls take milliseconds; streams (Attach, Watch) last minutes to days.
RPC_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    60.0, 600.0, 3600.0, 86400.0,
)  # fmt: skip
TEARDOWN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STORE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
)  # fmt: skip
TEARDOWN_PENDING_LIMIT = 100_000  # streams whose teardown is being timed (bounded memory)

ATTACH = "/broker.v1.DeviceService/Attach"
ENROLLMENTS = {  # method -> {required kind of the listener -> via}
    "/broker.v1.Bootstrap/EnrollDevice": {Kind.ANONYMOUS: "token", Kind.BIRTH: "birth"},
    "/broker.v1.Bootstrap/EnrollApp": {Kind.ANONYMOUS: "password"},
}
RENEWALS = {
    "/broker.v1.DeviceService/RenewCertificate": "device",
    "/broker.v1.AppService/RenewCertificate": "app",
    "/broker.v1.Bootstrap/RenewExpiredCertificate": "expired",
}


def metrics_host_port(address: str) -> tuple[str, int]:
    """(host, port) of the metrics address; ConfigurationError saying what is expected."""
    try:
        return split_address(address, "metrics")
    except ConfigurationError as error:
        raise ConfigurationError(f"{error.message}, or '' (off)") from None


def offset_port(address: str, offset: int) -> str:
    """address with its port moved up by offset (port 0 stays 0): replica i of ``serve
    --workers N`` serves metrics on the configured port + (i - 1)."""
    if not address:
        return ""
    host, port = metrics_host_port(address)
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port + offset if port else 0}"


class MethodMetrics:
    """One RPC method's pre-resolved metric children (built once per method)."""

    __slots__ = ("_by_code", "_counter", "_duration", "_on_ok", "_streams", "method", "refused")

    def __init__(self, metrics: BrokerMetrics, method: str, required: Kind | None) -> None:
        self.method = method.removeprefix("/")
        self._counter = metrics.rpcs
        self._duration = metrics.rpc_seconds.labels(self.method)
        self._by_code: dict[grpc.StatusCode, Callable[[], None]] = {}
        self._streams = metrics.attach_streams if method == ATTACH else None
        self._on_ok: Callable[[], None] | None = None
        self.refused = metrics.refused  # a ResourceExhausted reached the caller: its limit
        via = ENROLLMENTS.get(method, {}).get(required) if required is not None else None
        if via is not None:
            self._on_ok = metrics.enrollments.labels(via).inc
        elif method in RENEWALS:
            self._on_ok = metrics.renewals.labels(RENEWALS[method]).inc

    def admitted(self) -> None:
        """The caller passed the identity check: a live Attach stream from now on."""
        if self._streams is not None:
            self._streams.inc()

    def finished(self, code: grpc.StatusCode, seconds: float, admitted: bool) -> None:
        """The call ended with code after seconds (streams: their whole life)."""
        inc = self._by_code.get(code)
        if inc is None:
            inc = self._by_code[code] = self._counter.labels(self.method, code.name).inc
        inc()
        self._duration.observe(seconds)
        if admitted and self._streams is not None:
            self._streams.dec()
        if code is grpc.StatusCode.OK and self._on_ok is not None:
            self._on_ok()


class BrokerMetrics:
    """Every metric of one broker, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "broker_rpc",
            "RPCs ended, by method and gRPC status code",
            ["method", "code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "broker_rpc_duration_seconds",
            "RPC duration (streams: from admission to their end), by method",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.attach_streams = Gauge(
            "broker_attach_streams",
            "Attach streams on this replica whose camera passed the identity check",
            registry=r,
        )
        self.teardown_seconds = Histogram(
            "broker_teardown_seconds",
            "From a committed change (revocation, sign-out, share revocation, ownership reset) "
            "to the end of a live stream it ended on this replica, by stream (watch, attach)",
            ["stream"],
            buckets=TEARDOWN_BUCKETS,
            registry=r,
        )
        self._teardown_of = {s: self.teardown_seconds.labels(s) for s in ("watch", "attach")}
        self.enrollments = Counter(
            "broker_enrollments",
            "Certificates issued by enrollment, by how (token, birth certificate, app password)",
            ["via"],
            registry=r,
        )
        self.renewals = Counter(
            "broker_renewals",
            "Certificates renewed, by caller kind (device, app; expired: after expiry)",
            ["kind"],
            registry=r,
        )
        self.refusals = Counter(
            "broker_rate_limit_refusals",
            "RESOURCE_EXHAUSTED refusals, by limit (limiter scope, or core_queue: shed load)",
            ["limit"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "broker_store_transaction_seconds",
            "Store units of work (Store.run), re-runs included",
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.store_retries = Counter(
            "broker_store_retries",
            "Store units of work re-run after a serialization failure or deadlock (PostgreSQL)",
            registry=r,
        )
        self.expiring: ExpiringCollector | None = None
        self._refusal_children: dict[str, Callable[[], None]] = {}
        self._teardown_started: dict[tuple[str, str], float] = {}

    def for_method(self, method: str, required: Kind | None) -> MethodMetrics:
        """The pre-resolved children for one RPC method (the interceptor keeps it)."""
        return MethodMetrics(self, method, required)

    def refused(self, limit: str) -> None:
        """A ResourceExhausted reached the caller; limit is its scope ("" when unnamed)."""
        inc = self._refusal_children.get(limit)
        if inc is None:
            inc = self._refusal_children[limit] = self.refusals.labels(limit or "other").inc
        inc()

    def observe_store_run(self, seconds: float, reruns: int) -> None:
        """Store.on_run: runs on a core thread (prometheus_client is thread-safe)."""
        self.store_seconds.observe(seconds)
        if reruns:
            self.store_retries.inc(reruns)

    # -- teardown: committed change -> the live stream it ended has finished (loop thread only) ---
    def streams_ended(self, stream: str, keys: list[str], age: float) -> None:
        """EffectsApplier.on_streams_ended: start timing the teardown of these streams (watch:
        session ids, attach: device ids) from the change's commit, age seconds ago. A stream
        already being timed keeps its first start."""
        started = time.monotonic() - age
        pending = self._teardown_started
        for key in keys:
            if len(pending) < TEARDOWN_PENDING_LIMIT:
                pending.setdefault((stream, key), started)

    def _stream_finished(self, stream: str, key: str) -> None:
        started = self._teardown_started.pop((stream, key), None)
        if started is not None:
            self._teardown_of[stream].observe(max(0.0, time.monotonic() - started))

    def session_detached(self, live: LiveSession) -> None:
        """Relay.on_detach: a Watch has written its end event and returned."""
        self._stream_finished("watch", live.session_id)

    def attach_detached(self, handle: AttachHandle) -> None:
        """Presence.on_detach: an Attach handler has finished (its status is sent)."""
        self._stream_finished("attach", handle.device_id)

    def watch(
        self, store: Store, relay: Relay, presence: Presence, clock: Clock, trust_domain: str
    ) -> None:
        """Wire the core's hooks to these metrics and add the scrape-time collectors."""
        store.on_run = self.observe_store_run
        relay.on_detach = self.session_detached
        presence.on_detach = self.attach_detached
        self.registry.register(RelayCollector(relay))
        self.expiring = ExpiringCollector(store, clock, trust_domain)
        self.registry.register(self.expiring)


class RelayCollector(Collector):
    """Frames, alarms and live sessions, read from the relay's plain counters at scrape time (no cost
    per frame beyond an integer add on the event loop)."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def collect(self) -> Iterable[Metric]:
        stats = self._relay.stats
        yield CounterMetricFamily(
            "broker_frames_relayed",
            "Frames accepted from a session's own camera and queued for its watcher",
            value=stats.frames_relayed,
        )
        dropped = CounterMetricFamily(
            "broker_frames_dropped",
            "Frames not delivered, by reason (overrun: a slow watcher's oldest queued frames; "
            "unwatched: nobody watches the session; misrouted: sent by another camera, I6)",
            labels=["reason"],
        )
        dropped.add_metric(["overrun"], stats.frames_overrun)
        dropped.add_metric(["unwatched"], stats.frames_unwatched)
        dropped.add_metric(["misrouted"], stats.frames_misrouted)
        yield dropped
        alarms = CounterMetricFamily(
            "broker_relay_alarms",
            "Relay rules that fired (each audited as relay.alarm, I6), by reason",
            labels=["reason"],
        )
        alarms.add_metric(["misrouted_frame"], stats.frames_misrouted)
        alarms.add_metric(["misrouted_handshake"], stats.handshakes_misrouted)
        yield alarms
        yield GaugeMetricFamily(
            "broker_sessions_live",
            "Watch sessions registered on this replica's relay (its camera is attached here; "
            "Watch calls other replicas forward here included), until their Watch ends",
            value=self._relay.live_count(),
        )


@dataclass(frozen=True, slots=True)
class ExpiringCounts:
    online: int
    offline: int


class ExpiringCollector(Collector):
    """Active device certificates expiring within 7 days, split by whether the device is
    attached to any replica now (its attachment lease is live). Read from the store on the
    scraping thread (store.read() is thread-safe), at most once per ``cache_seconds``."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        trust_domain: str,
        cache_seconds: float = EXPIRING_CACHE_SECONDS,
    ) -> None:
        self._store = store
        self._clock = clock
        self._trust_domain = trust_domain
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, ExpiringCounts] | None = None

    def counts(self) -> ExpiringCounts:
        """The cached counts, read again when older than cache_seconds."""
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.cache_seconds:
                self._cached = (now, self._read())
            return self._cached[1]

    def _read(self) -> ExpiringCounts:
        now = unix(self._clock.now())
        online = offline = 0
        with self._store.read() as tx:
            for cert in tx.device_certificates_expiring(now, now + EXPIRING_WINDOW_SECONDS):
                device_id = parse_spiffe_id(cert.spiffe_id, self._trust_domain).device_id
                attachment = tx.get_attachment(device_id)
                if attachment is not None and attachment.live_at(now):
                    online += 1
                else:
                    offline += 1
        return ExpiringCounts(online, offline)

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "broker_certificates_expiring",
            "Active device certificates expiring within 7 days, by whether the device is "
            "attached (online: it is told to renew; offline: it renews when it comes back)",
            labels=["state"],
        )
        try:
            counts = self.counts()
        except Exception:  # an unreachable store must not fail the whole scrape
            log.exception("metrics: cannot read expiring certificates")
            return
        family.add_metric(["online"], counts.online)
        family.add_metric(["offline"], counts.offline)
        yield family


class MetricsServer:
    """prometheus_client's WSGI app for one registry, served on a daemon thread."""

    POLL_SECONDS = 0.05  # how soon stop() is noticed (socketserver's default is 0.5 s)

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        host, port = metrics_host_port(address)
        server_class = _MetricsServer6 if ":" in host else ThreadingWSGIServer
        self._httpd = make_server(
            host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": self.POLL_SECONDS},
            name="broker-metrics",
            daemon=True,
        )
        self._thread.start()
        bound = self._httpd.server_address
        self.host, self.port = str(bound[0]), int(bound[1])

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


class _MetricsServer6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: object) -> None:
        pass


SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry can expose (a labelled family with no child yet has no
    sample, so names come from the families' types; the dashboard test checks against them)."""
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in SUFFIXES.get(family.type, ("",))
    }
