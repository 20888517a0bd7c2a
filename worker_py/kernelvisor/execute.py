"""execute_request: run a cell on the main thread's event loop and reply."""

from __future__ import annotations

import asyncio
import logging
import sys
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from types import FrameType
from typing import Any

from IPython.core import interactiveshell
from IPython.core.async_helpers import _pseudo_sync_runner

from kernelvisor.capture import CStdio
from kernelvisor.interrupts import SigintGate
from kernelvisor.messages import Request
from kernelvisor.outbox import Outbox
from kernelvisor.shell import ZMQInteractiveShell
from kernelvisor.stdin import StdinBridge
from kernelvisor.streams import OutputBuffer

log = logging.getLogger(__name__)

_asyncio_runner = getattr(interactiveshell, "_asyncio_runner", None)
# A cell's code is called by this coroutine, which catches whatever it raises.
_RUN_CODE = interactiveshell.InteractiveShell.run_code.__code__


# Quiet time after a cell before cached history inputs are written to sqlite.
HISTORY_SAVE_DELAY = 0.5


def _in_cell_code(frame: FrameType | None) -> bool:
    while frame is not None:
        caller = frame.f_back
        if caller is not None and caller.f_code is _RUN_CODE:
            return True
        frame = caller
    return False


def _may_be_async(cell: str) -> bool:
    """False when the cell certainly has no top-level ``await``, ``async for`` or
    ``async with``: then IPython's check (which compiles the whole cell) is skipped."""
    return "await" in cell or "async" in cell


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class _Options:
    code: str
    silent: bool
    store_history: bool
    user_expressions: dict[str, Any]
    allow_stdin: bool
    stop_on_error: bool

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
            stop_on_error=bool(content.get("stop_on_error", True)),
        )


class Executor:
    def __init__(
        self,
        shell: ZMQInteractiveShell,
        outbox: Outbox,
        buffer: OutputBuffer,
        gate: SigintGate,
        stdin: StdinBridge,
        c_stdio: CStdio,
        engine_id: str,
    ) -> None:
        self._shell = shell
        self._outbox = outbox
        self._buffer = buffer
        self._gate = gate
        self._stdin = stdin
        self._c_stdio = c_stdio
        self._engine_id = engine_id
        # The supervisor sends one execute_request at a time; should two ever arrive, an
        # async cell must not interleave with the next one (stdin, SIGINT state, counts).
        self._one_at_a_time = asyncio.Lock()
        self._history_save: asyncio.TimerHandle | None = None
        self._last_cell_end = 0.0

    async def execute(self, req: Request) -> None:
        """Run the request to its reply. Never raises: the supervisor waits for a reply."""
        async with self._one_at_a_time:
            await self._execute(req)

    async def _execute(self, req: Request) -> None:
        started = _now_iso()
        stop_on_error = True
        try:
            opts = _Options.parse(req.content_json())
            stop_on_error = opts.stop_on_error
            # Output of this task (and of fds, and of threads it starts) belongs to req.
            self._buffer.parent_var.set(req.header)
            self._buffer.fallback_parent = req.header
            content = await self._run(req, opts)
        except BaseException as exc:  # a bug of ours, or an interrupt between the lines
            log.exception("execute_request %s failed in the worker", req.id)
            content = {
                "status": "error",
                "execution_count": self._shell.execution_count - 1,
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
        self._outbox.reply(
            req.id, "execute_reply", content, metadata, extra={"stop_on_error": stop_on_error}
        )
        self._schedule_history_save()

    def _schedule_history_save(self) -> None:
        """Write cached history once no cell has run for a moment (see shell_config).

        One timer at a time: a cell only notes when it ended, and a timer that fires
        too early waits for the rest (cheaper than replacing the timer every cell)."""
        loop = asyncio.get_running_loop()
        self._last_cell_end = loop.time()
        if self._history_save is None:
            self._history_save = loop.call_later(HISTORY_SAVE_DELAY, self._history_quiet)

    def _history_quiet(self) -> None:
        loop = asyncio.get_running_loop()
        remaining = self._last_cell_end + HISTORY_SAVE_DELAY - loop.time()
        if remaining > 0:
            self._history_save = loop.call_later(remaining, self._history_quiet)
            return
        self._history_save = None
        history = self._shell.history_manager
        save_flag = getattr(history, "save_flag", None) if history is not None else None
        if save_flag is not None:  # None: history disabled, or no saving thread
            save_flag.set()

    async def _run(self, req: Request, opts: _Options) -> dict[str, Any]:
        shell = self._shell
        if not opts.silent:
            self._outbox.iopub(
                "execute_input",
                req.header,
                {"code": opts.code, "execution_count": shell.execution_count},
            )
        shell.reset_error_state()
        with self._stdin.asking_for(req.id, req.header, opts.allow_stdin):
            result, interrupt = await self._run_cell(opts)

        err = interrupt
        if result is not None:
            err = result.error_before_exec or result.error_in_exec
        ok = result is not None and result.success and not shell.traceback_during_displayhook
        reply: dict[str, Any] = {"execution_count": shell.execution_count - 1}
        if ok:
            reply["status"] = "ok"
            reply["user_expressions"] = shell.user_expressions(opts.user_expressions)
        else:
            # No exception object when only formatting the result failed: use what the
            # error message said.
            ename, evalue = (type(err).__name__, str(err)) if err is not None else shell.last_error
            reply["status"] = "error"
            reply["ename"] = ename
            reply["evalue"] = evalue
            reply["traceback"] = shell.last_traceback or []
            reply["user_expressions"] = {}
        # Payloads (pager, set_next_input, ask_exit) are read and cleared whatever happened.
        reply["payload"] = shell.take_payloads()
        return reply

    async def _run_cell(self, opts: _Options) -> tuple[Any, BaseException | None]:
        """Run the cell; return (ExecutionResult or None, the interrupt that stopped us)."""
        shell = self._shell
        try:
            transformed = shell.transform_cell(opts.code)
            preprocessing_exc = None
        except Exception:
            transformed = opts.code
            preprocessing_exc = sys.exc_info()
        result = None
        try:
            if (
                _asyncio_runner is not None
                and shell.loop_runner is _asyncio_runner
                and _may_be_async(transformed)
                and shell.should_run_async(
                    opts.code,
                    transformed_cell=transformed,
                    preprocessing_exc_tuple=preprocessing_exc,
                )
            ):
                task = asyncio.ensure_future(
                    shell.run_cell_async(
                        opts.code,
                        store_history=opts.store_history,
                        silent=opts.silent,
                        transformed_cell=transformed,
                        preprocessing_exc_tuple=preprocessing_exc,
                    )
                )
                loop = asyncio.get_running_loop()

                def interrupt(frame: FrameType | None) -> None:
                    # Inside the cell's code IPython catches KeyboardInterrupt; anywhere
                    # else (e.g. the loop waiting on an await) it would break the event
                    # loop, so the cell's task is cancelled instead.
                    if _in_cell_code(frame):
                        raise KeyboardInterrupt
                    loop.call_soon_threadsafe(task.cancel, "interrupted (SIGINT)")

                with self._gate.calling(interrupt):
                    try:
                        result = await task
                    finally:
                        # run_cell would trigger these; run_cell_async does not.
                        shell.events.trigger("post_execute")
                        if not opts.silent:
                            shell.events.trigger("post_run_cell", result)
            else:
                # What shell.run_cell does, minus transforming the cell a second time.
                with self._gate.raising():
                    try:
                        result = _pseudo_sync_runner(
                            shell.run_cell_async(
                                opts.code,
                                store_history=opts.store_history,
                                silent=opts.silent,
                                transformed_cell=transformed,
                                preprocessing_exc_tuple=preprocessing_exc,
                            )
                        )
                    finally:
                        shell.events.trigger("post_execute")
                        if not opts.silent:
                            shell.events.trigger("post_run_cell", result)
        except (KeyboardInterrupt, asyncio.CancelledError) as exc:
            # Interrupted outside the user's code (IPython's own steps): report it the same.
            shell.showtraceback()
            return result, exc
        return result, None
