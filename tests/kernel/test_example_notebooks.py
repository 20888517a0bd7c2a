"""kernelvisor's example notebooks (the ideas of async-kernel's example notebooks) on the
kernelvisor kernel:

- ``caller.ipynb``: the ``Caller`` API from notebook cells (nbclient);
- ``concurrency.ipynb``: the run modes ``# task``, ``# thread``, ``# process``, cell by cell
  (nbclient, which sends a cell once the previous one has replied);
- ``concurrency_run_all.ipynb``: cells that run at the same time. nbclient cannot show that,
  so its cells are all sent at once, as JupyterLab's *Run All* does, through jupyter_client.

Every cell asserts what it shows; the tests here check each cell's reply and its exact
outputs. The notebooks are written so that their outputs do not depend on timing: a cell
that waits for something waits for an event, not for a duration.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from kvharness import (
    KERNELVISOR,
    STARTUP_TIMEOUT,
    TIMEOUT,
    Msg,
    execute,
    parent_id,
    running_kernel,
)
from nbclient import NotebookClient
from nbformat import NotebookNode
from test_notebooks import NOTEBOOK_DIR, Run, streams, types

Expected = tuple[str, str | None]  # (the cell's stdout, its execute_result's text/plain)
RunExample = Callable[[str], Run]


def execute_example(name: str, workdir: Path) -> Run:
    """The notebook executed by nbclient on kernelvisor. A failing cell does not stop the run
    (each cell's own test reports it); its reply says so."""
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    replies: dict[str, dict[str, Any]] = {}

    def on_cell_executed(cell: NotebookNode, cell_index: int, execute_reply: Msg) -> None:
        replies[cell["id"]] = execute_reply["content"]

    NotebookClient(
        nb,
        kernel_name=KERNELVISOR,
        timeout=int(TIMEOUT),
        startup_timeout=int(STARTUP_TIMEOUT),
        allow_errors=True,
        resources={"metadata": {"path": str(workdir)}},
        on_cell_executed=on_cell_executed,
    ).execute()
    return Run(name, KERNELVISOR, nb, replies)


@pytest.fixture(scope="module")
def run_example(kernelspecs: Path, tmp_path_factory: pytest.TempPathFactory) -> RunExample:
    """Execute an example notebook on kernelvisor once per module; later calls return the same
    run (or raise the same error)."""
    done: dict[str, Run | Exception] = {}

    def run(name: str) -> Run:
        if name not in done:
            try:
                done[name] = execute_example(name, tmp_path_factory.mktemp(name))
            except Exception as exc:  # noqa: BLE001 - kept and re-raised for each test
                done[name] = exc
        result = done[name]
        if isinstance(result, Exception):
            raise result
        return result

    return run


def run_all_at_once(
    name: str, *, warm: bool, env: dict[str, str] | None = None
) -> tuple[Run, list[str]]:
    """Send every code cell of the notebook before reading any reply (JupyterLab's Run All),
    once a cell has run (``warm``) or right after the kernel answered kernel_info; the
    executed notebook, and the cell ids in the order their replies arrived."""
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    cells = {cell.id: cell for cell in nb.cells if cell.cell_type == "code"}
    with running_kernel(KERNELVISOR, env=env) as kernel:
        kc = kernel.kc
        if warm:
            reply, _ = execute(kc, "1 + 1")
            assert reply["content"]["status"] == "ok", reply["content"]
        sent = {kc.execute(cell.source): cell_id for cell_id, cell in cells.items()}
        replies: dict[str, Msg] = {}
        idle: set[str] = set()
        outputs: dict[str, list[Msg]] = {msg_id: [] for msg_id in sent}
        order: list[str] = []
        # Generous: a cell waits at most 10 s for another before it fails.
        deadline = time.monotonic() + 2 * TIMEOUT
        while len(replies) < len(sent) or idle != sent.keys():
            assert time.monotonic() < deadline, f"replies {order}, idle {len(idle)}/{len(sent)}"
            for channel, get in (("shell", kc.get_shell_msg), ("iopub", kc.get_iopub_msg)):
                try:
                    msg = get(timeout=0.05)
                except queue.Empty:
                    continue
                msg_id = parent_id(msg)
                if msg_id not in sent:
                    continue
                if channel == "shell":
                    replies[msg_id] = msg
                    order.append(sent[msg_id])
                elif msg["msg_type"] == "status":
                    if msg["content"]["execution_state"] == "idle":
                        idle.add(msg_id)
                elif msg["msg_type"] in ("stream", "display_data", "execute_result", "error"):
                    outputs[msg_id].append(msg)
    for msg_id, cell_id in sent.items():
        cell = cells[cell_id]
        cell.outputs = [nbformat.v4.output_from_msg(m) for m in outputs[msg_id]]
        cell.execution_count = replies[msg_id]["content"].get("execution_count")
    by_cell = {cell_id: replies[msg_id]["content"] for msg_id, cell_id in sent.items()}
    return Run(name, KERNELVISOR, nb, by_cell), order


def check_cell(run: Run, cell_id: str, expected: Expected) -> None:
    """The cell succeeded, printed exactly ``stdout`` (nothing on stderr) and, if a result is
    expected, ended with that execute_result (numbered as its reply)."""
    stdout, result = expected
    reply = run.reply(cell_id)
    assert reply["status"] == "ok", reply
    outputs = run.outputs(cell_id)
    want_types = (["stream:stdout"] if stdout else []) + (["execute_result"] if result else [])
    assert types(outputs) == want_types, outputs
    assert streams(outputs) == ([("stdout", stdout)] if stdout else [])
    if result is not None:
        assert outputs[-1].data["text/plain"] == result
        assert outputs[-1].execution_count == reply["execution_count"]


def code_cell_ids(name: str) -> list[str]:
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    return [c.id for c in nb.cells if c.cell_type == "code"]


# --- caller.ipynb -----------------------------------------------------------------------------

CALLER: dict[str, Expected] = {
    # Caller() in a cell is the main thread's caller, on the worker's asyncio loop.
    "main-caller": ("<Caller 'MainThread' asyncio running>\n", None),
    # to_thread's call blocks its worker thread until the main loop, free while the cell
    # awaits, runs the call_soon that releases it.
    "to-thread": ("done: False\n<Pending done blocking>\n", "49"),
    "wait-sync": ("", "45"),
    # The ContextVar set in the cell is seen by calls run in another thread and in the loop.
    "context": ("", "('set in the cell', 'set in the cell')"),
    "trio-child": ("", "('trio-child', 'trio')"),
    # A Pending awaited across loops in both directions: trio awaits an asyncio call.
    "cross-loop": ("", "'trio in trio-child awaited asyncio in MainThread'"),
    # The three calls wait for each other: they can only all finish if they run concurrently.
    "call-soon-together": ("started: [0, 1, 2]\n", "[(0, 'met'), (1, 'met'), (2, 'met')]"),
    "queue-call": (
        "results: [0, 1, 2]\n",
        "['start 0', 'end 0', 'start 1', 'end 1', 'start 2', 'end 2']",
    ),
    "call-later": ("", "['soon', 'later']"),
    "cancel-running": ("PendingCancelled: cancelled by the notebook\n", "(True, True)"),
    "cancel-before-start": ("cancel() -> True\ncancelled: True done: True\n", "[]"),
    # Each to_thread call is released only once the previous one came out of as_completed.
    "as-completed": ("finished: [2, 0, 1]\n", None),
    "wait": (
        "first completed: ['quick'] | still running: True\nafter the timeout: 0 done, 1 not done\n",
        "True",
    ),
    "new-thread": ("", "('side', True)"),
    "manual": ("before: False\ninside: True MainThread\nafter: True\n", None),
    "stop-child": (
        "RuntimeError: <Caller 'trio-child' trio stopped> is stopped\n",
        "(True, False, True, 0)",
    ),
}


def test_caller_every_cell_is_checked() -> None:
    assert code_cell_ids("caller") == list(CALLER)


@pytest.mark.parametrize("cell_id", list(CALLER))
def test_caller(run_example: RunExample, cell_id: str) -> None:
    check_cell(run_example("caller"), cell_id, CALLER[cell_id])


# --- concurrency.ipynb ------------------------------------------------------------------------

MAIN = "('MainThread', 'asyncio')"
CONCURRENCY: dict[str, Expected] = {
    "setup": ("pid: {pid}\n", MAIN),
    # A task cell runs on the main thread's loop, in the notebook's namespace.
    "task": (f"{MAIN}\n", None),
    "after-task": ("", "'set by the task cell'"),
    # A thread cell runs in a pooled thread with its own (the worker's: asyncio) loop.
    "thread": ("main thread: False | loop: asyncio\n", None),
    "after-thread": ("", "'set by the thread cell'"),
    "thread-trio": ("", "('w', 'trio')"),
    # The same name without backend=: the same thread, whatever its loop.
    "thread-same-name": ("", "(True, ('w', 'trio'))"),
    "thread-caller": ("", "[('w', 'trio')]"),
    "blocking-thread": ("ran while the thread cell blocked: True\n", None),
    "blocking-queue": (
        "ran while the queue cell blocked: False\nran once the cell awaited: True\n",
        None,
    ),
    # A fresh namespace in another worker process.
    "process": ("pid: {pid}\n", "(False, False)"),
    "after-process": ("", "('set by the task cell', 'set by the thread cell')"),
}


def pid_of(run: Run, cell_id: str) -> int:
    [(name, text)] = streams(run.outputs(cell_id))
    assert name == "stdout" and text.startswith("pid: "), text
    return int(text.removeprefix("pid: ").partition("\n")[0])


def test_concurrency_every_cell_is_checked() -> None:
    assert code_cell_ids("concurrency") == list(CONCURRENCY)


@pytest.mark.parametrize("cell_id", list(CONCURRENCY))
def test_concurrency(run_example: RunExample, cell_id: str) -> None:
    run = run_example("concurrency")
    stdout, result = CONCURRENCY[cell_id]
    if "{pid}" in stdout:  # which pids: test_concurrency_process_cell_runs_in_another_worker
        stdout = stdout.format(pid=pid_of(run, cell_id))
    check_cell(run, cell_id, (stdout, result))


def test_concurrency_process_cell_runs_in_another_worker(run_example: RunExample) -> None:
    run = run_example("concurrency")
    assert pid_of(run, "process") != pid_of(run, "setup")


# --- concurrency_run_all.ipynb ----------------------------------------------------------------

RUN_ALL: dict[str, Expected] = {
    "setup": ("", None),
    # It could only finish because the three cells below ran while it waited.
    "waiter": (
        (
            "task cell, in MainThread\n"
            "thread cell, in the main thread: False\n"
            "trio thread cell, in w\n"
        ),
        None,
    ),
    "task": ("", None),
    "thread": ("", None),
    "trio-thread": ("", None),
    "late-task": ("", None),
    "setter": ("", None),
    "final": (
        (
            "the task cell got 42 from a later cell\n"
            "queue cell: waiting | ['task cell', 'thread cell', 'trio thread cell'] "
            "| ['queue cell: done', 'queue cell: setting']\n"
        ),
        "True",
    ),
}


@pytest.fixture(scope="module")
def run_all(kernelspecs: Path) -> tuple[Run, list[str]]:
    return run_all_at_once("concurrency_run_all", warm=True)


def test_run_all_every_cell_is_checked() -> None:
    assert code_cell_ids("concurrency_run_all") == list(RUN_ALL)


@pytest.mark.parametrize("cell_id", list(RUN_ALL))
def test_run_all(run_all: tuple[Run, list[str]], cell_id: str) -> None:
    check_cell(run_all[0], cell_id, RUN_ALL[cell_id])


def test_run_all_reply_order(run_all: tuple[Run, list[str]]) -> None:
    _, order = run_all
    assert sorted(order) == sorted(RUN_ALL)
    # Queue cells reply in their order.
    queue_cells = ["setup", "waiter", "setter", "final"]
    assert [c for c in order if c in queue_cells] == queue_cells
    # The late task cell waits for "setter", which only runs once "waiter" has replied.
    assert order.index("late-task") > order.index("waiter")


def test_run_all_before_the_worker_is_ready(kernelspecs: Path, tmp_path: Path) -> None:
    """Restart and Run All: every cell sent while the first worker still starts (its
    PYTHONSTARTUP sleeps, so the cells surely arrive before it is ready) must run as on a
    warm kernel, queue cells in order and task/thread cells after those sent before them."""
    startup = tmp_path / "slow_start.py"
    startup.write_text("import time\n\ntime.sleep(2)\n")
    env = {**os.environ, "PYTHONSTARTUP": str(startup)}
    run, order = run_all_at_once("concurrency_run_all", warm=False, env=env)
    for cell_id, expected in RUN_ALL.items():
        check_cell(run, cell_id, expected)
    queue_cells = ["setup", "waiter", "setter", "final"]
    assert [c for c in order if c in queue_cells] == queue_cells
