"""kernelvisor in JupyterLab 4, driven in headless Chromium: notebooks are opened in the real UI,
run with Run All (and a keyboard shortcut), and checked by what the page shows."""

from __future__ import annotations

import json
from typing import Any

import nbformat
import psutil
import pytest
from labharness import UI_TIMEOUT_MS, KernelTraffic, Lab
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect

# Starting the server and Chromium is part of the first test; both are well under this.
pytestmark = pytest.mark.timeout(300)

Cell = tuple[str, list[str]]  # (source, tags)

# The open notebook's panel, if it is the one at `path`.
PANEL_JS = """
(path) => {
    const app = window.jupyterapp;
    const w = app && app.shell.currentWidget;
    return w && w.context && w.context.path === path ? w : null;
}
"""

# What each code cell of the open notebook shows: its input prompt, its outputs' text and
# prompts, and whether it holds a rendered slider widget.
CELLS_JS = """
() => {
    const panel = window.jupyterapp.shell.currentWidget;
    return Array.from(panel.node.querySelectorAll('.jp-Notebook .jp-Cell.jp-CodeCell')).map(c => ({
        prompt: (c.querySelector('.jp-InputPrompt')?.textContent ?? '').trim(),
        outputs: Array.from(c.querySelectorAll('.jp-OutputArea-output')).map(o => o.innerText),
        outputPrompts: Array.from(c.querySelectorAll('.jp-OutputArea-prompt'))
            .map(o => o.textContent.trim()),
        slider: c.querySelector('.jupyter-widgets.widget-slider') !== null,
    }));
}
"""

# True once Run All (if started) has finished, the kernel is idle and no cell of the open
# notebook is queued or running.
SETTLED_JS = """
() => {
    if (window.__kvRunAllDone === false) return false;
    const panel = window.jupyterapp.shell.currentWidget;
    const indicator = panel.node.querySelector('.jp-Notebook-ExecutionIndicator');
    const prompts = Array.from(panel.node.querySelectorAll('.jp-Notebook .jp-InputPrompt'));
    return panel.sessionContext.kernelDisplayStatus === 'idle'
        && (indicator === null || indicator.dataset.status === 'idle')
        && !prompts.some(p => p.textContent.includes('*'));
}
"""


def write_notebook(lab: Lab, name: str, cells: list[Cell]) -> str:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "kernelvisor",
        "display_name": "Python 3 (kernelvisor)",
        "language": "python",
    }
    nb.cells = [nbformat.v4.new_code_cell(src, metadata={"tags": tags}) for src, tags in cells]
    nbformat.write(nb, lab.root / name)
    return name


def describe(page: Page) -> str:
    """The open notebook's cells as the page shows them, for failure messages."""
    try:
        return json.dumps(page.evaluate(CELLS_JS), indent=1)
    except PlaywrightError as exc:
        return f"(cells unreadable: {exc})"


def wait_js(page: Page, js: str, what: str, arg: Any = None) -> None:
    """Waits (generously) until ``js`` is truthy in the page, or fails saying what was awaited
    and what the notebook showed."""
    try:
        page.wait_for_function(js, arg=arg, timeout=UI_TIMEOUT_MS, polling=100)
    except PlaywrightError as exc:
        raise AssertionError(
            f"{what}: not seen in {UI_TIMEOUT_MS / 1000:.0f}s ({exc.message.splitlines()[0]})\n"
            f"cells:\n{describe(page)}"
        ) from None


def open_notebook(page: Page, lab: Lab, name: str) -> str:
    """Opens the notebook in its own workspace, waits until its kernelvisor kernel is idle, and
    starts recording the session's kernel status changes; returns the kernel id."""
    workspace = name.removesuffix(".ipynb")
    page.goto(f"{lab.url}/lab/workspaces/{workspace}/tree/{name}?token={lab.token}")
    wait_js(
        page,
        f"""(path) => {{
            const w = ({PANEL_JS})(path);
            const kernel = w && w.sessionContext.session && w.sessionContext.session.kernel;
            return kernel && kernel.name === 'kernelvisor'
                && w.sessionContext.kernelDisplayStatus === 'idle';
        }}""",
        f"{name} open with an idle kernelvisor kernel",
        arg=name,
    )
    # The toolbar names the kernel, as a user sees it.
    expect(page.locator(".jp-NotebookPanel-toolbar .jp-KernelName")).to_have_text(
        "Python 3 (kernelvisor)", timeout=UI_TIMEOUT_MS
    )
    kernel_id: str = page.evaluate(
        """() => {
            const ctx = window.jupyterapp.shell.currentWidget.sessionContext;
            window.__kvStatuses = [];
            window.__kvConnection = [];
            ctx.statusChanged.connect((_, s) => window.__kvStatuses.push(s));
            ctx.connectionStatusChanged.connect((_, s) => window.__kvConnection.push(s));
            return ctx.session.kernel.id;
        }"""
    )
    return kernel_id


def run_all(page: Page) -> None:
    """Run > Run All Cells, through JupyterLab's command registry. Not awaited here (a hung cell
    must fail a bounded wait, not block); its promise settles once every cell has a reply."""
    page.evaluate(
        """() => {
            window.__kvRunAllDone = false;
            const done = () => { window.__kvRunAllDone = true; };
            window.jupyterapp.commands.execute('notebook:run-all-cells').then(done, done);
        }"""
    )


def wait_settled(page: Page, what: str) -> list[dict[str, Any]]:
    """Waits until the kernel is idle and no cell is queued or running; returns the cells."""
    wait_js(page, SETTLED_JS, what)
    cells: list[dict[str, Any]] = page.evaluate(CELLS_JS)
    return cells


def run_cell_from_keyboard(page: Page, index: int) -> None:
    """Selects the code cell (a click on its prompt: command mode) and runs it with Ctrl+Enter."""
    page.locator(".jp-Notebook .jp-Cell.jp-CodeCell").nth(index).locator(".jp-InputPrompt").click()
    page.keyboard.press("Control+Enter")


def wait_output(page: Page, index: int, expected: str, what: str) -> None:
    """Waits until the code cell's first output reads ``expected`` (whitespace-trimmed)."""
    wait_js(
        page,
        """([index, expected]) => {
            const panel = window.jupyterapp.shell.currentWidget;
            const cell = panel.node.querySelectorAll('.jp-Notebook .jp-Cell.jp-CodeCell')[index];
            const out = cell && cell.querySelector('.jp-OutputArea-output');
            return out !== null && out !== undefined && out.innerText.trim() === expected;
        }""",
        what,
        arg=[index, expected],
    )


def text(cell: dict[str, Any]) -> str:
    return "\n".join(cell["outputs"])


def assert_kernel_never_died(page: Page, lab: Lab, kernel_id: str) -> None:
    """No dialog (JupyterLab shows "Kernel Restarting … appears to have died" when a kernel
    dies), no dead/restarting status, the connection never dropped, and the server still has
    the same kernel, idle."""
    dialogs = page.locator(".jp-Dialog")
    assert dialogs.count() == 0, f"a dialog is open: {dialogs.first.inner_text()!r}"
    statuses: list[str] = page.evaluate("() => window.__kvStatuses")
    assert "busy" in statuses, f"no kernel status change recorded: {statuses}"
    bad = {"dead", "restarting", "autorestarting", "terminating", "unknown"} & set(statuses)
    assert not bad, f"kernel status went {sorted(bad)}: {statuses}"
    connection: list[str] = page.evaluate("() => window.__kvConnection")
    assert "disconnected" not in connection, connection
    kernel = lab.api(f"/api/kernels/{kernel_id}")
    assert kernel["name"] == "kernelvisor"
    assert kernel["execution_state"] == "idle", kernel
    assert page.locator(".jp-Notebook-ExecutionIndicator").get_attribute("data-status") == "idle"
    status_bar = page.locator("#jp-main-statusbar").inner_text()
    assert "Python 3 (kernelvisor) | Idle" in status_bar, status_bar


def supervisor_pid(lab: Lab, kernel_id: str) -> int:
    """The pid of the kernelvisor process that runs this kernel (its connection file is named
    after the kernel id)."""
    found = [p.pid for p in lab.kernel_processes() if any(kernel_id in a for a in p.cmdline())]
    assert len(found) == 1, f"kernelvisor processes for {kernel_id}: {found}"
    return found[0]


def test_run_all_outputs_tags_and_task_cells(page: Page, lab: Lab) -> None:
    raises = "time.sleep(1)\nraise ValueError('expected by its tag')"
    soe_false = "time.sleep(1)\nraise KeyError('stop-on-error=false')"
    name = write_notebook(
        lab,
        "run_all.ipynb",
        [
            ("print('hello from kernelvisor')", []),
            ("6 * 7", []),
            ("import asyncio, time\nev = asyncio.Event()", []),
            # Finishes only because the next cell, a task, runs while it awaits.
            ("await ev.wait()\nprint('released')", []),
            ("# task\nev.set()\nprint('set')", []),
            # Each failing cell is still running when Run All's later requests reach the kernel,
            # so they are queued behind it: whether they run depends on what the error does to
            # the queue. (JupyterLab sends them all at once, but Jupyter Server relays them one
            # by one: 10-25 ms apart has been seen, so an error raised at once could come first.)
            (raises, ["raises-exception"]),
            ("print('ran after raises-exception')", []),
            # JupyterLab sends stop_on_error: true here (it knows only raises-exception): the
            # next cell runs only if the supervisor reads this tag from the request metadata.
            (soe_false, ["stop-on-error=false"]),
            ("print('ran after stop-on-error=false')", []),
            ("time.sleep(1)\n1 / 0", []),
            ("print('must not run: aborted after the error')", []),
        ],
    )
    traffic = KernelTraffic(page)
    kernel_id = open_notebook(page, lab, name)
    run_all(page)
    cells = wait_settled(page, "Run All finished with the kernel idle")
    details = json.dumps(cells, indent=1)
    assert len(cells) == 11, details

    # What JupyterLab sent: every cell at once, each with its cell's tags in the request's
    # metadata; stop_on_error is false only for raises-exception, which JupyterLab reads itself.
    requests = {r["content"]["code"]: r for r in traffic.execute_requests()}
    assert len(requests) == 11, sorted(requests)
    assert requests[raises]["metadata"]["tags"] == ["raises-exception"], requests[raises]
    assert requests[raises]["content"]["stop_on_error"] is False, requests[raises]
    assert requests[soe_false]["metadata"]["tags"] == ["stop-on-error=false"], requests[soe_false]
    assert requests[soe_false]["content"]["stop_on_error"] is True, requests[soe_false]

    hello, answer, setup, awaiting, task, tagged, after_tagged, soe, after_soe, error, aborted = (
        cells
    )
    # Execution counts in order, one per executed cell.
    prompts = [c["prompt"] for c in cells]
    assert prompts[:10] == [f"[{n}]:" for n in range(1, 11)], details
    assert text(hello).strip() == "hello from kernelvisor", details
    assert text(answer).strip() == "42", details
    assert answer["outputPrompts"] == ["[2]:"], details  # an execute_result, with its count
    assert setup["outputs"] == [], details
    assert text(awaiting).strip() == "released", details
    assert text(task).strip() == "set", details
    assert "ValueError" in text(tagged) and "expected by its tag" in text(tagged), details
    assert text(after_tagged).strip() == "ran after raises-exception", details
    assert "KeyError" in text(soe), details
    assert text(after_soe).strip() == "ran after stop-on-error=false", details
    # An error shown as a traceback, with its ename; the queue behind it was aborted.
    assert "ZeroDivisionError" in text(error) and "Traceback" in text(error), details
    assert aborted["outputs"] == [] and aborted["prompt"] != "[11]:", details
    assert_kernel_never_died(page, lab, kernel_id)


def test_ipywidgets_slider_renders_and_talks_to_the_kernel(page: Page, lab: Lab) -> None:
    name = write_notebook(
        lab,
        "widget.ipynb",
        [
            (
                "import ipywidgets as widgets\nslider = widgets.IntSlider(value=7, max=10)\nslider",
                [],
            ),
            ("print('value', slider.value)", []),
        ],
    )
    open_notebook(page, lab, name)
    run_all(page)
    cells = wait_settled(page, "the widget cells finished")
    assert text(cells[1]).strip() == "value 7", json.dumps(cells, indent=1)
    slider = page.locator(".jp-OutputArea-output .jupyter-widgets.widget-slider")
    try:
        slider.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
    except PlaywrightError:
        raise AssertionError(f"no rendered IntSlider; cells:\n{describe(page)}") from None
    # The readout shows the value the kernel set.
    expect(slider.locator(".widget-readout")).to_have_text("7", timeout=UI_TIMEOUT_MS)

    # Moved in the page (keyboard on its handle), the new value reaches the kernel's object
    # through the widget's comm.
    slider.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")
    expect(slider.locator(".widget-readout")).to_have_text("8", timeout=UI_TIMEOUT_MS)
    run_cell_from_keyboard(page, 1)
    wait_output(page, 1, "value 8", "the kernel sees the slider's new value")


def test_segfault_is_an_error_and_the_kernel_lives_on(page: Page, lab: Lab) -> None:
    name = write_notebook(
        lab,
        "crash.ipynb",
        [
            ("print('before the crash')", []),
            # Still running when the next request reaches the kernel (see the run-all test).
            ("import ctypes, time\ntime.sleep(1)\nctypes.string_at(0)", []),
            ("1 + 1", []),
        ],
    )
    kernel_id = open_notebook(page, lab, name)
    pid = supervisor_pid(lab, kernel_id)
    run_all(page)
    cells = wait_settled(page, "Run All over the crashing cell finished with the kernel idle")
    details = json.dumps(cells, indent=1)
    before, crash, after = cells
    assert text(before).strip() == "before the crash", details
    assert "WorkerCrashed" in text(crash) and "SIGSEGV" in text(crash), details
    # Queued behind the crash, it was aborted, as after any error.
    assert after["outputs"] == [], details
    assert_kernel_never_died(page, lab, kernel_id)

    # Run the last cell on its own, from the keyboard.
    run_cell_from_keyboard(page, 2)
    wait_output(page, 2, "2", "1 + 1 shows 2 after the crash")
    cells = wait_settled(page, "the kernel idle after 1 + 1")
    assert cells[2]["outputPrompts"] == [cells[2]["prompt"]], cells[2]
    assert_kernel_never_died(page, lab, kernel_id)
    # The same supervisor process: the worker died, not the kernel.
    assert supervisor_pid(lab, kernel_id) == pid
    assert psutil.Process(pid).is_running()


def test_a_variable_defined_before_a_segfault_survives_it(page: Page, lab: Lab) -> None:
    """Cells run one by one, as a person does: the snapshot forked before the crashing cell
    takes over, and the next cell sees what the cells before it defined."""
    name = write_notebook(
        lab,
        "snapshot.ipynb",
        [
            ("x = 'defined before the crash'", []),
            ("import ctypes\nctypes.string_at(0)", []),
            ("print(x)", []),
        ],
    )
    kernel_id = open_notebook(page, lab, name)
    run_cell_from_keyboard(page, 0)
    wait_settled(page, "the first cell done")
    run_cell_from_keyboard(page, 1)
    wait_js(
        page,
        """() => {
            const panel = window.jupyterapp.shell.currentWidget;
            const cell = panel.node.querySelectorAll('.jp-Notebook .jp-Cell.jp-CodeCell')[1];
            const out = cell && cell.querySelector('.jp-OutputArea-output');
            return out !== null && out !== undefined && out.innerText.includes('WorkerCrashed');
        }""",
        "the crash reported in the cell",
    )
    cells = wait_settled(page, "the kernel idle after the crash")
    assert "restored to before this cell" in text(cells[1]), json.dumps(cells[1], indent=1)
    run_cell_from_keyboard(page, 2)
    wait_output(page, 2, "defined before the crash", "the old variable printed after the crash")
    wait_settled(page, "the kernel idle after the last cell")
    assert_kernel_never_died(page, lab, kernel_id)
