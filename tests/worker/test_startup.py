"""The user's IPython profile: config files and start-up code run when a worker warms up."""

from __future__ import annotations

from pathlib import Path

from ipc_client import WorkerProcess


def result(proc: WorkerProcess, code: str) -> str:
    [out] = proc.execute(code).iopub("execute_result")
    return str(out.content["data"]["text/plain"])


def test_profile_config_and_startup_code(tmp_path: Path) -> None:
    profile = tmp_path / "ipython" / "profile_default"
    (profile / "startup").mkdir(parents=True)
    (profile / "ipython_config.py").write_text("c.InteractiveShell.autocall = 2\n")
    (profile / "ipython_kernel_config.py").write_text(
        "c.IPKernelApp.exec_lines = ['from_exec_lines = STARTUP_A + 1']\n"
    )
    (profile / "startup" / "00-first.py").write_text("STARTUP_A = 1\n")
    (profile / "startup" / "10-second.ipy").write_text(
        "%env STARTUP_ENV=from-ipy\nSTARTUP_B = STARTUP_A * 10\n"
    )
    (profile / "startup" / "20-broken.py").write_text(
        "raise RuntimeError('broken start-up file')\n"
    )
    (profile / "startup" / "30-broken.ipy").write_text("1/0\n")
    pythonstartup = tmp_path / "pythonstartup.py"
    pythonstartup.write_text("FROM_PYTHONSTARTUP = 'yes'\n")
    proc = WorkerProcess(
        env={"IPYTHONDIR": str(tmp_path / "ipython"), "PYTHONSTARTUP": str(pythonstartup)}
    )
    try:
        # Failing start-up code is logged; nothing of it reaches iopub (no request runs).
        first = proc.execute("get_ipython().autocall")
        assert [m.msg_type for m in first.messages if m.msg_type == "error"] == []
        assert "ZeroDivisionError" in proc.stderr()
        assert result(proc, "get_ipython().autocall") == "2"  # ipython_config.py
        assert result(proc, "import os; os.environ['STARTUP_ENV']") == "'from-ipy'"
        # Files in name order (the .ipy one used the .py one's name), then exec_lines.
        assert result(proc, "(STARTUP_A, STARTUP_B, from_exec_lines)") == "(1, 10, 2)"
        assert result(proc, "FROM_PYTHONSTARTUP") == "'yes'"
        # A broken file is logged, not fatal; the worker's own settings still apply.
        assert "broken start-up file" in proc.stderr()
        assert result(proc, "get_ipython().history_manager.db_cache_size") == "1000"
        # Start-up names are hidden from %who, as in IPython.
        assert "STARTUP_A" not in proc.execute("mine = 1\n%who").stream_text()
    finally:
        proc.close()
