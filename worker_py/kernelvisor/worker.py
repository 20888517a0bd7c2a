"""Worker entry point: ``python -m kernelvisor.worker --connect PATH --worker-id N``.

Threads: the main thread runs an asyncio loop where cells and comm handlers run; one
thread reads the IPC socket and dispatches; one answers introspection requests (so they
are served while a cell runs); the flusher and the fd capture threads move output.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextvars
import faulthandler
import json
import logging
import os
import platform
import queue
import sys
import threading
import traceback
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TextIO

import kernelvisor
from kernelvisor import comms
from kernelvisor.capture import CStdio, FdCapture
from kernelvisor.interrupts import SigintGate
from kernelvisor.ipc import Connection, ProtocolError
from kernelvisor.messages import Request
from kernelvisor.outbox import Outbox
from kernelvisor.stdin import StdinBridge
from kernelvisor.streams import STDERR, STDOUT, Flusher, OutputBuffer, OutStream

# Not __name__: run with -m, this module is "__main__", outside the "kernelvisor" logger.
log = logging.getLogger("kernelvisor.worker")

# How long shutdown waits for the main thread to finish before exiting regardless.
SHUTDOWN_GRACE_SECONDS = 1.0

COMM_MESSAGES = ("comm_open", "comm_msg", "comm_close")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kernelvisor.worker")
    parser.add_argument("--connect", required=True, metavar="SOCKET_PATH")
    parser.add_argument("--worker-id", required=True, type=int)
    return parser.parse_args(argv)


def setup_diagnostics() -> TextIO:
    """Keep the original stderr (the supervisor logs it) for crash dumps and our logs."""
    diag_fd = os.dup(2)
    faulthandler.enable(file=diag_fd, all_threads=True)
    diag = open(  # noqa: SIM115 - lives as long as the process
        diag_fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
    )
    handler = logging.StreamHandler(diag)
    handler.setFormatter(
        logging.Formatter(f"kernelvisor-worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger("kernelvisor")
    root.addHandler(handler)
    root.propagate = False
    level_name = os.environ.get("KERNELVISOR_WORKER_LOG", "WARNING").upper()
    level = logging.getLevelName(level_name)
    root.setLevel(level if isinstance(level, int) else logging.WARNING)
    return diag


class _SerialThread:
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


class Worker:
    """One worker process's wiring. Holds every connection and thread, so that a forked
    copy can build its own instead of inheriting module-level state."""

    def __init__(self, conn: Connection, worker_id: int, diag: TextIO) -> None:
        self.conn = conn
        self.worker_id = worker_id
        self.engine_id = str(uuid.uuid4())
        self.diag = diag
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._exited = threading.Event()

        self.gate = SigintGate()
        self.gate.install()
        self.buffer = OutputBuffer(ContextVar("kernelvisor_parent", default=None))
        self.capture = FdCapture(self.buffer)
        self.outbox = Outbox(conn, self.buffer, self.gate, self.capture.drain, self._orphan_output)
        self.flusher = Flusher(self.outbox.flush_streams)
        self.buffer.on_first_write = self.flusher.wake
        self.buffer.before_first_write = self.capture.drain

    def _orphan_output(self, name: str, text: str) -> None:
        self.diag.write(text)

    def start_capture(self) -> None:
        # Children must never block on the supervisor's stdin.
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        self.capture.start()
        sys.stdout = OutStream(self.buffer, self.flusher, STDOUT, 1)
        sys.stderr = OutStream(self.buffer, self.flusher, STDERR, 2)
        self.flusher.start()
        self.c_stdio = CStdio()

    def start_shell(self) -> None:
        # IPython is imported here, not at module level: the worker is only ready (and
        # says hello) once it is loaded and the shell exists.
        from kernelvisor.execute import Executor
        from kernelvisor.handlers import HANDLERS
        from kernelvisor.shell import ZMQInteractiveShell, shell_config

        self.shell = ZMQInteractiveShell.instance(
            config=shell_config(),
            outbox=self.outbox,
            output=self.buffer,
            drain_output=self.capture.drain,
        )
        self.stdin = StdinBridge(self.outbox, self.gate)
        self.stdin.install()
        self.comm_manager = comms.install(self.outbox, self.buffer.current_parent)
        self.executor = Executor(
            self.shell,
            self.outbox,
            self.buffer,
            self.gate,
            self.stdin,
            self.c_stdio,
            self.engine_id,
        )
        self.handlers = HANDLERS
        self.aux = _SerialThread("kernelvisor-aux")

    def say_hello(self) -> None:
        self.outbox.hello(
            {
                "worker_id": self.worker_id,
                "pid": os.getpid(),
                "language_info": {
                    "name": "python",
                    "version": platform.python_version(),
                    "mimetype": "text/x-python",
                    "codemirror_mode": {"name": "ipython", "version": 3},
                    "pygments_lexer": "ipython3",
                    "nbconvert_exporter": "python",
                    "file_extension": ".py",
                },
                "implementation_version": kernelvisor.__version__,
                "banner": self.shell.banner,
            }
        )

    def run(self) -> None:
        """Serve until shutdown; never returns."""
        threading.Thread(target=self._read_loop, name="kernelvisor-ipc", daemon=True).start()
        while True:
            try:
                self.loop.run_forever()
                break  # stopped by _shutdown
            except KeyboardInterrupt:
                # Escaped a task step (a SIGINT landing in IPython's own code of an async
                # cell); the task got it as its exception, so the loop can go on.
                log.warning("KeyboardInterrupt escaped a task; resuming the event loop")
            except BaseException:
                log.exception("the main loop stopped")
                break
        # Shutdown stopped the loop: run exit hooks (IPython saves history) while the
        # reader thread's deadline allows, then leave without waiting for user threads.
        try:
            atexit._run_exitfuncs()
        except BaseException:
            log.exception("exit hooks failed")
        self._exit(0)

    def _exit(self, code: int) -> None:
        try:
            self.outbox.flush_streams()
        finally:
            self._exited.set()
            os._exit(code)

    # --- reader thread ---------------------------------------------------------------

    def _read_loop(self) -> None:
        while True:
            try:
                frames = self.conn.recv()
                control = json.loads(frames[0])
                if not isinstance(control, dict):
                    raise ProtocolError("control frame is not a JSON object")
            except EOFError:
                log.info("supervisor closed the connection")
                self._shutdown()
                return
            except (ProtocolError, ValueError, OSError):
                log.exception("IPC connection broken")
                self._exit(1)
                return
            op = control.get("op")
            if op == "shutdown":
                self._shutdown()
                return
            if op != "request":
                log.warning("ignoring unknown op %r", op)
                continue
            try:
                req = Request.from_frames(control, frames)
            except ProtocolError:
                log.exception("bad request")
                self._exit(1)
                return
            self._dispatch(req)

    def _dispatch(self, req: Request) -> None:
        msg_type = req.msg_type
        # This thread never sends: if the supervisor is busy writing to us, a send
        # blocked on a full socket would stop us reading and deadlock both sides.
        if req.channel == "stdin" or msg_type == "input_reply":
            self.stdin.deliver(str(req.content_json().get("value", "")))
            self.aux.submit(lambda: self.outbox.done(req.id))
        elif msg_type == "execute_request":
            self.loop.call_soon_threadsafe(self._start_execute, req)
        elif msg_type in COMM_MESSAGES:
            # A fresh context per message: its parent header must not leak into others.
            self.loop.call_soon_threadsafe(self._handle_comm, req, context=contextvars.Context())
        elif msg_type == "comm_info_request":
            self.aux.submit(lambda: self._answer(req, self._comm_info))
        elif msg_type in self.handlers:
            handler = self.handlers[msg_type]
            self.aux.submit(lambda: self._answer(req, lambda c: handler(self.shell, c)))
        else:
            self.aux.submit(lambda: self._answer(req, lambda _: self._unknown(msg_type)))

    def _unknown(self, msg_type: str) -> dict[str, Any]:
        return {
            "status": "error",
            "ename": "UnknownMessageType",
            "evalue": f"kernelvisor's worker does not handle {msg_type!r}",
            "traceback": [],
        }

    def _comm_info(self, content: dict[str, Any]) -> dict[str, Any]:
        target = content.get("target_name")
        return comms.comm_info(self.comm_manager, target if isinstance(target, str) else None)

    def _answer(self, req: Request, compute: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
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
        self.outbox.reply(req.id, req.reply_type, content)

    def _shutdown(self) -> None:
        """Stop the main loop; exit regardless if a cell keeps the main thread busy."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        if not self._exited.wait(SHUTDOWN_GRACE_SECONDS):
            self._exit(0)

    # --- main thread -----------------------------------------------------------------

    def _start_execute(self, req: Request) -> None:
        self.loop.create_task(self.executor.execute(req))

    def _handle_comm(self, req: Request) -> None:
        self.buffer.parent_var.set(req.header)
        try:
            handler = getattr(self.comm_manager, req.msg_type)
            handler(None, None, req.to_jupyter())
        except Exception:
            log.exception("%s failed", req.msg_type)
        finally:
            self.outbox.done(req.id)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    diag = setup_diagnostics()
    try:
        conn = Connection.connect(args.connect)
    except OSError:
        log.exception("cannot connect to %s", args.connect)
        sys.exit(1)
    worker = Worker(conn, args.worker_id, diag)
    worker.start_capture()
    worker.start_shell()
    worker.say_hello()
    log.info("worker %d ready (pid %d)", args.worker_id, os.getpid())
    worker.run()


if __name__ == "__main__":
    main()
