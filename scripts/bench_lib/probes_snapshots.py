"""Snapshot rows (forked snapshots at cell boundaries): whether a segfault keeps the namespace and
how soon a cell using an old variable answers; what snapshots cost kernelvisor (round trip,
pipelined, flood; KERNELVISOR_SNAPSHOTS=on against off, interleaved); the fork's time against the
worker's RSS; and the memory a snapshot holds after a cell rewrites a 1 GB array."""

from __future__ import annotations

import time

import psutil

from bench_lib.kernels import (
    Launched,
    Msg,
    Opts,
    kv_info,
    kv_wait,
    launched,
    median,
    ms,
    restart_ready,
    run_cells,
    run_ok,
    send_cell,
    wait_reply_or_death,
)
from bench_lib.probes_core import SEGFAULT, flood, pipelined_rate, roundtrips
from bench_lib.procs import MB, rss_mb, tree_memory
from bench_lib.table import (
    KERNELVISOR,
    Fail,
    Missing,
    Row,
    Shown,
    Target,
    Value,
    probe,
    section,
)

SNAPSHOTS = section("snapshots", "a crash costs one cell, not the namespace")

# Quiet before a cell: more than kernelvisor's idle gap (10 ms), so a snapshot is taken before
# it, as in interactive use (README "Snapshots").
PAUSE = 0.05
GB = 2**30


@probe(
    SNAPSHOTS,
    Row("snap_kept", "namespace kept after segfault", targets=(Target("yes", bool, on="value"),)),
    Row(
        "snap_crash",
        "segfault → next result that uses an old variable (ms, median)",
        fmt="{:.0f}",
        targets=(Target("≤ 30 ms", lambda v: v <= 30, on="value"),),
    ),
)
def probe_snapshot_crash(kernel: str, opts: Opts) -> dict[str, Value]:
    runs = opts.runs(2, 5) if kernel == KERNELVISOR else 1
    times: list[float] = []
    with launched(kernel) as k:
        run_ok(k, "import ctypes")
        for _ in range(runs):
            run_ok(k, "old = 41")
            time.sleep(PAUSE)
            t0 = time.perf_counter()
            cell = send_cell(k, SEGFAULT)
            if not wait_reply_or_death(k, cell, timeout=60):
                restart_ready(k)
            [after] = run_cells(k, ["old + 1"], timeout=60)
            content = (after.reply or {}).get("content", {})
            if content.get("status") == "ok" and after.result_text() == "42":
                times.append(ms(after.t_first["execute_result"] - t0))
                continue
            # The variable is gone (ipykernel, xeus-python: the kernel died and was restarted).
            how = "restart" if not cell.reply else "reply"
            why = content.get("ename", content.get("status", "no reply"))
            gone = f"gone: {why} ({how} + error in {ms(after.t_done - t0):.0f} ms)"
            return {"snap_kept": False, "snap_crash": gone}
    return {"snap_kept": True, "snap_crash": median(times)}


# --- the cost of snapshots (kernelvisor, on against off) ---------------------------------------


def on_off(on: float, off: float, fmt: str, higher_is_better: bool = False) -> Shown:
    """kernelvisor's cell: on, off, and on's cost relative to off (judged ≤ 1.10)."""
    cost = off / on if higher_is_better else on / off
    return Shown(on, f"{fmt.format(on)} on / {fmt.format(off)} off (×{cost:.2f})", cost)


WITHIN_10 = (Target("on within 10% of off", lambda c: c <= 1.10, on="value"),)


def has_snapshots(info: Msg) -> bool:
    return isinstance(info.get("snapshot"), dict)


@probe(
    SNAPSHOTS,
    Row(
        "cost_rt",
        "round trip of `pass` (ms, median), snapshots on / off",
        targets=WITHIN_10,
    ),
    Row(
        "cost_rt_pause",
        f"round trip of `pass` after {PAUSE * 1000:.0f} ms of quiet (a snapshot before each cell)"
        " (ms, median), on / off",
        targets=WITHIN_10,
    ),
    Row("cost_pipe", "pipelined `pass` executes per second, on / off", targets=WITHIN_10),
    Row("cost_flood", "`print` 200k lines: time to idle (ms), on / off", targets=WITHIN_10),
    kernels=(KERNELVISOR,),
)
def probe_snapshot_cost(kernel: str, opts: Opts) -> dict[str, Value]:
    samples: dict[tuple[str, str], list[float]] = {}

    def add(key: str, mode: str, values: list[float]) -> None:
        samples.setdefault((key, mode), []).extend(values)

    for r in range(opts.runs(1, 3)):
        # Alternate which mode goes first, so that neither always meets a warmer machine.
        for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
            env = {"KERNELVISOR_SNAPSHOTS": mode}
            with launched(kernel, env=env) as k:
                info = kv_info(k)
                if not has_snapshots(info):
                    why = Missing("this build has no snapshots")
                    return dict.fromkeys(
                        ("cost_rt", "cost_rt_pause", "cost_pipe", "cost_flood"), why
                    )
                if info["snapshot"]["enabled"] != (mode == "on"):
                    raise RuntimeError(f"KERNELVISOR_SNAPSHOTS={mode} not in effect")
                add("rt", mode, roundtrips(k, opts.runs(50, 150)))
                add("rt_pause", mode, roundtrips(k, opts.runs(10, 30), pause=PAUSE, warmup=5))
                if mode == "on":
                    kv_wait(k, lambda i: i["snapshot"]["ready"], "a snapshot")
                add("pipe", mode, [pipelined_rate(k, opts.runs(200, 1000))])
            time_, _, exact = flood(kernel, env=env)
            if not isinstance(time_, float) or exact is not True:
                raise RuntimeError(f"flood with snapshots {mode}: {time_}, {exact}")
            add("flood", mode, [time_])

    def cell(key: str, fmt: str, higher: bool = False) -> Shown:
        return on_off(median(samples[key, "on"]), median(samples[key, "off"]), fmt, higher)

    return {
        "cost_rt": cell("rt", "{:.2f}"),
        "cost_rt_pause": cell("rt_pause", "{:.2f}"),
        "cost_pipe": cell("pipe", "{:.0f}", higher=True),
        "cost_flood": cell("flood", "{:.0f}"),
    }


# --- fork time and memory ----------------------------------------------------------------------


SIZES = [("fork_100m", "100 MB", 100 * MB), ("fork_1g", "1 GB", GB), ("fork_4g", "4 GB", 4 * GB)]


def fresh_snapshot(k: Launched, after_seq: int) -> Msg:
    """A pause and a cell, so that kernelvisor snapshots before it; that snapshot's info."""
    time.sleep(PAUSE)
    run_ok(k, "pass")

    def ready(i: Msg) -> bool:
        return bool(i["snapshot"]["ready"] and (i["snapshot"]["seq"] or 0) > after_seq)

    return dict(kv_wait(k, ready, "a new snapshot")["snapshot"])


def main_pid(k: Launched) -> int:
    return int(kv_info(k)["pool"]["main"]["pid"])


def rewrite(k: Launched, seq: int) -> tuple[Value, int]:
    """A snapshot shares `_kvb_a` (1 GB); a cell rewrites every page of it. The snapshot's USS
    then, the tree's PSS growth, and the snapshot's USS once the next cell's snapshot replaced
    it. Returns the value and the last seq."""
    snap = fresh_snapshot(k, seq)
    before = tree_memory(k.pid)
    time.sleep(PAUSE)
    run_ok(k, "_kvb_a[:] = 2", timeout=120)
    # The snapshot taken right before the rewrite holds the old pages.
    held = dict(
        kv_wait(k, lambda i: (i["snapshot"]["seq"] or 0) > snap["seq"], "a snapshot")["snapshot"]
    )
    after = tree_memory(k.pid)
    uss = (held["private_bytes"] or 0) / MB
    nxt = fresh_snapshot(k, held["seq"])
    old_pid = held["pid"]
    deadline = time.perf_counter() + 10
    while psutil.pid_exists(old_pid) and time.perf_counter() < deadline:
        time.sleep(0.05)
    then = (dict(kv_info(k)["snapshot"])["private_bytes"] or 0) / MB
    text = (
        f"{uss:.0f} (tree PSS +{after.pss - before.pss:.0f}; "
        f"after the next cell's snapshot: {then:.0f})"
    )
    return Shown(uss, text), int(nxt["seq"])


# Two ways to hold `size` bytes, every page written. numpy asks for transparent huge pages for
# large arrays (madvise), which makes page tables, and so forks, small; Python objects and most
# other memory sit on 4 KiB pages, which is what a private anonymous mmap with MADV_NOHUGEPAGE
# gives (private: a shared mapping's page tables are not copied at fork, and its writes would
# reach the snapshot).
ALLOC_HUGE = "_kvb_free()\n_kvb_a = np.ones({size}, dtype=np.uint8)"
ALLOC_SMALL = """\
_kvb_free()
_kvb_m = mmap.mmap(-1, {size}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
_kvb_m.madvise(mmap.MADV_NOHUGEPAGE)
_kvb_a = np.frombuffer(_kvb_m, dtype=np.uint8)
_kvb_a[:] = 1
"""
SETUP = """\
import mmap
import numpy as np
_kvb_a = _kvb_m = None
def _kvb_free():
    global _kvb_a, _kvb_m
    _kvb_a = None
    if _kvb_m is not None:
        _kvb_m.close()
    _kvb_m = None
"""


@probe(
    SNAPSHOTS,
    *(
        Row(
            key,
            f"snapshot's fork time, worker holding {label} (ms, median):"
            " numpy's huge pages / 4 KiB pages",
        )
        for key, label, _ in SIZES
    ),
    Row(
        "rewrite_1g",
        "extra memory after a cell rewrites a 1 GB array: the snapshot's USS (MB)",
        fmt="{:.0f}",
    ),
    kernels=(KERNELVISOR,),
)
def probe_snapshot_memory(kernel: str, opts: Opts) -> dict[str, Value]:
    out: dict[str, Value] = {}
    keys = [key for key, _, _ in SIZES] + ["rewrite_1g"]
    with launched(kernel) as k:
        info = kv_info(k)
        if not has_snapshots(info):
            return dict.fromkeys(keys, Missing("this build has no snapshots"))
        run_ok(k, SETUP)
        seq = int(fresh_snapshot(k, -1)["seq"])

        def forks(alloc: str, size: int) -> tuple[float, float]:
            """Median fork ms and the worker's RSS (MB) once it holds `size` bytes."""
            nonlocal seq
            run_ok(k, alloc.format(size=size), timeout=120)
            times = []
            for _ in range(opts.runs(2, 5)):
                snap = fresh_snapshot(k, seq)
                seq = int(snap["seq"])
                times.append(float(snap["fork_ms"]))
            return median(times), rss_mb(main_pid(k))

        for key, _, size in SIZES:
            avail = psutil.virtual_memory().available
            # The worker's array, and the previous one that its snapshot still holds.
            if avail < 1.5 * size + 2 * GB:
                out[key] = Missing(f"{avail / GB:.1f} GiB free")
                continue
            huge, rss = forks(ALLOC_HUGE, size)
            if key == "fork_1g":
                try:
                    out["rewrite_1g"], seq = rewrite(k, seq)
                except (RuntimeError, TimeoutError) as e:
                    out["rewrite_1g"] = Fail(str(e)[:80])
            small, _ = forks(ALLOC_SMALL, size)
            text = f"{huge:.1f} / {small:.1f} (worker RSS {rss:.0f} MB)"
            out[key] = Shown(huge, text)
        run_ok(k, "_kvb_free()")
    return out
