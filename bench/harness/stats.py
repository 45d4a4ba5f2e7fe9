"""Statistics and CPU accounting: percentiles and medians of runs, formatting, CPU of this process,
of its threads and of any pid (Linux /proc; psutil is not needed), the machine's busy cores, and
how busy other processes keep a shared machine."""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable

CORE_THREAD = "broker-core"  # thread-name prefix of the broker's core executor
PY_GROUPS = ("event loop (MainThread)", "core thread (broker-core)", "grpc aio poller (py thread)")
TICK = float(os.sysconf("SC_CLK_TCK"))
NCPU = os.cpu_count() or 1


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values by nearest rank; 0 for an empty list."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


@dataclasses.dataclass(frozen=True)
class Cost:
    """An in-process measurement: median and mean wall time and mean CPU per call."""

    name: str
    median: float
    mean: float
    cpu: float
    note: str = ""

    def minus(self, other: Cost, name: str, note: str) -> Cost:
        return Cost(
            name, self.median - other.median, self.mean - other.mean, self.cpu - other.cpu, note
        )

    def scaled(self, factor: float, name: str, note: str) -> Cost:
        return Cost(name, self.median * factor, self.mean * factor, self.cpu * factor, note)


def measure(name: str, note: str, fn: Callable[[int], object], count: int) -> Cost:
    """Wall time of fn(i) for i in range(count), and this process's CPU per call."""
    samples = []
    cpu = time.process_time()
    for i in range(count):
        started = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - started)
    cpu = (time.process_time() - cpu) / max(count, 1)
    return Cost(name, statistics.median(samples), statistics.fmean(samples), cpu, note)


def print_costs(title: str, costs: list[Cost]) -> None:
    print(f"\n{title}")
    print(f"  {'':<42}{'median':>10}{'mean':>10}{'CPU':>10}")
    for c in costs:
        print(f"  {c.name:<42}{us(c.median):>10}{us(c.mean):>10}{us(c.cpu):>10}   {c.note}")


# ---------------------------------------------------------------------------------------------
# CPU and memory (Linux /proc)
# ---------------------------------------------------------------------------------------------
def _stat_cpu(path: str) -> tuple[str, float]:
    with open(path) as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return stat[stat.index("(") + 1 : stat.rindex(")")], (int(fields[11]) + int(fields[12])) / TICK


def process_cpu() -> float:
    t = os.times()
    return t.user + t.system


def pid_cpu(pid: int) -> float:
    """utime + stime of a process (seconds); 0 if it is gone."""
    try:
        return _stat_cpu(f"/proc/{pid}/stat")[1]
    except OSError:
        return 0.0


def pid_memory(pid: int) -> dict[str, int]:
    """VmHWM (peak resident) and VmRSS of a process, in KiB; empty if it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread of this process, grouped by a readable thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    totals: dict[str, float] = defaultdict(float)
    for tid in os.listdir("/proc/self/task"):
        try:
            comm, seconds = _stat_cpu(f"/proc/self/task/{tid}/stat")
        except OSError:
            continue
        totals[_thread_group(names.get(int(tid)), comm)] += seconds
    return dict(totals)


def _thread_group(py_name: str | None, comm: str) -> str:
    if py_name == "MainThread":
        return PY_GROUPS[0]
    if py_name and py_name.startswith(CORE_THREAD):
        return PY_GROUPS[1]
    if py_name and "_poll_wrapper" in py_name:
        return PY_GROUPS[2]
    if py_name:
        return f"py thread {py_name.split(' ')[0]}"
    return f"grpc/native {comm}"


def raise_nofile() -> int:
    """Raise this process's open-file limit to the hard limit (thousands of TLS connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------
def machine_cpu() -> tuple[float, float, float]:
    """(busy, steal, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return float(busy), float(steal), float(busy + idle + iowait + steal)


class MachineWindow:
    """Busy and steal cores of the machine between start (construction) and stop()."""

    def __init__(self) -> None:
        self._start = machine_cpu()
        self.busy = self.steal = 0.0

    def stop(self) -> MachineWindow:
        busy, steal, total = (b - a for a, b in zip(self._start, machine_cpu(), strict=True))
        self.busy = NCPU * busy / total if total else 0.0
        self.steal = NCPU * steal / total if total else 0.0
        return self


def others_busy(pids: list[int], seconds: float = 1.0) -> float:
    """Cores kept busy over `seconds` by processes other than pids (and this one)."""
    ours0 = sum(pid_cpu(p) for p in pids) + process_cpu()
    window = MachineWindow()
    time.sleep(seconds)
    ours1 = sum(pid_cpu(p) for p in pids) + process_cpu()
    return max(0.0, window.stop().busy - (ours1 - ours0) / seconds)


def wait_quiet(pids: list[int], below: float, max_wait: float) -> tuple[float, float]:
    """On a shared machine: wait (up to max_wait s) until other processes use < `below` cores.
    Returns (seconds waited, the last sample of their load in cores)."""
    started = time.monotonic()
    load = others_busy(pids, 0.5)
    while load >= below and time.monotonic() - started < max_wait:
        load = others_busy(pids, 1.0)
    return time.monotonic() - started, load


def listen_overflows() -> int:
    """TcpExt ListenOverflows of this machine (/proc/net/netstat): SYNs dropped because a
    listener's accept queue was full; each costs the client a SYN retransmit (1 s, then 3 s, ...)."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0
