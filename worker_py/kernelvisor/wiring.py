"""The ``Worker``: one worker process's connections, threads, output path and shell, tied
together (readers in links.py, routing in router.py, run modes in run_modes.py)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import platform
import queue
import sys
import threading
import uuid
from contextvars import ContextVar
from typing import Any, TextIO

import kernelvisor
from kernelvisor import comms, threads
from kernelvisor.capture import CStdio, FdCapture
from kernelvisor.crash import FatalSignalFlush, flush_on_os_exit, really_exit
from kernelvisor.interrupts import SigintGate
from kernelvisor.ipc import Connection
from kernelvisor.messages import hello
from kernelvisor.outbox import Outbox, control_frame
from kernelvisor.run_modes import RunModes
from kernelvisor.snapshot import Snapshots
from kernelvisor.snapshot_magics import register_magics
from kernelvisor.stdin import StdinBridge
from kernelvisor.streams import STDERR, STDOUT, Flusher, OutputBuffer, OutStream

log = logging.getLogger(__name__)

# How long shutdown waits for the main thread to finish before exiting regardless.
SHUTDOWN_GRACE_SECONDS = 1.0

# When the history database is opened once the worker serves (if nothing needed it
# sooner): after a first cell sent at once, and the snapshot before it (history.py).
HISTORY_OPEN_DELAY = 0.1


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
        self.worker_id = worker_id
        self.engine_id = str(uuid.uuid4())
        self.diag = diag
        self.loop = new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._exited = threading.Event()
        self._shutdown_lock = threading.Lock()
        self.shutting_down = False

        self.gate = SigintGate()
        self.gate.install()
        self.gate.watch_signals()
        self.buffer = OutputBuffer(ContextVar("kernelvisor_parent", default=None))
        self.capture = FdCapture(self.buffer)
        self.outbox = Outbox(aux, self.buffer, self.gate, self.capture.drain, self._orphan_output)
        self.flusher = Flusher(self.outbox.flush_streams)
        self.buffer.on_first_write = self.flusher.wake
        self.buffer.on_full = self.flusher.wake_now
        self.buffer.before_first_write = self.capture.drain
        self.outbox.wake_flusher = self.flusher.wake_now
        # Keeps the C handler's callback alive; armed by start_capture.
        self.fatal_signals = fatal_signals if fatal_signals is not None else FatalSignalFlush()
        self.run_modes = RunModes(self)
        # The trio run of main-thread cells.
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
        # IPython is imported here, not at module level: the aux hello goes out before it
        # loads, and the worker is only ready (and opens main) once the shell exists.
        from kernelvisor.debugger import Debugger
        from kernelvisor.execute import Executor
        from kernelvisor.links import Links
        from kernelvisor.router import Router
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
        self.executor.on_done = self.run_modes.cell_done
        # Output of threads a cell starts stays that cell's.
        threads.inherit_context()
        # debug_request: on a thread of its own; an interrupt first resumes a cell's thread
        # held at a breakpoint.
        self.debugger = Debugger(self.shell, self.outbox, self.aux_conn)
        self.gate.resume_suspended = self.debugger.resume_for_interrupt
        self.router = Router(self)
        self.links = Links(self, self.router.on_message)
        self.snapshots = Snapshots(self)
        # The supervisor's answers to snapshot_query (snapshot_info ops).
        self.snapshot_answers: queue.Queue[dict[str, Any]] = queue.Queue()
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

    def run(self, rewired: bool = False) -> None:
        """Serve until shutdown; never returns. ``rewired``: ``rewire_after_fork`` has
        started serving already (a worker forked from the template, template.py)."""
        if not rewired:
            self._serve()
        if self.trio is not None:
            self.trio.start()
        while True:
            try:
                self.loop.run_forever()
                break  # stopped by shutdown
            except KeyboardInterrupt:
                # Escaped a task step (a SIGINT landing in IPython's own code of an async
                # cell); the task got it as its exception, so the loop can go on.
                log.warning("KeyboardInterrupt escaped a task; resuming the event loop")
                if self.links.inbox:  # messages read but not yet handled
                    self.loop.call_soon(self.links.handle_inbox)
            except BaseException:
                log.exception("the main loop stopped")
                break
        # Shutdown stopped the loop: run exit hooks (IPython saves history) while the
        # shutdown deadline allows, then leave without waiting for user threads.
        try:
            atexit._run_exitfuncs()
        except BaseException:
            log.exception("exit hooks failed")
        self.exit(0)

    def _serve(self) -> None:
        """Start reading both connections, and make the main thread's Caller once the
        loop runs."""
        self.links.serve()
        self.run_modes.start_caller()
        hm = getattr(self.shell, "history_manager", None)
        if hm is not None:
            self.loop.call_later(HISTORY_OPEN_DELAY, hm.open_pending)

    # --- snapshots -------------------------------------------------------------------

    def discard_inbox(self) -> None:
        """In a snapshot: what the worker had read but not handled is not ours."""
        self.links.inbox.clear()

    def rewire_after_fork(self, execution_count: int) -> None:
        """In a promoted snapshot, or a worker forked from the template: build what did not
        survive the fork, then serve."""
        import selectors

        # Before any link is up: a thread cell may come on aux as soon as main says hello.
        self.run_modes.forget_caller()
        loop: Any = self.loop
        # A selector of our own: the old epoll instance was shared with the dead worker,
        # and lists its descriptors. Keep the loop itself (tasks, timers, Callers made in
        # it stay valid), with a self-pipe of its own: the inherited one is shared with
        # every process forked from the same parent (the template's workers are siblings),
        # and a sibling's loop would read, and so swallow, this loop's wake-ups from other
        # threads (`call_soon_threadsafe`: a trio cell then hung for good).
        old = loop._selector
        loop._selector = selectors.DefaultSelector()
        old.close()
        # asyncio's own: the old pair is not in the new selector, so only closed.
        loop._close_self_pipe()
        loop._make_self_pipe()
        if loop.is_running():
            # A promoted snapshot goes on inside the loop its parent was running (a template's
            # worker starts its loop after this). asyncio knows a running loop by the pid
            # that started it, so without this every `await` here fails ("no running event
            # loop"): register it for this process, as run_forever would.
            asyncio._set_running_loop(loop)
        self.gate.watch_signals()
        self.capture.restart_after_fork()
        self.flusher = Flusher(self.outbox.flush_streams)
        self.buffer.on_first_write = self.flusher.wake
        self.buffer.on_full = self.flusher.wake_now
        self.outbox.wake_flusher = self.flusher.wake_now
        sys.stdout = OutStream(self.buffer, self.flusher, STDOUT, 1)
        sys.stderr = OutStream(self.buffer, self.flusher, STDERR, 2)
        self.flusher.start()
        self.aux_conn = self._connect_aux(self.path, self.worker_id, self.token)
        self.outbox.attach_aux(self.aux_conn)
        self.router.restart_after_fork()
        # Off the way to the first cell: a SQLite open and a committed insert (history.py).
        hm = getattr(self.shell, "history_manager", None)
        if hm is not None:
            hm.reopen_later()
        # Its thread did not survive the fork (and snapshots are never taken while debugpy
        # is loaded): a fresh one, on the new aux link.
        from kernelvisor.debugger import Debugger

        self.debugger = Debugger(self.shell, self.outbox, self.aux_conn)
        self.gate.resume_suspended = self.debugger.resume_for_interrupt
        self.set_count(execution_count)
        # The crash handler and os._exit flush only in the process that armed them.
        self.fatal_signals.arm(self._last_words)
        flush_on_os_exit(self._last_words_before_exit, SHUTDOWN_GRACE_SECONDS)
        self.gate.install()
        self.connect_main()
        self._serve()

    def set_count(self, execution_count: int) -> None:
        """Number the next cell ``execution_count`` (the namespace's numbering goes on
        across a crash); ``In`` keeps one entry per number."""
        self.shell.execution_count = execution_count
        self.shell.pad_history(execution_count)

    def snapshot_info(self, timeout: float = 2.0) -> dict[str, Any]:
        """The supervisor's view of the snapshot (for %snapshot), asked on ``aux``."""
        with contextlib.suppress(queue.Empty):
            while True:
                self.snapshot_answers.get_nowait()
        self.outbox.aux_control({"op": "snapshot_query"})
        return self.snapshot_answers.get(timeout=timeout)

    # --- ending ------------------------------------------------------------------------

    def exit(self, code: int) -> None:
        """Flush output (bounded), then end the process with ``code``."""
        try:
            # Bounded: the main thread may be stuck in a send to a supervisor not reading.
            self.outbox.flush_streams(timeout=SHUTDOWN_GRACE_SECONDS)
        finally:
            self._exited.set()
            really_exit(code)  # not os._exit: that flushes again

    def shutdown(self) -> None:
        """Stop taking work and stop the main loop; from any thread. The process exits
        after about SHUTDOWN_GRACE_SECONDS even if a cell keeps the main thread busy."""
        with self._shutdown_lock:
            if self.shutting_down:
                return
            self.shutting_down = True
        self.links.stop_reading_main()
        self.loop.call_soon_threadsafe(self.loop.stop)
        threading.Thread(
            target=self._exit_after_grace, name="kernelvisor-exit", daemon=True
        ).start()

    def _exit_after_grace(self) -> None:
        if not self._exited.wait(SHUTDOWN_GRACE_SECONDS):
            self.exit(0)
