"""Where each message from the supervisor goes: a table from ``op`` to handler and one
from ``msg_type`` to handler (in the spirit of ipykernel's ``shell_handlers``), and the
small handlers themselves. Readers call the router; it never sends from the reading
thread except a ``pong``."""

from __future__ import annotations

import contextvars
import json
import logging
import queue
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kernelvisor import comms
from kernelvisor.handlers import HANDLERS, Content
from kernelvisor.ipc import ProtocolError
from kernelvisor.messages import Request
from kernelvisor.outbox import control_frame

if TYPE_CHECKING:
    from kernelvisor.wiring import Worker

log = logging.getLogger(__name__)

COMM_MESSAGES = ("comm_open", "comm_msg", "comm_close")

OpHandler = Callable[[dict[str, Any]], None]
"""Takes a control frame (a JSON object with ``op``)."""

RequestHandler = Callable[[Request], None]
"""Takes a Jupyter request; decides where it runs, and answers it (or has it answered)."""


class SerialThread:
    """Runs submitted calls one after another on a daemon thread."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, call: Callable[[], None]) -> None:
        self._calls.put(call)

    def _loop(self) -> None:
        while True:
            call = self._calls.get()
            try:
                call()
            except Exception:
                log.exception("request handler failed")


class Router:
    """Routes each message by what it is, whichever connection it came on (IPC.md
    "Which connection answers"). Requests answered off the main thread run one after
    another on the ``kernelvisor-aux`` thread, so they are served while a cell runs."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self.aux = SerialThread("kernelvisor-aux")
        self.ops: dict[str, OpHandler] = {
            "shutdown": lambda _: worker.shutdown(),
            "ping": self._ping,
            # Output credit (IPC.md "Flow control"), on aux: held output may go.
            "credit": lambda control: worker.outbox.credit(control.get("flows")),
            "interrupt": self._interrupt,
            "drop_thread": self._drop_thread,
            "snapshot": self._snapshot,
            "set_count": self._set_count,
            "go": lambda control: worker.run_modes.go(control.get("id")),
            "snapshot_info": self._snapshot_info,
            "reset": lambda _: worker.loop.call_soon_threadsafe(self._reset),
        }
        self.requests: dict[str, RequestHandler] = {
            "execute_request": lambda req: worker.run_modes.start(req),
            **dict.fromkeys(COMM_MESSAGES, self._comm),
            "input_reply": self._input_reply,
            "debug_request": lambda req: worker.debugger.submit(req),
            "comm_info_request": self._off_main(self._comm_info),
            **{
                msg_type: self._off_main(_with_shell(worker, handler))
                for msg_type, handler in HANDLERS.items()
            },
        }

    def restart_after_fork(self) -> None:
        """The aux thread did not survive the fork: a new one."""
        self.aux = SerialThread("kernelvisor-aux")

    def on_message(self, frames: list[bytes], via: str) -> None:
        """Route one message from connection ``via``: an op to its handler, a request to
        ``dispatch``. A message that is not a valid one ends the worker."""
        try:
            control = json.loads(frames[0])
            if not isinstance(control, dict):
                raise ProtocolError("control frame is not a JSON object")
            op = control.get("op")
            if op != "request":
                handler = self.ops.get(op) if isinstance(op, str) else None
                if handler is None:
                    log.warning("ignoring unknown op %r on %s", op, via)
                else:
                    handler(control)
                return
            req = Request.from_frames(control, frames)
        except (ProtocolError, ValueError):
            log.exception("bad message on %s", via)
            self._worker.exit(1)
            return
        self.dispatch(req)

    def dispatch(self, req: Request) -> None:
        """Hand a request to its handler. Readers never send here: a send blocked on a
        full socket (the supervisor busy writing to us) would stop us reading and
        deadlock both sides."""
        handler = self.requests.get(req.msg_type)
        if handler is None:
            handler = self._input_reply if req.channel == "stdin" else self._unknown
        handler(req)

    # --- ops ---------------------------------------------------------------------------

    def _ping(self, control: dict[str, Any]) -> None:
        """Liveness: answered by the reading thread itself, so a pong proves only that
        this process can still take the GIL (a cell may be running). The supervisor reads
        and writes us from separate tasks: no deadlock here."""
        self._worker.aux_conn.send([control_frame({"op": "pong", "seq": control.get("seq")})])

    def _interrupt(self, control: dict[str, Any]) -> None:
        """One cell: the user's interrupt, or its timeout ran out; from the aux reader, at once."""
        timeout = control.get("timeout")
        self._worker.gate.interrupt_cell(
            int(control.get("id", 0)),
            float(timeout) if isinstance(timeout, int | float) else None,
        )

    def _drop_thread(self, control: dict[str, Any]) -> None:
        worker = self._worker
        worker.loop.call_soon_threadsafe(worker.run_modes.drop_thread, str(control.get("name", "")))

    def _snapshot(self, control: dict[str, Any]) -> None:
        """On main, between cells, in order with them (the main thread reads main)."""
        seq = control.get("seq")
        if isinstance(seq, int):
            self._worker.snapshots.take(seq)

    def _set_count(self, control: dict[str, Any]) -> None:
        """On main: handled here, in order, before the request that follows it."""
        worker = self._worker
        count = control.get("execution_count")
        if isinstance(count, int):
            if threading.current_thread() is threading.main_thread():
                worker.set_count(count)
            else:
                worker.loop.call_soon_threadsafe(worker.set_count, count)

    def _snapshot_info(self, control: dict[str, Any]) -> None:
        info = control.get("info")
        self._worker.snapshot_answers.put(info if isinstance(info, dict) else {})

    def _reset(self) -> None:
        """Back to the idle pool after a ``# process`` cell: a fresh namespace (IPython's
        %reset), warm imports kept, then say so. Runs on the main loop, after anything
        queued before it."""
        worker = self._worker
        worker.shell.reset(new_session=False)
        worker.shell.execution_count = 1
        worker.outbox.control({"op": "reset_done"})

    # --- requests --------------------------------------------------------------------

    def _comm(self, req: Request) -> None:
        """A fresh context per message: its parent header must not leak into others.
        Queued behind any cell that arrived first, as cells and comms keep order."""
        loop = self._worker.loop
        context = contextvars.Context()
        if threading.current_thread() is threading.main_thread():
            loop.call_soon(self._handle_comm, req, context=context)
        else:
            loop.call_soon_threadsafe(self._handle_comm, req, context=context)

    def _handle_comm(self, req: Request) -> None:
        worker = self._worker
        worker.buffer.parent_var.set(req.header)
        try:
            handler = getattr(worker.comm_manager, req.msg_type)
            handler(None, None, req.to_jupyter())
        except Exception:
            log.exception("%s failed", req.msg_type)
        finally:
            worker.outbox.done(req.id, req.header)

    def _input_reply(self, req: Request) -> None:
        worker = self._worker
        worker.stdin.deliver(str(req.content_json().get("value", "")))
        self.aux.submit(lambda: worker.outbox.aux_done(req.id))

    def _comm_info(self, content: Content) -> Content:
        target = content.get("target_name")
        return comms.comm_info(
            self._worker.comm_manager, target if isinstance(target, str) else None
        )

    def _unknown(self, req: Request) -> None:
        msg_type = req.msg_type
        self.aux.submit(
            lambda: self._answer(
                req,
                lambda _: {
                    "status": "error",
                    "ename": "UnknownMessageType",
                    "evalue": f"kernelvisor's worker does not handle {msg_type!r}",
                    "traceback": [],
                },
            )
        )

    def _off_main(self, compute: Callable[[Content], Content]) -> RequestHandler:
        """A handler that answers on the aux thread with ``compute(content)``."""
        return lambda req: self.aux.submit(lambda: self._answer(req, compute))

    def _answer(self, req: Request, compute: Callable[[Content], Content]) -> None:
        try:
            content = compute(req.content_json())
        except Exception as exc:
            log.exception("%s failed", req.msg_type)
            content = {
                "status": "error",
                "ename": type(exc).__name__,
                "evalue": str(exc),
                "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__),
            }
        self._worker.outbox.aux_reply(req.id, content)


def _with_shell(
    worker: Worker, handler: Callable[[Any, Content], Content]
) -> Callable[[Content], Content]:
    """``handler`` (of handlers.py) with the worker's shell."""
    return lambda content: handler(worker.shell, content)
