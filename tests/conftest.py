"""Shared fixtures: a real broker (all three listeners, real mTLS) on port 0 in a temp home."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from broker.clock import FakeClock
from broker.config import Config
from broker.pki.ca import PkiFiles, init_pki
from broker.service.server import BrokerServer
from tests.helpers import Pki, RunningBroker
from tests.pg import fresh_database, integration_backend


def start_broker(home: Path, clock: FakeClock | None = None, **overrides: object) -> RunningBroker:
    """Create a dev PKI in home and start a broker on port 0 for every listener."""
    clock = clock or FakeClock()
    config = Config(
        home=home,
        bootstrap_address="127.0.0.1:0",
        main_address="127.0.0.1:0",
        factory_address="127.0.0.1:0",
        metrics_address="127.0.0.1:0",  # a free port each (several brokers per host)
        # Cheap argon2 keeps the suite fast; the production cost is covered in tests/unit.
        argon2_time_cost=1,
        argon2_memory_kib=8192,
        argon2_parallelism=1,
    ).with_overrides(**overrides)
    init_pki(config, clock)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, BrokerServer] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def main() -> None:
            try:
                server = BrokerServer(config, clock)
                await server.start()
                holder["server"] = server
            finally:
                started.set()

        loop.run_until_complete(main())
        loop.run_forever()

    thread = threading.Thread(target=run, name="broker-loop", daemon=True)
    thread.start()
    if not started.wait(30) or "server" not in holder:
        raise RuntimeError("broker did not start (see the thread's exception above)")
    return RunningBroker(config, holder["server"], loop, clock, Pki(PkiFiles(config.certs_dir)))


def stop_broker(broker: RunningBroker) -> None:
    asyncio.run_coroutine_threadsafe(broker.server.stop(0.2), broker.loop).result(30)
    broker.loop.call_soon_threadsafe(broker.loop.stop)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A running broker on the suite's backend: SQLite, or a fresh PostgreSQL database when
    BROKER_TEST_BACKEND=postgres (tests.pg)."""
    with ExitStack() as stack:
        store_url = ""
        if integration_backend() == "postgres":
            store_url = stack.enter_context(fresh_database())
        running = start_broker(tmp_path, store_url=store_url)
        try:
            yield running
        finally:
            stop_broker(running)


@pytest.fixture
def operator_channel(broker: RunningBroker) -> Iterator[grpc.Channel]:
    files = broker.pki.files
    creds = grpc.ssl_channel_credentials(
        files.ca_bundle.read_bytes(),
        files.operator_key.read_bytes(),
        files.operator_chain.read_bytes(),
    )
    with grpc.secure_channel(broker.main, creds) as channel:
        yield channel
