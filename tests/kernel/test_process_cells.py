"""`# process` cells: run in a worker borrowed from the pool, beside the main worker."""

from __future__ import annotations

import time

from kvharness import (
    TIMEOUT,
    cell_stdout,
    collect_requests,
    execute,
    result_text,
    running_kernel,
)

BURN = (
    "# process\n"
    "import os, time\n"
    "t = time.process_time()\n"
    "while time.process_time() - t < 1.0:\n"
    "    pass\n"
    "print('pid', os.getpid(), 'sees x:', 'x' in globals())\n"
)


def test_process_cells_run_in_other_workers_concurrently() -> None:
    with running_kernel("kernelvisor") as k:
        execute(k.kc, "x = 42")
        main_pid = result_text(execute(k.kc, "import os; os.getpid()")[1])
        ids = [k.kc.execute(BURN), k.kc.execute(BURN)]
        cells = collect_requests(k.kc, ids)
        outs = [cell_stdout(cells[m]) for m in ids]
        assert all(cells[m]["reply"]["status"] == "ok" for m in ids), cells
        pids = {out.split()[1] for out in outs}
        # Two different processes, neither of them the main worker, neither seeing its names.
        assert len(pids) == 2 and main_pid not in pids, (outs, main_pid)
        assert all("sees x: False" in out for out in outs), outs
        assert result_text(execute(k.kc, "x")[1]) == "42"


def test_crash_in_a_process_cell_keeps_the_main_namespace() -> None:
    with running_kernel("kernelvisor") as k:
        execute(k.kc, "x = 42")
        [mid] = [k.kc.execute("# process\nimport ctypes; ctypes.string_at(0)")]
        cell = collect_requests(k.kc, [mid])[mid]
        assert cell["reply"]["status"] == "error"
        assert cell["reply"]["ename"] == "WorkerCrashed"
        assert "main namespace is intact" in cell["reply"]["evalue"]
        assert "SIGSEGV" in cell["reply"]["evalue"]
        assert result_text(execute(k.kc, "x")[1]) == "42"


def test_a_returned_worker_is_reset() -> None:
    with running_kernel("kernelvisor") as k:
        first = k.kc.execute("# process\nleftover = 1\nimport os; print(os.getpid())")
        pid = cell_stdout(collect_requests(k.kc, [first])[first]).strip()
        # Reuse is likely (the borrowed worker goes back to the idle pool); whichever worker
        # runs next must not see the previous cell's names.
        second = k.kc.execute("# process\nimport os; print(os.getpid(), 'leftover' in globals())")
        out = cell_stdout(collect_requests(k.kc, [second])[second]).split()
        assert out[1] == "False", (pid, out)


def test_an_interrupt_reaches_a_process_cell() -> None:
    with running_kernel("kernelvisor") as k:
        execute(k.kc, "x = 1")
        mid = k.kc.execute("# process\nimport time\nprint('start', flush=True)\ntime.sleep(60)")
        deadline = time.monotonic() + TIMEOUT
        while True:  # wait until the cell is running
            assert time.monotonic() < deadline, "the process cell never started"
            msg = k.kc.get_iopub_msg(timeout=TIMEOUT)
            if msg["parent_header"].get("msg_id") == mid and msg["msg_type"] == "stream":
                break
        k.km.interrupt_kernel()
        reply = k.kc.get_shell_msg(timeout=TIMEOUT)
        assert reply["parent_header"]["msg_id"] == mid
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert result_text(execute(k.kc, "x")[1]) == "1"
