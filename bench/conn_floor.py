"""What grpcio itself costs per held mutual-TLS connection: the floor under the broker's figure.

A bare ``grpc.aio`` server (one generic bidi method that only reads) runs in a child process on
the broker's own server certificate, key and client CA; a client process opens N channels with
the operator certificate and holds them, either connected only or each with one idle bidi stream
(the shape of a camera's Attach). Server VmRSS before and with all N held, divided by N, is the
floor: transport, TLS and grpc's per-call state, before any broker code. Server options that
might trim it (read chunk sizes, HPACK tables, write buffer, stream limits, a resource quota) can
be passed as JSON with --options to see whether they move it.

    .venv/bin/python -m bench.conn_floor [--connections 1000] [--options '[["name", value]]']
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import time
from pathlib import Path
from typing import Any

import grpc

from bench.harness.provision import bench_home
from bench.harness.stats import median, pid_memory, raise_nofile

METHOD = "/bench.Floor/Hold"


async def _serve(certs: str, options: list[tuple[str, Any]], port_out: Any) -> None:
    certs_dir = Path(certs)

    async def hold(requests: Any, context: grpc.aio.ServicerContext) -> None:
        async for _ in requests:
            pass

    server = grpc.aio.server(options=options)
    handler = grpc.method_handlers_generic_handler(
        "bench.Floor", {"Hold": grpc.stream_stream_rpc_method_handler(hold)}
    )
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [((certs_dir / "server.key").read_bytes(), (certs_dir / "server.pem").read_bytes())],
        root_certificates=(certs_dir / "ca-bundle.pem").read_bytes(),
        require_client_auth=True,
    )
    port_out.send(server.add_secure_port("127.0.0.1:0", credentials))
    await server.start()
    await server.wait_for_termination()


def _server_main(certs: str, options: list[tuple[str, Any]], port_out: Any) -> None:
    raise_nofile()
    asyncio.run(_serve(certs, options, port_out))


async def _hold(certs: str, port: int, count: int, streams: bool, done: Any) -> None:
    certs_dir = Path(certs)
    credentials = grpc.ssl_channel_credentials(
        (certs_dir / "ca-bundle.pem").read_bytes(),
        (certs_dir / "operator.key").read_bytes(),
        (certs_dir / "operator.pem").read_bytes(),
    )
    held: list[Any] = []
    for _ in range(count):
        channel = grpc.aio.secure_channel(
            f"localhost:{port}", credentials, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        await channel.channel_ready()
        held.append(channel)
        if streams:
            call = channel.stream_stream(METHOD)()
            await call.write(b"hello")
            held.append(call)
    done.send(len(held))
    await asyncio.sleep(3600)


def _client_main(certs: str, port: int, count: int, streams: bool, done: Any) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (count + 1000, count + 1000))
    asyncio.run(_hold(certs, port, count, streams, done))


def held_kib(certs: Path, options: list[tuple[str, Any]], count: int, streams: bool) -> float:
    """Server KiB per held connection (VmRSS with count held minus before, over count)."""
    spawn = multiprocessing.get_context("spawn")
    port_in, port_out = spawn.Pipe(duplex=False)
    server = spawn.Process(target=_server_main, args=(str(certs), options, port_out), daemon=True)
    server.start()
    port = port_in.recv()
    time.sleep(1.0)
    assert server.pid is not None
    before = pid_memory(server.pid)["VmRSS"]
    done_in, done_out = spawn.Pipe(duplex=False)
    client = spawn.Process(
        target=_client_main, args=(str(certs), port, count, streams, done_out), daemon=True
    )
    client.start()
    done_in.recv()
    time.sleep(3.0)  # settle
    after = pid_memory(server.pid)["VmRSS"]
    client.kill()
    server.kill()
    client.join()
    server.join()
    return (after - before) / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--connections", type=int, default=1000, help="held connections (1000)")
    p.add_argument("--runs", type=int, default=3, help="runs per shape (3)")
    p.add_argument("--options", default="[]", help="server channel options, JSON pairs")
    args = p.parse_args()
    options = [("grpc.max_receive_message_length", 65536)]
    options += [(str(k), v) for k, v in json.loads(args.options)]
    raise_nofile()
    with bench_home("conn-floor", False) as config:
        certs = config.home / "certs"
        print(
            f"bare grpc.aio mTLS server, {args.connections:,} held connections, options {options}"
        )
        for streams in (False, True):
            shape = "one idle bidi stream each" if streams else "connected, no RPC"
            figures = [
                held_kib(certs, options, args.connections, streams) for _ in range(args.runs)
            ]
            runs = ", ".join(f"{f:.1f}" for f in figures)
            print(f"  {shape:28} {median(figures):6.1f} KiB/connection (runs {runs})")


if __name__ == "__main__":
    main()
