"""kernelvisor.tracebacks: IPython's tracebacks look exactly as before, from one lexer class, one
executing-node style class and one colour mapping per style."""

from __future__ import annotations

import linecache
import sys
import time
import types
from collections.abc import Callable

import stack_data
import stack_data.core
from IPython.core.interactiveshell import InteractiveShell
from kernelvisor import tracebacks
from pygments.formatters.terminal256 import Terminal256Formatter

CELL = """\
def inner(n):
    total = n * 2
    raise KeyboardInterrupt(total)

def outer():
    return inner(21)

outer()
"""


FILENAME = "<kernelvisor-test-cell>"


def _formatted(shell: InteractiveShell) -> list[str]:
    # Registered as IPython registers a cell's source, so the traceback shows its lines.
    linecache.cache[FILENAME] = (len(CELL), None, CELL.splitlines(True), FILENAME)
    try:
        exec(compile(CELL, FILENAME, "exec"), {})  # noqa: S102 (a cell, as IPython runs one)
    except KeyboardInterrupt:
        etype, value, tb = sys.exc_info()
        assert etype is not None and value is not None
        return shell.InteractiveTB.structured_traceback(etype, value, tb)
    raise AssertionError("the cell did not raise")


def test_same_traceback_from_one_lexer_class() -> None:
    shell = InteractiveShell.instance()
    original = stack_data.core._pygmented_with_ranges
    make_style = stack_data.style_with_executing_node
    setup_styles = Terminal256Formatter._setup_styles
    try:
        before = _formatted(shell)
        tracebacks.install()
        assert stack_data.core._pygmented_with_ranges is tracebacks._pygmented_with_ranges
        after = _formatted(shell)
        # Colours, the executing-node highlight and every line are as stack_data made them.
        assert after == before
        assert any("total = n *" in part for part in after), "the cell's source is shown"
        # The executing node (the call on the arrow line) is highlighted, as stack_data does.
        assert any("\x1b[30;43minner" in part for part in after)
        lexer = tracebacks._range_lexer()
        _formatted(shell)
        assert tracebacks._range_lexer() is lexer, "one class, compiled once"
        style = stack_data.style_with_executing_node("monokai", "bg:#ff0000")
        assert stack_data.style_with_executing_node("monokai", "bg:#ff0000") is style
        assert stack_data.core.style_with_executing_node is stack_data.style_with_executing_node
        # A formatter for a known style gets the mapping the first one computed.
        first = Terminal256Formatter(style=style).style_string
        assert Terminal256Formatter(style=style).style_string == first
        assert Terminal256Formatter(style=style, nobold=True).style_string != first
        # And it is what makes a traceback cheaper: several times faster than the original
        # on a warm process (generous bound for a loaded machine).
        stack_data.core._pygmented_with_ranges = original
        t0 = time.perf_counter()
        for _ in range(5):
            _formatted(shell)
        slow = time.perf_counter() - t0
        stack_data.core._pygmented_with_ranges = tracebacks._pygmented_with_ranges
        t0 = time.perf_counter()
        for _ in range(5):
            _formatted(shell)
        fast = time.perf_counter() - t0
        assert fast < slow, (fast, slow)
    finally:
        stack_data.core._pygmented_with_ranges = original
        stack_data.style_with_executing_node = make_style
        stack_data.core.style_with_executing_node = make_style
        Terminal256Formatter._setup_styles = setup_styles
        tracebacks._installed = False


def _raise_it() -> None:
    raise KeyboardInterrupt


def _call(f: Callable[[], None]) -> None:
    f()


def test_a_traceback_is_cut_after_the_users_last_frame() -> None:
    # The kernel's frames at the end go (the SIGINT handler, the output code a print was in);
    # one of ours between two of the user's (a callback) stays. "Ours": code run with the
    # globals of a module of the kernel's package.
    ours = {"__name__": "kernelvisor.example"}
    raise_ours = types.FunctionType(_raise_it.__code__, ours)
    call_ours = types.FunctionType(_call.__code__, ours)

    def callback() -> None:
        raise_ours()

    def cell() -> None:
        call_ours(callback)

    try:
        cell()
    except KeyboardInterrupt as exc:
        tb = exc.__traceback__
    tracebacks.cut_kernel_tail(tb)
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert names == [
        "test_a_traceback_is_cut_after_the_users_last_frame",
        "cell",
        "_call",
        "callback",
    ]
