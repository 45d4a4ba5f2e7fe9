"""Building and running the broker's listeners.

- bootstrap: TLS, no client certificate; Bootstrap, health and reflection (v1 and v1alpha, listing
             this listener's services). Health answers for "" and every service the broker
             serves on any listener, and turns NOT_SERVING as soon as the broker starts stopping.
- factory:   mutual TLS against the factory CA; Bootstrap for cameras holding a birth certificate.
- main:      mutual TLS against the root; DeviceService and AdminService.

Each listener has its own ACL table; a registered RPC missing from it stops start-up (I3).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from broker._proto.broker.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    app_pb2,
    app_pb2_grpc,
    bootstrap_pb2,
    bootstrap_pb2_grpc,
    device_pb2,
    device_pb2_grpc,
)
from broker.accounts.passwords import PasswordHasher
from broker.accounts.users import Accounts
from broker.clock import Clock, SystemClock
from broker.cluster.feed import EventFeed
from broker.config import DEFAULT_METRICS_ADDRESS, Config
from broker.devices.enrollment import DeviceAuthority
from broker.devices.expired import expired_renewals
from broker.devices.ownership import Ownership
from broker.errors import ConfigurationError, Unavailable
from broker.identity.spiffe import Kind
from broker.pemfile import read_certificates
from broker.pki.ca import PkiFiles, load_authority
from broker.pki.reload import PkiReloader
from broker.pki.rotation import trusted_issuing
from broker.pki.trust import load_trust_bundle
from broker.protocol.tokens import load_keyring
from broker.service.admin import AdminService
from broker.service.app import AppService
from broker.service.bootstrap import BootstrapService
from broker.service.cluster import EventHandler
from broker.service.device import DeviceService
from broker.service.effects import EffectsApplier
from broker.service.gate import UPSTREAM_HOST, ConnectionGate, GateCounts
from broker.service.interceptor import (
    IdentityInterceptor,
    anonymous_authenticator,
    certificate_authenticator,
)
from broker.service.internal import (
    advertise_replica,
    build_internal_server,
    prepare_replica_certificate,
)
from broker.service.metrics import BrokerMetrics, MetricsServer
from broker.service.peer import Caller, PeerParser
from broker.service.reflection import V1_SERVICE, V1ALPHA_SERVICE, Reflection
from broker.service.runtime import Runtime
from broker.service.tls import ReloadingCredentials
from broker.sessions.attachments import Attachments
from broker.sessions.presence import Presence
from broker.sessions.relay import RESTART_REASON, Relay, alarm_event
from broker.sessions.sessions import Sessions
from broker.store import Store
from broker.store.open import open_store

log = logging.getLogger("broker.server")
DRAIN_REASON = "broker draining"
DRAIN_MESSAGE = "broker draining: reconnect (another replica will take this stream)"


@dataclass(frozen=True)
class Binding:
    """A service on a listener, with the one identity kind each of its RPCs admits."""

    descriptor: ServiceDescriptor
    add: Callable[[Any, Any], None]
    servicer: object
    kinds: dict[str, Kind]


def acl_table(bindings: list[Binding]) -> dict[str, Kind]:
    """Full method name → kind for every RPC of every binding; unmapped RPCs fail start-up (I3)."""
    table: dict[str, Kind] = {}
    for binding in bindings:
        unknown = set(binding.kinds) - {m.name for m in binding.descriptor.methods}
        if unknown:
            raise ConfigurationError(
                f"ACL names RPCs {binding.descriptor.full_name} lacks: {sorted(unknown)}"
            )
        for method in binding.descriptor.methods:
            if method.name not in binding.kinds:
                raise ConfigurationError(
                    f"RPC /{binding.descriptor.full_name}/{method.name} has no identity kind in the ACL"
                )
            table[f"/{binding.descriptor.full_name}/{method.name}"] = binding.kinds[method.name]
    return table


def every(descriptor: ServiceDescriptor, kind: Kind) -> dict[str, Kind]:
    """Map every RPC of a service to one kind."""
    return {m.name: kind for m in descriptor.methods}


def _service(module: Any, name: str) -> ServiceDescriptor:
    descriptor: ServiceDescriptor = module.DESCRIPTOR.services_by_name[name]
    return descriptor


class BrokerServer:
    """The three listeners of one broker process, sharing one Runtime."""

    def __init__(
        self, config: Config, clock: Clock | None = None, store: Store | None = None
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.files = PkiFiles(config.certs_dir)
        self.store = store or open_store(config)
        authority = load_authority(config, self.clock)
        self.devices = DeviceAuthority(config, authority, self.store, self.clock)
        keyring = load_keyring(config.certs_dir)
        presence = Presence()
        sessions = Sessions(config, self.store, self.clock, keyring)
        self.runtime: Runtime = Runtime(
            config,
            self.clock,
            self.devices,
            presence,
            load_trust_bundle(config, keyring.jwks_json()),
            Accounts(config, authority, self.store, self.clock, PasswordHasher(config)),
            Ownership(config, self.store, self.clock),
            sessions,
            Relay(presence, self.clock, self._alarm),
            PkiReloader(config, authority, sessions.reload_keyring, self.store, self.clock),
            self.store,
            Attachments(config, self.store, self.clock),
            replica=config.replica_name,
            executor=self.store.core_executor(),
        )
        self.effects = EffectsApplier(self.runtime)
        # Metrics (issue 13): off when metrics_address is "", and then nothing is hooked.
        self.metrics: BrokerMetrics | None = None
        self._metrics_server: MetricsServer | None = None
        if config.metrics_address:
            self.metrics = BrokerMetrics()
            rt = self.runtime
            self.metrics.watch(self.store, rt.relay, rt.presence, self.clock, config.trust_domain)
            self.effects.on_streams_ended = self.metrics.streams_ended
        self.events = EventHandler(self.runtime, self.effects)
        self.feed = EventFeed(self.store, config.replica_name, self.events)
        self.runtime.feed = self.feed
        self.runtime.expired = expired_renewals(config, authority, self.store, self.clock)
        self._background: list[asyncio.Task[None]] = []
        self.runtime.crl_source = self._crl_pem
        self._tls: list[ReloadingCredentials] = []
        self._main_parser = PeerParser(config.trust_domain, trusted_issuing(self.files))
        self.effects.on_trust_changed(lambda issuing: self._main_parser.reset(list(issuing)))
        self._servers: list[grpc.aio.Server] = []
        self._gates: dict[str, tuple[ConnectionGate, str]] = {}  # listener -> (gate, address)
        self.ports: dict[str, int] = {}
        self.devices.register_offline_certificates(self.files, "broker")
        prepare_replica_certificate(config, authority, self.clock, self.devices)

    def _alarm(self, device_id: str, session_id: str, reason: str) -> None:
        """A relay rule fired (e.g. a frame from the wrong camera): log and audit it (I6, I12)."""
        log.warning("relay alarm device=%s session=%s reason=%s", device_id, session_id, reason)
        event = alarm_event(self.config.trust_domain, device_id, session_id, reason)
        task = asyncio.get_running_loop().create_task(self.runtime.run(self.devices.audit, event))
        self._background.append(task)
        task.add_done_callback(self._background.remove)

    def _credentials(self, client_ca: Path | None) -> grpc.ServerCredentials:
        source = ReloadingCredentials(self.files.server_key, self.files.server_chain, client_ca)
        self._tls.append(source)
        return source.credentials()

    # -- listeners -----------------------------------------------------------------------------
    def _options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_receive_message_length", self.config.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 1 if self.config.so_reuseport else 0),
            # Reclaim connections that never finish TLS (an idle TCP connection, a stalled
            # ClientHello) and ones with nothing in flight; grpc's defaults are 120 s and never.
            ("grpc.server_handshake_timeout_ms", int(self.config.handshake_timeout_seconds * 1000)),
            ("grpc.max_connection_idle_ms", int(self.config.idle_connection_seconds * 1000)),
        ]

    async def _check_certificate(self, caller: Caller) -> None:
        assert caller.certificate is not None
        await self.runtime.run(
            self.devices.check_presented,
            caller.identity,
            caller.certificate,
            caller.serial,
            caller.fingerprint,
        )

    def _shed(self, kind: Kind) -> None:
        """Load shedding for new calls of cameras, apps and enrollments; operators (who revoke)
        and replicas (forwarded streams already admitted once) always get through."""
        if kind not in (Kind.OPERATOR, Kind.REPLICA):
            self.runtime.shed_if_busy()

    def _listener(
        self,
        name: str,
        address: str,
        credentials: grpc.ServerCredentials,
        bindings: list[Binding],
        authenticate: Any,
    ) -> grpc.aio.Server:
        acl = acl_table(bindings)
        server = grpc.aio.server(
            interceptors=[IdentityInterceptor(acl, authenticate, self._shed, self.metrics)],
            options=self._options(),
        )
        for binding in bindings:
            binding.add(binding.servicer, server)
        cap = self.config.max_connections_per_address
        bind = f"{UPSTREAM_HOST}:0" if cap > 0 else address  # behind a gate: loopback only
        port = server.add_secure_port(bind, credentials)
        if port == 0:
            raise ConfigurationError(f"cannot listen on {bind} for the {name} listener")
        if cap > 0:
            self._gates[name] = (ConnectionGate(name, cap, port, self.runtime.clients), address)
        self.ports[name] = port  # the gate's port once it listens (start)
        self._served.update(b.descriptor.full_name for b in bindings)
        return server

    def _build(self) -> list[grpc.aio.Server]:
        self._served: set[str] = set()  # every service on any listener (health answers for each)
        rt = self.runtime
        bootstrap_desc = _service(bootstrap_pb2, "Bootstrap")
        bootstrap = BootstrapService(rt)
        health_servicer = health.aio.HealthServicer()
        main_parser = self._main_parser
        factory_parser = PeerParser(
            self.config.trust_domain, read_certificates(self.files.factory_cert)
        )
        public = [
            Binding(
                bootstrap_desc,
                bootstrap_pb2_grpc.add_BootstrapServicer_to_server,
                bootstrap,
                every(bootstrap_desc, Kind.ANONYMOUS),
            ),
            Binding(
                _service(health_pb2, "Health"),
                health_pb2_grpc.add_HealthServicer_to_server,
                health_servicer,
                every(_service(health_pb2, "Health"), Kind.ANONYMOUS),
            ),
        ]
        reflection = Reflection(
            [b.descriptor.full_name for b in public]
            + [V1_SERVICE.full_name, V1ALPHA_SERVICE.full_name]
        )
        public += [
            Binding(
                V1ALPHA_SERVICE,
                reflection.add_v1alpha,
                None,
                every(V1ALPHA_SERVICE, Kind.ANONYMOUS),
            ),
            Binding(V1_SERVICE, reflection.add_v1, None, every(V1_SERVICE, Kind.ANONYMOUS)),
        ]
        bootstrap_server = self._listener(
            "bootstrap",
            self.config.bootstrap_address,
            self._credentials(None),
            public,
            anonymous_authenticator(),
        )
        factory_server = self._listener(
            "factory",
            self.config.factory_address,
            self._credentials(self.files.factory_cert),
            [
                Binding(
                    bootstrap_desc,
                    bootstrap_pb2_grpc.add_BootstrapServicer_to_server,
                    bootstrap,
                    {
                        "GetTrustBundle": Kind.BIRTH,
                        "EnrollDevice": Kind.BIRTH,
                        "CreateAccount": Kind.NOBODY,
                        "EnrollApp": Kind.NOBODY,
                        "GetCRL": Kind.NOBODY,
                        "RenewExpiredCertificate": Kind.NOBODY,
                    },
                )
            ],
            certificate_authenticator(factory_parser.parse, None),
        )
        device_desc = _service(device_pb2, "DeviceService")
        self._app_service = AppService(rt, self.effects)
        admin_desc = _service(admin_pb2, "AdminService")
        app_desc = _service(app_pb2, "AppService")
        main_server = self._listener(
            "main",
            self.config.main_address,
            self._credentials(self.files.ca_bundle),
            [
                Binding(
                    device_desc,
                    device_pb2_grpc.add_DeviceServiceServicer_to_server,
                    DeviceService(rt, self.effects),
                    every(device_desc, Kind.DEVICE),
                ),
                Binding(
                    admin_desc,
                    admin_pb2_grpc.add_AdminServiceServicer_to_server,
                    AdminService(rt, self.effects),
                    every(admin_desc, Kind.OPERATOR),
                ),
                Binding(
                    app_desc,
                    app_pb2_grpc.add_AppServiceServicer_to_server,
                    self._app_service,
                    every(app_desc, Kind.APP),
                ),
            ],
            certificate_authenticator(main_parser.parse, self._check_certificate),
        )
        self._health = health_servicer
        internal_server, self.ports["internal"] = build_internal_server(
            rt, self.effects, self.config
        )
        return [bootstrap_server, factory_server, main_server, internal_server]

    def gate_counts(self) -> dict[str, GateCounts]:
        """Connections each public listener's gate holds and has refused (none: no gates)."""
        return {name: gate.counts() for name, (gate, _) in self._gates.items()}

    def _crl_pem(self) -> str:
        from broker.pki.crl import build_crls, crls_pem

        return crls_pem(build_crls(self.files, self.store, self.clock))

    def _serve_metrics(self) -> None:
        """Bind /metrics. A configured address that cannot be bound stops start-up; the default
        one is best effort (another broker on this host may hold it): logged, served without."""
        if self.metrics is None:
            return
        address = self.config.metrics_address
        try:
            self._metrics_server = MetricsServer(address, self.metrics.registry)
        except OSError as error:
            if address != DEFAULT_METRICS_ADDRESS:
                raise ConfigurationError(f"cannot serve metrics on {address}: {error}") from error
            log.warning("metrics not served: cannot listen on %s (%s)", address, error)
            return
        self.ports["metrics"] = self._metrics_server.port
        log.info(
            "metrics on http://%s:%d/metrics", self._metrics_server.host, self._metrics_server.port
        )

    async def start(self) -> dict[str, int]:
        """Bind and start all listeners; returns the bound ports by listener name."""
        self._serve_metrics()  # first: a bad metrics address fails before anything else runs
        released = await self.runtime.run(self.runtime.attachments.release_all_of_this_replica)
        if released:
            log.info("released %d attachment(s) left by the previous run", len(released))
        ended = self.runtime.sessions.end_all_after_restart()
        if ended:
            log.info("ended %d session(s) left open by the previous run", len(ended))
        self.feed.start()  # events other replicas append from now on reach this one
        self._servers = self._build()
        for server in self._servers:
            await server.start()
        for name, (gate, address) in self._gates.items():
            try:
                self.ports[name] = await gate.start(address, self.config.so_reuseport)
            except OSError as error:
                raise ConfigurationError(
                    f"cannot listen on {address} for the {name} listener: {error}"
                ) from error
        await self.runtime.run(advertise_replica, self.runtime, self.ports["internal"])
        for service in ["", *sorted(self._served)]:
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._expiry = asyncio.get_running_loop().create_task(self.runtime.relay.run_expiry())
        # Start-up objects (PKI, protobuf descriptors, grpc servers) live as long as the process:
        # moved out of the collector's sight so that its full passes do not walk them per call.
        gc.collect()
        gc.freeze()
        log.info("broker listening ports=%s trust_domain=%s", self.ports, self.config.trust_domain)
        return dict(self.ports)

    async def drain(self, window: float | None = None, grace: float = 5.0) -> None:
        """SIGTERM: stop taking new work, move cameras to other replicas at times spread over
        the window (no reconnect storm), end this replica's sessions with a reason, then stop.

        Health turns NOT_SERVING first; the listeners stop accepting at once (with SO_REUSEPORT
        the kernel sends new connections to the other replicas) while live streams go on until
        their camera's turn comes or the grace period ends."""
        window = self.config.drain_window_seconds if window is None else window
        loop = asyncio.get_running_loop()
        await self._health.enter_graceful_shutdown()
        ended = self.runtime.relay.end_where(DRAIN_REASON)
        forwarded = await self._app_service.end_forwarded(DRAIN_REASON)
        # The internal listener stays open: other replicas forward Watch calls for the cameras
        # still attached here until their turn to move comes.
        public = self._servers[:-1]
        for gate, _ in self._gates.values():
            gate.stop_accepting()
        stopping = [asyncio.ensure_future(s.stop(window + grace)) for s in public]
        presence = self.runtime.presence
        cameras = sorted(presence.online_ids())
        for device_id in cameras:
            delay = random.uniform(0, window)  # noqa: S311 (spreading load, not a secret)
            loop.call_later(delay, self._move_camera, device_id)
        log.info(
            "draining: %d camera(s) to move over %.0f s, %d session(s) ended here, %d forwarded",
            len(cameras),
            window,
            len(ended),
            forwarded,
        )
        deadline = loop.time() + window + grace
        while (presence.online_count() or self.runtime.relay.live_count()) and (
            loop.time() < deadline
        ):
            await asyncio.sleep(0.1)
        # Whatever is left (sessions forwarded here since, cameras not gone by the deadline)
        # ends with the drain's reason too; a second lets the end events reach the apps.
        self.runtime.relay.end_where(DRAIN_REASON)
        await asyncio.gather(*stopping, return_exceptions=True)
        await self.stop(1.0)

    def _move_camera(self, device_id: str) -> None:
        """A draining replica's camera's turn: its viewers' sessions (including ones forwarded
        here since the drain began) end "broker draining", then its stream is told to reconnect."""
        self.runtime.relay.end_where(DRAIN_REASON, device_id=device_id)
        self.runtime.presence.end_device(device_id, Unavailable(DRAIN_MESSAGE))

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop all listeners; streams get `grace` seconds to finish."""
        await self._health.enter_graceful_shutdown()  # every health status NOT_SERVING, first
        await asyncio.to_thread(self.feed.stop)
        await self.events.drain()
        self.runtime.relay.end_where(RESTART_REASON)  # watchers get an end event with the reason
        self._expiry.cancel()
        for gate, _ in self._gates.values():
            gate.stop_accepting()
        await asyncio.gather(*(s.stop(grace) for s in self._servers))
        for gate, _ in self._gates.values():
            gate.close()
        await self._app_service.close()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.runtime.executor.shutdown(wait=True)
        self.runtime.password_executor.shutdown(wait=True)
        self.runtime.signing_executor.shutdown(wait=True)
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.stop)
            self._metrics_server = None
        self.store.close()

    async def wait(self) -> None:
        await asyncio.gather(*(s.wait_for_termination() for s in self._servers))
