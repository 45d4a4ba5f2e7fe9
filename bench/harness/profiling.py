"""Profiling hook: py-spy (when installed: `pip install py-spy`, or --py-spy PATH) samples benchmark
processes during extra, untimed runs; the raw stacks are summarised per thread."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench.harness.stats import CORE_THREAD

T = TypeVar("T")
# (flavour, py-spy flags): every running thread without pausing, or only the GIL holder.
PROFILES = (("threads", ["--threads", "--nonblocking"]), ("gil", ["--threads", "--gil"]))
BORING = (
    "threading.py",
    "concurrent/futures",
    "asyncio/base_events.py",
    "asyncio/runners.py",
    "multiprocessing/",
    "<module>",
    "bench/",
    "asyncio/events.py",
    "selectors.py",
    "contextlib.py",
)


def py_spy_binary(explicit: str | None) -> str | None:
    """py-spy from --py-spy, next to this interpreter (the venv), or PATH; None: not installed."""
    if explicit:
        return explicit
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class Spy:
    """py-spy recording each of `targets` (name -> pid) to DIR/<prefix>-<name>-<flavour>.txt."""

    def __init__(
        self,
        py_spy: str,
        out: Path,
        prefix: str,
        targets: dict[str, int],
        flags: list[str],
        flavour: str,
        rate: int = 250,
    ) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.raw: dict[str, Path] = {}
        self._procs: list[subprocess.Popen[bytes]] = []
        for name, pid in targets.items():
            raw = self.raw[name] = out / f"{prefix}-{name}-{flavour}.txt"
            self._procs.append(
                subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--rate",
                        str(rate),
                        "--format",
                        "raw",
                        "--output",
                        str(raw),
                        *flags,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(1.0)  # let it attach

    def stop(self, top: int = 12, threads_shown: int = 4) -> None:
        for proc in self._procs:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
        for name, raw in self.raw.items():
            print(f"   {name} ({raw}):")
            if raw.exists():
                summarize_profile(raw, top, threads_shown)


def summarize_profile(raw: Path, top: int = 12, threads_shown: int = 4) -> None:
    """Per thread: its share of samples, its hottest frames (inclusive) and leaves (self)."""
    threads: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    leaves: dict[str, Counter[str]] = defaultdict(Counter)
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = "?"
        if frames[0].startswith("thread ("):
            thread = frames.pop(0).split(": ", 1)[-1]
            thread = "core thread" if thread.startswith(CORE_THREAD) else thread
        threads[thread] += count
        total += count
        if frames:
            leaves[thread][frames[-1][:110]] += count
        for frame in {f.split(" (")[0] for f in frames if not any(b in f for b in BORING)}:
            inclusive[thread][frame[:90]] += count
    if not total:
        print("    (no samples)")
        return
    for thread, count in threads.most_common(threads_shown):
        print(f"    {thread}: {100 * count / total:.0f}% of samples")
        for frame, n in inclusive[thread].most_common(top):
            print(f"      incl {100 * n / total:5.1f}%  {frame}")
        for frame, n in leaves[thread].most_common(6):
            print(f"      self {100 * n / total:5.1f}%  {frame}")


def profiled_runs(
    py_spy: str,
    out: Path,
    prefix: str,
    pid: int,
    run: Callable[[int], T],
    report: Callable[[str, T], None],
) -> list[T]:
    """One extra run(k) per profile flavour with py-spy on the broker (pid); report(flavour,
    result) prints it before the profile's summary."""
    results: list[T] = []
    for k, (flavour, flags) in enumerate(PROFILES):
        spy = Spy(py_spy, out, prefix, {"broker": pid}, flags, flavour)
        results.append(run(k))
        report(flavour, results[-1])
        spy.stop()
    return results
