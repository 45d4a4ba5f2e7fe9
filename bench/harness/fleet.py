"""The client fleet: spawned client processes that answer commands over a pipe, and what runs in
them: the unmodified SDK clients (DeviceClient, AppClient, simcam.SimulatedCamera) over the
identity directories provisioning wrote, frames stamped with CLOCK_MONOTONIC for added latency,
backoff with jitter, and a command loop.

A client process is ``spawn_clients(setup, [args...])``: each process runs ``setup(*args)`` (an
async, module-level function) that returns its handlers by command name; then the parent sends
``(name, *params)`` and gets the handler's result. A handler that returns ``Deferred(fn)`` is a
two-phase, timed command: the process answers "ready", and runs ``fn()`` only on "go", so every
process starts at once and the parent can sample the broker just before."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import multiprocessing as mp
import os
import random
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import grpc

from bench.harness.provision import App, Camera
from bench.harness.stats import MachineWindow, pid_cpu, raise_nofile

Handlers = dict[str, Callable[..., Any]]


class Deferred:
    """A timed command's body, run when the parent says "go"."""

    def __init__(self, fn: Callable[[], Awaitable[Any]]) -> None:
        self.fn = fn


def _client_main(
    conn: Connection, setup: Callable[..., Awaitable[Handlers]], args: tuple[Any, ...]
) -> None:
    raise_nofile()
    asyncio.run(_command_loop(conn, setup, args))


async def _command_loop(
    conn: Connection, setup: Callable[..., Awaitable[Handlers]], args: tuple[Any, ...]
) -> None:
    loop = asyncio.get_running_loop()
    handlers = await setup(*args)
    conn.send(("ready", os.getpid()))
    while True:
        command = await loop.run_in_executor(None, conn.recv)
        if command is None:
            break
        result = handlers[command[0]](*command[1:])
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, Deferred):
            conn.send("ready")
            if await loop.run_in_executor(None, conn.recv) != "go":
                raise RuntimeError("expected go")
            result = await result.fn()
        conn.send(result)
    if "close" in handlers:
        await handlers["close"]()


class Clients:
    """Client processes, one per entry of per_process (the args of setup)."""

    def __init__(
        self,
        setup: Callable[..., Awaitable[Handlers]],
        per_process: list[tuple[Any, ...]],
        names: list[str] | None = None,
        ready_timeout: float = 300,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.names = names or [f"client{i}" for i in range(len(per_process))]
        self._procs: list[tuple[mp.process.BaseProcess, Connection]] = []
        for name, args in zip(self.names, per_process, strict=True):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_client_main, args=(child, setup, args), name=name, daemon=True
            )
            proc.start()
            self._procs.append((proc, parent))
        self.pids = [int(self._recv(conn, ready_timeout)[1]) for _, conn in self._procs]

    def __len__(self) -> int:
        return len(self._procs)

    @staticmethod
    def _recv(conn: Connection, timeout: float) -> Any:
        if not conn.poll(timeout):
            raise RuntimeError("a client process did not answer")
        return conn.recv()

    def ask(self, index: int, *command: Any, timeout: float = 300) -> Any:
        conn = self._procs[index][1]
        conn.send(command)
        return self._recv(conn, timeout)

    def ask_all(self, *command: Any, timeout: float = 300) -> list[Any]:
        for _, conn in self._procs:
            conn.send(command)
        return [self._recv(conn, timeout) for _, conn in self._procs]

    def timed(
        self,
        commands: list[tuple[Any, ...]],
        before: Callable[[], None] = lambda: None,
        timeout: float = 600,
    ) -> list[Any]:
        """Send each process its (Deferred-returning) command, wait until all are ready, call
        before(), then "go" to all at once; returns their results."""
        for (_, conn), command in zip(self._procs, commands, strict=True):
            conn.send(command)
        for _, conn in self._procs:
            if self._recv(conn, 120) != "ready":
                raise RuntimeError("client not ready")
        before()
        for _, conn in self._procs:
            conn.send("go")
        return [self._recv(conn, timeout) for _, conn in self._procs]

    def stop(self) -> None:
        for _, conn in self._procs:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc, _ in self._procs:
            proc.join(15)
            if proc.is_alive():
                proc.kill()


def split(items: list[Any], count: int) -> list[list[Any]]:
    """items dealt round robin to count processes."""
    return [items[i::count] for i in range(count)]


# ---------------------------------------------------------------------------------------------
# SDK clients and simulated cameras (run inside client processes)
# ---------------------------------------------------------------------------------------------
def device_client(camera: Camera, addresses: tuple[str, str], ca_pem: bytes) -> Any:
    """The SDK's DeviceClient on the identity directory; addresses: (bootstrap, main)."""
    from broker.client.device import DeviceClient, Endpoints

    return DeviceClient(camera.dir, Endpoints(*addresses), ca_pem)


def app_client(app: App, addresses: tuple[str, str], ca_pem: bytes) -> Any:
    """The SDK's AppClient on the identity directory; addresses: (bootstrap, main)."""
    from broker.client.app import AppClient
    from broker.client.device import Endpoints

    return AppClient(app.dir, Endpoints(*addresses), ca_pem)


def stamped_payload(
    device_id: str, session_id: str, sequence: int, stamp_ns: int, size: int
) -> bytes:
    """simcam.frame_payload with a CLOCK_MONOTONIC stamp (ns) as the first padding field:
    ``device_id|session_id|sequence|stamp|....``; simcam.parse_payload still reads it."""
    head = f"{device_id}|{session_id}|{sequence}|{stamp_ns}|".encode()
    return head + b"." * max(0, size - len(head))


def parse_stamp(plaintext: bytes) -> int:
    """The monotonic stamp (ns) stamped_payload wrote."""
    return int(plaintext.split(b"|", 4)[3])


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(attempt-1)))."""
    return random.uniform(0, min(cap, base * 2 ** max(0, attempt - 1)))


def stamped_camera(client: Any, fps: float, frame_bytes: int, random_phase: bool = True) -> Any:
    """simcam.SimulatedCamera whose frames carry a monotonic stamp taken just before the frame is
    handed to the SDK (AttachSession.send_frame seals and writes it), sent on a fixed schedule
    (no drift), starting at a random phase of the frame interval unless random_phase is False
    (then every stream starts in step: the worst case). ``late`` collects how late each frame
    left versus its schedule (seconds): when that grows, the client process is saturated."""
    from broker.client.simcam import SimulatedCamera

    class StampedCamera(SimulatedCamera):
        late: list[float]

        async def _stream(self, session: Any, stream: Any) -> None:
            interval = 1.0 / self.fps
            device_id = self.client.state.device_id
            due = time.monotonic()
            if random_phase:  # independent cameras: frame clocks not in step with each other
                due += random.uniform(0, interval)
                await asyncio.sleep(due - time.monotonic())
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                while True:
                    self.late.append(time.monotonic() - due)
                    sequence = stream.sealer.sequence + 1
                    await session.send_frame(
                        stream,
                        stamped_payload(
                            device_id,
                            stream.session_id,
                            sequence,
                            time.monotonic_ns(),
                            self.frame_bytes,
                        ),
                    )
                    self.stats.frames_sent += 1
                    due += interval
                    delay = due - time.monotonic()
                    if delay < -interval:  # more than a frame behind: skip, do not burst
                        due = time.monotonic()
                        delay = 0.0
                    await asyncio.sleep(max(0.0, delay))

    camera = StampedCamera(client, fps=fps, frame_bytes=frame_bytes)
    camera.late = []
    return camera


def count_unretrieved(counts: Any, key: str = "SDK write errors nobody retrieved") -> None:
    """On the running loop, count (instead of printing) "Task exception was never retrieved":
    the SDK's shielded writes fail that way when their caller already left (a failed Attach).
    Every other loop error keeps the default handler."""
    loop = asyncio.get_running_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith("Task exception was never retrieved"):
            counts[key] += 1
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def measured_window(
    tasks: list[asyncio.Task[Any]],
    everyone: asyncio.Event,
    started: float,
    warmup: float,
    duration: float,
    window: list[float],
    pids: list[int],
    latencies: list[int],
    watchers: list[Any],
) -> dict[str, Any]:
    """The watchers' measured window (relay benchmarks): wait until every watcher has its first
    frame (bounded), warm up, then set window to [start, end] (the watchers record latencies
    inside it) and sample the processes' CPU and the machine around it; stop the watchers."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(everyone.wait(), 60)
    setup = time.monotonic() - started
    await asyncio.sleep(warmup)
    cpu0 = {pid: pid_cpu(pid) for pid in pids}
    machine = MachineWindow()
    window[:] = [time.monotonic(), time.monotonic() + duration]
    await asyncio.sleep(duration)
    wall = time.monotonic() - window[0]
    cpu = {pid: pid_cpu(pid) - cpu0[pid] for pid in pids}
    machine.stop()
    await asyncio.wait(tasks, timeout=10)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "latencies": latencies,
        "wall": wall,
        "setup": setup,
        "cpu": cpu,
        "watchers": [dataclasses.asdict(w) for w in watchers],
        "machine": machine.busy,
        "steal": machine.steal,
    }
