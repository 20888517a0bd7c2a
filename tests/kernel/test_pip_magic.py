"""``%pip`` in a real kernel (issue #4): IPython's magic runs ``<worker python> -m pip ...`` as a
shell command, so its output must come back as stream output, in order, before the reply.

Nothing is downloaded and the venv is not touched: the package is a wheel built here with
``zipfile`` and installed with ``--no-index --target <tmpdir>``. Both kernels run the same
checks, since ``%pip`` is meant to behave as it does on ipykernel.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.util
import re
import secrets
import zipfile
from pathlib import Path

import pip
from kvharness import BOTH_KERNELS, Kernel, execute, of_type, result_text, stream_text

# pip, on a loaded CI box, starts in a second or two; this only bounds a hang.
PIP_TIMEOUT = 90.0
RESTART_NOTE = "Note: you may need to restart the kernel to use updated packages.\n"


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def build_wheel(directory: Path, name: str, version: str, module_source: str) -> Path:
    """A pure-Python wheel with one package ``name`` (``__init__.py`` = module_source), its
    ``METADATA``, ``WHEEL`` and a ``RECORD`` with the hash and size of every other file."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": module_source.encode(),
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            "Summary: a wheel built by kernelvisor's %pip test\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: kernelvisor-tests\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record_path = f"{dist_info}/RECORD"
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[record_path] = (record + f"{record_path},,\n").encode()
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def stdout_of(iopub: list[dict]) -> str:
    # ipykernel runs shell commands under a pty, which turns "\n" into "\r\n".
    return stream_text(iopub, "stdout").replace("\r\n", "\n")


@BOTH_KERNELS
def test_pip_install_local_wheel(kernel: Kernel, tmp_path: Path) -> None:
    name = f"kvpipdemo{secrets.token_hex(4)}"  # a normalized name: pip prints it as is
    value = secrets.token_hex(8)
    wheels, target = tmp_path / "wheels", tmp_path / "target"
    wheels.mkdir()
    wheel = build_wheel(wheels, name, "1.0", f"VALUE = {value!r}\n")
    assert importlib.util.find_spec(name) is None

    kc = kernel.kc
    # Not importable before the install: what is imported later comes from the target.
    reply, iopub = execute(kc, f"import {name}")
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "ModuleNotFoundError"

    reply, iopub = execute(
        kc,
        f"%pip install --no-index --no-deps --target {target} {wheel}",
        timeout=PIP_TIMEOUT,
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    assert not of_type(iopub, "error")
    out = stdout_of(iopub)
    # pip's own lines (written by the child process to the worker's fd 1), then IPython's
    # note (printed by the magic after the command returned): in that order, nothing lost.
    assert f"Processing {wheel}\n" in out, out
    assert f"Successfully installed {name}-1.0\n" in out, out
    assert out.endswith(RESTART_NOTE), out
    assert out.index("Successfully installed") < out.index(RESTART_NOTE)
    assert "ERROR" not in stream_text(iopub, "stderr")
    assert (target / name / "__init__.py").is_file()
    assert (target / f"{name}-1.0.dist-info" / "METADATA").is_file()

    code = f"import sys\nsys.path.insert(0, {str(target)!r})\nimport {name}\n{name}.VALUE"
    reply, iopub = execute(kc, code)
    assert reply["content"]["status"] == "ok", reply["content"]
    assert result_text(iopub) == repr(value)
    _, iopub = execute(kc, f"{name}.__file__")
    assert result_text(iopub) == repr(str(target / name / "__init__.py"))
    # The package went to the target only: the interpreter running the tests (the kernels'
    # python) still does not see it.
    assert importlib.util.find_spec(name) is None


@BOTH_KERNELS
def test_pip_version_names_the_workers_python(kernel: Kernel) -> None:
    kc = kernel.kc
    _, iopub = execute(kc, "import sys\nsys.executable, sys.prefix, sys.version_info[:2]")
    text = result_text(iopub)
    assert text is not None
    executable, prefix, (major, minor) = ast.literal_eval(text)

    reply, iopub = execute(kc, "%pip --version", timeout=PIP_TIMEOUT)
    assert reply["content"]["status"] == "ok", reply["content"]
    out = stdout_of(iopub)
    # "pip 26.3 from <prefix>/lib/python3.11/site-packages/pip (python 3.11)", then the note.
    first, _, rest = out.partition("\n")
    assert rest == RESTART_NOTE, out
    match = re.fullmatch(r"pip (\S+) from (.+) \(python (\d+)\.(\d+)\)", first)
    assert match, first
    version, location = match[1], match[2]
    # The worker's pip: this venv's (the kernelspecs point at the tests' interpreter).
    assert version == pip.__version__
    assert Path(location).resolve() == Path(pip.__file__).resolve().parent
    assert Path(location).resolve().is_relative_to(Path(prefix).resolve())
    assert (int(match[3]), int(match[4])) == (major, minor)
    assert Path(executable).is_relative_to(prefix)
