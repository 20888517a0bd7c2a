"""Interrupting cells: SIGINT (from the supervisor) interrupts every running cell; the
``interrupt`` op interrupts one (its timeout expired).

What an interrupt does depends on where the cell is:

- its code (or IPython's around it) is executing on the main thread: SIGINT's handler
  raises KeyboardInterrupt right there, which ends the cell with an error;
- it is suspended in an ``await`` (on any thread's event loop): its task is cancelled.
  Raising would land in the event loop instead of the cell;
- its code is executing in another thread: KeyboardInterrupt is raised asynchronously
  in that thread (``PyThreadState_SetAsyncExc``). It takes effect at the thread's next
  Python instruction, so a thread blocked in a long C call (``time.sleep``) sees it only
  when the call returns; a second interrupt then replaces the worker (the supervisor).

A signal never tears an IPC message in half: sends on the main thread ``hold()`` it
until they are done. A worker with no running cell ignores SIGINT.

The supervisor's interrupt names its cells: an ``interrupt`` op (on ``aux``) for each cell
that has started as far as the client knows, and no signal. ``interrupt_cell`` then does what
stops that cell where it is (below; on the main thread, through a SIGINT it sends there,
marked for the cell), so the interrupt is exact:

- a cell the worker has not started yet (its request waits unread because the main thread
  was busy, or it waits for ``go``) ends with KeyboardInterrupt as soon as it starts
  (``running``), before its code runs;
- a cell that had already ended here is passed by: nothing carries over, neither to the next
  cell nor to a cell that started here meanwhile (a signal would reach whatever runs).

A SIGINT from outside (VS Code signals every process of the kernel's tree) reaches every
running cell; with no cell running it is ignored. The op does nothing to a cell that such a
signal reached just before (``interrupted`` is set), and marks the cell so that a signal
right after it is the same click.

SIGINTs that arrive together are one interrupt (``COALESCE_SECONDS``): VS Code interrupts a
local kernel by signalling every process of its tree one by one, then the kernel, which
forwards the signal to the worker, so one click reaches the worker twice. The second must not
cut short the cell's ``except KeyboardInterrupt:`` clean-up. A later click is a new interrupt.

Python runs a signal's handler on the main thread, at its next bytecode: a SIGINT that lands
just before the main thread blocks (in the event loop's ``select``, in ``time.sleep``), or
that another thread of the worker caught, would run it only when that call returns. So the C
handler also writes the signal's number to a socket (``signal.set_wakeup_fd``), and for each
SIGINT a watcher thread (``watch_signals``) pokes the main thread with a signal whose handler
does nothing (``POKE``): the poke interrupts the blocking call, and Python then runs every
handler still pending, the SIGINT's included (if it ran already, the poke costs nothing).
Without it an awaiting cell missed its interrupt's grace and lost its worker.

In a trio cell, KeyboardInterrupt is never raised in code that trio protects from it (its
cancel scopes' bookkeeping): the cell's scope is cancelled instead, as for an await.

A cell held at a debugger breakpoint is first resumed (``resume_suspended``, set by the
debugger), so that the exception leaves pydevd's wait with the debugger's state intact.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import CodeType, FrameType

from kernelvisor.cells import Cell, current_cell

# An untargeted SIGINT this soon after the last one that reached a cell passes that cell by.
COALESCE_SECONDS = 0.5

# How many interrupts for cells not (or no longer) running the gate remembers.
AT_START_KEPT = 64


def _cell_on_stack(
    frame: FrameType | None, guard: CodeType, task_guard: CodeType | None = None
) -> Cell | None:
    """The cell executing on this stack (not suspended): the one whose ``guard`` frame
    (the executor's, around a cell's code) is on it; else, if ``task_guard`` is given and
    its frame is on it (IPython running a main-thread cell as a task of its own, in the
    cell's context), the cell of the current context."""
    in_task = False
    while frame is not None:
        code = frame.f_code
        if code is guard:
            cell = frame.f_locals.get("cell")
            return cell if isinstance(cell, Cell) else None
        if code is task_guard:
            in_task = True
        frame = frame.f_back
    return current_cell.get() if in_task else None


# What the watcher sends the main thread to make it run pending handlers: a real-time signal,
# which nothing else sends a kernel's worker.
POKE = signal.SIGRTMIN + 7


def _poked(signum: int, frame: FrameType | None) -> None:
    """``POKE``'s handler: the point was to get here (see the module doc)."""


def _trio_protects_this_point() -> bool:
    """Whether the code the signal interrupted is protected from KeyboardInterrupt by trio
    (called from the handler: its caller frames are the interrupted code's)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        return bool(trio.lowlevel.currently_ki_protected())
    except Exception:
        return False


def _raise_in_thread(ident: int, exc_type: type[BaseException]) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc_type))


class SigintGate:
    """The SIGINT handler, and the registry of running cells it interrupts."""

    def __init__(self) -> None:
        self._main_ident = threading.main_thread().ident
        self._cells: dict[int, Cell] = {}
        # Reentrant: the SIGINT handler takes it, and may run while the main thread holds it.
        self._lock = threading.RLock()
        # Set by the executor: the code object of its frame that runs a cell's code.
        self.guard: CodeType | None = None
        self.task_guard: CodeType | None = None
        self._holds = 0
        # Interrupts that arrived while a send held them: None means "every cell".
        self._deferred: list[set[int] | None] = []
        # Cells whose targeted interrupt is on its way to the main thread as a SIGINT.
        self._targeted: deque[int] = deque()
        self._hold = _Hold(self)
        # When an untargeted SIGINT last reached each running cell (time.monotonic()).
        self._sigint_at: dict[int, float] = {}
        # Set by the debugger: given a cell's stack and thread, resumes the thread if a
        # breakpoint holds it (True if it did). Called before KeyboardInterrupt is raised there.
        self.resume_suspended: Callable[[FrameType | None, int], bool] | None = None
        # Cells the supervisor interrupted before they started here (request ids, oldest
        # first): each is interrupted when it starts. One that had ended already never
        # starts again, so its entry only waits to be pushed out (``AT_START_KEPT``).
        self._at_start: dict[int, None] = {}
        # The socket pair the C handler writes to, read by the watcher (``watch_signals``).
        self._wakeup: tuple[socket.socket, socket.socket] | None = None

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)

    def watch_signals(self) -> None:
        """From the main thread: have every signal seen at once (see the module doc). Called
        again after a fork: the pair is shared with the parent, and the thread is gone."""
        old = self._wakeup
        if old is not None:
            for sock in old:
                sock.close()
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        signal.signal(POKE, _poked)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._wakeup = (reader, writer)
        threading.Thread(
            target=self._watch, args=(reader,), name="kernelvisor-signals", daemon=True
        ).start()

    def _watch(self, reader: socket.socket) -> None:
        """The watcher thread: poke the main thread for each SIGINT."""
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGINT in data:
                with contextlib.suppress(OSError):
                    signal.pthread_kill(self._main_ident, POKE)  # type: ignore[arg-type]

    @contextmanager
    def running(self, cell: Cell) -> Iterator[None]:
        """Registers ``cell`` as interruptible while the block runs."""
        with self._lock:
            self._cells[cell.req_id] = cell
            if cell.req_id in self._at_start:
                del self._at_start[cell.req_id]
                if cell.interrupted is None:
                    cell.interrupted = "interrupt"  # it stops before its code runs
        try:
            yield
        finally:
            with self._lock:
                self._cells.pop(cell.req_id, None)
                self._sigint_at.pop(cell.req_id, None)

    def running_cells(self) -> list[Cell]:
        with self._lock:
            return list(self._cells.values())

    def interrupt_cell(self, req_id: int, timeout: float | None = None) -> None:
        """Interrupts one cell, from any thread (the supervisor's ``interrupt`` op): for its
        ``timeout=`` tag, or (``timeout`` None) the user's interrupt, which may come for a
        cell not started here yet, or ended already (see the module doc)."""
        with self._lock:
            cell = self._cells.get(req_id)
            if cell is None:
                if timeout is None:  # not started yet, or ended already
                    self._at_start[req_id] = None
                    while len(self._at_start) > AT_START_KEPT:
                        del self._at_start[next(iter(self._at_start))]
                return
            if timeout is None:
                if cell.interrupted is not None:
                    return  # a SIGINT from outside reached it first (the same click)
                # A SIGINT from outside that comes right after this is the same click.
                self._sigint_at[req_id] = time.monotonic()
        cell.interrupted = float(timeout) if timeout is not None else "interrupt"
        if cell.thread_ident == self._main_ident:
            # Only the main thread can raise in its own code: send it the signal, marked
            # for this cell. (A SIGINT from outside arriving in the same instant may merge
            # with it and then reach only this cell.)
            self._targeted.append(req_id)
            if threading.get_ident() == self._main_ident:
                signal.raise_signal(signal.SIGINT)
            else:
                signal.pthread_kill(self._main_ident, signal.SIGINT)  # type: ignore[arg-type]
        else:
            self._interrupt_elsewhere(cell)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        targets: set[int] | None = None
        if self._targeted:
            targets = set()
            while self._targeted:
                targets.add(self._targeted.popleft())
        if not self._cells:
            return  # a cell on its way here gets the interrupt as an op (module doc)
        if targets is None:
            targets = self._not_just_interrupted()
            if targets is not None and not targets:
                return  # the same click, by another way (see the module doc)
        if self._holds:
            self._deferred.append(targets)
            return
        self._interrupt(frame, targets)

    def _not_just_interrupted(self) -> set[int] | None:
        """For an untargeted SIGINT: the running cells it should reach, those that no SIGINT
        reached within ``COALESCE_SECONDS`` (None: all of them), and the time it reaches
        them."""
        now = time.monotonic()
        with self._lock:
            fresh = {
                req_id
                for req_id in self._cells
                if now - self._sigint_at.get(req_id, -COALESCE_SECONDS) >= COALESCE_SECONDS
            }
            for req_id in fresh:
                self._sigint_at[req_id] = now
            return None if len(fresh) == len(self._cells) else fresh

    def _interrupt(self, frame: FrameType | None, targets: set[int] | None) -> None:
        """On the main thread: interrupt the ``targets`` (None: every running cell)."""
        guard = self.guard
        active = _cell_on_stack(frame, guard, self.task_guard) if guard is not None else None
        raise_here = False
        for cell in self.running_cells():
            if targets is not None and cell.req_id not in targets:
                continue
            if cell.interrupted is None:
                cell.interrupted = "interrupt"
            if cell is active:
                raise_here = True
            elif cell.thread_ident == self._main_ident:
                if cell.cancel is not None:
                    cell.cancel()
                # Else it has not reached its code yet: it stops there (it is marked).
            else:
                self._interrupt_elsewhere(cell)
        if raise_here:
            if _trio_protects_this_point() and active is not None and active.cancel is not None:
                active.cancel()  # at its next checkpoint
                return
            self._resume(frame, self._main_ident)
            raise KeyboardInterrupt

    def _interrupt_elsewhere(self, cell: Cell) -> None:
        """A cell of another thread: raise in its code, or cancel its await."""
        guard = self.guard
        frame = sys._current_frames().get(cell.thread_ident)
        if guard is not None and _cell_on_stack(frame, guard) is cell:
            self._resume(frame, cell.thread_ident)
            _raise_in_thread(cell.thread_ident, KeyboardInterrupt)
        elif cell.cancel is not None:
            cell.cancel()

    def _resume(self, frame: FrameType | None, ident: int) -> None:
        resume = self.resume_suspended
        if resume is not None:
            with contextlib.suppress(Exception):  # never lose the interrupt itself
                resume(frame, ident)

    def hold(self) -> AbstractContextManager[None]:
        """Defer SIGINT until the block ends (used around IPC sends)."""
        return self._hold

    def _release(self) -> None:
        self._holds -= 1
        if not self._holds and self._deferred:
            deferred, self._deferred = self._deferred, []
            targets: set[int] | None = set()
            for t in deferred:
                if t is None or targets is None:
                    targets = None
                else:
                    targets |= t
            if self._cells:
                self._interrupt(sys._getframe(2), targets)  # its callers lead to the cell


class _Hold:
    """``SigintGate.hold()``: one reusable object (it runs around every send), its state
    kept in the gate."""

    __slots__ = ("_gate",)

    def __init__(self, gate: SigintGate) -> None:
        self._gate = gate

    def __enter__(self) -> None:
        gate = self._gate
        if threading.get_ident() == gate._main_ident:
            gate._holds += 1

    def __exit__(self, *exc: object) -> None:
        gate = self._gate
        if threading.get_ident() == gate._main_ident:
            gate._release()
