"""Process memory for the bench: RSS, PSS and USS summed over a kernel's process tree, and the
peak RSS of chosen processes over an interval (the kernel's VmHWM, reset through clear_refs)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

MB = 2**20


@dataclass
class TreeMemory:
    rss: float  # MB, summed
    pss: float
    uss: float
    by_pid: dict[int, float]  # pid -> PSS (MB)


def tree_pids(pid: int) -> list[int]:
    root = psutil.Process(pid)
    return [root.pid, *(p.pid for p in root.children(recursive=True))]


def tree_memory(pid: int) -> TreeMemory:
    """Summed over the process and all its descendants (memory_full_info: smaps_rollup)."""
    rss = pss = uss = 0
    by_pid: dict[int, float] = {}
    for p in tree_pids(pid):
        try:
            m = psutil.Process(p).memory_full_info()
        except psutil.NoSuchProcess:
            continue
        rss, pss, uss = rss + m.rss, pss + m.pss, uss + m.uss
        by_pid[p] = m.pss / MB
    return TreeMemory(rss / MB, pss / MB, uss / MB, by_pid)


def _voluntary_switches(pids: list[int]) -> int:
    """Voluntary context switches so far of every thread of ``pids`` (each one a sleep that
    something woke)."""
    total = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                status = (task / "status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def wakeups_per_second(pid: int, seconds: float) -> float:
    """How often the threads of the process tree are woken, per second over `seconds`: what
    an idle kernel costs a laptop's battery."""
    pids = tree_pids(pid)
    before = _voluntary_switches(pids)
    time.sleep(seconds)
    return (_voluntary_switches(pids) - before) / seconds


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MB


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


class PeakRss:
    """Peak RSS of each process between start() and stop(), with the RSS at start().

    Exact where the kernel lets us reset the high-water mark (writing 5 to clear_refs, Linux
    4.0+, own processes); otherwise sampled every 5 ms on a thread."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.before: dict[int, float] = {}
        self.peak: dict[int, float] = {}
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self.exact = True

    def start(self) -> None:
        for pid in self.pids:
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                self.exact = False
            self.before[pid] = _status_kb(pid, "VmRSS") / 1024
        self.peak = dict(self.before)
        if not self.exact:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._take("VmRSS")

    def _take(self, field: str) -> None:
        for pid in self.pids:
            try:
                self.peak[pid] = max(self.peak[pid], _status_kb(pid, field) / 1024)
            except (OSError, RuntimeError):
                pass

    def stop(self) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
        self._take("VmHWM" if self.exact else "VmRSS")


def wait_quiet_cpu(pid: int, seconds: float = 0.3, timeout: float = 10.0) -> None:
    """Until the tree used under 5% of a core for `seconds` (a spare worker done starting)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        procs = [psutil.Process(p) for p in tree_pids(pid)]
        t0 = sum(sum(p.cpu_times()[:2]) for p in procs)
        time.sleep(seconds)
        try:
            t1 = sum(sum(p.cpu_times()[:2]) for p in procs)
        except psutil.NoSuchProcess:
            continue
        if t1 - t0 < 0.05 * seconds:
            return
