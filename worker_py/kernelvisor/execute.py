"""execute_request: run a cell and reply.

Cells may run concurrently (``task`` cells on the main loop, ``thread`` cells and
subshells in other threads; see IPC.md "Run modes"), so everything about one cell is
kept in its ``Cell`` (cells.py), which the shell reads through a context variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import anyio
from IPython.core.async_helpers import _pseudo_sync_runner

from kernelvisor import timings
from kernelvisor.capture import CStdio
from kernelvisor.cells import Cell, current_cell
from kernelvisor.interrupts import SigintGate
from kernelvisor.ipc import ProtocolError
from kernelvisor.messages import Count, Request
from kernelvisor.outbox import Outbox
from kernelvisor.shell import ZMQInteractiveShell
from kernelvisor.streams import OutputBuffer

log = logging.getLogger(__name__)

# Quiet time after a cell before cached history inputs are written to sqlite.
HISTORY_SAVE_DELAY = 0.5


def _may_be_async(cell: str) -> bool:
    """False when the cell certainly has no top-level ``await``, ``async for`` or
    ``async with``: then IPython's check (which compiles the whole cell) is skipped."""
    return "await" in cell or "async" in cell


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _in_trio() -> bool:
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _threadsafe_cancel(scope: anyio.CancelScope) -> Callable[[], None]:
    """A callable that cancels ``scope`` from any thread, in the scope's own loop."""
    if _in_trio():
        import trio

        token = trio.lowlevel.current_trio_token()

        def cancel_trio() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(scope.cancel)

        return cancel_trio
    loop = asyncio.get_running_loop()

    def cancel_asyncio() -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(scope.cancel)

    return cancel_asyncio


# What ends an awaiting cell that was interrupted: a cancellation of its task or scope.
_CANCELLED: tuple[type[BaseException], ...] = (KeyboardInterrupt, asyncio.CancelledError)


def _cancelled_types() -> tuple[type[BaseException], ...]:
    trio = sys.modules.get("trio")
    return (*_CANCELLED, trio.Cancelled) if trio is not None else _CANCELLED


@dataclass(frozen=True)
class _Options:
    code: str
    silent: bool
    store_history: bool
    user_expressions: dict[str, Any]
    allow_stdin: bool

    @classmethod
    def parse(cls, content: dict[str, Any]) -> _Options:
        silent = bool(content.get("silent", False))
        expressions = content.get("user_expressions")
        return cls(
            code=str(content.get("code", "")),
            silent=silent,
            store_history=bool(content.get("store_history", not silent)),
            user_expressions=expressions if isinstance(expressions, dict) else {},
            allow_stdin=bool(content.get("allow_stdin", False)),
        )


class Executor:
    def __init__(
        self,
        shell: ZMQInteractiveShell,
        outbox: Outbox,
        buffer: OutputBuffer,
        gate: SigintGate,
        c_stdio: CStdio,
        engine_id: str,
        loop: asyncio.AbstractEventLoop,
        main_asyncio: bool,
    ) -> None:
        self._shell = shell
        self._outbox = outbox
        self._buffer = buffer
        self._gate = gate
        self._c_stdio = c_stdio
        self._engine_id = engine_id
        self._loop = loop
        # Main-thread cells run as asyncio tasks (not trio): cancelled through their task.
        self._main_asyncio = main_asyncio
        # Told each reply's status (run_modes.RunModes.cell_done: cells sent ahead).
        self.on_done: Callable[[int, str, float], None] | None = None
        self._main_ident = threading.main_thread().ident
        # Execution counts are reserved one cell at a time, whichever thread starts it.
        self._count_lock = threading.Lock()
        self._history_save: asyncio.TimerHandle | None = None
        self._last_cell_end = 0.0
        # SIGINT raises in a main-thread cell while its code runs: while this frame of
        # it, or IPython's run of a cell with top-level await (a task of its own, in the
        # cell's context), is on the stack.
        gate.guard = Executor._run_cell.__code__
        gate.task_guard = type(shell).run_cell_async.__code__

    async def execute(self, req: Request) -> None:
        """Run the request to its reply. Never raises: the supervisor waits for a reply.

        Runs in a context of its own (a task's, or a copy), which becomes the cell's."""
        if timings.ENABLED:
            timings.mark(req.id)
        started = _now_iso()
        began = time.perf_counter()
        cell = Cell(req.id, req.header, False)
        try:
            opts = _Options.parse(req.content_json())
            cell.allow_stdin = opts.allow_stdin
            current_cell.set(cell)
            # Output of this cell (and of tasks and threads it starts) belongs to req.
            self._buffer.parent_var.set(req.header)
            self._buffer.fallback_parent = req.header
            if req.count is None:
                raise ProtocolError("execute_request without its execution count")
            with self._gate.running(cell):
                content = await self._run(cell, opts, req.count)
        except BaseException as exc:  # a bug of ours, or an interrupt between the lines
            log.exception("execute_request %s failed in the worker", req.id)
            content = {
                "status": "error",
                "execution_count": cell.count,
                "ename": type(exc).__name__,
                "evalue": str(exc),
                "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__),
            }
        # Output still buffered in this process (C stdio, the original Python file objects
        # on fds 1/2) belongs to this cell: push it into the pipes the outbox drains.
        self._c_stdio.flush()
        metadata = {
            "started": started,
            "dependencies_met": True,
            "engine": self._engine_id,
            "status": content["status"],
        }
        # Whether an error aborts the queue is the supervisor's decision (its cell plan).
        if timings.ENABLED:
            timings.mark(req.id)
        self._outbox.reply(req.id, content, metadata, req.header)
        if self.on_done is not None:
            self.on_done(req.id, content["status"], time.perf_counter() - began)
        if timings.ENABLED:
            timings.done(req.id)
        self._schedule_history_save()

    def _schedule_history_save(self) -> None:
        """Write cached history once no cell has run for a moment (see shell_config).

        One timer at a time: a cell only notes when it ended, and a timer that fires
        too early waits for the rest (cheaper than replacing the timer every cell)."""
        if threading.get_ident() != self._main_ident:
            self._loop.call_soon_threadsafe(self._schedule_history_save)
            return
        loop = self._loop
        self._last_cell_end = loop.time()
        if self._history_save is None:
            self._history_save = loop.call_later(HISTORY_SAVE_DELAY, self._history_quiet)

    def _history_quiet(self) -> None:
        loop = self._loop
        remaining = self._last_cell_end + HISTORY_SAVE_DELAY - loop.time()
        if remaining > 0:
            self._history_save = loop.call_later(remaining, self._history_quiet)
            return
        self._history_save = None
        history = self._shell.history_manager
        save_flag = getattr(history, "save_flag", None) if history is not None else None
        if save_flag is not None:  # None: history disabled, or no saving thread
            save_flag.set()

    async def _run(self, cell: Cell, opts: _Options, count: Count) -> dict[str, Any]:
        shell = self._shell
        with self._count_lock:
            # The supervisor numbered the cell and published its execute_input.
            shell.reserve_count(cell, count.number, count.takes_count)
        result, interrupt = await self._run_cell(cell, opts)

        err = interrupt
        if result is not None:
            err = result.error_before_exec or result.error_in_exec or err
        ok = result is not None and result.success and not cell.traceback_during_displayhook
        ok = ok and interrupt is None
        reply: dict[str, Any] = {"execution_count": cell.count}
        if ok:
            reply["status"] = "ok"
            reply["user_expressions"] = shell.user_expressions(opts.user_expressions)
        else:
            # What the error message showed; without one (only formatting the result
            # failed, or nothing was shown), the exception itself.
            if cell.last_traceback is None and err is not None:
                shown = cell.interrupt_error(err)
                ename, evalue = type(shown).__name__, str(shown)
            else:
                ename, evalue = cell.last_error
            reply["status"] = "error"
            reply["ename"] = ename
            reply["evalue"] = evalue
            reply["traceback"] = cell.last_traceback or []
            reply["user_expressions"] = {}
        # Payloads (pager, set_next_input, ask_exit) are the cell's, whatever happened.
        reply["payload"] = cell.payloads
        return reply

    async def _run_cell(self, cell: Cell, opts: _Options) -> tuple[Any, BaseException | None]:
        """Run the cell; return (ExecutionResult or None, the interrupt that stopped us).

        The interrupt gate looks for this frame (``gate.guard``): while it is on the main
        thread's stack, the cell is executing and SIGINT raises here."""
        shell = self._shell
        if timings.ENABLED:
            timings.mark(cell.req_id)
        try:
            transformed = shell.transform_cell(opts.code)
            preprocessing_exc = None
        except Exception:
            transformed = opts.code
            preprocessing_exc = sys.exc_info()
        result = None
        try:
            if cell.interrupted is not None:
                # Interrupted between its start and here (its code was not running yet,
                # nor could it be cancelled): it ends now, as if its code had been hit.
                raise KeyboardInterrupt
            run = shell.run_cell_async(
                opts.code,
                store_history=opts.store_history,
                silent=opts.silent,
                transformed_cell=transformed,
                preprocessing_exc_tuple=preprocessing_exc,
            )
            try:
                if _may_be_async(transformed) and shell.should_run_async(
                    opts.code,
                    transformed_cell=transformed,
                    preprocessing_exc_tuple=preprocessing_exc,
                ):
                    result = await self._await_cell(cell, run)
                else:
                    # What shell.run_cell does, minus transforming the cell a second time.
                    result = _pseudo_sync_runner(run)
            finally:
                # run_cell would trigger these; run_cell_async does not.
                shell.events.trigger("post_execute")
                if not opts.silent:
                    shell.events.trigger("post_run_cell", result)
                if timings.ENABLED:
                    timings.mark(cell.req_id)
        except _cancelled_types() as exc:
            # Interrupted outside the user's code (IPython's own steps): report it the same.
            shell.showtraceback()
            return result, cell.interrupt_error(exc)
        return result, None

    async def _await_cell(self, cell: Cell, run: Coroutine[Any, Any, Any]) -> Any:
        """Await a cell with top-level ``await``, cancellable from any thread."""
        if self._main_asyncio and cell.thread_ident == self._main_ident:
            # We may be the first step of a coroutine that is not a task yet (see
            # RunModes.start_execute): the cell gets a task of its own, in its context, so
            # that its code runs in a task as asyncio code expects; an interrupt
            # cancels that task while it awaits.
            task = asyncio.ensure_future(run)
            loop = self._loop
            cell.cancel = lambda: loop.call_soon_threadsafe(task.cancel, "interrupted")
            return await task
        with anyio.CancelScope() as scope:
            cell.cancel = _threadsafe_cancel(scope)
            result = await run
        if result is None and scope.cancelled_caught:
            raise KeyboardInterrupt  # cancelled in IPython's steps: the scope ate it
        return result
