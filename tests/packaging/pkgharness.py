"""Helpers for the packaging tests: the repository's version, a PATH without Rust, running
notebooks through nbclient and reading their outputs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import nbformat
from nbformat import NotebookNode

REPO = Path(__file__).resolve().parents[2]
RUST_TOOLS = ("cargo", "rustc", "rustup")


def cargo_version() -> str:
    """The version in Cargo.toml (the wheel's version too)."""
    return tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]


def path_without_rust(*first: Path) -> str:
    """A PATH of ``first`` and the system's default dirs, less any dir that has a Rust tool."""
    dirs = [str(d) for d in first]
    for d in os.defpath.split(os.pathsep):
        if d and not any((Path(d) / tool).exists() for tool in RUST_TOOLS):
            dirs.append(d)
    path = os.pathsep.join(dirs)
    for tool in RUST_TOOLS:
        assert shutil.which(tool, path=path) is None, f"{tool} is still on {path}"
    return path


def run(argv: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Runs ``argv``; fails the test with its output if it fails."""
    proc = subprocess.run(
        [str(a) for a in argv], check=False, capture_output=True, text=True, timeout=600, **kwargs
    )
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def code_cell(source: str, *tags: str) -> NotebookNode:
    """A code cell with ``tags``."""
    cell = nbformat.v4.new_code_cell(source)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def stdout_of(cell: NotebookNode) -> str:
    """All the cell's stdout text."""
    return "".join(
        o["text"] for o in cell.outputs if o["output_type"] == "stream" and o["name"] == "stdout"
    )


def error_of(cell: NotebookNode) -> NotebookNode | None:
    """The cell's error output, if any."""
    errors = [o for o in cell.outputs if o["output_type"] == "error"]
    assert len(errors) <= 1, errors
    return errors[0] if errors else None


def result_of(cell: NotebookNode) -> str | None:
    """The cell's execute_result as text/plain, if any."""
    for o in cell.outputs:
        if o["output_type"] == "execute_result":
            return o["data"]["text/plain"]
    return None


def python_of_venv(venv: Path) -> Path:
    """The venv's python."""
    return venv / "bin" / "python"


def make_venv(where: Path) -> Path:
    """A fresh virtualenv at ``where``, made by the base interpreter of this one."""
    base = getattr(sys, "_base_executable", sys.executable)
    run([base, "-m", "venv", where])
    return where
