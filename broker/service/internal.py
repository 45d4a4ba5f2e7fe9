"""The internal listener: replica-to-replica mutual TLS, ReplicaService for replica identities only.

- ForwardWatch: the replica an app reached forwards its Watch to this one, which holds the camera's
  Attach stream. Nothing the forwarder checked is trusted: token, certificate binding (cnf), app
  key, grant and the attachment epoch are all re-checked here, then the session is relayed exactly
  like a local Watch (broker.service.watching), ciphertext only, with the per-frame identity check
  where the Attach stream is (I6).

The listener requires a client certificate chaining to the fleet's roots; every RPC admits only
Kind.REPLICA (I3: unmapped RPCs fail start-up), and the per-call check re-reads the certificate
from the store (I7) like on the main listener.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc

from broker._proto.broker.internal.v1 import replica_pb2, replica_pb2_grpc
from broker.clock import Clock, now_s
from broker.config import Config
from broker.devices.enrollment import DeviceAuthority
from broker.errors import ConfigurationError, FailedPrecondition
from broker.identity.spiffe import Kind, parse_spiffe_id
from broker.pemfile import read_certificates
from broker.pki.ca import IssuingAuthority, PkiFiles
from broker.pki.replica import ReplicaFiles, ensure_replica_certificate, replica_identity
from broker.pki.rotation import trusted_issuing
from broker.protocol.spiffe_id import SpiffeId
from broker.service.effects import EffectsApplier
from broker.service.forward import HOLDER_HEADER, STALE_EPOCH
from broker.service.interceptor import IdentityInterceptor, certificate_authenticator
from broker.service.peer import Caller, PeerParser
from broker.service.runtime import Runtime
from broker.service.tls import ReloadingCredentials
from broker.service.watching import watch_locally

log = logging.getLogger("broker.internal")

SERVICE = replica_pb2.DESCRIPTOR.services_by_name["ReplicaService"]


class ReplicaService(replica_pb2_grpc.ReplicaServiceServicer):
    """What other replicas may ask of this one."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def ForwardWatch(
        self, request: replica_pb2.ForwardWatchRequest, context: grpc.aio.ServicerContext
    ) -> None:
        rt = self._rt
        rt.require_fresh_feed()  # a stale holder could miss the event that ends this stream
        app = parse_spiffe_id(request.app_spiffe_id, rt.config.trust_domain)
        claims = await rt.run(
            rt.sessions.verify_for_watch,
            app,
            request.cnf_thumbprint,
            request.session_id,
            request.token,
            request.app_ephemeral_public_key,
        )
        device_id = SpiffeId.parse(claims.audience).device_id  # aud was checked exactly
        handle = rt.presence.handle(device_id)
        if (
            handle is None
            or handle.ended
            or not handle.epoch
            or handle.epoch != request.attach_epoch
        ):
            raise FailedPrecondition(STALE_EPOCH)

        async def taken() -> None:
            await context.send_initial_metadata(((HOLDER_HEADER, rt.replica),))

        await watch_locally(
            rt,
            claims,
            device_id,
            request.token,
            request.app_ephemeral_public_key,
            context.write,
            on_open=taken,
        )


def prepare_replica_certificate(
    config: Config, authority: IssuingAuthority, clock: Clock, devices: DeviceAuthority
) -> tuple[Path, Path]:
    """Issue (first start, or 2/3 of its life gone) and record this replica's certificate, so the
    per-call certificate check accepts it; returns (key, chain) paths. Safe to call again at
    any time (e.g. daily): it only issues when due."""
    key, chain = ensure_replica_certificate(config, authority, clock)
    leaf = read_certificates(chain)[0]
    devices.register_local_certificate(replica_identity(config), leaf, "broker")
    return key, chain


def advertised_address(config: Config, port: int) -> str:
    """Where other replicas reach this one's internal listener (host of internal_address, or
    loopback when it binds every interface)."""
    host = config.internal_address.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]", "::"):  # noqa: S104 (reading the bind address, not binding)
        host = "127.0.0.1"
    return f"{host}:{port}"


def advertise_replica(rt: Runtime, port: int) -> str:
    """Record this replica and its internal address in the store (runs on the core thread);
    returns the address."""
    address = advertised_address(rt.config, port)
    now = now_s(rt.clock)
    rt.store.run(lambda tx: tx.upsert_replica(rt.replica, address, now))
    return address


def _options(config: Config) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 0),  # one internal port per replica
    ]


def build_internal_server(
    rt: Runtime, effects: EffectsApplier, config: Config
) -> tuple[grpc.aio.Server, int]:
    """The internal listener on config.internal_address (bound, not started) and its port.

    Serves with this replica's certificate and requires a client certificate chaining to the
    fleet's roots; the ACL admits only Kind.REPLICA, and each call's certificate is re-checked
    against the store. Call prepare_replica_certificate first.
    """
    from broker.service.server import Binding, acl_table  # server.py imports this module

    files = PkiFiles(config.certs_dir)
    replica_files = ReplicaFiles.of(config)
    if not replica_files.key.exists() or not replica_files.chain.exists():
        raise ConfigurationError(
            f"no replica certificate in {replica_files.folder}: call prepare_replica_certificate"
        )
    parser = PeerParser(config.trust_domain, trusted_issuing(files))
    effects.on_trust_changed(lambda issuing: parser.reset(list(issuing)))

    async def check(caller: Caller) -> None:
        assert caller.certificate is not None
        await rt.run(
            rt.devices.check_presented,
            caller.identity,
            caller.certificate,
            caller.serial,
            caller.fingerprint,
        )

    binding = Binding(
        SERVICE,
        replica_pb2_grpc.add_ReplicaServiceServicer_to_server,
        ReplicaService(rt),
        {m.name: Kind.REPLICA for m in SERVICE.methods},
    )
    acl = acl_table([binding])
    server = grpc.aio.server(
        interceptors=[IdentityInterceptor(acl, certificate_authenticator(parser.parse, check))],
        options=_options(config),
    )
    binding.add(binding.servicer, server)
    credentials = ReloadingCredentials(replica_files.key, replica_files.chain, files.ca_bundle)
    port = server.add_secure_port(config.internal_address, credentials.credentials())
    if port == 0:
        raise ConfigurationError(f"cannot listen on {config.internal_address} (internal listener)")
    return server, port
