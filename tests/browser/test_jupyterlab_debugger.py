"""JupyterLab's debugger with kernelvisor, in headless Chromium: turn the debugger on from the
notebook toolbar, set a breakpoint by clicking the editor's gutter, run the cell, and see the
stopped frame's locals in the variables panel; continue, and the cell finishes."""

from __future__ import annotations

import pytest
from labharness import UI_TIMEOUT_MS, Lab
from playwright.sync_api import Page, expect
from test_jupyterlab import open_notebook, wait_js, write_notebook

pytestmark = pytest.mark.timeout(300)

CELL = "def double(x):\n    y = x * 2\n    return y\n\nresult = double(21)\nprint('result', result)"
BREAK_LINE = 3


def test_breakpoint_from_the_gutter_shows_the_locals(page: Page, lab: Lab) -> None:
    name = write_notebook(lab, "debugger.ipynb", [(CELL, [])])
    open_notebook(page, lab, name)

    # The bug button is in the toolbar because the kernelspec says `debugger: true`.
    bug = page.locator(".jp-NotebookPanel-toolbar .jp-DebuggerBugButton")
    # Enabled once JupyterLab has checked the spec (it is rendered disabled first).
    expect(bug).to_have_attribute("aria-disabled", "false", timeout=UI_TIMEOUT_MS)
    bug.click()
    expect(bug).to_have_attribute("aria-pressed", "true", timeout=UI_TIMEOUT_MS)

    # The breakpoint gutter appears in the cell's editor once the debugger is on.
    cell = page.locator(".jp-Notebook .jp-CodeCell").first
    gutter = cell.locator(".cm-breakpoint-gutter .cm-gutterElement")
    expect(gutter.nth(BREAK_LINE)).to_be_visible(timeout=UI_TIMEOUT_MS)
    # gutterElement 0 is CodeMirror's spacer; lines follow from 1.
    gutter.nth(BREAK_LINE).click()
    expect(gutter.nth(BREAK_LINE).locator(".cm-breakpoint-icon")).to_have_count(
        1, timeout=UI_TIMEOUT_MS
    )
    # The breakpoints panel lists it, at the cell's file in the kernel's cell directory.
    listed = page.locator(".jp-DebuggerBreakpoint")
    expect(listed).to_have_count(1, timeout=UI_TIMEOUT_MS)
    expect(listed.locator(".jp-DebuggerBreakpoint-line")).to_have_text(str(BREAK_LINE))
    expect(listed.locator(".jp-DebuggerBreakpoint-source")).to_contain_text("kernelvisor_")

    cell.click()
    # Not awaited: the command's promise settles only once the cell has run.
    page.evaluate("() => { void window.jupyterapp.commands.execute('notebook:run-cell'); }")

    # Stopped at the breakpoint: the call stack names the function, the variables panel shows
    # its locals with their values.
    expect(page.locator(".jp-DebuggerCallstackFrame-name").first).to_have_text(
        "double", timeout=UI_TIMEOUT_MS
    )
    # (The tree view; the table view beside it is hidden.)
    variables = page.locator(".jp-DebuggerVariables-body:visible")
    expect(variables.locator(".jp-DebuggerVariables-name")).to_have_text(
        ["x", "y"], timeout=UI_TIMEOUT_MS
    )
    expect(variables).to_contain_text("21")
    expect(variables).to_contain_text("42")

    # Continue (the debugger's command, as its toolbar button runs it): the cell finishes.
    page.evaluate("() => { void window.jupyterapp.commands.execute('debugger:continue'); }")
    expect(cell.locator(".jp-OutputArea-output")).to_contain_text(
        "result 42", timeout=UI_TIMEOUT_MS
    )
    wait_js(
        page,
        """() => window.jupyterapp.shell.currentWidget.sessionContext.kernelDisplayStatus
            === 'idle'""",
        "the kernel idle after the cell",
    )
