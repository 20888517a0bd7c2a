"""Run modes (IPC.md "Run modes"): how an ``execute_request`` starts. ``queue`` and
``task`` cells run on the main thread's event loop, ``thread`` cells in a thread of the
main thread's ``Caller``.

The worker keeps no queue of cells: it starts each cell when it gets it. That ``queue``
cells run one after another is the supervisor's doing (src/kernel/lanes.rs): it sends
the main worker a main-lane ``queue`` cell only once the previous one has replied, and a
cell's reply is the last thing it does here. So ``queue`` and ``task`` cells start the
same way; the difference is only whether later cells wait in the supervisor's lane.

The one exception is a cell sent ahead (IPC.md "Cells sent ahead", src/kernel/ahead.rs):
it names the running cell it comes ``after``, and is held here until that one has replied;
it then starts, or is dropped if that reply was an error and it says ``unless_error``."""

from __future__ import annotations

import collections.abc
import contextvars
import dataclasses
import json
import logging
import sys
import threading
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any

from kernelvisor.cells import current_cell
from kernelvisor.messages import Request

if TYPE_CHECKING:
    from kernelvisor.wiring import Worker

log = logging.getLogger(__name__)

# How long a thread cell waits for the main thread's Caller (made once its loop runs).
CALLER_WAIT_SECONDS = 10.0

# How many replies' statuses are kept for cells sent ahead (one is ever needed).
REPLIED_KEPT = 16

# Python >= 3.11: create_task takes the context the first step ran in.
_EAGER = sys.version_info >= (3, 11)


class RunModes:
    """Starts cells in their run mode, and owns the main thread's ``Caller``, parent of
    the threads that run ``thread`` cells."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        # Made in the main thread once its loop runs (start_caller).
        self._main_caller: Any = None
        self._caller_ready = threading.Event()
        # Cells sent ahead, by the request they wait for; and the statuses of the last
        # replies, for a cell that arrives after the one it waits for has replied.
        self._held: dict[int, Request] = {}
        self._replied: collections.OrderedDict[int, tuple[str, float]] = collections.OrderedDict()
        # Cells sent ahead that wait for the supervisor's go, by their own id.
        self._waiting_go: dict[int, Request] = {}
        self._ahead_lock = threading.Lock()

    def cell_done(self, req_id: int, status: str, ran: float) -> None:
        """An execute_request has replied after running ``ran`` seconds (from its
        thread): a cell held after it goes."""
        with self._ahead_lock:
            self._replied[req_id] = (status, ran)
            if len(self._replied) > REPLIED_KEPT:
                self._replied.popitem(last=False)
            held = self._held.pop(req_id, None)
        if held is None:
            return
        # Once this cell's frames are off the stack: a burst must not nest cells.
        if threading.current_thread() is threading.main_thread():
            self._worker.loop.call_soon(self.start, held, context=contextvars.Context())
        else:
            self._worker.loop.call_soon_threadsafe(self.start, held, context=contextvars.Context())

    def _may_start(self, req: Request) -> bool:
        """For a cell sent ahead: whether it starts now (held, or dropped, if not)."""
        after = req.after
        if after is None:
            return True
        with self._ahead_lock:
            replied = self._replied.get(after.id)
            if replied is None:
                self._held[after.id] = req
                return False
        status, ran = replied
        if status == "error" and after.unless_error:
            log.debug("request %s dropped: request %s failed before it", req.id, after.id)
            return False
        if after.within is not None and ran * 1000 >= after.within:
            # The supervisor takes the snapshot due after a long cell first.
            self._waiting_go[req.id] = req
            self._worker.outbox.control({"op": "held", "id": req.id})
            return False
        return True

    def go(self, req_id: object) -> None:
        """The supervisor's word for a cell that waits for it (main thread)."""
        req = self._waiting_go.pop(req_id, None) if isinstance(req_id, int) else None
        if req is None:
            log.warning("go for no held cell: %r", req_id)
            return
        self._start(req)

    def start(self, req: Request) -> None:
        """Start an ``execute_request`` in its run mode; from any thread."""
        if not self._may_start(req):
            return
        self._start(req)

    def _start(self, req: Request) -> None:
        loop = self._worker.loop
        if req.mode == "thread":
            # From any thread (the supervisor sends these on aux, so that a blocked main
            # thread does not hold them up): callers are thread-safe.
            self._start_thread_cell(req)
            return
        # A queue or task cell (the supervisor decided when it may start).
        on_main = threading.current_thread() is threading.main_thread()
        if on_main and current_cell.get() is None:
            self.start_execute(req)
        elif on_main:
            # Read by an input() waiting inside a cell: start it after that cell (or at
            # its next await), when the loop runs again.
            loop.call_soon(self.start_execute, req, context=contextvars.Context())
        else:
            loop.call_soon_threadsafe(self.start_execute, req, context=contextvars.Context())

    def start_execute(self, req: Request) -> None:
        """A ``queue`` or ``task`` cell, on the main thread.

        With asyncio, run the request's first step now (a cell that never awaits runs to
        its reply right here), and only what remains after an ``await`` as a task. With
        trio, the cell is a trio task from the start (trio calls need a trio task)."""
        worker = self._worker

        def run() -> Coroutine[Any, Any, None]:
            return worker.executor.execute(req)

        if worker.trio is not None:
            worker.trio.spawn(run)
            return
        coro = run()
        if not _EAGER:
            worker.loop.create_task(coro)
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
        worker.loop.create_task(_Resumed(coro, awaiting), context=context)

    # --- the main thread's Caller and its threads ----------------------------------------

    def forget_caller(self) -> None:
        """After a fork: the main-thread Caller is the forking process's. Thread cells that
        arrive before the new one is made wait for it (``_caller``), instead of starting
        their threads under the old one."""
        self._main_caller = None
        self._caller_ready.clear()

    def start_caller(self) -> None:
        """Make a new main-thread Caller once the loop runs (at start, and in a promoted
        snapshot)."""
        self.forget_caller()
        self._worker.loop.call_soon(self._make_caller)

    def _make_caller(self) -> None:
        """The main thread's Caller: made in the main thread while its loop runs."""
        from kernelvisor.caller import Caller

        self._main_caller = Caller()
        self._caller_ready.set()

    def _caller(self) -> Any:
        if not self._caller_ready.wait(CALLER_WAIT_SECONDS):
            raise RuntimeError("the main thread's event loop is not running")
        return self._main_caller

    def _start_thread_cell(self, req: Request) -> None:
        """A ``thread`` cell: in the named thread (created on first use; its cells run
        one after another), or in a thread of the ``to_thread`` pool. Either has its own
        event loop (asyncio or trio), so the cell may await there."""
        worker = self._worker

        async def run() -> None:
            await worker.executor.execute(req)

        backend = req.backend or worker.backend
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
            worker.loop.call_soon_threadsafe(
                self.start_execute, _as_error_cell(req, exc), context=contextvars.Context()
            )

    def drop_thread(self, name: str) -> None:
        """Stop a named thread once the cells queued there are done (deleted subshell)."""
        if self._main_caller is None:
            return
        for child in self._main_caller.children:
            if child.name == name and not child.stopped:
                child.queue_call(child.stop)


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


def _as_error_cell(req: Request, exc: Exception) -> Request:
    """The request, with code that raises ``exc``'s message where the cell would run."""
    content = json.loads(req.content or b"{}")
    content["code"] = f"raise RuntimeError({str(exc)!r})"
    return dataclasses.replace(req, content=json.dumps(content).encode(), mode="queue")
