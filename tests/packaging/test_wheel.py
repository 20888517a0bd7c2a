"""The wheel, as a user gets it: ``pip wheel .`` builds one wheel holding the supervisor binary and
the worker package, at Cargo.toml's version. Installed into a fresh virtualenv outside the
repository, with no Rust toolchain on PATH, ``kernelvisor install`` (and ``python -m kernelvisor
install``) register a kernelspec for that virtualenv's Python, and nbclient runs a notebook on it:
output, a segfaulting cell that leaves the kernel alive, and a cell after it.

The wheel build reuses target/release (maturin runs ``cargo build --release`` in the repository,
which scripts/install has already done), so it costs seconds, not a compile.
"""

from __future__ import annotations

import json
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from pkgharness import (
    REPO,
    cargo_version,
    code_cell,
    error_of,
    make_venv,
    path_without_rust,
    result_of,
    run,
    stdout_of,
)

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel .`` at the repository root."""
    out = tmp_path_factory.mktemp("wheelhouse")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, REPO])
    wheels = list(out.glob("kernelvisor-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv (in a temp dir, outside the repository) with the wheel installed."""
    venv = make_venv(tmp_path_factory.mktemp("user") / "venv")
    assert REPO not in venv.parents
    path = path_without_rust(venv / "bin")
    env = {"PATH": path, "HOME": str(venv.parent), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run([venv / "bin/python", "-m", "pip", "install", "-q", wheel], env=env, cwd=venv.parent)
    yield venv


def test_wheel_holds_binary_and_worker_at_one_version(wheel: Path) -> None:
    version = cargo_version()
    assert wheel.name.startswith(f"kernelvisor-{version}-"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert f"kernelvisor-{version}.data/scripts/kernelvisor" in names
    for module in ("__init__", "__main__", "worker", "caller", "eg_launcher"):
        assert f"kernelvisor/{module}.py" in names, (module, names)
    assert not [n for n in names if n.startswith(("tests/", "src/", "target/"))], names


def test_installed_wheel_registers_and_runs_a_notebook(
    venv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = venv / "bin"
    path = path_without_rust(bin_dir)
    env = {"PATH": path, "HOME": str(tmp_path)}
    kv = bin_dir / "kernelvisor"
    assert kv.is_file()

    # One version on both sides: the binary's and the Python distribution's.
    version = cargo_version()
    assert version in run([kv, "--version"], env=env).stdout
    dist_version = run(
        [
            bin_dir / "python",
            "-c",
            "import importlib.metadata as m; print(m.version('kernelvisor'))",
        ],
        env=env,
        cwd=tmp_path,
    ).stdout.strip()
    assert dist_version == version

    # `kernelvisor install --user`, without --python: the kernelspec gets the python beside
    # the binary, the venv's. (The user's Jupyter data dir is a temp dir here.)
    data_dir = tmp_path / "jupyter-data"
    run([kv, "install", "--user"], env=env | {"JUPYTER_DATA_DIR": str(data_dir)}, cwd=tmp_path)
    spec = json.loads((data_dir / "kernels/kernelvisor/kernel.json").read_text())
    argv = spec["argv"]
    assert Path(argv[0]) == kv
    assert Path(argv[argv.index("--python") + 1]).parent == bin_dir
    # python -m kernelvisor install: the same binary, this very python.
    prefix = tmp_path / "prefix"
    run(
        [bin_dir / "python", "-m", "kernelvisor", "install", "--prefix", prefix, "--name", "kv-m"],
        env=env,
        cwd=tmp_path,
    )
    spec_m = json.loads((prefix / "share/jupyter/kernels/kv-m/kernel.json").read_text())
    assert Path(spec_m["argv"][0]) == kv
    assert spec_m["argv"][spec_m["argv"].index("--python") + 1] == str(bin_dir / "python")

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        code_cell("import sys, kernelvisor\nprint(sys.prefix)\nprint(kernelvisor.__file__)"),
        code_cell(
            "import ctypes\nprint('about to crash', flush=True)\nctypes.string_at(0)",
            "raises-exception",
        ),
        code_cell("import sys\nprint('alive in', sys.prefix)\n6 * 7"),
    ]
    # The kernel inherits this environment: no Rust on its PATH either.
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(data_dir))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share/jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    for name in ("kernelvisor", "kv-m"):
        client = NotebookClient(
            nb,
            kernel_name=name,
            timeout=60,
            startup_timeout=60,
            resources={"metadata": {"path": str(tmp_path)}},
        )
        client.execute()
        first, crash, after = nb.cells
        prefix_line, module_line = stdout_of(first).splitlines()
        assert Path(prefix_line) == venv
        assert venv in Path(module_line).parents
        assert REPO not in Path(module_line).parents
        assert stdout_of(crash) == "about to crash\n"
        err = error_of(crash)
        assert err is not None and err["ename"] == "WorkerCrashed", crash.outputs
        assert "SIGSEGV" in err["evalue"]
        assert stdout_of(after) == f"alive in {venv}\n"
        assert result_of(after) == "42"
