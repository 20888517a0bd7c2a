"""A storm of SIGCHLD at the supervisor while requests stream in loses and mangles nothing: the
supervisor reads its signals from a signalfd (src/signals.rs), so no handler cuts a ZeroMQ
call with EINTR in the middle of a multipart message."""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from typing import Any

from isolation_support import supervisor_pid
from jupyter_client.blocking.client import BlockingKernelClient
from kvharness import Kernel, is_idle, parent_id

# Sends SIGCHLD (harmless: the supervisor looks for strays to reap) to a pid until its stdin
# closes, then prints how many it sent.
# Bursts of 100 with a pause between them (at most ~100,000 a second): a storm that keeps a
# SIGCHLD pending most of the time, without taking a whole core from the kernel.
STORM = """
import os, signal, sys, threading, time
pid, done, sent = int(sys.argv[1]), threading.Event(), 0
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
while not done.is_set():
    for _ in range(100):
        os.kill(pid, signal.SIGCHLD)
    sent += 100
    time.sleep(0.001)
print(sent, flush=True)
"""

CELLS = 2000
DEADLINE = 60.0


def results(kc: BlockingKernelClient, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each request's reply status and result text, once all replied and went idle (a lost
    message leaves one unfinished: the deadline then fails the test)."""
    cells: dict[str, dict[str, Any]] = {i: {"status": None, "result": None} for i in ids}
    idle: set[str] = set()
    deadline = time.monotonic() + DEADLINE
    while len(idle) < len(ids) or any(c["status"] is None for c in cells.values()):
        assert time.monotonic() < deadline, (
            f"{len(ids) - len(idle)} requests never went idle, "
            f"{sum(c['status'] is None for c in cells.values())} never replied"
        )
        while kc.shell_channel.msg_ready():
            reply = kc.get_shell_msg(timeout=1)
            cells[parent_id(reply)]["status"] = reply["content"]["status"]
        try:
            msg = kc.get_iopub_msg(timeout=0.05)
        except queue.Empty:
            continue
        cell = cells.get(parent_id(msg))
        if cell is None:
            continue
        if msg["msg_type"] == "execute_result":
            cell["result"] = msg["content"]["data"]["text/plain"]
        elif is_idle(msg):
            idle.add(parent_id(msg))
    return cells


def test_a_signal_storm_loses_no_request(kernel: Kernel) -> None:
    kc = kernel.kc
    storm = subprocess.Popen(
        [sys.executable, "-c", STORM, str(supervisor_pid(kernel))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # Each cell's result names it: a request mangled into another would show. Not stored
        # in the history database, which other tests (and the user) read.
        ids = [kc.execute(f"{i} * 3", store_history=False) for i in range(CELLS)]
        done = results(kc, ids)
    finally:
        out, _ = storm.communicate(timeout=30)
    assert int(out) > 5_000, f"only {out.strip()} signals sent: no storm"
    assert [done[m] for m in ids] == [{"status": "ok", "result": str(i * 3)} for i in range(CELLS)]
