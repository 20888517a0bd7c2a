"""Cheaper IPython tracebacks: one pygments lexer class for stack_data's highlighting.

IPython formats a traceback's source lines with stack_data, whose ``_pygmented_with_ranges``
defines a new pygments lexer class on every call (one per frame shown). pygments compiles a
lexer's token table once per class, so every traceback recompiled Python's whole grammar:
about half the time of formatting a short traceback, e.g. an interrupted cell's
``KeyboardInterrupt`` (and the memory that touches is copied on write after a snapshot).
``install`` replaces that function with one that makes the same output from one class.

IPython also builds, for every traceback, a new style class (stack_data's
``style_with_executing_node``) and a ``Terminal256Formatter`` for it, which maps every token
style of it to the nearest of 256 colours again. ``install`` makes the style class once per
(style, modifier) and keeps each style's colour mapping, so a formatter for it is cheap. The
output is the same.

``cut_kernel_tail`` cuts a KeyboardInterrupt's traceback after the user's last frame: the
SIGINT handler that raised it, or the output code a ``print`` was in, is the kernel's.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import TracebackType
from typing import Any

_installed = False
_lexer_class: type | None = None
# style_with_executing_node's classes, by (style, modifier).
_executing_styles: dict[tuple[Any, str], type] = {}
# Terminal256Formatter's colour mapping, by (style class, bold, underline, italic).
_style_strings: dict[tuple[Any, ...], dict[str, Any]] = {}


def cut_kernel_tail(tb: TracebackType | None) -> None:
    """Cuts a traceback after its last frame outside this package (if it has one): the user
    sees where their code was interrupted, as under Python's own SIGINT handler (a C
    function, so no frames of its own), not our handler's frames or those of the output
    code a ``print(..., flush=True)`` was in; and formatting it reads and highlights no
    source of ours. Frames of ours between frames of theirs (a callback) stay."""
    last_theirs: TracebackType | None = None
    while tb is not None:
        if not tb.tb_frame.f_globals.get("__name__", "").startswith(_PACKAGE):
            last_theirs = tb
        tb = tb.tb_next
    if last_theirs is not None:
        last_theirs.tb_next = None


_PACKAGE = __name__.rpartition(".")[0] + "."


def _range_lexer() -> type:
    """The lexer: pygments' Python 3 lexer, marking tokens that start inside ``ranges``
    (set per instance) as ``ExecutingNode``, as stack_data's own does."""
    global _lexer_class
    if _lexer_class is None:
        from pygments.lexers import get_lexer_by_name

        base: Any = type(get_lexer_by_name("python3"))

        class RangeLexer(base):  # type: ignore[misc, valid-type]
            ranges: Sequence[tuple[int, int]] = ()

            def get_tokens(self, text: str) -> Any:
                length = 0
                for ttype, value in super().get_tokens(text):
                    if any(start <= length < end for start, end in self.ranges):
                        ttype = ttype.ExecutingNode
                    length += len(value)
                    yield ttype, value

        _lexer_class = RangeLexer
    return _lexer_class


def _pygmented_with_ranges(formatter: Any, code: str, ranges: Sequence[tuple[int, int]]) -> Any:
    import pygments

    lexer = _range_lexer()(stripnl=False)
    lexer.ranges = ranges
    try:
        highlighted = pygments.highlight(code, lexer, formatter)
    except Exception:
        # As stack_data: code without highlighting rather than no traceback.
        highlighted = code
    return highlighted.splitlines()


def install() -> None:
    """Patches stack_data (imported here if IPython has not yet: it is about to format a
    traceback); cheap after the first call. A stack_data without the function is left as
    it is."""
    global _installed
    if _installed:
        return
    _installed = True
    try:
        core: Any = importlib.import_module("stack_data.core")
    except ImportError:
        return
    if callable(getattr(core, "_pygmented_with_ranges", None)):
        core._pygmented_with_ranges = _pygmented_with_ranges
    _memoize_styles(core)


def _memoize_styles(core: Any) -> None:
    """One executing-node style class per (style, modifier), and one colour mapping per
    style class for ``Terminal256Formatter`` (both were rebuilt for every traceback)."""
    make_style = getattr(core, "style_with_executing_node", None)
    if callable(make_style):

        def style_with_executing_node(style: Any, modifier: str) -> Any:
            key = (style, modifier)
            made = _executing_styles.get(key)
            if made is None:
                made = _executing_styles[key] = make_style(style, modifier)
            return made

        core.style_with_executing_node = style_with_executing_node
        package = importlib.import_module("stack_data")
        if getattr(package, "style_with_executing_node", None) is make_style:
            package.style_with_executing_node = style_with_executing_node
    try:
        from pygments.formatters.terminal256 import Terminal256Formatter
    except ImportError:
        return
    setup = getattr(Terminal256Formatter, "_setup_styles", None)
    if not callable(setup):
        return

    def _setup_styles(self: Any) -> None:
        key = (self.style, self.usebold, self.useunderline, self.useitalic)
        known = _style_strings.get(key)
        if known is None:
            setup(self)
            _style_strings[key] = dict(self.style_string)
        else:
            self.style_string.update(known)

    Terminal256Formatter._setup_styles = _setup_styles
