"""Connection caps and handshake timeouts (issue 13, item 3), against a running broker.

One address cannot hold the broker's descriptors: each public listener admits at most
``max_connections_per_address`` concurrent connections per client address (closing the rest on
accept), and grpc closes a connection that has not finished its TLS handshake within
``handshake_timeout_seconds``. Clients from other addresses are served throughout. The flood
figures (3,000 idle + 500 half-open, p99 of legitimate calls) are in ``bench.conn_flood``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker._proto.broker.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from broker.service.gate import ClientAddresses, ConnectionGate, address_key, client_host
from tests.conftest import start_broker, stop_broker
from tests.helpers import (
    count_rows,
    csr_for,
    enroll_device,
    operator_channel_of,
    p256,
    read_store,
    rpc_error,
)

ATTACKER = "127.0.0.2"  # the whole of 127/8 is loopback: a second client address for free
HALF_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # a ClientHello cut short


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[Any]:
    """Cap 5; a handshake timeout far beyond the test, so held connections stay held."""
    broker = start_broker(tmp_path, max_connections_per_address=5, handshake_timeout_seconds=60)
    yield broker
    stop_broker(broker)


@pytest.fixture
def impatient(tmp_path: Path) -> Iterator[Any]:
    """Cap 5 and a 1.5 s handshake timeout."""
    broker = start_broker(tmp_path, max_connections_per_address=5, handshake_timeout_seconds=1.5)
    yield broker
    stop_broker(broker)


def connect_from(host: str, port: int, first_bytes: bytes = b"") -> socket.socket:
    sock = socket.socket()
    sock.bind((host, 0))
    sock.connect(("127.0.0.1", port))
    if first_bytes:
        sock.sendall(first_bytes)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the broker closed sock (EOF or reset), None if still open after seconds."""
    sock.settimeout(seconds)
    start = time.monotonic()
    try:
        data = sock.recv(1)
    except TimeoutError:
        return None
    except ConnectionResetError:
        return time.monotonic() - start
    assert data == b"", "the broker sent bytes to a client that never spoke TLS"
    return time.monotonic() - start


def wait_for(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def gate_counts(broker: Any, listener: str) -> Any:
    return broker.server.gate_counts()[listener]


def holds(broker: Any, listener: str, count: int) -> bool:
    return bool(gate_counts(broker, listener).open == count)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_one_address_gets_its_cap_and_no_more_while_others_are_served(capped: Any) -> None:
    port = capped.server.ports["bootstrap"]
    held = [connect_from(ATTACKER, port) for _ in range(5)]
    wait_for(lambda: gate_counts(capped, "bootstrap").open == 5)
    over = [connect_from(ATTACKER, port) for _ in range(20)]

    for sock in over:
        elapsed = closed_within(sock, 1.0)
        assert elapsed is not None and elapsed < 1.0
    wait_for(lambda: gate_counts(capped, "bootstrap").refused == 20)
    counts = gate_counts(capped, "bootstrap")
    assert (counts.open, counts.addresses, counts.refused) == (5, 1, 20)

    # another address (the test's own, 127.0.0.1) still enrolls and attaches meanwhile
    with operator_channel_of(capped) as operator:
        camera = enroll_device(capped, operator, "cam-capped")
    assert camera.device_id == "cam-capped"

    for sock in held + over:
        sock.close()
    wait_for(lambda: gate_counts(capped, "bootstrap").open == 0)
    again = connect_from(ATTACKER, port)
    assert closed_within(again, 0.3) is None  # admitted again once the address is under its cap
    again.close()


def test_handshakes_that_never_finish_are_reclaimed_with_their_descriptors(
    impatient: Any,
) -> None:
    capped = impatient
    port = capped.server.ports["main"]
    baseline = open_descriptors()
    idle = [connect_from(ATTACKER, port) for _ in range(3)]
    stalled = [connect_from(ATTACKER, port, HALF_HELLO) for _ in range(2)]
    wait_for(lambda: gate_counts(capped, "main").open == 5)
    assert open_descriptors() > baseline

    for sock in idle + stalled:
        elapsed = closed_within(sock, 6.0)
        assert elapsed is not None and elapsed < 4.0, elapsed  # timeout 1.5 s, generous slack
        sock.close()

    wait_for(lambda: gate_counts(capped, "main").open == 0)
    wait_for(lambda: open_descriptors() <= baseline)


def test_every_public_listener_is_capped(capped: Any) -> None:
    for listener in ("bootstrap", "factory", "main"):
        port = capped.server.ports[listener]
        held = [connect_from(ATTACKER, port) for _ in range(5)]
        wait_for(functools.partial(holds, capped, listener, 5))
        extra = connect_from(ATTACKER, port)
        assert closed_within(extra, 1.0) is not None, listener
        for sock in [*held, extra]:
            sock.close()


def test_no_gate_when_the_cap_is_off(tmp_path: Path) -> None:
    broker = start_broker(tmp_path, max_connections_per_address=0)
    try:
        assert broker.server.gate_counts() == {}
        with operator_channel_of(broker) as operator:
            assert enroll_device(broker, operator, "cam-ungated").device_id == "cam-ungated"
    finally:
        stop_broker(broker)


# -- the gate itself, in front of a plain TCP server --------------------------------------------


def test_the_gate_pipes_bytes_unchanged_and_names_the_client_behind_each_connection() -> None:
    async def scenario() -> None:
        seen_ports: list[int] = []

        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen_ports.append(writer.get_extra_info("peername")[1])
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        clients = ClientAddresses()
        gate = ConnectionGate("test", 2, server.sockets[0].getsockname()[1], clients)
        port = await gate.start("127.0.0.1:0", reuse_port=False)
        try:
            payload = os.urandom(300_000)  # several buffers: backpressure both ways
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(ATTACKER, 0)
            )
            writer.write(payload)
            await writer.drain()
            echoed = await reader.readexactly(len(payload))
            assert echoed == payload
            # Nagle off on both sockets of the pipe (it cost ~40 ms on one call in ten)
            [pipe] = gate._pipes
            for end in (pipe, pipe.other):
                assert end is not None and end.transport is not None
                sock = end.transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            [upstream_port] = seen_ports
            assert clients.address_of(f"ipv4:127.0.0.1:{upstream_port}") == ATTACKER
            assert clients.address_of("ipv4:127.0.0.1:1") == "127.0.0.1"  # not a gate's
            assert clients.address_of("ipv6:[::1]:4444") == "::1"
            writer.close()
            await writer.wait_closed()
            deadline = time.monotonic() + 5
            while gate.counts().open and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert gate.counts().open == 0
            assert clients.address_of(f"ipv4:127.0.0.1:{upstream_port}") == "127.0.0.1"
        finally:
            gate.close()
            server.close()

    asyncio.run(scenario())


def test_ipv6_clients_are_counted_per_64_and_ipv4_per_address() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7" == client_host("::ffff:192.0.2.7")
    assert client_host("2001:db8::1") == "2001:db8::1"
    assert address_key("192.0.2.7") != address_key("192.0.2.8")


def test_login_limits_count_the_clients_own_address_through_the_gate(tmp_path: Path) -> None:
    """grpc sees the gate's loopback connection (127.0.0.1); the failures are recorded under the
    client's own address (::1), so per-address limits stay per client (I8)."""
    broker = start_broker(tmp_path, bootstrap_address="[::1]:0")
    try:
        credentials = grpc.ssl_channel_credentials(broker.pki.ca_pem)
        target = f"[::1]:{broker.server.ports['bootstrap']}"
        options = (("grpc.ssl_target_name_override", "localhost"),)
        with grpc.secure_channel(target, credentials, options) as channel:
            stub = bootstrap_pb2_grpc.BootstrapStub(channel)
            error = rpc_error(
                stub.EnrollApp,
                bootstrap_pb2.EnrollAppRequest(
                    username="nobody-here", password="wrong password!", csr_pem=csr_for(p256())
                ),
                timeout=10,
            )
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        pairs = read_store(broker, lambda tx: tx.failure_counts("login.pair", 0))
        assert [p.key for p in pairs] == ["::1|nobody-here"]
        assert count_rows(broker, "app_instances") == 0
    finally:
        stop_broker(broker)
