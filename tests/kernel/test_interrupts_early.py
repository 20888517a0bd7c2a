"""An interrupt that reaches the worker before the cell it is for has started there (its
request still unread: the main thread was busy) stops that cell as soon as it starts; it is
not lost (before, the cell ran on and the next interrupt killed the worker)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from isolation_support import kv_kernel, main_worker
from kvharness import collect_iopub, execute, get_reply, iopub_until, result_text
from test_interrupts import INTERRUPTS

# A comm handler runs on the worker's main thread, outside any cell: while it sleeps, the
# execute request sent after it waits unread in the worker's socket.
BUSY_HANDLER = """
import time
import comm
def _busy_target(c, open_msg):
    @c.on_msg
    def _(msg):
        c.send({"sleeping": True})
        time.sleep(float(msg["content"]["data"]["seconds"]))
comm.get_comm_manager().register_target("kv-busy", _busy_target)
"""


def busy_main_thread(kc, seconds: float) -> int:  # type: ignore[no-untyped-def]
    """Keeps the main worker's main thread in a comm handler for ``seconds`` (returns once
    the handler runs); returns the worker's pid."""
    reply, _ = execute(kc, BUSY_HANDLER)
    assert reply["content"]["status"] == "ok"
    _, pid = main_worker(kc)
    opened = kc.session.msg("comm_open", {"comm_id": "b", "target_name": "kv-busy", "data": {}})
    kc.shell_channel.send(opened)
    collect_iopub(kc, opened["header"]["msg_id"])
    busy = kc.session.msg("comm_msg", {"comm_id": "b", "data": {"seconds": seconds}})
    kc.shell_channel.send(busy)
    iopub_until(kc, busy["header"]["msg_id"], lambda m: m["msg_type"] == "comm_msg", [])
    return pid


@pytest.mark.parametrize("how", sorted(INTERRUPTS))
def test_an_interrupt_before_the_cell_starts_stops_it(how: str) -> None:
    with kv_kernel() as k:
        kc = k.kc
        # Once the handler sleeps, the next request waits unread in the worker's socket.
        pid = busy_main_thread(kc, 3)
        cell = kc.execute("import time\ntime.sleep(60)")
        time.sleep(0.5)
        t0 = time.monotonic()
        INTERRUPTS[how](k)
        reply = get_reply(kc, cell, timeout=30)
        assert reply["content"]["status"] == "error", reply["content"]
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
        # Well before the 60 s sleep, and by the first interrupt: the worker is the same.
        assert time.monotonic() - t0 < 20
        assert main_worker(kc)[1] == pid
        reply, _ = execute(kc, "1 + 1")
        assert reply["content"]["status"] == "ok"


def test_a_sigint_with_no_cell_on_its_way_touches_no_later_cell() -> None:
    """VS Code signals every process of the tree, the worker too: a SIGINT that comes while
    only other requests (a comm message) wait unread is dropped once they are handled."""
    with kv_kernel() as k:
        kc = k.kc
        pid = busy_main_thread(kc, 2)
        second = kc.session.msg("comm_msg", {"comm_id": "b", "data": {"seconds": 0}})
        kc.shell_channel.send(second)
        time.sleep(0.5)  # the second waits unread
        os.kill(pid, signal.SIGINT)
        collect_iopub(kc, second["header"]["msg_id"])
        reply, iopub = execute(kc, "1 + 1")
        assert reply["content"]["status"] == "ok", reply["content"]
        assert result_text(iopub) == "2"
