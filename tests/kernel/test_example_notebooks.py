"""kernelvisor's example notebooks (the ideas of async-kernel's example notebooks), executed
by nbclient on the kernelvisor kernel: ``caller.ipynb``, the ``Caller`` API from notebook
cells.

Every cell asserts what it shows; the tests here check each cell's reply and its exact
outputs. The notebooks are written so that their outputs do not depend on timing: a cell
that waits for something waits for an event, not for a duration.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest
from kvharness import KERNELVISOR
from test_notebooks import NOTEBOOK_DIR, Run, execute_notebook, streams, types

Expected = tuple[str, str | None]  # (the cell's stdout, its execute_result's text/plain)
RunExample = Callable[[str], Run]


@pytest.fixture(scope="module")
def run_example(kernelspecs: Path, tmp_path_factory: pytest.TempPathFactory) -> RunExample:
    """Execute an example notebook on kernelvisor once per module; later calls return the same
    run (or raise the same error)."""
    done: dict[str, Run | Exception] = {}

    def run(name: str) -> Run:
        if name not in done:
            try:
                done[name] = execute_notebook(name, KERNELVISOR, tmp_path_factory.mktemp(name))
            except Exception as exc:  # noqa: BLE001 - kept and re-raised for each test
                done[name] = exc
        result = done[name]
        if isinstance(result, Exception):
            raise result
        return result

    return run


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
