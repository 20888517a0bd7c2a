"""Concurrent cells in one worker (IPC.md, "Run modes"): ``task`` cells on the main
loop, ``thread`` cells in threads with their own loops, each with its own count,
errors, payloads and output; interrupts that reach the right cells."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
from ipc_client import Message, WorkerProcess


def run_until_replies(worker: WorkerProcess, *req_ids: int) -> list[Message]:
    """Every message up to the replies of ``req_ids``, in arrival order."""
    seen: list[Message] = []
    waiting = set(req_ids)
    while waiting:
        msg = worker.recv()
        seen.append(msg)
        if msg.op == "reply" and msg.control.get("id") in waiting:
            waiting.discard(msg.control["id"])
    return seen


def reply_of(messages: list[Message], req_id: int) -> Message:
    (reply,) = [m for m in messages if m.op == "reply" and m.control.get("id") == req_id]
    return reply


def of(worker: WorkerProcess, messages: list[Message], req_id: int, msg_type: str) -> list[Message]:
    """The iopub messages of ``msg_type`` whose parent is request ``req_id``."""
    msg_id = worker.msg_ids[req_id]
    return [
        m
        for m in messages
        if m.op == "iopub" and m.msg_type == msg_type and m.parent.get("msg_id") == msg_id
    ]


def text(worker: WorkerProcess, messages: list[Message], req_id: int) -> str:
    return "".join(m.content["text"] for m in of(worker, messages, req_id, "stream"))


def result(worker: WorkerProcess, messages: list[Message], req_id: int) -> str:
    (msg,) = of(worker, messages, req_id, "execute_result")
    return str(msg.content["data"]["text/plain"])


def order(messages: list[Message], *req_ids: int) -> list[int]:
    """The request ids in the order their replies arrived."""
    return [m.control["id"] for m in messages if m.op == "reply" and m.control["id"] in req_ids]


@pytest.fixture
def worker(fresh_worker: WorkerProcess) -> Iterator[WorkerProcess]:
    fresh_worker.execute("import asyncio, threading, time")
    yield fresh_worker


def test_task_cell_finishes_while_a_queued_cell_awaits(worker: WorkerProcess) -> None:
    slow = worker.send_cell("await asyncio.sleep(1.5)\nprint('slow done')\n'slow'")
    quick = worker.send_cell("print('quick')\nx = 5\nx * 2", "task")
    seen = run_until_replies(worker, slow, quick)
    assert order(seen, slow, quick) == [quick, slow]
    assert text(worker, seen, quick) == "quick\n"
    assert result(worker, seen, quick) == "10"
    assert text(worker, seen, slow) == "slow done\n"
    assert result(worker, seen, slow) == "'slow'"
    assert reply_of(seen, quick).content["status"] == "ok"


def test_concurrent_cells_keep_their_own_counts(worker: WorkerProcess) -> None:
    first = worker.send_cell("await asyncio.sleep(0.5)\n'first'")
    second = worker.send_cell("await asyncio.sleep(0.1)\n'second'", "task")
    third = worker.send_cell("'third'", "thread")
    seen = run_until_replies(worker, first, second, third)
    counts = {}
    for req in (first, second, third):
        (res,) = of(worker, seen, req, "execute_result")
        count = reply_of(seen, req).content["execution_count"]
        # The number the supervisor gave it, whichever started first in the worker.
        assert res.content["execution_count"] == count == worker.counts[req]
        counts[req] = count
    low = min(counts.values())
    assert [counts[first], counts[second], counts[third]] == [low, low + 1, low + 2]
    # Out[] holds each value under its own count.
    ex = worker.execute(f"Out[{counts[first]}], Out[{counts[second]}], Out[{counts[third]}]")
    (res,) = ex.iopub("execute_result")
    assert res.content["data"]["text/plain"] == "('first', 'second', 'third')"


def test_thread_cell_runs_while_the_main_thread_is_blocked(worker: WorkerProcess) -> None:
    worker.execute("shared = 41")
    blocked = worker.send_cell("time.sleep(1.5)\n'main'")
    threaded = worker.send_cell(
        "import threading\nprint(threading.current_thread() is threading.main_thread())\n"
        "shared + 1",
        "thread",
    )
    seen = run_until_replies(worker, blocked, threaded)
    assert order(seen, blocked, threaded) == [threaded, blocked]
    assert text(worker, seen, threaded) == "False\n"
    assert result(worker, seen, threaded) == "42"  # the one namespace


def test_named_thread_keeps_its_thread_and_awaits_in_its_loop(worker: WorkerProcess) -> None:
    code = "await asyncio.sleep(0.01)\nthreading.current_thread().name"
    first = worker.send_cell(code, "thread", thread="my worker")
    seen = run_until_replies(worker, first)
    second = worker.send_cell(code, "thread", thread="my worker")
    seen += run_until_replies(worker, second)
    assert result(worker, seen, first) == result(worker, seen, second) == "'my worker'"


def test_named_thread_keeps_its_backend(worker: WorkerProcess) -> None:
    code = "import sniffio\nsniffio.current_async_library()"
    first = worker.send_cell(code, "thread", thread="t", backend="trio")
    seen = run_until_replies(worker, first)
    again = worker.send_cell(code, "thread", thread="t")  # no backend: the thread's own
    seen += run_until_replies(worker, again)
    other = worker.send_cell(code, "thread", thread="t", backend="asyncio")
    seen += run_until_replies(worker, other)
    assert result(worker, seen, first) == result(worker, seen, again) == "'trio'"
    content = reply_of(seen, other).content
    assert content["status"] == "error" and "does not match" in content["evalue"], content


def test_thread_cell_on_trio(worker: WorkerProcess) -> None:
    req = worker.send_cell(
        "import trio\nawait trio.sleep(0.01)\ntrio.lowlevel.current_task() is not None",
        "thread",
        thread="trio thread",
        backend="trio",
    )
    seen = run_until_replies(worker, req)
    assert reply_of(seen, req).content["status"] == "ok", reply_of(seen, req).content
    assert result(worker, seen, req) == "True"


def test_errors_and_payloads_stay_with_their_cell(worker: WorkerProcess) -> None:
    failing = worker.send_cell("await asyncio.sleep(0.3)\n1 / 0")
    fine = worker.send_cell("get_ipython().set_next_input('next')\n'fine'", "task")
    seen = run_until_replies(worker, failing, fine)
    bad, good = reply_of(seen, failing).content, reply_of(seen, fine).content
    assert bad["status"] == "error" and bad["ename"] == "ZeroDivisionError"
    assert bad["payload"] == []
    assert good["status"] == "ok" and good["payload"][0]["text"] == "next"
    assert [m.content["ename"] for m in of(worker, seen, failing, "error")] == ["ZeroDivisionError"]
    assert of(worker, seen, fine, "error") == []


def test_thread_started_by_a_cell_prints_to_that_cell(worker: WorkerProcess) -> None:
    started = worker.send_cell(
        "go = threading.Event()\n"
        "def later():\n"
        "    go.wait(10)\n"
        "    print('from the thread of cell A', flush=True)\n"
        "threading.Thread(target=later).start()"
    )
    seen = run_until_replies(worker, started)
    other = worker.send_cell("go.set()\ntime.sleep(0.5)\nprint('cell B')")
    seen += run_until_replies(worker, other)
    assert text(worker, seen, other) == "cell B\n"
    assert text(worker, seen, started) == "from the thread of cell A\n"


def test_sigint_interrupts_every_running_cell(worker: WorkerProcess) -> None:
    worker.execute("survivor = 7")
    awaiting = worker.send_cell("await asyncio.sleep(30)", "task")
    threaded = worker.send_cell(
        "t0 = time.monotonic()\nwhile time.monotonic() - t0 < 30:\n    pass", "thread"
    )
    # Started last (it blocks the main thread): the task is awaiting by then.
    blocked = worker.send_cell("print('blocking', flush=True)\ntime.sleep(30)")
    msg = worker.recv()
    while not (msg.op == "iopub" and msg.msg_type == "stream"):
        msg = worker.recv()
    time.sleep(0.3)
    worker.proc.send_signal(signal.SIGINT)
    seen = run_until_replies(worker, blocked, awaiting, threaded)
    for req in (blocked, awaiting, threaded):
        content = reply_of(seen, req).content
        assert content["status"] == "error" and content["ename"] == "KeyboardInterrupt", content
    assert [m.content["ename"] for m in of(worker, seen, awaiting, "error")] == [
        "KeyboardInterrupt"
    ]
    (res,) = worker.execute("survivor").iopub("execute_result")
    assert res.content["data"]["text/plain"] == "7"


@pytest.mark.parametrize("why", ["timeout", "user"])
@pytest.mark.parametrize("mode", ["queue", "task", "thread"])
@pytest.mark.parametrize(
    "code",
    [
        "await asyncio.sleep(30)",
        "t0 = time.monotonic()\nwhile time.monotonic() - t0 < 30:\n    pass",
    ],
    ids=["awaiting", "spinning"],
)
def test_interrupt_op_stops_one_cell(worker: WorkerProcess, mode: str, code: str, why: str) -> None:
    """The op for a `timeout=` tag that expired, and the user's interrupt (which the
    supervisor sends for each started cell, and no signal)."""
    if mode == "queue" and "spinning" in code:
        other = worker.send_cell("await asyncio.sleep(0.2)\n'other'", "thread")
    else:
        other = worker.send_cell("await asyncio.sleep(1)\n'other'", "task")
    target = worker.send_cell(code, mode)
    time.sleep(0.3)
    if why == "timeout":
        worker.send_op("interrupt", id=target, timeout=0.3)
    else:
        worker.send_op("interrupt", id=target)
    seen = run_until_replies(worker, target, other)
    content = reply_of(seen, target).content
    assert content["status"] == "error", content
    if why == "timeout":
        assert content["ename"] == "TimeoutError", content
        assert "timeout=0.3" in content["evalue"]
    else:
        assert content["ename"] == "KeyboardInterrupt", content
    assert result(worker, seen, other) == "'other'"  # not interrupted


# A comm handler runs on the worker's main thread outside any cell: while it sleeps, what is
# sent next waits unread in the worker's socket.
BUSY_TARGET = """
import comm
import time
def _busy(c, open_msg):
    @c.on_msg
    def _(msg):
        time.sleep(float(msg["content"]["data"]["seconds"]))
comm.get_comm_manager().register_target("kv-busy", _busy)
"""


def test_an_interrupt_after_its_cell_ended_passes_the_next_cell_by(worker: WorkerProcess) -> None:
    """The supervisor interrupts a cell that has just ended here (its reply was on its
    way): the op, and a SIGINT from outside, find no cell, and a cell sent after them runs, even when
    it is read together with a request that was waiting when the signal came (the worker
    used to guess from unread requests, and interrupted it)."""
    ended = worker.send_cell("pass")
    run_until_replies(worker, ended)
    worker.execute(BUSY_TARGET)
    worker.send_request("comm_open", {"comm_id": "busy", "target_name": "kv-busy", "data": {}})
    worker.send_request("comm_msg", {"comm_id": "busy", "data": {"seconds": 1.5}})
    time.sleep(0.3)  # the main thread sleeps in the handler
    worker.send_request("comm_msg", {"comm_id": "busy", "data": {"seconds": 0}})
    worker.send_op("interrupt", id=ended)
    worker.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    later = worker.send_cell("'later ran'")
    seen = run_until_replies(worker, later)
    assert reply_of(seen, later).content["status"] == "ok", reply_of(seen, later).content
    assert result(worker, seen, later) == "'later ran'"


def test_input_in_a_thread_cell(worker: WorkerProcess) -> None:
    req = worker.send_cell("name = input('who? ')\nname.upper()", "thread")
    msg = worker.recv()
    while msg.op != "stdin":
        msg = worker.recv()
    assert msg.control["id"] == req and msg.content["prompt"] == "who? "
    worker.send_request("input_reply", {"value": "ada"}, channel="stdin")
    seen = run_until_replies(worker, req)
    assert result(worker, seen, req) == "'ADA'"


@pytest.fixture
def trio_worker(ipython_dir: str) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(env={"IPYTHONDIR": ipython_dir}, args=("--backend", "trio"))
    try:
        yield proc
    finally:
        proc.close()


def test_trio_backend_runs_main_thread_cells_in_trio(trio_worker: WorkerProcess) -> None:
    w = trio_worker
    w.execute("import trio")
    slow = w.send_cell("await trio.sleep(1)\n'slow'")
    quick = w.send_cell("trio.lowlevel.current_task() is not None", "task")
    seen = run_until_replies(w, slow, quick)
    assert order(seen, slow, quick) == [quick, slow]
    assert result(w, seen, quick) == "True"
    assert result(w, seen, slow) == "'slow'"
    # A plain cell, and an interrupted await.
    assert w.execute("1 + 1").iopub("execute_result")[0].content["data"]["text/plain"] == "2"
    sleeping = w.send_cell("await trio.sleep(30)")
    time.sleep(0.5)
    w.proc.send_signal(signal.SIGINT)
    seen = run_until_replies(w, sleeping)
    content = reply_of(seen, sleeping).content
    assert content["status"] == "error" and content["ename"] == "KeyboardInterrupt", content


def test_uvloop_main_loop(ipython_dir: str) -> None:
    """``KERNELVISOR_UVLOOP=1``: the main thread's loop is uvloop's, with the same behaviour
    (a task beside an awaiting cell; SIGINT cancelling an await)."""
    w = WorkerProcess(env={"IPYTHONDIR": ipython_dir, "KERNELVISOR_UVLOOP": "1"})
    try:
        ex = w.execute("import asyncio\ntype(asyncio.get_running_loop()).__module__")
        assert ex.iopub("execute_result")[0].content["data"]["text/plain"] == "'uvloop'"
        slow = w.send_cell("await asyncio.sleep(1)\n'slow'")
        quick = w.send_cell("'quick'", "task")
        seen = run_until_replies(w, slow, quick)
        assert order(seen, slow, quick) == [quick, slow]
        sleeping = w.send_cell("await asyncio.sleep(30)")
        time.sleep(0.5)
        w.proc.send_signal(signal.SIGINT)
        content = reply_of(run_until_replies(w, sleeping), sleeping).content
        assert content["ename"] == "KeyboardInterrupt", content
    finally:
        w.close()
