"""Worker entry point: ``python -m kernelvisor.worker --connect PATH --worker-id N``.

Connections (IPC.md): ``aux`` is read by a thread, which answers introspection requests
on another one (so they are served while a cell runs) and hands ``input_reply`` to a
waiting ``input()``; ``main`` is read by the main thread's event loop itself, where
cells and comm handlers run, so a cell starts without any thread hop. The flusher and
the fd capture threads move output.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import collections.abc
import contextlib
import contextvars
import dataclasses
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
from collections.abc import Callable, Coroutine, Generator
from contextvars import ContextVar
from typing import Any, TextIO

import kernelvisor
from kernelvisor import comms, threads
from kernelvisor.capture import CStdio, FdCapture
from kernelvisor.cells import current_cell
from kernelvisor.crash import FatalSignalFlush, flush_on_os_exit, really_exit
from kernelvisor.interrupts import SigintGate
from kernelvisor.ipc import Connection, ProtocolError
from kernelvisor.messages import Request, hello
from kernelvisor.outbox import Outbox, control_frame
from kernelvisor.snapshot import Snapshots
from kernelvisor.snapshot_magics import register_magics
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
    parser.add_argument(
        "--token-fd",
        type=int,
        default=None,
        metavar="FD",
        help="read the worker's secret from this inherited fd (then close it)",
    )
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the event loop of main-thread cells (trio: a guest of the worker's asyncio loop)",
    )
    return parser.parse_args(argv)


def setup_diagnostics() -> TextIO:
    """Keep the original stderr (the supervisor logs it) for crash dumps and our logs.

    faulthandler's handlers chain to those installed before (a FatalSignalFlush's)."""
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


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The main thread's loop: uvloop's when ``KERNELVISOR_UVLOOP=1`` and it is installed
    (``pip install 'kernelvisor[uvloop]'``), else asyncio's."""
    if os.environ.get("KERNELVISOR_UVLOOP", "") == "1":
        try:
            import uvloop
        except ImportError:
            log.warning("KERNELVISOR_UVLOOP=1, but uvloop is not installed: using asyncio's loop")
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


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


# Python >= 3.11: create_task takes the context the first step ran in.
_EAGER = sys.version_info >= (3, 11)


class _Resumed(collections.abc.Coroutine[Any, Any, None]):
    """A coroutine already stepped once (it yielded ``awaiting``), for a Task to finish:
    the Task sees ``awaiting`` first, as if it had taken that step itself."""

    def __init__(self, coro: Coroutine[Any, Any, None], awaiting: Any) -> None:
        self._coro = coro
        self._awaiting: Any = awaiting
        self._first = True

    def send(self, value: Any) -> Any:
        if self._first:
            self._first = False
            awaiting, self._awaiting = self._awaiting, None
            return awaiting
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._first = False
        self._awaiting = None
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, None]:
        raise TypeError("only a Task drives a _Resumed coroutine")


class Worker:
    """One worker process's wiring. Holds every connection and thread, so that a forked
    copy can build its own instead of inheriting module-level state."""

    def __init__(
        self,
        path: str,
        aux: Connection,
        worker_id: int,
        diag: TextIO,
        fatal_signals: FatalSignalFlush | None = None,
        backend: str = "asyncio",
        token: str = "",
    ) -> None:
        self.path = path
        # Proves to the supervisor that a connection is ours (IPC.md "Handshake").
        self.token = token
        self.backend = backend
        self.aux_conn = aux
        self.main_conn: Connection | None = None
        self._main_inbox: collections.deque[list[bytes]] = collections.deque()
        self.worker_id = worker_id
        self.engine_id = str(uuid.uuid4())
        self.diag = diag
        self.loop = new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._exited = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._shutting_down = False

        self.gate = SigintGate()
        self.gate.install()
        self.buffer = OutputBuffer(ContextVar("kernelvisor_parent", default=None))
        self.capture = FdCapture(self.buffer)
        self.outbox = Outbox(aux, self.buffer, self.gate, self.capture.drain, self._orphan_output)
        self.flusher = Flusher(self.outbox.flush_streams)
        self.buffer.on_first_write = self.flusher.wake
        self.buffer.on_full = self.flusher.wake_now
        self.buffer.on_full = self.flusher.wake_now
        self.buffer.before_first_write = self.capture.drain
        # Keeps the C handler's callback alive; armed by start_capture.
        self.fatal_signals = fatal_signals if fatal_signals is not None else FatalSignalFlush()
        # The main thread's Caller (created in its loop on first use), parent of the
        # threads that run `thread` cells; and the trio run of main-thread cells.
        self._main_caller: Any = None
        self._caller_ready = threading.Event()
        # Queue cells waiting for the one running on the main thread.
        self._queue_busy = False
        self._queue_waiting: collections.deque[Request] = collections.deque()
        self.trio: Any = None
        if backend == "trio":
            from kernelvisor.trio_host import TrioHost

            self.trio = TrioHost(self.loop)

    @classmethod
    def connect(
        cls,
        path: str,
        worker_id: int,
        diag: TextIO,
        fatal_signals: FatalSignalFlush | None = None,
        backend: str = "asyncio",
        token: str = "",
    ) -> Worker:
        """Open ``aux`` and say hello on it at once (the supervisor then knows the pid)."""
        aux = cls._connect_aux(path, worker_id, token)
        return cls(path, aux, worker_id, diag, fatal_signals, backend, token)

    @staticmethod
    def _connect_aux(path: str, worker_id: int, token: str) -> Connection:
        aux = Connection.connect(path)
        aux.send([control_frame(hello("aux", worker_id, os.getpid(), token))])
        return aux

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
        # Nothing printed is lost when user code ends the process (crash.py).
        self.fatal_signals.arm(self._last_words)
        flush_on_os_exit(self._last_words_before_exit, SHUTDOWN_GRACE_SECONDS)

    def _last_words(self, deadline: float) -> None:
        """Inside a fatal signal's handler: buffered output and what the fd pipes hold,
        never waiting past ``deadline``."""
        self.outbox.flush_final(deadline, self.capture.drain_before)

    def _last_words_before_exit(self, deadline: float) -> None:
        """Before user code's ``os._exit``: as at the end of a cell, C stdio buffers too."""
        self.c_stdio.flush()
        self.outbox.flush_final(deadline, self.capture.drain_before)

    def start_shell(self) -> None:
        # IPython is imported here, not at module level: the worker is only ready (and
        # opens main) once it is loaded and the shell exists.
        from kernelvisor.debugger import Debugger
        from kernelvisor.execute import Executor
        from kernelvisor.handlers import HANDLERS
        from kernelvisor.shell import ZMQInteractiveShell, shell_config
        from kernelvisor.startup import run_startup

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
            self.c_stdio,
            self.engine_id,
            self.loop,
            main_asyncio=self.trio is None,
        )
        # Output of threads a cell starts stays that cell's.
        threads.inherit_context()
        self.handlers = HANDLERS
        # debug_request: on a thread of its own; an interrupt first resumes a cell's thread
        # held at a breakpoint.
        self.debugger = Debugger(self.shell, self.outbox, self.aux_conn)
        self.gate.resume_suspended = self.debugger.resume_for_interrupt
        self.aux = _SerialThread("kernelvisor-aux")
        self.snapshots = Snapshots(self)
        self._snapshot_info: queue.Queue[dict[str, Any]] = queue.Queue()
        register_magics(self)
        run_startup(self.shell)

    def connect_main(self) -> None:
        """Open ``main`` and send the full hello on it: the worker is ready."""
        from kernelvisor.debugger import available as debugger_available

        conn = Connection.connect(self.path)
        greeting = hello(
            "main",
            self.worker_id,
            os.getpid(),
            self.token,
            language_info={
                "name": "python",
                "version": platform.python_version(),
                "mimetype": "text/x-python",
                "codemirror_mode": {"name": "ipython", "version": 3},
                "pygments_lexer": "ipython3",
                "nbconvert_exporter": "python",
                "file_extension": ".py",
            },
            implementation_version=kernelvisor.__version__,
            banner=self.shell.banner,
            debugger=debugger_available(),
        )
        conn.send([control_frame(greeting)])
        self.main_conn = conn
        self.outbox.attach_main(conn)

    def run(self) -> None:
        """Serve until shutdown; never returns."""
        self._serve_links()
        if self.trio is not None:
            self.trio.start()
        while True:
            try:
                self.loop.run_forever()
                break  # stopped by _shutdown
            except KeyboardInterrupt:
                # Escaped a task step (a SIGINT landing in IPython's own code of an async
                # cell); the task got it as its exception, so the loop can go on.
                log.warning("KeyboardInterrupt escaped a task; resuming the event loop")
                if self._main_inbox:  # messages read but not yet handled
                    self.loop.call_soon(self._handle_main_inbox)
            except BaseException:
                log.exception("the main loop stopped")
                break
        # Shutdown stopped the loop: run exit hooks (IPython saves history) while the
        # shutdown deadline allows, then leave without waiting for user threads.
        try:
            atexit._run_exitfuncs()
        except BaseException:
            log.exception("exit hooks failed")
        self._exit(0)

    def _serve_links(self) -> None:
        """Start reading ``aux`` (a thread) and ``main`` (the loop), and make the main
        thread's Caller once the loop runs."""
        assert self.main_conn is not None, "connect_main first"
        threading.Thread(target=self._aux_loop, name="kernelvisor-aux-reader", daemon=True).start()
        main_fd = self.main_conn.fileno()
        self.loop.add_reader(main_fd, self._read_main)
        self.stdin.watch_fd = main_fd
        self.stdin.on_watch_readable = self._read_main
        self._main_caller = None
        self._caller_ready.clear()
        self.loop.call_soon(self._make_caller)

    # --- snapshots -------------------------------------------------------------------

    def discard_inbox(self) -> None:
        """In a snapshot: what the worker had read but not handled is not ours."""
        self._main_inbox.clear()

    def rewire_after_fork(self, execution_count: int) -> None:
        """In a promoted snapshot: build what did not survive the fork, then serve."""
        import selectors

        loop: Any = self.loop
        # A selector of our own: the old epoll instance was shared with the dead worker,
        # and lists its descriptors. Keep the loop itself (tasks, timers, Callers made in
        # it stay valid), re-registering only its self-pipe.
        old = loop._selector
        loop._selector = selectors.DefaultSelector()
        old.close()
        loop._add_reader(loop._ssock.fileno(), loop._read_from_self)
        self.capture.restart_after_fork()
        self.flusher = Flusher(self.outbox.flush_streams)
        self.buffer.on_first_write = self.flusher.wake
        self.buffer.on_full = self.flusher.wake_now
        sys.stdout = OutStream(self.buffer, self.flusher, STDOUT, 1)
        sys.stderr = OutStream(self.buffer, self.flusher, STDERR, 2)
        self.flusher.start()
        self.aux_conn = self._connect_aux(self.path, self.worker_id, self.token)
        self.outbox.attach_aux(self.aux_conn)
        self.aux = _SerialThread("kernelvisor-aux")
        # Off the way to the first cell: a SQLite open and a committed insert.
        threading.Thread(
            target=self._reopen_history, name="kernelvisor-history-reopen", daemon=True
        ).start()
        # Its thread did not survive the fork (and snapshots are never taken while debugpy
        # is loaded): a fresh one, on the new aux link.
        from kernelvisor.debugger import Debugger

        self.debugger = Debugger(self.shell, self.outbox, self.aux_conn)
        self.gate.resume_suspended = self.debugger.resume_for_interrupt
        self.set_count(execution_count)
        self.gate.install()
        self.connect_main()
        self._serve_links()

    def _reopen_history(self) -> None:
        """Never use the dead worker's SQLite connection: open our own, in a new session
        (the dead worker may have written lines of its own after the fork). Under the
        history caches' locks, which every write-out takes."""
        hm = getattr(self.shell, "history_manager", None)
        if hm is None or not getattr(hm, "enabled", False):
            return
        try:
            with hm.db_input_cache_lock, hm.db_output_cache_lock:
                hm.init_db()
                hm.new_session()
            thread_class = type(getattr(hm, "save_thread", None) or object)
            if getattr(hm, "save_thread", None) is not None and hasattr(thread_class, "stop"):
                hm.save_thread = thread_class(hm)
                hm.save_thread.start()
        except Exception:
            log.exception("cannot reopen the history database; history is off")
            hm.enabled = False

    def set_count(self, execution_count: int) -> None:
        """Number the next cell ``execution_count`` (the namespace's numbering goes on
        across a crash); ``In`` keeps one entry per number."""
        shell = self.shell
        shell.execution_count = execution_count
        hm = getattr(shell, "history_manager", None)
        if hm is not None:
            for hist in (hm.input_hist_parsed, hm.input_hist_raw):
                while len(hist) < execution_count:
                    hist.append("")

    def snapshot_info(self, timeout: float = 2.0) -> dict[str, Any]:
        """The supervisor's view of the snapshot (for %snapshot), asked on ``aux``."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._snapshot_info.get_nowait()
        self.outbox.aux_control({"op": "snapshot_query"})
        return self._snapshot_info.get(timeout=timeout)

    def _exit(self, code: int) -> None:
        try:
            # Bounded: the main thread may be stuck in a send to a supervisor not reading.
            self.outbox.flush_streams(timeout=SHUTDOWN_GRACE_SECONDS)
        finally:
            self._exited.set()
            really_exit(code)  # not os._exit: that flushes again

    def _shutdown(self) -> None:
        """Stop taking work and stop the main loop; from any thread. The process exits
        after about SHUTDOWN_GRACE_SECONDS even if a cell keeps the main thread busy."""
        with self._shutdown_lock:
            if self._shutting_down:
                return
            self._shutting_down = True
        self._stop_reading_main()
        self.loop.call_soon_threadsafe(self.loop.stop)
        threading.Thread(
            target=self._exit_after_grace, name="kernelvisor-exit", daemon=True
        ).start()

    def _exit_after_grace(self) -> None:
        if not self._exited.wait(SHUTDOWN_GRACE_SECONDS):
            self._exit(0)

    # --- main connection: read by the main thread --------------------------------------

    def _read_main(self) -> None:
        """The event loop's reader of ``main`` (also called by a waiting input())."""
        conn = self.main_conn
        if conn is None:
            return
        if self._shutting_down:
            self._stop_reading_main()
            return
        try:
            messages = conn.recv_nowait()
        except EOFError:
            log.info("supervisor closed the main connection")
            self._shutdown()
            return
        except (ProtocolError, OSError):
            log.exception("IPC connection broken (main)")
            self._stop_reading_main()
            self._exit(1)
            return
        self._main_inbox.extend(messages)
        self._handle_main_inbox()

    def _handle_main_inbox(self) -> None:
        # Through one queue, so that a nested call (from an input() waiting inside a
        # cell started by an outer call) still handles messages in arrival order.
        inbox = self._main_inbox
        while inbox and not self._shutting_down:
            self._on_message(inbox.popleft(), "main")

    def _stop_reading_main(self) -> None:
        self.stdin.watch_fd = None
        if self.main_conn is not None and threading.current_thread() is threading.main_thread():
            self.loop.remove_reader(self.main_conn.fileno())

    # --- aux connection: read by a thread ----------------------------------------------

    def _aux_loop(self) -> None:
        while not self._shutting_down:
            try:
                frames = self.aux_conn.recv()
            except EOFError:
                log.info("supervisor closed the aux connection")
                self._shutdown()
                return
            except (ProtocolError, OSError):
                log.exception("IPC connection broken (aux)")
                self._exit(1)
                return
            self._on_message(frames, "aux")

    # --- both ----------------------------------------------------------------------------

    def _on_message(self, frames: list[bytes], via: str) -> None:
        """Route one message by what it is, whichever connection it came on."""
        try:
            control = json.loads(frames[0])
            if not isinstance(control, dict):
                raise ProtocolError("control frame is not a JSON object")
            op = control.get("op")
            if op == "shutdown":
                self._shutdown()
                return
            if op == "ping":
                # Liveness: answered by the reading thread itself, so a pong proves only
                # that this process can still take the GIL (a cell may be running). The
                # supervisor reads and writes us from separate tasks: no deadlock here.
                self.aux_conn.send([control_frame({"op": "pong", "seq": control.get("seq")})])
                return
            if op == "interrupt":
                # One cell (its timeout ran out); from the aux reader, at once.
                timeout = control.get("timeout")
                self.gate.interrupt_cell(
                    int(control.get("id", 0)),
                    float(timeout) if isinstance(timeout, int | float) else None,
                )
                return
            if op == "drop_thread":
                self.loop.call_soon_threadsafe(self._drop_thread, str(control.get("name", "")))
                return
            if op == "snapshot":
                # On main, between cells, in order with them (the main thread reads main).
                seq = control.get("seq")
                if isinstance(seq, int):
                    self.snapshots.take(seq)
                return
            if op == "set_count":
                # On main: handled here, in order, before the request that follows it.
                count = control.get("execution_count")
                if isinstance(count, int):
                    if threading.current_thread() is threading.main_thread():
                        self.set_count(count)
                    else:
                        self.loop.call_soon_threadsafe(self.set_count, count)
                return
            if op == "snapshot_info":
                info = control.get("info")
                self._snapshot_info.put(info if isinstance(info, dict) else {})
                return
            if op == "reset":
                # Back to the idle pool after a `# process` cell: a fresh namespace, warm
                # imports kept. Runs on the main loop, after anything queued before it.
                self.loop.call_soon_threadsafe(self._reset)
                return
            if op != "request":
                log.warning("ignoring unknown op %r on %s", op, via)
                return
            req = Request.from_frames(control, frames)
        except (ProtocolError, ValueError):
            log.exception("bad message on %s", via)
            self._exit(1)
            return
        self._dispatch(req)

    def _dispatch(self, req: Request) -> None:
        """Where each request runs. Readers never send here: a send blocked on a full
        socket (the supervisor busy writing to us) would stop us reading and deadlock
        both sides."""
        msg_type = req.msg_type
        on_main = threading.current_thread() is threading.main_thread()
        if msg_type == "execute_request":
            if req.mode == "thread":
                # From any thread (the supervisor sends these on aux, so that a blocked
                # main thread does not hold them up): callers are thread-safe.
                self._start_thread_cell(req)
                return
            start = self._start_execute if req.mode == "task" else self._start_queue_cell
            if on_main and current_cell.get() is None:
                start(req)
            elif on_main:
                # Read by an input() waiting inside a cell: start it after that cell.
                self.loop.call_soon(start, req, context=contextvars.Context())
            else:
                self.loop.call_soon_threadsafe(start, req, context=contextvars.Context())
        elif msg_type in COMM_MESSAGES:
            # A fresh context per message: its parent header must not leak into others.
            # Queued behind any cell that arrived first, as cells and comms keep order.
            if on_main:
                self.loop.call_soon(self._handle_comm, req, context=contextvars.Context())
            else:
                self.loop.call_soon_threadsafe(
                    self._handle_comm, req, context=contextvars.Context()
                )
        elif req.channel == "stdin" or msg_type == "input_reply":
            self.stdin.deliver(str(req.content_json().get("value", "")))
            self.aux.submit(lambda: self.outbox.aux_done(req.id))
        elif msg_type == "debug_request":
            self.debugger.submit(req)
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
        self.outbox.aux_reply(req.id, content)

    # --- main thread -----------------------------------------------------------------

    def _reset(self) -> None:
        """Clear the user namespace and history counters (IPython's %reset), then say so."""
        self.shell.reset(new_session=False)
        self.shell.execution_count = 1
        self.outbox.control({"op": "reset_done"})

    def _start_queue_cell(self, req: Request) -> None:
        """A ``queue`` cell: after the one running (the supervisor sends them one at a
        time; this keeps the order should two ever arrive, e.g. while one awaits)."""
        if self._queue_busy:
            self._queue_waiting.append(req)
            return
        self._queue_busy = True

        async def run() -> None:
            try:
                await self.executor.execute(req)
            finally:
                self.loop.call_soon(self._queue_next, context=contextvars.Context())

        self._start_execute(req, run)

    def _queue_next(self) -> None:
        self._queue_busy = False
        if self._queue_waiting:
            self._start_queue_cell(self._queue_waiting.popleft())

    def _start_execute(
        self, req: Request, run: Callable[[], Coroutine[Any, Any, None]] | None = None
    ) -> None:
        """A ``queue`` or ``task`` cell, on the main thread.

        With asyncio, run the request's first step now (a cell that never awaits runs to
        its reply right here), and only what remains after an ``await`` as a task. With
        trio, the cell is a trio task from the start (trio calls need a trio task)."""
        if run is None:

            def run() -> Coroutine[Any, Any, None]:
                return self.executor.execute(req)

        if self.trio is not None:
            self.trio.spawn(run)
            return
        coro = run()
        if not _EAGER:
            self.loop.create_task(coro)
            return
        # Its own context, as a task would have: a cell's context variables stay its own.
        context = contextvars.copy_context()
        try:
            awaiting = context.run(coro.send, None)
        except StopIteration:
            return
        except BaseException:  # execute() reports its own errors; never lose the loop
            log.exception("execute_request %s failed", req.id)
            return
        self.loop.create_task(_Resumed(coro, awaiting), context=context)

    def _make_caller(self) -> None:
        """The main thread's Caller: made in the main thread while its loop runs."""
        from kernelvisor.caller import Caller

        self._main_caller = Caller()
        self._caller_ready.set()

    def _caller(self) -> Any:
        if not self._caller_ready.wait(SHUTDOWN_GRACE_SECONDS * 10):
            raise RuntimeError("the main thread's event loop is not running")
        return self._main_caller

    def _start_thread_cell(self, req: Request) -> None:
        """A ``thread`` cell: in the named thread (created on first use; its cells run
        one after another), or in a thread of the ``to_thread`` pool. Either has its own
        event loop (asyncio or trio), so the cell may await there."""

        async def run() -> None:
            await self.executor.execute(req)

        backend = req.backend or self.backend
        try:
            caller = self._caller()
            if req.thread is not None:
                # backend= picks the loop of a thread it creates; an existing thread of
                # that name is used as it is, unless a different backend is asked for.
                existing = next(
                    (c for c in caller.children if c.name == req.thread and not c.stopped), None
                )
                named = existing if existing is not None and req.backend is None else None
                (named or caller.get(req.thread, backend=backend)).queue_call(run)
            elif backend == caller.backend:
                caller.to_thread(run)
            else:  # the pool of threads running the other backend
                caller.get(f"kernelvisor-{backend}", backend=backend).to_thread(run)
        except Exception as exc:
            # E.g. a thread of that name with another backend: the cell fails, visibly.
            log.warning("cannot start thread cell %s: %s", req.id, exc)
            self.loop.call_soon_threadsafe(
                self._start_execute, _as_error_cell(req, exc), context=contextvars.Context()
            )

    def _drop_thread(self, name: str) -> None:
        """Stop a named thread once the cells queued there are done (deleted subshell)."""
        if self._main_caller is None:
            return
        for child in self._main_caller.children:
            if child.name == name and not child.stopped:
                child.queue_call(child.stop)

    def _handle_comm(self, req: Request) -> None:
        self.buffer.parent_var.set(req.header)
        try:
            handler = getattr(self.comm_manager, req.msg_type)
            handler(None, None, req.to_jupyter())
        except Exception:
            log.exception("%s failed", req.msg_type)
        finally:
            self.outbox.done(req.id)


def _as_error_cell(req: Request, exc: Exception) -> Request:
    """The request, with code that raises ``exc``'s message where the cell would run."""
    content = json.loads(req.content or b"{}")
    content["code"] = f"raise RuntimeError({str(exc)!r})"
    return dataclasses.replace(req, content=json.dumps(content).encode(), mode="queue")


def read_token(fd: int | None) -> str:
    """The secret the supervisor passed in an inherited pipe; the fd is closed after."""
    if fd is None:
        return ""
    try:
        data = b""
        while chunk := os.read(fd, 256):
            data += chunk
        return data.decode("ascii").strip()
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    token = read_token(args.token_fd)
    # Before faulthandler: a fatal signal dumps the stacks first, then flushes output.
    fatal_signals = FatalSignalFlush()
    fatal_signals.install()
    diag = setup_diagnostics()
    try:
        worker = Worker.connect(
            args.connect, args.worker_id, diag, fatal_signals, args.backend, token
        )
    except OSError:
        log.exception("cannot connect to %s", args.connect)
        sys.exit(1)
    worker.start_capture()
    worker.start_shell()
    try:
        worker.connect_main()
    except OSError:
        log.exception("cannot connect to %s", args.connect)
        really_exit(1)
    log.info("worker %d ready (pid %d)", args.worker_id, os.getpid())
    worker.run()


if __name__ == "__main__":
    main()
