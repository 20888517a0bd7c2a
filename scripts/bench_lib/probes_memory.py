"""Memory rows: what the kernel's whole process tree costs, idle after warm-up and after the
200k-line flood, as summed RSS, PSS (a shared page counted once, split among its sharers) and
USS (pages no other process maps). kernelvisor's PSS cell names its processes."""

from __future__ import annotations

import time

from bench_lib.kernels import STREAM_TIMEOUT, Launched, Opts, kv_info, kv_settled, launched, run_ok
from bench_lib.probes_core import FLOOD
from bench_lib.procs import TreeMemory, tree_memory, wait_quiet_cpu, wakeups_per_second
from bench_lib.table import KERNELVISOR, Row, Shown, Value, at_most, probe, section

MEMORY = section("memory", "the kernel's process tree (MB)")


def kv_roles(k: Launched) -> dict[int, str]:
    """pid -> what it is, for kernelvisor's processes."""
    info = kv_info(k)
    roles = {k.pid: "supervisor"}
    pool = info["pool"]
    if pool.get("main"):
        roles[pool["main"]["pid"]] = "main"
    for w in pool.get("idle", []):
        roles[w["pid"]] = "spare"
    if pool.get("template"):
        roles[pool["template"]["pid"]] = "template"
    snap = info.get("snapshot") or {}
    # Newest first: the one a crash restores, then the one kept for %undo.
    for kept, name in zip(snap.get("kept") or [], ("snapshot", "undo snapshot"), strict=False):
        roles[kept["pid"]] = name
    return roles


def settle(k: Launched, kernel: str) -> None:
    """Idle and steady: kernelvisor's spare worker up, no process busy."""
    if kernel == KERNELVISOR:
        kv_settled(k)
    wait_quiet_cpu(k.pid)
    time.sleep(0.5)


def measured(k: Launched, kernel: str, when: str) -> dict[str, Value]:
    mem: TreeMemory = tree_memory(k.pid)
    pss: Value = mem.pss
    if kernel == KERNELVISOR:
        roles = kv_roles(k)
        parts = ", ".join(
            f"{roles.get(pid, 'other')} {v:.0f}" for pid, v in sorted(mem.by_pid.items())
        )
        pss = Shown(mem.pss, f"{mem.pss:.1f} ({parts})")
    return {f"rss_{when}": mem.rss, f"pss_{when}": pss, f"uss_{when}": mem.uss}


def rows(when: str, label: str) -> list[Row]:
    return [
        Row(f"rss_{when}", f"RSS, {label}"),
        Row(f"pss_{when}", f"PSS, {label}", targets=(at_most(1),)),
        Row(f"uss_{when}", f"USS, {label}"),
    ]


WAKE_SECONDS = 5.0


@probe(
    MEMORY,
    *rows("idle", "idle after warm-up"),
    Row("wakeups", f"idle: wake-ups per second, every thread of the tree ({WAKE_SECONDS:.0f} s)"),
    *rows("flood", "after the 200k-line flood"),
)
def probe_memory(kernel: str, opts: Opts) -> dict[str, Value]:
    with launched(kernel) as k:
        run_ok(k, "1+1", *["pass"] * 20)
        settle(k, kernel)
        out = measured(k, kernel, "idle")
        out["wakeups"] = wakeups_per_second(k.pid, WAKE_SECONDS)
        run_ok(k, FLOOD, timeout=STREAM_TIMEOUT)
        # A pause and one more cell: kernelvisor takes a snapshot once the worker is idle,
        # as it would before the user's next cell.
        time.sleep(0.05)
        run_ok(k, "pass")
        settle(k, kernel)
        out |= measured(k, kernel, "flood")
        return out
