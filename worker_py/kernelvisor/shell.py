"""The IPython shell of a worker: results, displays and errors become iopub messages."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from IPython.core import page
from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell, InteractiveShellABC
from IPython.utils import process as ipython_process
from traitlets import Any as AnyTrait
from traitlets import CBool, Type
from traitlets.config import Config

from kernelvisor.cells import Cell, current_cell
from kernelvisor.compiler import CellCompiler
from kernelvisor.history import HistoryManager
from kernelvisor.messages import loads_object
from kernelvisor.startup import user_config
from kernelvisor.streams import OutStream
from kernelvisor.tracebacks import cut_kernel_tail
from kernelvisor.tracebacks import install as install_fast_tracebacks

# Inputs cached before IPython writes history to sqlite on its own.
HISTORY_CACHE_SIZE = 1000


def shell_config() -> Config:
    """The user's profile config, with the settings the worker relies on on top."""
    config = user_config()
    # history_request is answered off the main thread. IPython < 9 ties its sqlite
    # connection to the creating thread, and treats the resulting error as a corrupt
    # database (it moves the user's history file away), so lift that restriction.
    config.HistoryAccessor.connection_options = {"check_same_thread": False}
    # IPython writes history to sqlite (with fdatasync) after every cell by default, on a
    # thread that then competes for the GIL with the next cell: ~0.6 ms per cell. Inputs
    # are cached instead and written when the worker goes quiet (Executor schedules it);
    # history_request still sees everything, since IPython writes the cache out first.
    config.HistoryManager.db_cache_size = HISTORY_CACHE_SIZE
    return config


class IpcDisplayHook(DisplayHook):
    """Sends a cell's last value as ``execute_result``; never prints an Out[N] prompt.

    The message being built, and IPython's ``exec_result``, belong to the running cell
    (cells run concurrently)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._scratch = Cell(0, b"", False)
        super().__init__(*args, **kwargs)

    def _cell(self) -> Cell:
        return current_cell.get() or self._scratch

    @property
    def content(self) -> dict[str, Any] | None:
        return self._cell().display_content

    @property  # type: ignore[override]
    def exec_result(self) -> Any:
        return self._cell().exec_result

    @exec_result.setter
    def exec_result(self, value: Any) -> None:
        self._cell().exec_result = value

    def start_displayhook(self) -> None:
        self._is_active = True  # read by IPython >= 9
        self._cell().display_content = {
            "execution_count": self.prompt_count,
            "data": {},
            "metadata": {},
        }

    def write_output_prompt(self) -> None:
        content = self.content
        if content is not None:
            content["execution_count"] = self.prompt_count

    def write_format_data(self, format_dict: dict[str, Any], md_dict: Any = None) -> None:
        content = self.content
        if content is not None:
            content["data"] = format_dict
            content["metadata"] = md_dict or {}

    def finish_displayhook(self) -> None:
        cell = self._cell()
        content, cell.display_content = cell.display_content, None
        self._is_active = False
        if content and content["data"]:
            self.shell.publish("execute_result", content)  # type: ignore[union-attr]


class IpcDisplayPublisher(DisplayPublisher):
    """``display()``, ``update_display()`` and ``clear_output()``."""

    def publish(  # type: ignore[override]
        self,
        data: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        source: Any = None,
        *,
        transient: dict[str, Any] | None = None,
        update: bool = False,
        **kwargs: Any,
    ) -> None:
        self._validate_data(data, metadata)
        content = {"data": data, "metadata": metadata or {}, "transient": transient or {}}
        msg_type = "update_display_data" if update else "display_data"
        self.shell.publish(msg_type, content)  # type: ignore[union-attr]

    def clear_output(self, wait: bool = False) -> None:
        self.shell.publish("clear_output", {"wait": bool(wait)})  # type: ignore[union-attr]


def _is_worker_stdout(stream: object) -> bool:
    """Whether ``stream`` is the worker's own stdout, the stream of what fd 1 receives."""
    return isinstance(stream, OutStream) and stream.fileno() == 1


class _KernelShim:
    """What ipywidgets' Output widget reads from ``get_ipython().kernel``."""

    def __init__(self, shell: ZMQInteractiveShell) -> None:
        self._shell = shell

    def get_parent(self, channel: str = "shell") -> dict[str, Any]:
        return {"header": loads_object(self._shell.parent_header() or b"{}")}


# Named like ipykernel's shell on purpose: libraries (rich, pandas, tqdm, plotly...)
# detect a notebook frontend by this class name and then emit rich output.
class ZMQInteractiveShell(InteractiveShell):
    displayhook_class = Type(IpcDisplayHook)
    display_pub_class = Type(IpcDisplayPublisher)
    # Cells are named <tempdir>/kernelvisor_<pid>/<hash>.py, as ipykernel names them.
    compiler_class = Type(CellCompiler)
    # Line editing has no meaning without a terminal.
    readline_use = CBool(False)
    autoindent = CBool(False)

    outbox = AnyTrait(help="kernelvisor.outbox.Outbox all messages go through")
    output = AnyTrait(help="kernelvisor.streams.OutputBuffer: knows the running request")
    drain_output = AnyTrait(help="callable moving captured fd output into the buffer")
    kernel = AnyTrait()

    def __init__(self, **kwargs: Any) -> None:
        # What belongs to "the running cell" when no cell runs (e.g. a comm handler).
        self._scratch = Cell(0, b"", False)
        self._count = 1
        super().__init__(**kwargs)
        self.kernel = _KernelShim(self)
        # tqdm.autonotebook picks its notebook widget only when it finds this section.
        if "IPKernelApp" not in self.config:
            self.config.IPKernelApp.tqdm = "dummy value for tqdm's notebook detection"

    def parent_header(self) -> bytes | None:
        return self.output.current_parent()  # type: ignore[no-any-return]

    def publish(self, msg_type: str, content: dict[str, Any]) -> None:
        """Send an iopub message on behalf of the request whose code is running."""
        self.outbox.iopub(msg_type, self.parent_header(), content)

    def _cell(self) -> Cell:
        return current_cell.get() or self._scratch

    # The execution count. Concurrent cells each reserve theirs when they start
    # (reserve_count); IPython then reads "the" count and increments it once per cell, so
    # inside a cell the count reads as that cell's, before and after its increment.
    @property  # type: ignore[override]
    def execution_count(self) -> int:
        cell = current_cell.get()
        if cell is None or not cell.count:
            return self._count
        return cell.count + 1 if cell.counted else cell.count

    @execution_count.setter
    def execution_count(self, value: int) -> None:
        cell = current_cell.get()
        if cell is not None and cell.count and not cell.counted and value == cell.count + 1:
            cell.counted = True  # IPython counting the cell: reserved already
            return
        self._count = value

    def reserve_count(self, cell: Cell, number: int, takes_count: bool) -> None:
        """Gives ``cell`` the execution count the supervisor chose for it (and takes it, if
        the cell takes one: stored in history). Called by the thread that starts the cell,
        one at a time. Numbers that other workers' cells took (``# process``) are skipped
        in ``In`` too."""
        if number > self._count:
            self.pad_history(number)
            self._count = number
        cell.count = number
        if takes_count:
            self._count = max(self._count, number + 1)
        else:
            cell.counted = True  # IPython will not increment: the count stays as it is
            cell.count = number - 1 if number > 1 else 0

    def pad_history(self, count: int) -> None:
        """``In`` keeps one entry per number: empty ones up to ``count``."""
        hm = getattr(self, "history_manager", None)
        if hm is not None:
            for hist in (hm.input_hist_parsed, hm.input_hist_raw):
                while len(hist) < count:
                    hist.append("")

    def showtraceback(self, exc_tuple: Any = None, *args: Any, **kwargs: Any) -> None:
        install_fast_tracebacks()
        _etype, value, tb = exc_tuple if exc_tuple is not None else sys.exc_info()
        if isinstance(value, KeyboardInterrupt):
            cut_kernel_tail(tb)
        # An interrupted cell shows why it ended (KeyboardInterrupt, TimeoutError), not the
        # cancellation that ended its await.
        cell = current_cell.get()
        if cell is not None and cell.interrupted is not None and value is not None:
            shown = cell.interrupt_error(value)
            if shown is not value:
                exc_tuple = (type(shown), shown, tb)
        super().showtraceback(exc_tuple, *args, **kwargs)

    def init_environment(self) -> None:
        env = os.environ
        # Children print colours (the frontend renders ANSI) and never page.
        env["TERM"] = "xterm-color"
        env["CLICOLOR"] = "1"
        env["FORCE_COLOR"] = "1"
        env["CLICOLOR_FORCE"] = "1"
        env["PAGER"] = "cat"
        env["GIT_PAGER"] = "cat"
        env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    def init_history(self) -> None:
        """IPython's, but the history file is opened off the way to the first cell."""
        self.history_manager = HistoryManager(shell=self, parent=self)
        self.configurables.append(self.history_manager)

    def init_virtualenv(self) -> None:
        """The worker runs in the environment it was started in; no detection."""

    def init_hooks(self) -> None:
        super().init_hooks()
        self.set_hook("show_in_pager", page.as_hook(self._page_as_payload), 99)

    def _page_as_payload(
        self, strg: Any, start: int = 0, screen_lines: int = 0, pager_cmd: Any = None
    ) -> None:
        data = strg if isinstance(strg, dict) else {"text/plain": strg}
        self._write_payload({"source": "page", "data": data, "start": max(0, start)})

    def ask_exit(self) -> None:
        # The client decides whether to shut the kernel down; the worker keeps running.
        self._write_payload({"source": "ask_exit", "keepkernel": False})

    def set_next_input(self, text: str, replace: bool = False) -> None:
        self._write_payload({"source": "set_next_input", "text": text, "replace": replace})

    def _write_payload(self, payload: dict[str, Any]) -> None:
        # Kept with the cell (not IPython's shared payload manager): read with its reply.
        self._cell().payloads.append(payload)

    def enable_gui(self, gui: str | None = None) -> None:
        if gui not in (None, "inline"):
            raise UsageError(f"kernelvisor has no GUI event loop integration (asked for {gui!r})")

    def _showtraceback(self, etype: type, evalue: BaseException, stb: list[str]) -> None:
        cell = self._cell()
        if cell.display_content is not None:
            # Formatting the result failed: the cell counts as failed too.
            cell.traceback_during_displayhook = True
        try:
            evalue_text = str(evalue)
        except Exception:
            evalue_text = f"<unprintable {etype.__name__} object>"
        self.publish("error", {"ename": etype.__name__, "evalue": evalue_text, "traceback": stb})
        cell.last_traceback = stb
        cell.last_error = (etype.__name__, evalue_text)
        cell.last_shown = evalue

    def _format_exception_for_storage(
        self, exception: BaseException, filename: Any = None, running_compiled_code: bool = False
    ) -> dict[str, Any]:
        # IPython >= 9 formats a cell's exception a second time to keep it in history; the
        # traceback just shown is the same one (formatting costs ~5 ms: stack_data builds a
        # new pygments lexer class each time), so reuse it.
        cell = self._cell()
        if exception is cell.last_shown and cell.last_traceback is not None:
            ename, evalue = cell.last_error
            return {"ename": ename, "evalue": evalue, "traceback": cell.last_traceback}
        return super()._format_exception_for_storage(  # type: ignore[no-any-return]
            exception, filename, running_compiled_code
        )

    # `!cmd` runs in one of two ways, chosen per call. Normally the child inherits fds 1
    # and 2, which the worker captures: fast, and its stdout and stderr stay apart. But
    # when sys.stdout is not the worker's stream (%%capture, contextlib.redirect_stdout),
    # the child's output has to reach whatever sys.stdout is now, so it runs under a pty
    # (IPython's pexpect-based system) whose output is copied there, as ipykernel does.
    # The command is expanded ({var}, $var) here, with the locals of the code running it.
    def system(self, cmd: str) -> None:
        cmd = self.var_expand(cmd, depth=1)
        code = self._run_raw(cmd) if _is_worker_stdout(sys.stdout) else self._run_piped(cmd)
        # As _set_exit_code, inline: one kernel frame fewer in a CalledProcessError's
        # traceback, as with ipykernel.
        self.user_ns["_exit_code"] = code
        if self._raise_on_error() and code != 0:
            raise subprocess.CalledProcessError(code, cmd)

    def _raise_on_error(self) -> bool:
        # The `system_raise_on_error` setting is IPython >= 9's; older ones never raise.
        return bool(getattr(self, "system_raise_on_error", False))

    def system_raw(self, cmd: str) -> None:
        cmd = self.var_expand(cmd, depth=1)
        self._set_exit_code(cmd, self._run_raw(cmd))

    def system_piped(self, cmd: str) -> None:
        cmd = self.var_expand(cmd, depth=1)
        self._set_exit_code(cmd, self._run_piped(cmd))

    def _set_exit_code(self, cmd: str, code: int) -> None:
        # Not returned: a value would be shown as the cell's result.
        self.user_ns["_exit_code"] = code
        if self._raise_on_error() and code != 0:
            raise subprocess.CalledProcessError(code, cmd)

    def _run_raw(self, cmd: str) -> int:
        """IPython's system_raw (POSIX) for an expanded command: the exit code, or minus
        the signal that killed the child. Without system_raw's hint to use %pip, %conda or
        %cd instead (ipykernel does not give it either)."""
        try:
            try:
                code = subprocess.call(cmd, shell=True, executable=os.environ.get("SHELL"))
            finally:
                # The child is done: queue its output before anything printed next.
                self.drain_output()
        except KeyboardInterrupt:
            # A long traceback is of no use here.
            print("\n" + self.get_exception_only(), file=sys.stderr)
            code = 130
        return -(code - 128) if code > 128 else code

    def _run_piped(self, cmd: str) -> int:
        """IPython's system_piped for an expanded command."""
        if cmd.rstrip().endswith("&"):
            # The pty is read until the child exits: a background process cannot work.
            raise OSError("Background processes not supported.")
        code: int = ipython_process.system(cmd)
        return code

    @contextlib.contextmanager
    def _tee(self, channel: str) -> Iterator[None]:
        # IPython >= 9 wraps sys.stdout.write on every run_cell to record stream output
        # in history; that doubles the cost of each write, and nothing here reads it.
        yield


InteractiveShellABC.register(ZMQInteractiveShell)
