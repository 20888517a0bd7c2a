"""The user's IPython profile, as ipykernel uses it: configuration files, then start-up code.

Workers are started ahead of time (a warm pool), so this runs when a worker warms up: a worker
that replaces a crashed one already has the start-up names."""

from __future__ import annotations

import glob
import logging
import os
from typing import TYPE_CHECKING

from traitlets.config import Config
from traitlets.config.loader import load_pyconfig_files

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

log = logging.getLogger(__name__)

CONFIG_FILES = ["ipython_config.py", "ipython_kernel_config.py"]


def profile_path() -> str:
    from IPython.paths import get_ipython_dir

    return os.path.join(get_ipython_dir(), "profile_default")


def user_config() -> Config:
    """The default profile's config files, merged (missing files are skipped)."""
    path = profile_path()
    if not os.path.isdir(path):
        return Config()
    try:
        return load_pyconfig_files(CONFIG_FILES, path)
    except Exception:  # a broken user config must not keep the worker from starting
        log.exception("cannot load the IPython profile config in %s", path)
        return Config()


def run_startup(shell: InteractiveShell) -> None:
    """$PYTHONSTARTUP, the profile's startup/*.py and *.ipy (by name), then exec_lines and
    exec_files from the config; the names they define are hidden from %who, as in IPython."""
    before = set(shell.user_ns)
    # No request is running: a failure goes to the worker's log, not to a notebook.
    shell._showtraceback = _log_traceback  # type: ignore[method-assign]
    try:
        _run_all(shell)
    finally:
        del shell._showtraceback
    shell.user_ns_hidden.update({k: v for k, v in shell.user_ns.items() if k not in before})


def _log_traceback(etype: type, evalue: BaseException, stb: list[str]) -> None:
    log.error("start-up code failed: %s: %s", etype.__name__, evalue)


def _run_all(shell: InteractiveShell) -> None:
    files = []
    startup = os.environ.get("PYTHONSTARTUP")
    if startup and os.path.isfile(startup):
        files.append(startup)
    startup_dir = os.path.join(profile_path(), "startup")
    files += sorted(
        glob.glob(os.path.join(startup_dir, "*.py")) + glob.glob(os.path.join(startup_dir, "*.ipy"))
    )
    app = _app_config(shell.config)
    files += [str(f) for f in app.get("exec_files", [])]
    for path in files:
        _run_file(shell, path)
    for line in app.get("exec_lines", []):
        try:
            shell.run_cell(str(line), store_history=False, silent=True)
        except Exception:
            log.exception("exec_lines entry %r failed", line)


def _app_config(config: Config) -> Config:
    """exec_lines/exec_files as ipykernel reads them (IPKernelApp, or InteractiveShellApp)."""
    merged = Config()
    for section in ("InteractiveShellApp", "IPKernelApp"):
        if section in config:
            merged.merge(config[section])
    return merged


def _run_file(shell: InteractiveShell, path: str) -> None:
    try:
        if path.endswith(".ipy"):
            shell.safe_execfile_ipy(path, raise_exceptions=True)
        else:
            shell.safe_execfile(path, shell.user_ns, raise_exceptions=True)
    except Exception:  # logged to the worker's stderr; the worker still starts
        log.exception("start-up file %s failed", path)
