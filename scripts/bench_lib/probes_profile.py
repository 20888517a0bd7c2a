"""Profile rows (kernelvisor only): where the round trip of `pass` goes. The kernel runs with
KERNELVISOR_TIMINGS (src/timings.rs, worker_py/kernelvisor/timings.py): the supervisor and
the worker write per-cell timestamps on CLOCK_MONOTONIC, the clock of the client's
perf_counter(), so each cell's round trip splits into

- client ↔ supervisor: jupyter_client and ZeroMQ both ways (the request in, the reply and the
  idle status out, with the supervisor's ZeroMQ I/O thread);
- supervisor: its own work on the request (parse, verify, plan, sign) and on the reply;
- IPC: the Unix socket both ways (sends, wake-ups, reads; the reply's encoding included);
- worker: the executor around IPython (reading the request, the reply's content);
- IPython: transform_cell, run_cell and the post-run events, for `pass`.

Medians of each part over the cells (they need not add up to the median round trip). Also the
CPU time each process spends per cell, and the machine's floor under a hop between two
processes (a Unix-socket echo, back to back and after a sleep: what waking another CPU costs)."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_lib.kernels import Launched, Opts, check_ok, kv_info, launched, run_cells
from bench_lib.table import KERNELVISOR, Row, Shown, Value, probe, section

PROFILE = section("profile", "where kernelvisor's `pass` round trip goes (timestamps)")

PARTS = [
    ("split_total", "round trip (this probe's cells)"),
    ("split_client", "client ↔ supervisor: jupyter_client + ZeroMQ, both ways"),
    ("split_supervisor", "supervisor's own work (request + reply)"),
    ("split_ipc", "IPC: Unix socket both ways, wake-ups included"),
    ("split_worker", "worker around IPython (read, reply)"),
    ("split_ipython", "IPython: transform_cell + run_cell + events"),
]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read(path: Path, kind: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        what, key, *rest = line.split("\t")
        if what == kind:
            rows[key] = rest
    return rows


def split(k: Launched, timings: Path, n: int) -> dict[str, Value]:
    """Runs n `pass` cells one after another (after 20 warm-up cells) and splits them."""
    for _ in range(20):
        check_ok(run_cells(k, ["pass"], timeout=30))
    main = kv_info(k)["pool"]["main"]
    pids = [k.pid, int(main["pid"])] if main else [k.pid]
    cpu0 = [_cpu_seconds(p) for p in pids]
    cells = []
    for _ in range(n):
        [cell] = run_cells(k, ["pass"], timeout=30)
        check_ok([cell])
        cells.append(cell)
    cpu = [(_cpu_seconds(p) - c) / n * 1e6 for p, c in zip(pids, cpu0, strict=True)]
    time.sleep(0.2)  # the last lines are written after the reply
    sup = timings / "supervisor.tsv"
    # msg_id -> id, recv, sent
    execs = {row[0]: [sid, *row[1:]] for sid, row in _read(sup, "exec").items()}
    replies = _read(sup, "reply")  # id -> heard, out
    workers: dict[str, list[str]] = {}
    for f in timings.glob("worker-*.tsv"):
        workers.update(_read(f, "cell"))  # id -> in, ipy0, ipy1, reply0, out
    parts: dict[str, list[float]] = {key: [] for key, _ in PARTS}
    for c in cells:
        ex = execs.get(c.msg_id)
        if ex is None:
            continue
        sid = ex[0]
        if sid not in replies or sid not in workers:
            continue
        recv, sent = (int(x) for x in ex[1:3])
        heard, out = (int(x) for x in replies[sid][:2])
        w_in, ipy0, ipy1, rep0, _w_out = (int(x) for x in workers[sid][:5])
        total = (c.t_done - c.t_sent) * 1e9
        us = 1e-3
        parts["split_total"].append(total * us)
        parts["split_client"].append((total - (out - recv)) * us)
        parts["split_supervisor"].append(((sent - recv) + (out - heard)) * us)
        parts["split_ipc"].append(((w_in - sent) + (heard - rep0)) * us)
        parts["split_worker"].append(((ipy0 - w_in) + (rep0 - ipy1)) * us)
        parts["split_ipython"].append((ipy1 - ipy0) * us)
    if len(parts["split_total"]) < n // 2:
        raise RuntimeError(f"timestamps for {len(parts['split_total'])} of {n} cells")
    result: dict[str, Value] = {key: statistics.median(v) for key, v in parts.items()}
    result["cpu_supervisor"] = cpu[0]
    if len(cpu) > 1:
        result["cpu_worker"] = cpu[1]
    return result


@probe(
    PROFILE,
    *(Row(key, f"split: {label} (µs, median)", "{:.0f}", ratios=False) for key, label in PARTS),
    Row("cpu_supervisor", "CPU per `pass` cell: supervisor (µs)", "{:.0f}", ratios=False),
    Row("cpu_worker", "CPU per `pass` cell: main worker (µs)", "{:.0f}", ratios=False),
    kernels=(KERNELVISOR,),
)
def probe_profile(kernel: str, opts: Opts) -> dict[str, Value]:
    with (
        tempfile.TemporaryDirectory(prefix="kv-timings-") as tmp,
        launched(kernel, env={"KERNELVISOR_TIMINGS": tmp}) as k,
    ):
        return split(k, Path(tmp), opts.runs(200, 1000))


# The machine's floor under any hop between two processes: a peer process echoes 600 bytes
# over a Unix socket. Back to back, the two wake each other on CPUs that are running; after a
# sleep, the wake-up lands on an idle CPU, which on a VM without a cpuidle driver is a halted
# vCPU. Against the split's IPC line: what of it is the socket, and what is software.
ECHO = """
import os, socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
while True:
    d = s.recv(4096)
    if not d:
        break
    s.sendall(d)
"""


def hop_us(gap: float, n: int) -> float:
    """Median µs of a 600-byte round trip to an echoing process, `gap` seconds asleep before
    each."""
    mine, theirs = socket.socketpair()
    peer = subprocess.Popen(
        [sys.executable, "-c", ECHO, str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    try:
        data = b"x" * 600
        times = []
        for _ in range(n):
            if gap:
                time.sleep(gap)
            start = time.perf_counter()
            mine.sendall(data)
            got = 0
            while got < len(data):
                chunk = mine.recv(4096)
                if not chunk:
                    raise RuntimeError("the echoing process ended")
                got += len(chunk)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6
    finally:
        mine.close()
        peer.wait(timeout=10)


@probe(
    PROFILE,
    Row(
        "hop_floor",
        "the machine (no kernel): a Unix-socket round trip to another process, back to back / "
        "after 1 ms asleep (µs, median)",
        ratios=False,
    ),
    kernels=(KERNELVISOR,),
)
def probe_hop_floor(kernel: str, opts: Opts) -> dict[str, Value]:
    busy = hop_us(0.0, opts.runs(500, 3000))
    asleep = hop_us(0.001, opts.runs(100, 500))
    return {"hop_floor": Shown(asleep, f"{busy:.0f} / {asleep:.0f}")}
