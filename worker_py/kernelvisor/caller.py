"""``Caller``: run sync and async functions in a given thread's event loop (asyncio or trio).

Scheduling is synchronous and thread-safe: ``call_soon``, ``call_later``, ``queue_call`` and
``to_thread`` return a ``Pending`` at once, which can be awaited from any thread's loop
(asyncio or trio), waited for with ``wait_sync()``, or cancelled from anywhere.

How a caller runs: a scheduler task in the caller's loop owns an anyio task group. Other
threads append jobs to a locked deque; when the scheduler is idle it waits on an
``anyio.Event`` that the first submitter sets through the loop's own thread-safe entry
(``call_soon_threadsafe`` / ``TrioToken.run_sync_soon``). Each job becomes a task in the
group, started in the ``contextvars`` context copied when it was scheduled. Jobs from
``call_soon`` are started strictly in submission order (trio randomises task order, so each
waits for its predecessor to have been called); ``call_later`` jobs wait in the scheduler's
timer heap and join that order when due (by deadline); ``queue_call`` jobs run one at a time.

Where the loop comes from:

- ``Caller()`` / ``Caller("CurrentThread")``: the scheduler is a task in the loop running in
  this thread (an asyncio task, or a trio system task).
- ``Caller("NewThread")`` and children (``get``, ``to_thread`` workers): a new thread named
  after the caller runs ``anyio.run(scheduler, backend=...)``.
- ``Caller("manual")``: not started; ``start_sync()`` starts it in a new thread, ``async with``
  runs it in the entering task's loop until the block exits.

The ``to_thread`` pool and the reaper of its idle workers are in caller_pool.py.
"""

from __future__ import annotations

import contextvars
import enum
import functools
import heapq
import importlib.util
import inspect
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, ClassVar, Literal, ParamSpec, TypeVar, overload

import anyio
import anyio.abc

from kernelvisor._pending import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    InvalidStateError,
    LoopRef,
    Pending,
    PendingCancelled,
    ReturnWhen,
    current_loop,
)
from kernelvisor._pending import as_completed as _as_completed
from kernelvisor._pending import wait as _wait
from kernelvisor.caller_pool import PoolStats, ThreadPool, forget_reaper_after_fork, stop_reaper

_sniffio_cvar: contextvars.ContextVar[str | None] | None
try:
    from sniffio import current_async_library_cvar as _sniffio_cvar
except ImportError:  # pragma: no cover - trio (the only user of it here) requires sniffio
    _sniffio_cvar = None

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "Caller",
    "InvalidStateError",
    "Pending",
    "PendingCancelled",
    "PoolStats",
]

log = logging.getLogger("kernelvisor.caller")

P = ParamSpec("P")
T = TypeVar("T")
C = TypeVar("C", bound="Caller")

Modifier = Literal["CurrentThread", "MainThread", "NewThread", "manual"]
Backend = Literal["asyncio", "trio"]
_MODIFIERS = ("CurrentThread", "MainThread", "NewThread", "manual")
_BACKENDS = ("asyncio", "trio")

_NO_RESULT: Any = object()
_COPY: Any = object()


class _State(enum.IntEnum):
    INITIAL = 0  # "manual", not started
    STARTING = 1  # thread/task created, scheduler not running yet
    RUNNING = 2
    STOPPING = 3
    STOPPED = 4


class _Job:
    __slots__ = ("args", "context", "deadline", "func", "kwargs", "pending", "serial")

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        pending: Pending[Any],
        deadline: float | None,
        serial: bool,
    ) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.context = contextvars.copy_context()
        self.pending = pending
        self.deadline = deadline  # time.monotonic() value, for call_later
        self.serial = serial  # queue_call


def _check_backend(backend: str, *, new_loop: bool) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {_BACKENDS}")
    if new_loop and backend == "trio" and importlib.util.find_spec("trio") is None:
        raise ModuleNotFoundError(
            "backend 'trio' needs the trio package (pip install 'kernelvisor[trio]')"
        )


class Caller:
    """Runs calls in one thread's event loop; see the module docstring.

    ``Caller(modifier=None, /, *, name=None, backend=None, backend_options=None,
    zmq_context=None)`` (``zmq_context``: kept for user code, see the property);
    ``modifier`` is one of:

    - ``"CurrentThread"``: the caller of this thread (created on first use). An event loop
      must be running in this thread, else ``RuntimeError``.
    - ``"MainThread"``: the main thread's caller. From the main thread as "CurrentThread";
      from another thread it must already exist, else ``RuntimeError``.
    - ``"NewThread"``: always a new thread running a new loop (``backend``, default asyncio).
    - ``"manual"``: a new caller that is not started: ``start_sync()`` starts it in a new
      thread; ``async with caller:`` runs it in the current loop for the block's duration.
    - omitted: "CurrentThread" when a loop runs in this thread, otherwise "NewThread".
    """

    MAX_IDLE_POOL_INSTANCES: int = 10
    """``to_thread`` worker that becomes idle stops at once if this many are already idle."""
    IDLE_WORKER_SHUTDOWN_DURATION: float = 60.0
    """Idle ``to_thread`` workers stop after this many seconds idle (<= 0: never)."""

    _glock: ClassVar[threading.RLock] = threading.RLock()  # registries, families, pools
    _by_thread: ClassVar[dict[threading.Thread, Caller]] = {}
    _live: ClassVar[set[Caller]] = set()
    _counter: ClassVar[itertools.count[int]] = itertools.count(1)
    _current: ClassVar[contextvars.ContextVar[tuple[Caller, Pending[Any]] | None]] = (
        contextvars.ContextVar("kernelvisor_caller_current", default=None)
    )

    _name: str
    _backend: str
    _backend_explicit: bool
    _backend_options: dict[str, Any] | None
    _zmq_context: Any
    _thread: threading.Thread | None
    _own_thread: bool
    _loop: LoopRef | None
    _state: _State
    _finalized: bool
    _lock: threading.Lock
    _queue: deque[_Job]
    _wake: anyio.Event | None
    _serial: deque[_Job]
    _serial_running: bool
    _inflight: set[_Job]
    _parent: Caller | None
    _children: set[Caller]
    _stopped_children: list[Caller]
    _is_worker: bool
    _pool: ThreadPool
    _bound: threading.Event
    _start_error: BaseException | None
    _stopped: Pending[None]
    _task: Any

    # --- creation ------------------------------------------------------------------------

    def __new__(
        cls: type[C],
        modifier: Modifier | None = None,
        /,
        *,
        name: str | None = None,
        backend: Backend | None = None,
        backend_options: dict[str, Any] | None = None,
        zmq_context: Any = None,
    ) -> C:
        if modifier is not None and modifier not in _MODIFIERS:
            raise ValueError(f"unknown modifier {modifier!r}: expected one of {_MODIFIERS}")
        here = current_loop()
        if modifier is None:
            modifier = "CurrentThread" if here is not None else "NewThread"
        if backend is not None:
            _check_backend(backend, new_loop=modifier in ("NewThread", "manual"))

        if modifier in ("NewThread", "manual"):
            inst = cls._make(
                name or f"Caller-{next(cls._counter)}",
                backend or (here.backend if here is not None else "asyncio"),
                backend is not None,
                backend_options,
                zmq_context,
            )
            if modifier == "NewThread":
                inst._launch_thread(wait=True)
            return inst

        thread = threading.current_thread()
        if modifier == "MainThread" and thread is not threading.main_thread():
            with cls._glock:
                existing = cls._by_thread.get(threading.main_thread())
            if existing is None or existing._state >= _State.STOPPING:
                raise RuntimeError(
                    "Caller('MainThread') from another thread needs the main thread's caller "
                    "to exist already: create it first with Caller() in the main thread, "
                    "while its event loop runs"
                )
            existing._check_matches(name, backend)
            return existing  # type: ignore[return-value]

        if here is None:
            raise RuntimeError(
                f"Caller({modifier!r}) needs an event loop running in thread "
                f"{thread.name!r}, and none (asyncio or trio) is running there; use "
                "Caller('NewThread') to run one in a new thread"
            )
        if backend is not None and backend != here.backend:
            raise ValueError(
                f"backend {backend!r} requested, but the loop in thread {thread.name!r} "
                f"is {here.backend!r}"
            )
        with cls._glock:
            existing = cls._by_thread.get(thread)
            if (
                existing is not None
                and existing._state < _State.STOPPING
                and existing._loop is not None
                and existing._loop.handle is here.handle
            ):
                existing._check_matches(name, backend)
                return existing  # type: ignore[return-value]
            inst = cls._make(name or thread.name, here.backend, True, None, zmq_context)
            inst._state = _State.STARTING
            inst._thread = thread
            inst._loop = here
            cls._by_thread[thread] = inst
        if (
            existing is not None
            and existing._state < _State.STOPPED
            and (existing._loop is None or existing._loop.handle is not here.handle)
        ):
            # The caller of a loop that ended without stopping it (e.g. closed, not run out).
            existing.stop()
            existing._finalize()
        inst._start_in_loop(here)
        return inst

    def __init__(
        self,
        modifier: Modifier | None = None,
        /,
        *,
        name: str | None = None,
        backend: Backend | None = None,
        backend_options: dict[str, Any] | None = None,
        zmq_context: Any = None,
    ) -> None:
        """All the work is in ``__new__``, which may return an existing caller."""

    @classmethod
    def _make(
        cls: type[C],
        name: str,
        backend: str,
        backend_explicit: bool,
        backend_options: dict[str, Any] | None,
        zmq_context: Any,
    ) -> C:
        inst = object.__new__(cls)
        inst._name = name
        inst._backend = backend
        inst._backend_explicit = backend_explicit
        inst._backend_options = backend_options
        inst._zmq_context = zmq_context
        inst._thread = None
        inst._own_thread = False
        inst._loop = None
        inst._state = _State.INITIAL
        inst._finalized = False
        inst._lock = threading.Lock()
        inst._queue = deque()
        inst._wake = None
        inst._serial = deque()
        inst._serial_running = False
        inst._inflight = set()
        inst._parent = None
        inst._children = set()
        inst._stopped_children = []
        inst._is_worker = False
        inst._pool = ThreadPool(inst)
        inst._bound = threading.Event()
        inst._start_error = None
        inst._stopped = Pending()
        inst._task = None
        with cls._glock:
            cls._live.add(inst)
        return inst

    def _stopping(self) -> bool:
        """Stopping or stopped: it takes no more calls."""
        return self._state >= _State.STOPPING

    def _check_matches(self, name: str | None, backend: str | None) -> None:
        if name is not None and name != self._name:
            raise ValueError(f"name {name!r} does not match the existing {self!r}")
        if backend is not None and backend != self._backend:
            raise ValueError(f"backend {backend!r} does not match the existing {self!r}")

    def _prepare_thread(self) -> bool:
        """Create (not start) the thread of a caller not started yet, and register it.
        False (nothing done) if it was already started."""
        with self._lock:
            if self._state is not _State.INITIAL:
                return False
            self._state = _State.STARTING
            self._own_thread = True
            self._thread = thread = threading.Thread(
                target=self._thread_main, name=self._name, daemon=True
            )
        with Caller._glock:
            Caller._by_thread[thread] = self
        return True

    def _launch_thread(self, *, wait: bool) -> None:
        """Start the thread made by ``_prepare_thread``."""
        if self._thread is None:
            self._prepare_thread()
        assert self._thread is not None
        self._thread.start()
        if wait:
            self._bound.wait()
            if self._start_error is not None:
                raise RuntimeError(f"{self!r} failed to start") from self._start_error

    def _thread_main(self) -> None:
        try:
            anyio.run(
                self._run_scheduler,
                backend=self._backend,
                backend_options=self._backend_options,
            )
        except BaseException as exc:
            self._start_error = exc
            log.exception("event loop of %r failed", self)
        finally:
            self._finalize(self._start_error)

    def _start_in_loop(self, loop: LoopRef) -> None:
        """Run the scheduler as a task of the loop running in this thread."""
        ctx = contextvars.Context()
        if loop.backend == "asyncio":
            task = ctx.run(loop.handle.create_task, self._run_scheduler())  # type: ignore[attr-defined]
            task.set_name(f"Caller {self._name}")
            # If the loop ends before the task's first step, its body never runs.
            task.add_done_callback(lambda _: self._finalize())
            self._task = task
        else:
            import trio

            trio.lowlevel.spawn_system_task(
                self._run_scheduler, name=f"Caller {self._name}", context=ctx
            )

    def start_sync(self) -> None:
        """Start a "manual" caller in a new thread; returns once its loop runs.

        No-op if already started; ``RuntimeError`` if stopped.
        """
        if self._prepare_thread():
            self._launch_thread(wait=True)
        elif self._state >= _State.STOPPING:
            raise RuntimeError(f"{self!r} is stopped; a caller cannot be restarted")

    # --- the scheduler (runs in the caller's loop) ----------------------------------------

    async def _run_scheduler(self) -> None:
        try:
            loop = current_loop()
            assert loop is not None
            with self._lock:
                self._loop = loop
                if self._state is _State.STARTING:
                    self._state = _State.RUNNING
            self._bound.set()
            async with anyio.create_task_group() as tg:
                try:
                    await self._schedule(tg)
                finally:
                    tg.cancel_scope.cancel()
        except BaseException as exc:
            # Cancelled: the loop is shutting down (asyncio.run's end, trio's main task
            # done). The scheduler must not raise: a trio system task would crash the run.
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                log.exception("scheduler of %r failed", self)
        finally:
            self._finalize()

    async def _schedule(self, tg: anyio.abc.TaskGroup) -> None:
        prev_started: anyio.Event | None = None  # the last call_soon/call_later job's
        timers: list[tuple[float, int, _Job]] = []  # call_later jobs not due yet
        order = itertools.count()
        while True:
            with self._lock:
                jobs = self._queue
                wake = None
                if jobs:
                    self._queue = deque()
                elif self._state >= _State.STOPPING:
                    return
                else:
                    self._wake = wake = anyio.Event()
            for job in jobs:
                if job.pending.done():  # cancelled before it was dispatched
                    continue
                if job.deadline is not None:
                    with self._lock:  # counted in flight: stop() cancels it
                        self._inflight.add(job)
                    heapq.heappush(timers, (job.deadline, next(order), job))
                else:
                    prev_started = self._dispatch(tg, job, prev_started)
            # Due call_later jobs join the ordered chain by deadline (then by scheduling).
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                job = heapq.heappop(timers)[2]
                if job.pending.done():
                    with self._lock:
                        self._inflight.discard(job)
                else:
                    prev_started = self._dispatch(tg, job, prev_started)
            if wake is not None:
                if timers:
                    with anyio.move_on_after(timers[0][0] - time.monotonic()):
                        await wake.wait()
                else:
                    await wake.wait()

    def _dispatch(
        self, tg: anyio.abc.TaskGroup, job: _Job, prev_started: anyio.Event | None
    ) -> anyio.Event | None:
        """Start a job; returns the event the next call_soon/call_later job waits for."""
        if job.serial:
            with self._lock:  # counted in flight: stop() cancels it if not started
                self._inflight.add(job)
            self._serial.append(job)
            if not self._serial_running:
                self._serial_running = True
                tg.start_soon(self._serial_runner, tg)
            return prev_started
        started = anyio.Event()
        self._spawn(tg, job, prev_started, started, None)
        return started

    def _spawn(
        self,
        tg: anyio.abc.TaskGroup,
        job: _Job,
        prev_started: anyio.Event | None,
        started: anyio.Event | None,
        finished: anyio.Event | None,
    ) -> None:
        """Start the job's task in (a copy of) the context it was scheduled in."""
        if _sniffio_cvar is not None:
            # The context may come from another loop's thread (anyio.run sets this
            # variable there): anyio must see this caller's backend.
            job.context.run(_sniffio_cvar.set, self._backend)
        with self._lock:
            self._inflight.add(job)
        job.context.run(tg.start_soon, self._run_job, job, prev_started, started, finished)

    async def _serial_runner(self, tg: anyio.abc.TaskGroup) -> None:
        try:
            while self._serial:
                job = self._serial.popleft()
                if job.pending.done():
                    with self._lock:
                        self._inflight.discard(job)
                    continue
                finished = anyio.Event()
                self._spawn(tg, job, None, None, finished)
                await finished.wait()
        finally:
            self._serial_running = False

    async def _run_job(
        self,
        job: _Job,
        prev_started: anyio.Event | None,
        started: anyio.Event | None,
        finished: anyio.Event | None,
    ) -> None:
        pen = job.pending
        Caller._current.set((self, pen))  # this task's own copy of the job's context
        scope = anyio.CancelScope()
        loop = self._loop
        assert loop is not None
        pen._set_canceller(functools.partial(loop.call, scope.cancel))
        try:
            with scope:
                if prev_started is not None and not prev_started.is_set():
                    await prev_started.wait()  # keeps the order on trio (random task order)
                if not pen._start():
                    return  # cancelled before it started: never called
                try:
                    result = job.func(*job.args, **job.kwargs)
                    if started is not None:
                        started.set()
                    if inspect.iscoroutine(result):
                        result = await result
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as exc:
                    pen._finish(_NO_RESULT, exc, None)
                else:
                    pen._finish(result, None, None)
        finally:
            with self._lock:
                self._inflight.discard(job)
            if started is not None:
                started.set()
            if not pen.done():
                pen._finish(_NO_RESULT, None, f"{self!r} stopped")
            if finished is not None:
                finished.set()

    # --- scheduling (any thread) -----------------------------------------------------------

    def _submit(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        deadline: float | None = None,
        serial: bool = False,
    ) -> Pending[Any]:
        pen: Pending[Any] = Pending()
        pen._owner = self._thread
        pen._label = getattr(func, "__qualname__", None) or repr(func)
        job = _Job(func, args, kwargs, pen, deadline, serial)
        with self._lock:
            if self._state >= _State.STOPPING:
                raise RuntimeError(f"{self!r} is stopped")
            self._queue.append(job)
            wake, self._wake = self._wake, None
            loop = self._loop
        if wake is not None and loop is not None:
            loop.call(wake.set)
        return pen

    @overload
    def call_soon(
        self,
        func: Callable[P, Coroutine[Any, Any, T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Pending[T]: ...
    @overload
    def call_soon(
        self,
        func: Callable[P, T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Pending[T]: ...
    def call_soon(
        self,
        func: Callable[..., Any],
        /,
        *args: Any,
        **kwargs: Any,
    ) -> Pending[Any]:
        """Call ``func(*args, **kwargs)`` in the caller's loop (a coroutine function is
        awaited there). Calls start in the order they were scheduled; each runs in a copy
        of the scheduling context (``contextvars``)."""
        return self._submit(func, args, kwargs)

    @overload
    def call_later(
        self,
        delay: float,
        func: Callable[P, Coroutine[Any, Any, T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Pending[T]: ...
    @overload
    def call_later(
        self,
        delay: float,
        func: Callable[P, T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Pending[T]: ...
    def call_later(
        self,
        delay: float,
        func: Callable[..., Any],
        /,
        *args: Any,
        **kwargs: Any,
    ) -> Pending[Any]:
        """Like ``call_soon``, but not before ``delay`` seconds have passed (calls that
        become due together start in deadline order). Until then it has not started:
        ``cancel()`` completes it at once."""
        deadline = time.monotonic() + delay if delay > 0 else None
        return self._submit(func, args, kwargs, deadline=deadline)

    @overload
    def queue_call(
        self,
        func: Callable[P, Coroutine[Any, Any, T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Pending[T]: ...
    @overload
    def queue_call(
        self,
        func: Callable[P, T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Pending[T]: ...
    def queue_call(
        self,
        func: Callable[..., Any],
        /,
        *args: Any,
        **kwargs: Any,
    ) -> Pending[Any]:
        """Like ``call_soon``, but queued calls run one after another: each starts once
        the previous one (of this caller's queue) has finished."""
        return self._submit(func, args, kwargs, serial=True)

    @overload
    def to_thread(
        self,
        func: Callable[P, Coroutine[Any, Any, T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Pending[T]: ...
    @overload
    def to_thread(
        self,
        func: Callable[P, T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Pending[T]: ...
    def to_thread(
        self,
        func: Callable[..., Any],
        /,
        *args: Any,
        **kwargs: Any,
    ) -> Pending[Any]:
        """Call ``func`` in a pooled worker: a child caller with its own thread and loop
        (same backend, backend options and zmq context as this one).

        A worker whose call is done becomes idle, or stops at once if
        ``MAX_IDLE_POOL_INSTANCES`` are already idle; idle workers stop after
        ``IDLE_WORKER_SHUTDOWN_DURATION`` seconds (if > 0). See ``pool_stats()``.
        """
        return self._pool.call(func, args, kwargs)

    def pool_stats(self) -> PoolStats:
        """This caller's ``to_thread`` pool: idle and busy worker counts."""
        with Caller._glock:
            return self._pool.stats()

    # --- children ---------------------------------------------------------------------------

    def _new_child(
        self,
        name: str,
        backend: str,
        backend_options: dict[str, Any] | None,
        zmq_context: Any,
        *,
        is_worker: bool = False,
    ) -> Caller:
        # Under _glock: registered as a child before its thread exists.
        child = type(self)._make(name, backend, True, backend_options, zmq_context)
        child._parent = self
        child._is_worker = is_worker
        self._children.add(child)
        child._prepare_thread()
        return child

    def get(
        self,
        name: str | None = None,
        *,
        backend: Backend | None = None,
        backend_options: dict[str, Any] | None = None,
        zmq_context: Any = _COPY,
    ) -> Caller:
        """A child caller (new thread and loop) that stops when this one stops.

        With ``name``: the running child of that name if there is one (``ValueError`` if
        its backend differs from ``backend``). ``backend`` and ``zmq_context`` default to
        this caller's; ``backend_options`` too, but only when the backend is the same.
        """
        if backend is not None:
            _check_backend(backend, new_loop=True)
        with Caller._glock:
            if self._state >= _State.STOPPING:
                raise RuntimeError(f"{self!r} is stopped")
            if name is not None:
                for child in self._children:
                    if child._name == name and not child._is_worker:
                        if child._state >= _State.STOPPING:
                            continue
                        if backend is not None and backend != child._backend:
                            raise ValueError(
                                f"backend {backend!r} does not match the existing {child!r}"
                            )
                        return child
            child_backend = backend or self._backend
            if backend_options is None and child_backend == self._backend:
                backend_options = self._backend_options
            child = self._new_child(
                name or f"{self._name}-child-{next(Caller._counter)}",
                child_backend,
                backend_options,
                self._zmq_context if zmq_context is _COPY else zmq_context,
            )
        child._launch_thread(wait=True)
        return child

    # --- stopping ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop (thread-safe, returns at once): calls not started yet are cancelled, running
        ones are cancelled in the loop, children stop too. See ``join``/``wait_stopped``."""
        with self._lock:
            if self._state >= _State.STOPPING:
                return
            never_started = self._state is _State.INITIAL
            self._state = _State.STOPPING
            jobs, self._queue = self._queue, deque()
            jobs.extend(self._inflight)  # dispatched; those not started yet never will
            wake, self._wake = self._wake, None
            loop = self._loop
        msg = f"{self!r} stopped"
        for job in jobs:
            job.pending._cancel_unstarted(msg)
        with Caller._glock:
            children = list(self._children)
            self._stopped_children = children
        for child in children:
            child.stop()
        if never_started:
            self._finalize()
        elif wake is not None and loop is not None:
            loop.call(wake.set)

    def _finalize(self, error: BaseException | None = None) -> None:
        """The scheduler has ended (or will never run): release everything. Idempotent."""
        with self._lock:
            if self._finalized:
                return
            self._finalized = True
            self._state = _State.STOPPED
            jobs = list(self._queue)
            self._queue.clear()
            self._wake = None
            jobs.extend(self._inflight)  # tasks that never ran (e.g. their loop ended first)
            self._inflight.clear()
        jobs.extend(self._serial)
        self._serial.clear()
        with Caller._glock:
            if self._thread is not None and Caller._by_thread.get(self._thread) is self:
                del Caller._by_thread[self._thread]
            Caller._live.discard(self)
            parent = self._parent
            if parent is not None:
                parent._children.discard(self)
                parent._pool.discard(self)
            children = list(self._children)
            self._stopped_children = list({*self._stopped_children, *children})
        msg = f"{self!r} stopped"
        for job in jobs:
            job.pending._finish(_NO_RESULT, error, None if error is not None else msg)
        for child in children:
            child.stop()
        self._bound.set()
        self._stopped._finish(None, None, None)

    def join(self, timeout: float | None = None) -> bool:
        """Block until stopped (and its thread and its children's have ended); False on
        timeout. Does not stop it: call ``stop()`` first."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        if not self._stopped.done():
            if self._thread is threading.current_thread():
                raise RuntimeError(f"join() on {self!r} from its own thread would deadlock")
            if not self._stopped._wait_done_sync(left()):
                return False
        thread = self._thread
        if self._own_thread and thread is not None and thread is not threading.current_thread():
            thread.join(left())
            if thread.is_alive():
                return False
        return all(child.join(left()) for child in self._stopped_children)

    async def wait_stopped(self) -> None:
        """Wait (in any loop) until stopped, and its children too."""
        await self._stopped.wait(protect=True)
        for child in self._stopped_children:
            await child.wait_stopped()

    @classmethod
    def stop_all(cls, timeout: float | None = 10.0) -> bool:
        """Stop every caller and wait for their threads (and the idle-worker reaper) to end.
        False if something did not end within ``timeout`` seconds (each)."""
        with Caller._glock:
            callers = list(Caller._live)
        for caller in callers:
            caller.stop()
        ok = True
        me = threading.current_thread()
        here = current_loop()
        for caller in callers:
            if not caller._own_thread and caller._thread is me:
                loop = caller._loop
                if here is not None and loop is not None and loop.handle is here.handle:
                    continue  # our own running loop: it finishes stopping later
                caller._finalize()  # its loop has ended
                continue
            try:
                ok = caller.join(timeout) and ok
            except RuntimeError:
                ok = False
        return stop_reaper(timeout) and ok

    # --- async context ----------------------------------------------------------------------

    async def __aenter__(self: C) -> C:
        """Start a "manual" caller in this loop (no-op if already running); the block's
        end stops it and waits until it has stopped."""
        loop = current_loop()
        assert loop is not None
        with self._lock:
            if self._state >= _State.STOPPING:
                raise RuntimeError(f"{self!r} is stopped; a caller cannot be restarted")
            start_here = self._state is _State.INITIAL
            if start_here:
                if self._backend_explicit and self._backend != loop.backend:
                    raise RuntimeError(
                        f"{self!r} was created for {self._backend!r} but entered in a "
                        f"{loop.backend!r} loop"
                    )
                self._backend = loop.backend
                self._state = _State.STARTING
                self._thread = loop.thread
                self._loop = loop
        if start_here:
            with Caller._glock:
                current = Caller._by_thread.get(loop.thread)
                if current is None or current._state >= _State.STOPPING:
                    Caller._by_thread[loop.thread] = self
            self._start_in_loop(loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        current = Caller._current.get()
        inside = current[0] if current is not None else None
        while inside is not None and inside is not self:
            inside = inside._parent
        if inside is None:  # not inside one of the calls being stopped (would deadlock)
            with anyio.CancelScope(shield=True):
                await self.wait_stopped()

    # --- introspection ----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def backend_options(self) -> dict[str, Any] | None:
        return self._backend_options

    @property
    def zmq_context(self) -> Any:
        """The ``zmq_context`` given at creation (``None`` if none was), for user code.

        In async-kernel a caller carries the kernel's ``zmq.Context`` so that code running
        in its thread can open sockets on it; code written for async-kernel passes it to
        ``Caller(...)`` and ``get(...)``. Here the worker has no zmq (the supervisor owns
        every socket), so kernelvisor never uses the value: it only keeps it, copies it to
        children made by ``get`` (unless given there) and ``to_thread`` workers, and
        returns it here."""
        return self._zmq_context

    @property
    def thread(self) -> threading.Thread | None:
        """The thread whose loop runs the calls (None for a "manual" caller not started)."""
        return self._thread

    @property
    def running(self) -> bool:
        return self._state is _State.RUNNING

    @property
    def stopped(self) -> bool:
        return self._state is _State.STOPPED

    @property
    def parent(self) -> Caller | None:
        return self._parent

    @property
    def children(self) -> frozenset[Caller]:
        """Children not yet stopped (from ``get`` and the ``to_thread`` pool)."""
        with Caller._glock:
            return frozenset(self._children)

    def __repr__(self) -> str:
        return f"<Caller {self._name!r} {self._backend} {self._state.name.lower()}>"

    @classmethod
    def all_callers(cls) -> list[Caller]:
        """Every caller not yet stopped."""
        with Caller._glock:
            return list(Caller._live)

    @classmethod
    def current_pending(cls) -> Pending[Any] | None:
        """Inside a call run by a caller: that call's ``Pending``."""
        current = Caller._current.get()
        return current[1] if current is not None else None

    # --- waiting on several -----------------------------------------------------------------

    @staticmethod
    def as_completed(
        pendings: Iterable[Pending[T]],
        *,
        timeout: float | None = None,
        cancel_unfinished: bool = False,
    ) -> AsyncGenerator[Pending[T], None]:
        """``async for pen in Caller.as_completed(pendings)``: each as it completes."""
        return _as_completed(pendings, timeout=timeout, cancel_unfinished=cancel_unfinished)

    @staticmethod
    async def wait(
        pendings: Iterable[Pending[T]],
        *,
        timeout: float | None = None,
        return_when: ReturnWhen = "ALL_COMPLETED",
    ) -> tuple[set[Pending[T]], set[Pending[T]]]:
        """Like ``asyncio.wait``: ``done, not_done = await Caller.wait(pendings, ...)``."""
        return await _wait(pendings, timeout=timeout, return_when=return_when)


def _forget_threads_after_fork() -> None:
    """In a forked child only the forking thread survives: every Caller running in
    another thread (the to_thread pool, named threads, the reaper) is gone with it, and a
    registry lock may have been held by one of them. Start the registries afresh; callers
    created before the fork are stopped (their threads do not exist here)."""
    Caller._glock = threading.RLock()
    Caller._by_thread = {}
    Caller._live = set()
    forget_reaper_after_fork()


os.register_at_fork(after_in_child=_forget_threads_after_fork)
