"""Run modes through jupyter_client: `# task` and `# thread` cells run beside the queue,
in the one namespace, each with its own parent header, count and busy/idle."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from kvharness import (
    Kernel,
    cell_stdout,
    collect_requests,
    execute,
    get_reply,
    of_type,
    result_text,
    running_kernel,
    statuses,
)


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    with running_kernel("kernelvisor") as k:
        execute(k.kc, "import asyncio, threading, time")
        yield k


def reply_order(kc: BlockingKernelClient, msg_ids: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The msg_ids in the order their replies arrive, and every cell's messages."""
    replies: list[str] = []
    cells = collect_requests(kc, msg_ids, on_reply=replies.append)
    return replies, cells


def test_task_cell_finishes_while_a_long_queued_cell_runs(kernel: Kernel) -> None:
    kc = kernel.kc
    long = kc.execute("await asyncio.sleep(2)\nprint('long done')")
    task = kc.execute("# task\nprint('task ran')\n6 * 7")
    order, cells = reply_order(kc, [long, task])
    assert order == [task, long]
    assert cell_stdout(cells[task]) == "task ran\n"
    assert result_text(cells[task]["iopub"]) == "42"
    assert cell_stdout(cells[long]) == "long done\n"
    for msg_id in (long, task):
        # Every message of a cell carries that cell's parent; one busy, one idle each.
        assert statuses(cells[msg_id]["iopub"]) == ["busy", "idle"], cells[msg_id]["iopub"]


def test_queue_cells_run_in_order_while_one_awaits(kernel: Kernel) -> None:
    """A queue cell waits for the one before it even while that one awaits: the
    supervisor's lane sends the next only after the reply (the worker keeps no queue)."""
    kc = kernel.kc
    first = kc.execute("await asyncio.sleep(0.5)\norder = [1]")
    second = kc.execute("order.append(2)")
    third = kc.execute("await asyncio.sleep(0)\norder")
    replies, cells = reply_order(kc, [first, second, third])
    assert replies == [first, second, third]
    assert [cells[m]["reply"]["status"] for m in replies] == ["ok"] * 3
    assert result_text(cells[third]["iopub"]) == "[1, 2]"


def test_thread_cell_runs_while_a_blocking_cell_holds_the_main_thread(kernel: Kernel) -> None:
    kc = kernel.kc
    execute(kc, "shared = 'namespace'")
    blocking = kc.execute("time.sleep(2)\n'main done'")
    thread = kc.execute(
        "# thread\nprint(threading.current_thread() is threading.main_thread())\nshared"
    )
    order, cells = reply_order(kc, [blocking, thread])
    assert order == [thread, blocking]
    assert cell_stdout(cells[thread]) == "False\n"
    assert result_text(cells[thread]["iopub"]) == "'namespace'"
    assert result_text(cells[blocking]["iopub"]) == "'main done'"


def test_named_thread_with_trio_backend(kernel: Kernel) -> None:
    kc = kernel.kc
    code = (
        "# thread name='trio worker' backend=trio\n"
        "import trio\nawait trio.sleep(0.01)\nthreading.current_thread().name"
    )
    for _ in range(2):  # the same named thread both times
        reply, iopub = execute(kc, code)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert result_text(iopub) == "'trio worker'"


def test_thread_started_in_a_cell_prints_to_it_during_a_later_cell(kernel: Kernel) -> None:
    kc = kernel.kc
    reply, _ = execute(
        kc,
        "go = threading.Event()\n"
        "def later():\n"
        "    go.wait(30)\n"
        "    print('printed by the thread of cell A', flush=True)\n"
        "threading.Thread(target=later).start()",
    )
    cell_a = reply["parent_header"]["msg_id"]
    cell_b = kc.execute("go.set()\ntime.sleep(0.5)\nprint('cell B')")
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while not any(
        m["msg_type"] == "status"
        and m["content"]["execution_state"] == "idle"
        and m["parent_header"].get("msg_id") == cell_b
        for m in seen
    ):
        assert time.monotonic() < deadline
        seen.append(kc.get_iopub_msg(timeout=30))
    assert get_reply(kc, cell_b)["content"]["status"] == "ok"
    streams = [
        (m["parent_header"]["msg_id"], m["content"]["text"]) for m in of_type(seen, "stream")
    ]
    assert (cell_a, "printed by the thread of cell A\n") in streams, streams
    assert (cell_b, "cell B\n") in streams, streams
    assert not any(cell_a == p and "cell B" in t for p, t in streams)


def test_silent_request_runs_as_a_task(kernel: Kernel) -> None:
    kc = kernel.kc
    long = kc.execute("await asyncio.sleep(2)")
    silent = kc.execute("silent_ran = True", silent=True)
    order, cells = reply_order(kc, [long, silent])
    assert order == [silent, long]
    assert not of_type(cells[silent]["iopub"], "execute_input")
    assert result_text(execute(kc, "silent_ran")[1]) == "True"


def test_interrupt_reaches_queue_task_and_thread_cells(kernel: Kernel) -> None:
    kc = kernel.kc
    execute(kc, "survivor = 5")
    task = kc.execute("# task\nprint('started', flush=True)\nawait asyncio.sleep(60)")
    thread = kc.execute(
        "# thread\nprint('started', flush=True)\n"
        "t0 = time.monotonic()\nwhile time.monotonic() - t0 < 60:\n    pass"
    )
    queued = kc.execute("print('started', flush=True)\nawait asyncio.sleep(60)")
    started: set[str] = set()
    deadline = time.monotonic() + 30
    while len(started) < 3:  # an interrupt reaches the cells running when it comes
        assert time.monotonic() < deadline, f"only {started} started"
        msg = kc.get_iopub_msg(timeout=30)
        if msg["msg_type"] == "stream":
            started.add(msg["parent_header"]["msg_id"])
    kernel.km.interrupt_kernel()
    cells = collect_requests(kc, [task, thread, queued])
    for msg_id in (task, thread, queued):
        content = cells[msg_id]["reply"]
        assert content["status"] == "error", content
        assert content["ename"] == "KeyboardInterrupt", content
    assert result_text(execute(kc, "survivor")[1]) == "5"
