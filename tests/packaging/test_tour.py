"""examples/tour.ipynb, run by scripts/tour (nbclient) on the kernelvisor kernel: every code
cell's outputs are checked, and so is what scripts/tour prints."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest
from kvharness import install_kernelspec, kernelvisor_bin
from nbformat import NotebookNode
from pkgharness import REPO, error_of, result_of, stdout_of

SHARED = "defined in an ordinary cell"


def no_error(cell: NotebookNode) -> None:
    assert error_of(cell) is None, cell.outputs


def prints(text: str, result: str | None = None) -> Callable[[NotebookNode], None]:
    """The cell prints exactly ``text`` and has ``result`` (or no result), and no error."""

    def check(cell: NotebookNode) -> None:
        no_error(cell)
        assert stdout_of(cell) == text, cell.outputs
        assert result_of(cell) == result, cell.outputs

    return check


def fails(ename: str, evalue_part: str, text: str = "") -> Callable[[NotebookNode], None]:
    def check(cell: NotebookNode) -> None:
        err = error_of(cell)
        assert err is not None and err["ename"] == ename, cell.outputs
        assert evalue_part in err["evalue"], err
        assert stdout_of(cell) == text, cell.outputs
        assert "raises-exception" in cell.metadata.get("tags", [])

    return check


def plot(cell: NotebookNode) -> None:
    no_error(cell)
    images = [o for o in cell.outputs if o["output_type"] == "display_data"]
    assert len(images) == 1, cell.outputs
    png = base64.b64decode(images[0]["data"]["image/png"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000


def widget(cell: NotebookNode) -> None:
    no_error(cell)
    (out,) = cell.outputs
    assert out["output_type"] == "execute_result"
    assert out["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
    assert out["data"]["text/plain"].startswith("IntSlider(value=7")


# (the cell's first line, its check), for every code cell in order.
EXPECTED: list[tuple[str, Callable[[NotebookNode], None]]] = [
    ("import os", fails("KeyboardInterrupt", "")),
    ("print(", prints("interrupted; the loop's counter is still here: True\n")),
    ("shared = ", prints("")),
    ("# task", prints(f"task cell, on MainThread | sees: {SHARED}\n")),
    ("# thread", prints(f"thread cell, off the main thread: True | sees: {SHARED}\n")),
    (
        "# process",
        prints(
            "process cell, in a worker of its own: fresh namespace: True\n",
            str(sum(k * k for k in range(1_000_000))),
        ),
    ),
    ("# process", fails("WorkerCrashed", "the main namespace is intact")),
    ("print(", prints(f"after the process cell's crash, the main namespace is intact: {SHARED}\n")),
    ("import threading", prints("", "(49, True)")),
    ("%matplotlib inline", plot),
    ("import ipywidgets", widget),
    ("print(", prints("the slider's value, read in the kernel: 7\n")),
    (
        "import ctypes",
        fails(
            "WorkerCrashed",
            "the namespace was restored to before",
            "reading address 0 ...\n",
        ),
    ),
    (
        "print(",
        prints(
            "the kernel is alive; defined before the crash: defined in an ordinary cell"
            " and the slider at 7\n"
        ),
    ),
]


@pytest.mark.timeout(300)
def test_tour(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    install_kernelspec(kernelvisor_bin(), prefix)
    out = tmp_path / "tour.ipynb"
    env = {
        **os.environ,
        "JUPYTER_PATH": str(prefix / "share/jupyter"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }
    proc = subprocess.run(
        [sys.executable, REPO / "scripts/tour", "--save", out],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    nb = nbformat.read(out, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert len(cells) == len(EXPECTED)
    for cell, (first_line, check) in zip(cells, EXPECTED, strict=True):
        assert cell.source.startswith(first_line), (first_line, cell.source)
        check(cell)
    counts = [c.execution_count for c in cells]
    assert counts == sorted(counts) and None not in counts, counts

    # What scripts/tour prints: every cell, with its outputs.
    printed = proc.stdout
    assert "running examples/tour.ipynb on the 'kernelvisor' kernel" in printed
    assert "→ WorkerCrashed: the worker process died (killed by SIGSEGV (signal 11))" in printed
    assert "→ KeyboardInterrupt" in printed
    assert "→ (49, True)" in printed
    assert "[image/png" in printed
    assert "[application/vnd.jupyter.widget-view+json]" in printed
