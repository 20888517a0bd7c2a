"""The crash report's frames (crash.py): from the outermost cell frame down to the frame
that crashed, as IPython formats a traceback; nothing when no frame is a cell's."""

from __future__ import annotations

import re
import sys
from types import FrameType

from kernelvisor.crash import REPORT_FRAMES, crash_report

ANSI = re.compile(r"\x1b\[[0-9;]*m")
HERE = __file__


def _cells(filename: str) -> tuple[str, str] | None:
    """Treats this test file as a cell's code."""
    return ("Cell", "In[7]") if filename == HERE else None


def _innermost(depth: int) -> FrameType:
    if depth:
        return _innermost(depth - 1)
    return sys._getframe()


def test_frames_from_the_cell_down() -> None:
    lines = [ANSI.sub("", line) for line in crash_report(_innermost(1), _cells)]
    # Every frame here is in this "cell": the first shown is pytest's call of this test
    # (frames above it are pytest's own files, not shown).
    assert lines[0].startswith("Cell In[7], line "), lines
    assert not [line for line in lines if line.startswith("File ")], lines
    arrows = [line for line in lines if re.match(r"-+> \d+ ", line)]
    assert arrows[-1].endswith("return sys._getframe()"), arrows
    assert "_innermost(1)" in arrows[0] or "crash_report(" in arrows[0], arrows


def test_library_frames_below_the_cell_are_named_as_files() -> None:
    def library_call() -> FrameType:
        return _innermost(0)

    library_call.__code__ = library_call.__code__.replace(co_filename="/usr/lib/lib.py")
    lines = [ANSI.sub("", line) for line in crash_report(library_call(), _cells)]
    files = [line for line in lines if line.startswith("File ")]
    assert len(files) == 1, lines
    assert re.fullmatch(r"File /usr/lib/lib\.py:\d+, in .*library_call\(\)", files[0]), files
    # The frame it called is in the cell again.
    assert lines[lines.index(files[0]) + 2].startswith("Cell In[7], line "), lines


def test_no_cell_frame_no_report_and_deep_stacks_are_cut() -> None:
    assert crash_report(_innermost(0), lambda filename: None) == []
    lines = crash_report(_innermost(3 * REPORT_FRAMES), _cells)
    assert re.fullmatch(r"\[\.\.\. \d+ frames not shown \.\.\.\]", lines[0]), lines[0]
    assert sum(1 for line in lines if ANSI.sub("", line).startswith("Cell In[7]")) == REPORT_FRAMES
