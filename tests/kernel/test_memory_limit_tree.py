"""The memory limit covers the worker's whole process tree (issue 9): a subprocess that a cell
started and that goes over the limit is killed with its worker, and the error names it (pid and
command); forked children that share the worker's memory are not counted twice."""

from __future__ import annotations

import re

from isolation_support import (
    assert_crashed,
    assert_healthy,
    kv_kernel,
    main_worker,
    wait_dead,
)
from jupyter_client.blocking.client import BlockingKernelClient
from kvharness import (
    Msg,
    execute,
    get_reply,
    iopub_until,
    is_idle,
    result_text,
    stream_text,
)

# A child Python that grows by 20 MiB at a time towards 800 MiB (then sleeps), written so
# that its pages are really resident (b"x" * n touches them, bytearray(n) would not). The
# pauses keep the growth between two of the supervisor's 100 ms checks small.
GREEDY_CHILD = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", '''
import time
chunks = []
for _ in range(40):
    chunks.append(b"x" * (20 << 20))
    time.sleep(0.02)
time.sleep(120)
'''])
print(child.pid, flush=True)
child.wait()
"""


def test_a_subprocess_over_the_limit_is_killed_and_named() -> None:
    with kv_kernel(memory_limit="300M") as k:
        kc = k.kc
        _, worker = main_worker(kc)
        msg_id = kc.execute(GREEDY_CHILD)
        seen: list[Msg] = []
        iopub_until(kc, msg_id, lambda m: m["msg_type"] == "stream", seen, timeout=60)
        child = int(stream_text(seen).split()[0])
        reply, iopub = execute_rest(kc, msg_id, seen)
        error = assert_crashed(reply, iopub, "killed: out of memory (")
        evalue = error["evalue"]
        assert "the worker and its 1 subprocess reached" in evalue, evalue
        assert "the limit is 300 MiB" in evalue, evalue
        assert re.search(rf"the largest: pid {child} \(python[0-9.]*\), \d+ MiB", evalue), evalue
        wait_dead({child, worker}, "the greedy subprocess and its worker")
        assert_healthy(kc)


def test_forked_children_sharing_memory_are_counted_once() -> None:
    """The worker holds 150 MiB and forks three children that share it: four times its
    resident memory is well over the limit, but the memory used is not."""
    code = (
        "import gc, os, time\n"
        'data = b"x" * (150 << 20)\n'
        # As servers that fork do: the children's garbage collector leaves the parent's
        # objects (and so their pages) alone.
        "gc.freeze()\n"
        "pids = []\n"
        "for _ in range(3):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(2)\n"
        "        os._exit(0)\n"
        "    pids.append(pid)\n"
        "[os.waitpid(pid, 0)[1] for pid in pids]"
    )
    with kv_kernel(memory_limit="300M") as k:
        kc = k.kc
        before = main_worker(kc)
        reply, iopub = execute(kc, code, timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert result_text(iopub) == "[0, 0, 0]"
        assert main_worker(kc) == before


def test_the_worker_alone_is_named_too() -> None:
    grow = (
        "import time\nchunks = []\nwhile True:\n"
        '    chunks.append(b"x" * (20 << 20))\n    time.sleep(0.02)'
    )
    with kv_kernel(memory_limit="300M") as k:
        _, worker = main_worker(k.kc)
        reply, iopub = execute(k.kc, grow, timeout=60)
        error = assert_crashed(reply, iopub, "killed: out of memory (")
        assert re.search(rf"the worker, pid {worker} \(python[0-9.]*\), \d+ MiB", error["evalue"])
        wait_dead({worker}, "the worker")


def execute_rest(kc: BlockingKernelClient, msg_id: str, seen: list[Msg]) -> tuple[Msg, list[Msg]]:
    """The reply of a cell whose first iopub messages were read into ``seen``, and all of
    its iopub messages."""
    reply = get_reply(kc, msg_id, timeout=60)
    iopub_until(kc, msg_id, is_idle, seen, timeout=60)
    return reply, seen
