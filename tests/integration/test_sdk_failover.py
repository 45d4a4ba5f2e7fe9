"""A camera running the SDK's reconnect loop survives its broker going away: drained (the stream
ends with UNAVAILABLE "broker draining") or stopped, it backs off with jitter and attaches again to
the broker that takes over on the same home and ports. Its main endpoint lists a dead address too,
so every new connection has to find the live one."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from broker.client.device import DeviceClient, Endpoints
from broker.client.reconnect import Backoff
from broker.client.simcam import SimulatedCamera
from tests.conftest import start_broker, stop_broker
from tests.helpers import RunningBroker, create_token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _token(broker: RunningBroker, device_id: str) -> str:
    import grpc

    files = broker.pki.files
    creds = grpc.ssl_channel_credentials(
        files.ca_bundle.read_bytes(),
        files.operator_key.read_bytes(),
        files.operator_chain.read_bytes(),
    )
    with grpc.secure_channel(broker.main, creds) as channel:
        return create_token(channel, device_id)


def test_camera_comes_back_after_drain_and_restart(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("bootstrap", "main", "factory")}
    dead = free_port()
    addresses = {
        "bootstrap_address": f"127.0.0.1:{ports['bootstrap']}",
        "main_address": f"127.0.0.1:{ports['main']}",
        "factory_address": f"127.0.0.1:{ports['factory']}",
    }
    home = tmp_path / "home"
    broker = start_broker(home, **addresses)  # type: ignore[arg-type]
    token = _token(broker, "cam-failover")
    endpoints = Endpoints(
        f"127.0.0.1:{ports['bootstrap']}",
        [f"127.0.0.1:{dead}", f"127.0.0.1:{ports['main']}"],
    )
    client = DeviceClient(tmp_path / "cam", endpoints, broker.pki.ca_pem)
    brokers = [broker]

    async def attached(camera: SimulatedCamera, count: int) -> None:
        while camera.stats.attached < count:
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        await client.enroll(token)
        camera = SimulatedCamera(client, heartbeat_interval=1.0)
        stop = asyncio.Event()
        running = asyncio.ensure_future(
            camera.run_forever(stop, backoff=Backoff(base=0.05, cap=0.5))
        )
        await asyncio.wait_for(attached(camera, 1), 10)

        # 1. Drain: the broker tells the camera to reconnect elsewhere, then exits.
        first = brokers[0]
        await asyncio.to_thread(
            lambda: first.on_loop(first.server.drain(window=0.2, grace=1.0), timeout=30)
        )
        first.loop.call_soon_threadsafe(first.loop.stop)
        brokers.remove(first)
        # Nobody listens now: the camera keeps retrying with backoff.
        await asyncio.sleep(0.5)
        assert camera.stats.attached == 1
        ends = camera.reconnector.stats.ends
        assert any("UNAVAILABLE" in end and "draining" in end for end in ends), ends

        # 2. A broker takes over on the same home and ports: the camera is back.
        brokers.append(await asyncio.to_thread(start_broker, home, **addresses))
        await asyncio.wait_for(attached(camera, 2), 15)

        # 3. Stopped outright this time: back again on the next one.
        await asyncio.to_thread(stop_broker, brokers.pop(0))
        brokers.append(await asyncio.to_thread(start_broker, home, **addresses))
        await asyncio.wait_for(attached(camera, 3), 15)

        stats = camera.reconnector.stats
        assert stats.attaches >= 3 and len(stats.delays) >= 2
        assert all(0 <= d <= 0.5 for d in stats.delays)
        stop.set()
        result = await asyncio.wait_for(running, 10)
        assert result.reason == "stopped" and stats.stop_reason == "stopped"

    try:
        asyncio.run(scenario())
    finally:
        for running in brokers:
            stop_broker(running)


def test_camera_stops_when_replaced_by_another_instance(tmp_path: Path) -> None:
    """A second live Attach of the same device ends the first with "replaced": the first
    instance's loop stops instead of fighting back (no attach ping-pong between two clones)."""
    broker = start_broker(tmp_path / "home")
    try:
        token = _token(broker, "cam-twin")
        client = DeviceClient(tmp_path / "cam", broker.endpoints, broker.pki.ca_pem)

        async def scenario() -> None:
            await client.enroll(token)
            first = SimulatedCamera(client)
            stop = asyncio.Event()
            running = asyncio.ensure_future(first.run_forever(stop))
            while first.stats.attached < 1:
                await asyncio.sleep(0.02)
            second = SimulatedCamera(client)
            twin = asyncio.ensure_future(second.run())
            result = await asyncio.wait_for(running, 10)
            assert result.reason == "replaced", first.reconnector.stats.ends
            assert first.reconnector.stats.attaches == 1
            while second.stats.attached < 1:
                await asyncio.sleep(0.02)
            twin.cancel()

        asyncio.run(scenario())
    finally:
        stop_broker(broker)
