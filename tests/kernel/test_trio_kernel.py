"""The trio kernel (`kernelvisor install --backend trio`, kernelspec "kernelvisor-trio"):
main-thread cells run in trio, with the same concurrency as on asyncio."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from kvharness import Kernel, collect_requests, execute, result_text, running_kernel


@pytest.fixture(scope="module")
def trio_kernel() -> Iterator[Kernel]:
    with running_kernel("kernelvisor-trio") as k:
        execute(k.kc, "import trio")
        yield k


def test_cells_await_in_trio(trio_kernel: Kernel) -> None:
    reply, iopub = execute(
        trio_kernel.kc, "await trio.sleep(0.01)\ntrio.lowlevel.current_task() is not None"
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    assert result_text(iopub) == "True"


def test_task_cell_beside_an_awaiting_queue_cell(trio_kernel: Kernel) -> None:
    kc = trio_kernel.kc
    slow = kc.execute("await trio.sleep(2)\n'slow'")
    quick = kc.execute("# task\n'quick'")
    order: list[str] = []
    cells = collect_requests(kc, [slow, quick], on_reply=order.append)
    assert order == [quick, slow]
    assert result_text(cells[quick]["iopub"]) == "'quick'"
    assert result_text(cells[slow]["iopub"]) == "'slow'"


def test_caller_in_a_trio_cell(trio_kernel: Kernel) -> None:
    reply, iopub = execute(
        trio_kernel.kc,
        "from kernelvisor import Caller\n"
        "import threading\n"
        "await Caller().to_thread(lambda: threading.current_thread() is not threading.main_thread())",
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    assert result_text(iopub) == "True"


def test_interrupt_cancels_a_trio_await(trio_kernel: Kernel) -> None:
    kc = trio_kernel.kc
    execute(kc, "kept = 'yes'")
    cell = kc.execute("print('waiting', flush=True)\nawait trio.sleep(60)")
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "the cell never started"
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == cell and msg["msg_type"] == "stream":
            break
    trio_kernel.km.interrupt_kernel()
    cells = collect_requests(kc, [cell])
    assert cells[cell]["reply"]["ename"] == "KeyboardInterrupt", cells[cell]["reply"]
    assert result_text(execute(kc, "kept")[1]) == "'yes'"
