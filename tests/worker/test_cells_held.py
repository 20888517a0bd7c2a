"""A cell sent ahead (IPC.md "Cells sent ahead"), as the worker sees it: held until the
cell it comes after has replied, dropped after an error that aborts the queue, held for the
supervisor's ``go`` after a long cell, and interrupted by an interrupt that comes while it
waits."""

from __future__ import annotations

import os
import signal
import time

from ipc_client import Message, WorkerProcess


def ahead(worker: WorkerProcess, code: str, after: int, **fields: object) -> int:
    control = {"after": after, "unless_error": True, **fields}
    return worker.send_request("execute_request", {"code": code}, control_extra=control)


def until(worker: WorkerProcess, pred: object) -> list[Message]:
    """Messages up to and including the first for which ``pred`` holds."""
    seen = []
    while True:
        msg = worker.recv()
        seen.append(msg)
        if pred(msg):  # type: ignore[operator]
            return seen


def reply_of(req: int):  # type: ignore[no-untyped-def]
    return lambda m: m.op in ("reply", "done") and m.control.get("id") == req


def test_it_starts_right_after_the_reply_it_waits_for(fresh_worker: WorkerProcess) -> None:
    w = fresh_worker
    first = w.send_request("execute_request", {"code": "import time\ntime.sleep(0.2)\nx = 1"})
    second = ahead(w, "x + 1", first)
    seen = until(w, reply_of(second))
    order = [m.control.get("id") for m in seen if m.op == "reply"]
    assert order == [first, second]
    (result,) = [m for m in seen if m.msg_type == "execute_result"]
    assert result.content["data"] == {"text/plain": "2"}


def test_an_error_that_aborts_drops_it(fresh_worker: WorkerProcess) -> None:
    w = fresh_worker
    first = w.send_request("execute_request", {"code": "import time\ntime.sleep(0.1)\n1/0"})
    dropped = ahead(w, "y = 1", first)
    kept = ahead(w, "z = 1", first, unless_error=False)
    check = w.send_request("execute_request", {"code": "'y' in globals(), 'z' in globals()"})
    seen = until(w, reply_of(check))
    replied = [m.control.get("id") for m in seen if m.op == "reply"]
    assert dropped not in replied, "a dropped cell sends nothing"
    assert replied == [first, kept, check]
    (result,) = [m for m in seen if m.msg_type == "execute_result"]
    assert result.content["data"] == {"text/plain": "(False, True)"}


def test_after_a_long_cell_it_waits_for_go(fresh_worker: WorkerProcess) -> None:
    w = fresh_worker
    first = w.send_request("execute_request", {"code": "import time\ntime.sleep(0.1)"})
    second = ahead(w, "'second'", first, within=50.0)
    seen = until(w, lambda m: m.op == "held")
    assert seen[-1].control["id"] == second
    assert [m.control.get("id") for m in seen if m.op == "reply"] == [first]
    w.send_op("go", via="main", id=second)
    seen = until(w, reply_of(second))
    assert seen[-1].control["status"] == "ok"
    quick = w.send_request("execute_request", {"code": "pass"})
    third = ahead(w, "'third'", quick, within=5000.0)
    seen = until(w, reply_of(third))
    assert not [m for m in seen if m.op == "held"], "a short cell: no word needed"


def test_an_interrupt_while_it_waits_for_go_stops_it_when_it_starts(
    fresh_worker: WorkerProcess,
) -> None:
    """The supervisor's interrupt names the cell (the ``interrupt`` op) and signals: no
    cell runs then, so the signal does nothing, and the cell stops as soon as it starts."""
    w = fresh_worker
    first = w.send_request("execute_request", {"code": "import time\ntime.sleep(0.1)"})
    second = ahead(w, "import time\ntime.sleep(5)\n'not interrupted'", first, within=50.0)
    until(w, lambda m: m.op == "held")
    w.send_op("interrupt", id=second)
    os.kill(w.proc.pid, signal.SIGINT)
    time.sleep(0.3)  # both handled before the go comes
    w.send_op("go", via="main", id=second)
    seen = until(w, reply_of(second))
    assert seen[-1].control["status"] == "error"
    (error,) = [m for m in seen if m.msg_type == "error"]
    assert error.content["ename"] == "KeyboardInterrupt"
