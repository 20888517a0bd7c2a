"""Core rows: start-up, round trip, pipelined throughput, the 200k-line print flood, crash
recovery and restart."""

from __future__ import annotations

import time

import zmq

from bench_lib.kernels import (
    STARTUP_TIMEOUT,
    STREAM_TIMEOUT,
    Launched,
    Opts,
    check_ok,
    first_result_after,
    launched,
    median,
    ms,
    restart_ready,
    run_cells,
    run_ok,
    send_cell,
    wait_ready,
    wait_reply_or_death,
)
from bench_lib.table import XPYTHON_RAW, Fail, Row, Target, Value, at_least, at_most, probe, section

CORE = section("core", "latency, throughput, flood, crash, restart")

FLOOD_LINES = 200_000
FLOOD = f"for i in range({FLOOD_LINES}): print(i)"


@probe(
    CORE,
    Row("launch_info", "launch → kernel_info_reply (ms, median)", targets=(at_most(0.1),)),
    Row("launch_result", "launch → first `1+1` result (ms, median)"),
)
def probe_launch(kernel: str, opts: Opts) -> dict[str, Value]:
    runs = opts.runs(2, 5)
    infos: list[float] = []
    results: list[float] = []
    result_error: Fail | None = None
    for i in range(runs + 1):  # the first launch only warms caches (pyc, page cache)
        with launched(kernel) as k:
            if i:
                infos.append(ms(k.t_info - k.t_start))
            if result_error:
                continue
            # A failing 1+1 must not hide the kernel_info timing, so it fails its row only.
            try:
                t, _ = first_result_after(k, k.t_start)
                if i:
                    results.append(t)
            except (RuntimeError, TimeoutError) as e:
                result_error = Fail(str(e))
    return {"launch_info": median(infos), "launch_result": result_error or median(results)}


def roundtrips(k: Launched, n: int, pause: float = 0.0, warmup: int = 20) -> list[float]:
    """ms from send to reply + idle of `pass`, n times after `warmup` cells; `pause` s of quiet
    before each (interactive use rather than back to back)."""
    times = []
    for i in range(n + warmup):
        if pause:
            time.sleep(pause)
        [cell] = run_cells(k, ["pass"], timeout=30)
        check_ok([cell])
        if i >= warmup:
            times.append(ms(cell.t_done - cell.t_sent))
    return times


@probe(
    CORE,
    Row(
        "roundtrip",
        "round trip of `pass`, reply + idle (ms, median)",
        fmt="{:.2f}",
        targets=(at_most(0.25), at_most(1, XPYTHON_RAW, "≤ 1 × raw")),
    ),
)
def probe_roundtrip(kernel: str, opts: Opts) -> dict[str, Value]:
    with launched(kernel) as k:
        return {"roundtrip": median(roundtrips(k, opts.runs(50, 200)))}


def pipelined_rate(k: Launched, n: int) -> float:
    """`pass` cells per second, n sent at once (after 10 warm-up cells)."""
    run_cells(k, ["pass"] * 10, timeout=30)
    cells = run_cells(k, ["pass"] * n, timeout=120)
    check_ok(cells)
    end = max(c.t_done for c in cells)
    return n / (end - cells[0].t_sent)


@probe(
    CORE,
    Row(
        "pipelined",
        "pipelined `pass` executes per second",
        fmt="{:.0f}",
        targets=(at_least(4), at_least(1, XPYTHON_RAW, "≥ 1 × raw")),
    ),
)
def probe_pipelined(kernel: str, opts: Opts) -> dict[str, Value]:
    with launched(kernel) as k:
        return {"pipelined": pipelined_rate(k, opts.runs(200, 1000))}


def flood(kernel: str, env: dict[str, str] | None = None) -> tuple[Value, int, Value]:
    """The 200k-line print with the client's RCVHWM at 1000: (ms to idle, stream messages,
    every byte arrived)."""
    expected = "".join(f"{i}\n" for i in range(FLOOD_LINES))
    with launched(kernel, sockopts={zmq.RCVHWM: 1000}, env=env) as k:
        hwm = k.kc.iopub_channel.socket.getsockopt(zmq.RCVHWM)
        if hwm != 1000:
            raise RuntimeError(f"iopub RCVHWM is {hwm}, not 1000")
        # Fully up first: start-up has its own row (kernelvisor answers kernel_info before its
        # worker is up, so without this the flood would include it).
        run_ok(k, "pass", timeout=STARTUP_TIMEOUT)
        # A user's pause before the cell (kernelvisor snapshots before a cell that follows one).
        time.sleep(0.05)
        [cell] = run_cells(k, [FLOOD], timeout=STREAM_TIMEOUT, quiet_after=10)
    check_ok([cell])
    streams = [m for m in cell.iopub if m["msg_type"] == "stream"]
    text = cell.stdout()
    exact: Value = True if text == expected else Fail(f"got {len(text)} of {len(expected)} chars")
    time_: Value = ms(cell.t_idle - cell.t_sent) if cell.t_idle else Fail("idle never arrived")
    return time_, len(streams), exact


@probe(
    CORE,
    Row(
        "stream_time",
        "`print` 200k lines: time to idle (ms)",
        fmt="{:.0f}",
        targets=(at_most(0.33),),
    ),
    Row("stream_msgs", "`print` 200k lines: iopub stream messages", fmt="{:.0f}"),
    Row(
        "stream_exact",
        "`print` 200k lines: every byte arrived (client RCVHWM 1000)",
        targets=(Target("exact", bool, on="value"),),
    ),
)
def probe_stream(kernel: str, opts: Opts) -> dict[str, Value]:
    time_, msgs, exact = flood(kernel)
    return {"stream_time": time_, "stream_msgs": msgs, "stream_exact": exact}


SEGFAULT = "import ctypes; ctypes.string_at(0)"


@probe(
    CORE,
    Row(
        "crash",
        "segfault → next `1+1` result (ms; ipykernel, xeus-python: die, restart_kernel(now=True))",
        fmt="{:.0f}",
        targets=(Target("< 150 ms", lambda v: v < 150, on="value"),),
    ),
    Row("crash_reply", "segfault cell gets a reply (not a death)", fmt="{}"),
)
def probe_crash(kernel: str, opts: Opts) -> dict[str, Value]:
    with launched(kernel) as k:
        run_ok(k, "x = 1")
        time.sleep(1.5)  # kernelvisor warms its spare worker while idle
        t0 = time.perf_counter()
        cell = send_cell(k, SEGFAULT)
        replied = wait_reply_or_death(k, cell, timeout=60)
        if not replied:
            restart_ready(k)
        elif cell.reply is None or cell.reply["content"]["status"] != "error":
            raise RuntimeError("the segfault cell did not fail")
        t, _ = first_result_after(k, t0)
        return {"crash": t, "crash_reply": replied}


@probe(
    CORE,
    Row(
        "restart",
        "restart_kernel() → first `1+1` result (ms, median)",
        fmt="{:.0f}",
        targets=(at_most(0.5),),
    ),
)
def probe_restart(kernel: str, opts: Opts) -> dict[str, Value]:
    times = []
    with launched(kernel) as k:
        run_ok(k, "1+1")
        for _ in range(opts.runs(2, 5)):
            t0 = time.perf_counter()
            k.km.restart_kernel(now=False)
            wait_ready(k.km, k.kc, k.pump)
            times.append(first_result_after(k, t0)[0])
    return {"restart": median(times)}
