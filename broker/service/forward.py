"""Calling another replica's internal listener: ReplicaService.ForwardWatch over mutual TLS.

The client authenticates with this replica's own certificate (``certs/replicas/<name>.key/.pem``,
spiffe://<td>/broker/replica/<name>) and verifies the holder against the fleet's roots
(``certs/ca-bundle.pem``) and the loopback/server names in its certificate. One channel per holder
address is kept, rebuilt when the credential files change (a renewal or a root rotation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from broker._proto.broker.internal.v1 import replica_pb2, replica_pb2_grpc
from broker.config import Config
from broker.pki.ca import PkiFiles
from broker.pki.replica import ReplicaFiles
from broker.service.tls import key_matches_chain

log = logging.getLogger("broker.forward")

# Initial metadata the holder sends once it has taken the session on its relay: from then on the
# holder records the session's close (bytes, reason, audit), never the forwarding replica.
HOLDER_HEADER = "broker-relay-holder"
# FAILED_PRECONDITION from the holder: the forward's epoch is not the camera's current one.
STALE_EPOCH = "stale attachment epoch: the camera re-attached; route again"

Stamp = tuple[tuple[int, int, int], ...]


@dataclass
class _Cached:
    stamp: Stamp
    channel: grpc.aio.Channel


class ForwardClient:
    """Channels to other replicas' internal listeners, one per address."""

    def __init__(self, config: Config) -> None:
        files = ReplicaFiles.of(config)
        self._paths = (files.key, files.chain, PkiFiles(config.certs_dir).ca_bundle)
        self._options = [("grpc.max_receive_message_length", config.max_message_bytes * 2)]
        self._channels: dict[str, _Cached] = {}
        self._retired: list[grpc.aio.Channel] = []

    def _stamp(self) -> Stamp:
        stats = (p.stat() for p in self._paths)
        return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)

    def _credentials(self) -> grpc.ChannelCredentials:
        key_path, chain_path, ca_path = self._paths
        key, chain = key_path.read_bytes(), chain_path.read_bytes()
        if not key_matches_chain(key, chain):
            raise OSError(f"{key_path} does not match {chain_path} (renewal in progress?)")
        return grpc.ssl_channel_credentials(ca_path.read_bytes(), key, chain)

    def channel(self, address: str) -> grpc.aio.Channel:
        """The channel to address, rebuilt if this replica's credentials changed on disk."""
        stamp = self._stamp()
        cached = self._channels.get(address)
        if cached is not None and cached.stamp == stamp:
            return cached.channel
        channel = grpc.aio.secure_channel(address, self._credentials(), options=self._options)
        if cached is not None:
            self._retired.append(cached.channel)  # streams on it run to their end
        self._channels[address] = _Cached(stamp, channel)
        return channel

    def forward_watch(
        self, address: str, request: replica_pb2.ForwardWatchRequest
    ) -> grpc.aio.UnaryStreamCall:
        """Start ReplicaService.ForwardWatch on the replica at address; the call yields
        broker.v1.StreamEvent messages and raises grpc.aio.AioRpcError on a status."""
        stub = replica_pb2_grpc.ReplicaServiceStub(self.channel(address))
        return stub.ForwardWatch(request)

    async def close(self) -> None:
        channels = [c.channel for c in self._channels.values()] + self._retired
        self._channels.clear()
        self._retired.clear()
        for channel in channels:
            await channel.close()


def holder_took_session(metadata: object) -> bool:
    """Whether initial metadata carries the holder's "session taken" header."""
    if metadata is None:
        return False
    try:
        return any(key == HOLDER_HEADER for key, _ in metadata)  # type: ignore[attr-defined]
    except TypeError:
        return False
