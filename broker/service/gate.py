"""A per-address cap on concurrent connections, in front of each public gRPC listener.

grpcio gives Python no hook per connection: a connection is invisible until it carries an RPC,
so neither a TCP connection that never starts TLS nor a half-finished handshake can be counted
or refused from inside the server. The gate owns the public socket instead: it accepts, refuses
at once (accept, close: no handshake, no descriptor kept) a connection from an address already
holding ``cap`` connections, and pipes the others, bytes unchanged, to the gRPC server on a
loopback port. TLS stays end to end between the client and grpc (the gate only sees
ciphertext, and I1 still reads identity from the certificate grpc verified); grpc's handshake
timeout reclaims connections that never finish TLS, and the gate closes its side when grpc
closes its own.

The gRPC server sees the gate's loopback address; ``ClientAddresses`` maps it back to the
client's (for per-address login limits and logs). IPv6 clients are counted per /64, the block
one subscriber usually holds. grpc's own port listens on loopback only: a process on the broker's
host could reach it past the gate (TLS and every identity check still apply; it is counted as
127.0.0.1), which is why the cap is a defence against remote floods, not against local code.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections import Counter
from dataclasses import dataclass

from broker.service.addresses import split_address

log = logging.getLogger("broker.gate")

UPSTREAM_HOST = "127.0.0.1"
LISTEN_BACKLOG = 4096
ACCEPT_BATCH = 256  # accepted per wake-up, so a flood cannot hold the event loop
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends RST


class ClientAddresses:
    """Which client each gate's loopback connection speaks for, shared by a broker's gates.

    Gates bind their upstream sockets to an explicit port before connecting, so a loopback
    port names one connection across all of them."""

    def __init__(self) -> None:
        self._by_port: dict[int, str] = {}

    def address_of(self, grpc_peer: str) -> str:
        """The client's IP address for grpc's peer string ("ipv4:127.0.0.1:PORT" behind a gate,
        else the peer's own address, port dropped)."""
        kind, _, rest = grpc_peer.partition(":")
        if kind not in ("ipv4", "ipv6"):
            return grpc_peer
        host, _, port = rest.rpartition(":")
        if host == UPSTREAM_HOST and port.isdigit():
            client = self._by_port.get(int(port))
            if client is not None:
                return client
        return host.strip("[]")

    def _add(self, port: int, host: str) -> None:
        self._by_port[port] = host

    def _remove(self, port: int) -> None:
        self._by_port.pop(port, None)


@dataclass(frozen=True, slots=True)
class GateCounts:
    """What a gate holds now and has refused since it started."""

    open: int
    addresses: int
    refused: int


def client_host(host: str) -> str:
    """The client's address as grpc would name it: an IPv4 client of a dual-stack listener
    ("::ffff:192.0.2.7") is 192.0.2.7."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return host


def address_key(host: str) -> str:
    """What the cap counts: the IPv4 address, or the IPv6 /64 it belongs to."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class ConnectionGate:
    """Accepts on the public address and pipes what it admits to the gRPC server's port."""

    def __init__(self, name: str, cap: int, upstream_port: int, clients: ClientAddresses) -> None:
        self.name = name
        self._cap = cap
        self._upstream_port = upstream_port
        self._counts: Counter[str] = Counter()
        self._clients = clients
        self._pipes: set[_Inbound] = set()
        self._refused = 0
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, address: str, reuse_port: bool) -> int:
        """Listen on address; returns the bound port."""
        host, port = split_address(address, f"{self.name} listener")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((host, port))
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(listener, self._accept_all)
        bound: int = listener.getsockname()[1]
        return bound

    def _accept_all(self) -> None:
        """Accept what the kernel has queued. A refusal is an accept and a close on the raw
        socket (a few microseconds): a flood of connections from one address costs the event
        loop no transport, protocol or task per connection it refuses."""
        assert self._listener is not None and self._loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # e.g. out of descriptors: keep serving what is open
                log.warning("%s: accept failed: %s", self.name, error)
                return
            host = client_host(str(peer[0]))
            key = address_key(host)
            if self._counts[key] >= self._cap:
                self._refuse(sock, key)
                continue
            self._counts[key] += 1
            sock.setblocking(False)
            # asyncio sets TCP_NODELAY only on sockets created with proto=IPPROTO_TCP; without
            # it, Nagle and delayed ACKs add ~40 ms to one call in ten.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._loop.create_task(self._pipe(sock, host, key))

    def _refuse(self, sock: socket.socket, key: str) -> None:
        self._refused += 1  # counted before the client can see the reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)  # RST: no TIME_WAIT kept
        sock.close()
        if self._refused % 1000 == 1:  # a flood logs once per thousand refusals
            log.warning(
                "%s: refusing connections from %s (cap %d per address; %d refused so far)",
                self.name,
                key,
                self._cap,
                self._refused,
            )

    async def _pipe(self, sock: socket.socket, host: str, key: str) -> None:
        assert self._loop is not None
        inbound = _Inbound(self, host, key)
        try:
            await self._loop.connect_accepted_socket(lambda: inbound, sock)
        except OSError:
            inbound.forget()
            sock.close()
            return
        await self._connect_upstream(inbound)

    def stop_accepting(self) -> None:
        """New connections are refused by the kernel (or, with SO_REUSEPORT, go to the other
        replicas); admitted ones keep their pipe until either end closes."""
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener)
            self._listener.close()
            self._listener = None

    def close(self) -> None:
        """Stop accepting and cut every pipe (after grpc has stopped)."""
        self.stop_accepting()
        for pipe in list(self._pipes):
            pipe.abort()

    def counts(self) -> GateCounts:
        return GateCounts(len(self._pipes), len(self._counts), self._refused)

    # -- called by the pipe ends ---------------------------------------------------------------
    def _admitted(self, pipe: _Inbound) -> None:
        self._pipes.add(pipe)

    def _release(self, pipe: _Inbound, key: str) -> None:
        """The pipe's client connection is gone: its address may connect once more."""
        self._pipes.discard(pipe)
        self._counts[key] -= 1
        if self._counts[key] <= 0:
            del self._counts[key]

    async def _connect_upstream(self, pipe: _Inbound) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(
                lambda: _Outbound(pipe),
                UPSTREAM_HOST,
                self._upstream_port,
                local_addr=(UPSTREAM_HOST, 0),  # a port unique among all gates (bind, no reuse)
            )
        except OSError as error:
            log.warning("%s: gRPC listener unreachable: %s", self.name, error)
            pipe.abort()
            return
        port: int = transport.get_extra_info("sockname")[1]
        self._clients._add(port, pipe.host)
        pipe.upstream_ready(transport)

    def _forget_upstream(self, port: int) -> None:
        self._clients._remove(port)


class _End(asyncio.Protocol):
    """One socket of a pipe; what it reads is written to the other end, with backpressure."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _End | None = None

    def data_received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close this end; connection_lost closes the other

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()  # flushes what is buffered, then closes

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Inbound(_End):
    """The client's connection to the gate (admitted: counted against its address)."""

    def __init__(self, gate: ConnectionGate, host: str, key: str) -> None:
        super().__init__()
        self.gate = gate
        self.host = host
        self._key = key
        self._counted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.gate._admitted(self)
        transport.pause_reading()  # nothing is read before the upstream pipe exists

    def upstream_ready(self, transport: asyncio.Transport) -> None:
        if self.transport is None or self.transport.is_closing():
            transport.close()
            return
        self.transport.resume_reading()

    def forget(self) -> None:
        """Give the address its slot back (once)."""
        if self._counted:
            self._counted = False
            self.gate._release(self, self._key)

    def connection_lost(self, exc: Exception | None) -> None:
        self.forget()
        super().connection_lost(exc)


class _Outbound(_End):
    """The gate's connection to the gRPC server, on behalf of one client."""

    def __init__(self, inbound: _Inbound) -> None:
        super().__init__()
        self.other = inbound
        inbound.other = self
        self._gate = inbound.gate
        self._port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._port = transport.get_extra_info("sockname")[1]

    def connection_lost(self, exc: Exception | None) -> None:
        self._gate._forget_upstream(self._port)
        super().connection_lost(exc)
