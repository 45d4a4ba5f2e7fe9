"""Unary load: C calls in flight from client processes, and one run's figures (calls/s, latency,
the broker's CPU per call split by thread, the core thread's busy share and queue wait, client
CPU, the machine's busy cores and what other processes used), printed the same way by every
unary benchmark."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc

from bench.harness.fleet import Clients
from bench.harness.stats import NCPU, PY_GROUPS, MachineWindow, median, ms, pct, process_cpu, us


async def drive(call: Callable[[int], Awaitable[None]], n: int, concurrency: int) -> dict[str, Any]:
    """call(i) for i in range(n), `concurrency` at a time; latencies of the successes and error
    counts (gRPC status name, or BAD_RESPONSE for a ValueError)."""
    it = iter(range(n))
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def worker() -> None:
        for i in it:
            started = time.perf_counter()
            try:
                await call(i)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
                continue
            except ValueError:
                errors["BAD_RESPONSE"] += 1
                continue
            latencies.append(time.perf_counter() - started)

    cpu0 = process_cpu()
    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "start": start,
        "end": time.monotonic(),
        "latencies": latencies,
        "errors": dict(errors),
        "cpu": process_cpu() - cpu0,
    }


@dataclasses.dataclass
class UnaryRun:
    n: int
    ok: int
    errors: dict[str, int]
    wall: float
    latencies: list[float]
    server_cpu: float
    threads: dict[str, float]
    core_calls: int
    core_batches: int
    core_busy: float
    core_waited: float
    client_cpu: float
    machine_busy: float
    steal: float
    extra: dict[str, int]  # summed counters the clients return besides the standard ones
    db_cpu: float = 0.0  # CPU of a separate database server (PostgreSQL) during the run

    @property
    def rate(self) -> float:
        return self.ok / self.wall if self.wall else 0.0

    @property
    def p50(self) -> float:
        return pct(self.latencies, 0.50)

    @property
    def p99(self) -> float:
        return pct(self.latencies, 0.99)

    @property
    def others(self) -> float:
        """Cores kept busy by processes other than this benchmark's (a shared machine)."""
        own = (self.server_cpu + self.client_cpu + self.db_cpu) / self.wall if self.wall else 0.0
        return max(0.0, self.machine_busy - own)

    @property
    def python_cpu(self) -> float:
        """CPU of the broker's Python threads: work that needs its one GIL, so cannot overlap."""
        return sum(v for k, v in self.threads.items() if k in PY_GROUPS)


STANDARD = {"start", "end", "latencies", "errors", "cpu"}


class Sampled(Protocol):
    """What run_load samples around a run: a BrokerChild, a ServeChild, or a peer server whose
    stats() give the same keys ("cpu", "threads", the core_* counters)."""

    def stats(self) -> dict[str, Any]: ...


def run_load(
    broker: Sampled, clients: Clients, commands: list[tuple[Any, ...]], n: int
) -> UnaryRun:
    """One timed run: every client process gets its command; broker and machine sampled around."""
    sample: dict[str, Any] = {}

    def before() -> None:
        sample["broker"] = broker.stats()
        sample["machine"] = MachineWindow()

    results = clients.timed(commands, before)
    machine = sample["machine"].stop()
    b0, b1 = sample["broker"], broker.stats()
    errors: Counter[str] = Counter()
    extra: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
        extra.update({k: v for k, v in r.items() if k not in STANDARD})
    latencies = [x for r in results for x in r["latencies"]]
    threads = {k: v - b0["threads"].get(k, 0.0) for k, v in b1["threads"].items()}
    return UnaryRun(
        n=n,
        ok=len(latencies),
        errors=dict(errors),
        wall=max(r["end"] for r in results) - min(r["start"] for r in results),
        latencies=latencies,
        server_cpu=b1["cpu"] - b0["cpu"],
        threads={k: v for k, v in threads.items() if v > 0},
        **{k: b1[k] - b0[k] for k in ("core_calls", "core_batches", "core_busy", "core_waited")},
        client_cpu=sum(r["cpu"] for r in results),
        machine_busy=machine.busy,
        steal=machine.steal,
        extra=dict(extra),
    )


def print_run(index: int, r: UnaryRun, unit: str) -> None:
    print(
        f"  run {index}: {r.rate:8,.0f} {unit}  ok={r.ok}/{r.n} err={sum(r.errors.values())}"
        f"  p50={ms(r.p50)} p99={ms(r.p99)}  server {us(r.server_cpu / max(r.ok, 1))} CPU/call"
        f"  core busy {100 * r.core_busy / r.wall if r.wall else 0:3.0f}%"
        f"  machine {r.machine_busy:.2f}/{NCPU} cores (steal {r.steal:.2f}, other processes "
        f"{r.others:.2f})"
    )
    if r.errors:
        print(f"         errors: {r.errors}")


def print_breakdown(runs: list[UnaryRun], unit: str) -> None:
    """The median of the runs and where the time went, summed over them."""
    rates = [r.rate for r in runs]
    print(
        f"  MEDIAN of {len(runs)}: {median(rates):,.0f} {unit}  p50={ms(median([r.p50 for r in runs]))}"
        f"  p99={ms(median([r.p99 for r in runs]))}  (min {min(rates):,.0f}/s, max "
        f"{max(rates):,.0f}/s)"
    )
    ok = sum(r.ok for r in runs) or 1
    threads: Counter[str] = Counter()
    for r in runs:
        threads.update(r.threads)
    server = sum(r.server_cpu for r in runs)
    client_cpu = sum(r.client_cpu for r in runs)
    core_busy = sum(r.core_busy for r in runs)
    core_calls = sum(r.core_calls for r in runs) or 1
    batches = sum(r.core_batches for r in runs) or 1
    wall = sum(r.wall for r in runs)
    python = sum(r.python_cpu for r in runs)
    print(
        f"  where the time goes: server CPU {us(server / ok)}/call "
        f"({us(python / ok)} in Python threads), clients {us(client_cpu / ok)}/call"
    )
    for name, seconds in threads.most_common():
        if seconds / ok >= 2e-6:
            print(
                f"      {name:<30}{us(seconds / ok):>9}/call  ({100 * seconds / wall:3.0f}% of a core)"
            )
    print(
        f"    core thread: {core_calls / ok:.1f} jobs/call, {us(core_busy / core_calls)} busy per "
        f"job (wall in the call, GIL waits included, COMMIT not), queue wait "
        f"{us(sum(r.core_waited for r in runs) / core_calls)}, {core_calls / batches:.1f} "
        f"jobs/COMMIT, busy {100 * core_busy / wall:.0f}% of wall"
    )
    print(
        f"    ceilings: core thread alone {ok / core_busy if core_busy else 0:,.0f}/s; "
        f"one GIL ({us(python / ok)}/call) {ok / python if python else 0:,.0f}/s; "
        f"{NCPU} cores / (server+client CPU) {NCPU * ok / ((server + client_cpu) or 1):,.0f}/s"
    )


def summary_header() -> str:
    return (
        f"{'runs':>5}{'median/s':>10}{'min/s':>8}{'max/s':>8}{'p50':>9}{'p99':>9}"
        f"{'srv CPU':>10}{'GIL cap/s':>10}{'CPU cap/s':>10}{'errors':>7}{'others':>7}"
    )


def summary_row(runs: list[UnaryRun]) -> str:
    rates = [r.rate for r in runs]
    ok = sum(r.ok for r in runs) or 1
    python = sum(r.python_cpu for r in runs)
    return (
        f"{len(runs):>5}{median(rates):>10,.0f}{min(rates):>8,.0f}{max(rates):>8,.0f}"
        f"{ms(median([r.p50 for r in runs])):>9}{ms(median([r.p99 for r in runs])):>9}"
        f"{us(sum(r.server_cpu for r in runs) / ok):>10}"
        f"{ok / python if python else 0:>10,.0f}"
        f"{NCPU * ok / (sum(r.server_cpu + r.client_cpu for r in runs) or 1):>10,.0f}"
        f"{sum(sum(r.errors.values()) for r in runs):>7}"
        f"{median([r.others for r in runs]):>7.2f}"
    )
