"""The kernelvisor command line: install, --version/--help, and clean failure on bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from kvharness import REPO


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def assert_no_panic(proc: subprocess.CompletedProcess[str]) -> None:
    assert "panicked" not in proc.stderr, proc.stderr
    assert "RUST_BACKTRACE" not in proc.stderr, proc.stderr


def test_install_writes_kernelspec(kv_bin: Path, tmp_path: Path) -> None:
    proc = run(
        [str(kv_bin), "install", "--prefix", str(tmp_path), "--name", "x"]
        + ["--display-name", "X Y", "--env", "A=B", "--python", sys.executable]
    )
    assert proc.returncode == 0, proc.stderr
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "x"
    spec = json.loads((spec_dir / "kernel.json").read_text())
    argv = spec["argv"]
    assert Path(argv[0]).is_absolute()
    assert os.path.samefile(argv[0], kv_bin)
    assert argv[argv.index("-f") + 1] == "{connection_file}"
    python = argv[argv.index("--python") + 1]
    assert Path(python).is_absolute()
    # Must stay the venv's python (not its resolved symlink target), or the worker package
    # installed in the venv would not be importable.
    probe = run([python, "-c", "import sys; print(sys.prefix)"])
    assert probe.stdout.strip() == sys.prefix
    assert spec["display_name"] == "X Y"
    assert spec["language"] == "python"
    assert spec["interrupt_mode"] in ("signal", "message")
    assert spec["env"] == {"A": "B"}

    listed = run(
        [sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
        env={**os.environ, "JUPYTER_PATH": str(tmp_path / "share" / "jupyter")},
    )
    assert listed.returncode == 0, listed.stderr
    specs = json.loads(listed.stdout)["kernelspecs"]
    assert "x" in specs
    assert os.path.samefile(specs["x"]["resource_dir"], spec_dir)
    assert specs["x"]["spec"]["display_name"] == "X Y"


def test_install_writes_logos(kv_bin: Path, tmp_path: Path) -> None:
    proc = run([str(kv_bin), "install", "--prefix", str(tmp_path), "--python", sys.executable])
    assert proc.returncode == 0, proc.stderr
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "kernelvisor"
    assert (spec_dir / "kernel.json").is_file()
    logos = sorted(p.name for p in spec_dir.glob("logo-*.png"))
    assert logos, f"no logos in {sorted(p.name for p in spec_dir.iterdir())}"
    for name in logos:
        assert (spec_dir / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name


def test_install_user_goes_to_home(kv_bin: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_DATA_HOME", "JUPYTER_DATA_DIR")}
    env["HOME"] = str(tmp_path)
    proc = run([str(kv_bin), "install", "--user", "--python", sys.executable], env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / ".local/share/jupyter/kernels/kernelvisor/kernel.json").is_file()


def test_install_rejects_python_without_worker(kv_bin: Path, tmp_path: Path) -> None:
    """A python that cannot import the worker package would make a kernel that never starts."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    proc = run([str(kv_bin), "install", "--prefix", str(tmp_path), "--python", str(fake)])
    assert proc.returncode > 0
    assert str(fake) in proc.stderr
    assert not (tmp_path / "share/jupyter/kernels/kernelvisor/kernel.json").exists()
    assert_no_panic(proc)


def test_version(kv_bin: Path) -> None:
    proc = run([str(kv_bin), "--version"])
    assert proc.returncode == 0, proc.stderr
    version = tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]
    assert re.search(rf"\b{re.escape(version)}\b", proc.stdout), proc.stdout


def test_help(kv_bin: Path) -> None:
    proc = run([str(kv_bin), "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "install" in proc.stdout
    assert "-f" in proc.stdout


def test_missing_connection_file_fails_cleanly(kv_bin: Path) -> None:
    proc = run([str(kv_bin), "-f", "/nonexistent/kernel-x.json", "--python", sys.executable])
    assert proc.returncode > 0
    assert "/nonexistent/kernel-x.json" in proc.stderr
    assert_no_panic(proc)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""], ids=["syntax", "array", "empty"])
def test_invalid_connection_file_fails_cleanly(kv_bin: Path, tmp_path: Path, content: str) -> None:
    conn = tmp_path / "kernel-bad.json"
    conn.write_text(content)
    proc = run([str(kv_bin), "-f", str(conn), "--python", sys.executable])
    assert proc.returncode > 0
    assert proc.stderr.strip()
    assert_no_panic(proc)


def test_install_prints_its_warnings(kv_bin: Path, tmp_path: Path) -> None:
    """`install` logs through the same tracing set-up as the kernel run, so warnings show."""
    missing = tmp_path / "no-such-python"
    proc = run(
        [str(kv_bin), "install", "--prefix", str(tmp_path), "--no-check", "--python", str(missing)]
    )
    assert proc.returncode == 0, proc.stderr
    assert "python does not exist (--no-check)" in proc.stderr, proc.stderr
    assert str(missing) in proc.stderr
    quiet = run(
        [str(kv_bin), "install", "--prefix", str(tmp_path), "--no-check", "--python", str(missing)]
        + ["--log-level", "error"]
    )
    assert quiet.returncode == 0, quiet.stderr
    assert "does not exist" not in quiet.stderr, quiet.stderr
