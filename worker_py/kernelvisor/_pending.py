"""``Pending``: a thread-safe result that any thread or event loop can wait for.

A ``Pending`` is completed in one thread (usually a ``Caller``'s loop thread) and read from
any other. Its state lives behind a ``threading.Lock``; completion swaps the callback list
out under the lock and runs the callbacks after releasing it, in the completing thread.

Crossing loops: ``await pending`` registers a done callback that wakes the *awaiting* loop
through that loop's own thread-safe entry point (``loop.call_soon_threadsafe`` for asyncio,
``TrioToken.run_sync_soon`` for trio), where an ``anyio.Event`` is set. When the completing
thread is the awaiting loop's thread the event is set directly. ``wait_sync`` does the same
with a ``threading.Event``. Nothing here depends on which loop completes the ``Pending``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Generator, Iterable
from typing import Any, Final, Generic, Literal, TypeVar

import anyio

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "InvalidStateError",
    "LoopRef",
    "Pending",
    "PendingCancelled",
    "as_completed",
    "current_loop",
    "wait",
]

log = logging.getLogger("kernelvisor.caller")

T = TypeVar("T")

# The same strings as asyncio's and concurrent.futures' constants, so either can be passed.
FIRST_COMPLETED: Final = "FIRST_COMPLETED"
FIRST_EXCEPTION: Final = "FIRST_EXCEPTION"
ALL_COMPLETED: Final = "ALL_COMPLETED"
ReturnWhen = Literal["FIRST_COMPLETED", "FIRST_EXCEPTION", "ALL_COMPLETED"]


class PendingCancelled(Exception):
    """Raised by ``result()``, ``exception()`` and ``await`` when the ``Pending`` was cancelled.

    An ordinary ``Exception`` on purpose: it must not look like the *awaiting* task was
    cancelled (``asyncio.CancelledError``/``trio.Cancelled`` drive the loops' own machinery).
    """


class InvalidStateError(RuntimeError):
    """The operation does not fit the ``Pending``'s state (e.g. ``result()`` before done)."""


def _safe_call(fn: Callable[[], object]) -> None:
    # Callbacks handed to a loop must never raise: trio turns that into TrioInternalError.
    try:
        fn()
    except BaseException:
        log.exception("callback %r failed", fn)


class LoopRef:
    """A running event loop (asyncio or trio) and a thread-safe way to call into it."""

    __slots__ = ("backend", "handle", "thread")

    def __init__(self, backend: str, handle: object, thread: threading.Thread) -> None:
        self.backend = backend
        # The asyncio loop or the TrioToken: identifies this run of the loop.
        self.handle = handle
        self.thread = thread

    def call_soon_threadsafe(self, fn: Callable[[], object]) -> bool:
        """Schedule ``fn()`` in the loop from any thread; False when the loop has ended."""
        try:
            if self.backend == "asyncio":
                loop: asyncio.AbstractEventLoop = self.handle  # type: ignore[assignment]
                loop.call_soon_threadsafe(_safe_call, fn)
            else:
                self.handle.run_sync_soon(_safe_call, fn)  # type: ignore[attr-defined]
        except Exception:  # asyncio: RuntimeError (closed); trio: RunFinishedError
            return False
        return True

    def call(self, fn: Callable[[], object]) -> bool:
        """Call ``fn()`` now when already in the loop's thread, else schedule it there."""
        if threading.current_thread() is self.thread:
            _safe_call(fn)
            return True
        return self.call_soon_threadsafe(fn)


def current_loop() -> LoopRef | None:
    """The event loop running in this thread (asyncio or trio), or None."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return LoopRef("asyncio", loop, threading.current_thread())
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            return LoopRef("trio", token, threading.current_thread())
    return None


def _require_loop(what: str) -> LoopRef:
    loop = current_loop()
    if loop is None:
        raise RuntimeError(f"{what} must run inside an asyncio or trio event loop")
    return loop


_NOT_STARTED, _RUNNING, _DONE = 0, 1, 2
_NO_RESULT: Any = object()


class Pending(Generic[T]):
    """The eventual result of a call scheduled by a ``Caller`` (or set by hand).

    Thread-safe: it can be awaited from any asyncio or trio loop in any thread, waited
    for synchronously with ``wait_sync()``, and cancelled from anywhere with ``cancel()``.

    ``Pending()`` can also be created directly and completed with ``set_result`` /
    ``set_exception`` (like ``concurrent.futures.Future``).
    """

    __slots__ = (
        "__weakref__",
        "_callbacks",
        "_cancel_msg",
        "_canceller",
        "_exception",
        "_label",
        "_lock",
        "_owner",
        "_result",
        "_state",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = _NOT_STARTED
        self._result: T = _NO_RESULT
        self._exception: BaseException | None = None
        # None: not cancelled; a str (possibly empty): cancellation requested/applied.
        self._cancel_msg: str | None = None
        self._callbacks: list[Callable[[Pending[T]], object]] = []
        self._canceller: Callable[[], object] | None = None
        # The thread whose loop completes this Pending (wait_sync there would deadlock).
        self._owner: threading.Thread | None = None
        self._label = ""

    def __repr__(self) -> str:
        with self._lock:
            state = self._state
            cancelled = self._cancel_msg is not None
            exc = self._exception
        if state == _DONE:
            text = "cancelled" if cancelled else ("error" if exc is not None else "done")
        else:
            text = "running" if state == _RUNNING else "pending"
            if cancelled:
                text += " (cancelling)"
        label = f" {self._label}" if self._label else ""
        return f"<Pending {text}{label}>"

    # --- state -------------------------------------------------------------------------

    def done(self) -> bool:
        """True once a result, an exception or a cancellation has been set."""
        return self._state == _DONE

    def cancelled(self) -> bool:
        """True if the ``Pending`` is done and ended by cancellation."""
        return self._state == _DONE and self._cancel_msg is not None

    def result(self) -> T:
        """The result; raises the call's exception, ``PendingCancelled`` or
        ``InvalidStateError`` (not done yet). Does not block: see ``wait_sync``."""
        exc = self.exception()
        if exc is not None:
            raise exc
        return self._result

    def exception(self) -> BaseException | None:
        """The call's exception (None on success); raises ``PendingCancelled`` if cancelled,
        ``InvalidStateError`` if not done yet."""
        if self._state != _DONE:
            raise InvalidStateError(f"{self!r} is not done")
        if self._cancel_msg is not None:
            raise PendingCancelled(self._cancel_msg or "cancelled")
        return self._exception

    # --- callbacks ---------------------------------------------------------------------

    def add_done_callback(self, fn: Callable[[Pending[T]], object]) -> None:
        """Call ``fn(pending)`` when done: right away (in this thread) if already done,
        otherwise in the thread that completes it. Exceptions are logged, not raised."""
        with self._lock:
            if self._state != _DONE:
                self._callbacks.append(fn)
                return
        self._run_callback(fn)

    def remove_done_callback(self, fn: Callable[[Pending[T]], object]) -> int:
        """Remove every registration of ``fn``; returns how many were removed."""
        with self._lock:
            before = len(self._callbacks)
            self._callbacks = [cb for cb in self._callbacks if cb != fn]
            return before - len(self._callbacks)

    def _run_callback(self, fn: Callable[[Pending[T]], object]) -> None:
        try:
            fn(self)
        except Exception:
            log.exception("done callback %r of %r failed", fn, self)

    # --- completion --------------------------------------------------------------------

    def set_result(self, value: T) -> None:
        """Complete with ``value``; ``InvalidStateError`` if already done."""
        if not self._finish(value, None, None):
            raise InvalidStateError(f"{self!r} is already done")

    def set_exception(self, exception: BaseException) -> None:
        """Complete with ``exception``; ``InvalidStateError`` if already done."""
        if not self._finish(_NO_RESULT, exception, None):
            raise InvalidStateError(f"{self!r} is already done")

    def cancel(self, msg: str | None = None) -> bool:
        """Cancel (thread-safe). False if already done, else True.

        Not started yet: done (cancelled) at once and the call never runs. Running: the
        call's task is cancelled in its loop (a synchronous function cannot be interrupted),
        and the ``Pending`` ends cancelled whatever the call then returns.
        """
        with self._lock:
            if self._state == _DONE:
                return False
            if self._cancel_msg is None:
                self._cancel_msg = msg or ""
            canceller = self._canceller
            not_started = self._state == _NOT_STARTED
        if not_started:
            self._finish(_NO_RESULT, None, msg or "")
        if canceller is not None:
            canceller()
        return True

    def _cancel_unstarted(self, msg: str) -> bool:
        """Cancel only if the call has not started (no canceller is called)."""
        with self._lock:
            if self._state != _NOT_STARTED:
                return False
            if self._cancel_msg is None:
                self._cancel_msg = msg
        return self._finish(_NO_RESULT, None, msg)

    def _set_canceller(self, canceller: Callable[[], object]) -> None:
        """How to interrupt the call once its task exists (called from its loop thread)."""
        with self._lock:
            self._canceller = canceller

    def _start(self) -> bool:
        """Mark the call as started; False if it was cancelled before starting."""
        with self._lock:
            if self._state != _NOT_STARTED or self._cancel_msg is not None:
                return False
            self._state = _RUNNING
            return True

    def _finish(self, value: Any, exception: BaseException | None, cancel_msg: str | None) -> bool:
        with self._lock:
            if self._state == _DONE:
                return False
            self._state = _DONE
            if cancel_msg is not None and self._cancel_msg is None:
                self._cancel_msg = cancel_msg
            if self._cancel_msg is None:
                self._result = value
                self._exception = exception
            callbacks, self._callbacks = self._callbacks, []
            self._canceller = None
        for fn in callbacks:
            self._run_callback(fn)
        return True

    # --- waiting -----------------------------------------------------------------------

    def _wait_done_sync(self, timeout: float | None) -> bool:
        if self._state == _DONE:
            return True
        event = threading.Event()

        def wake(_: Pending[T]) -> None:
            event.set()

        self.add_done_callback(wake)
        try:
            return event.wait(timeout)
        finally:
            self.remove_done_callback(wake)

    def wait_sync(self, timeout: float | None = None) -> T:
        """Block this thread until done, then return ``result()``.

        ``TimeoutError`` after ``timeout`` seconds (the call is not cancelled). Raises
        ``RuntimeError`` when called from the thread that must complete it (deadlock).
        """
        if self._state != _DONE:
            if self._owner is threading.current_thread():
                raise RuntimeError(
                    f"wait_sync() on {self!r} from the thread that runs it would deadlock; "
                    "await it instead"
                )
            if not self._wait_done_sync(timeout):
                raise TimeoutError(f"{self!r} not done after {timeout} s")
        return self.result()

    async def wait(self, *, timeout: float | None = None, protect: bool = False) -> T:
        """Wait in the current event loop (asyncio or trio, any thread), return ``result()``.

        Like awaiting an asyncio task, the ``Pending`` is cancelled when the wait is
        cancelled or times out (``TimeoutError``), unless ``protect`` is True.
        """
        if self._state != _DONE:
            loop = _require_loop("awaiting a Pending")
            event = anyio.Event()

            def wake(_: Pending[T]) -> None:
                loop.call(event.set)

            self.add_done_callback(wake)
            try:
                with anyio.fail_after(timeout):
                    await event.wait()
            except BaseException:
                self.remove_done_callback(wake)
                if not protect:
                    self.cancel("the wait for it was cancelled or timed out")
                raise
        return self.result()

    def __await__(self) -> Generator[Any, None, T]:
        return self.wait().__await__()


class _Collector(Generic[T]):
    """Collects Pendings as they complete, for a consumer in the current event loop."""

    def __init__(self, pendings: Iterable[Pending[T]]) -> None:
        self.loop = _require_loop("Caller.as_completed/Caller.wait")
        self.todo = list(dict.fromkeys(pendings))
        self.ready: deque[Pending[T]] = deque()
        self._event: anyio.Event | None = None

    def _set_event(self) -> None:
        if self._event is not None:
            self._event.set()

    def _on_done(self, pen: Pending[T]) -> None:
        self.ready.append(pen)
        self.loop.call(self._set_event)

    def __enter__(self) -> _Collector[T]:
        for pen in self.todo:
            pen.add_done_callback(self._on_done)
        return self

    def __exit__(self, *exc: object) -> None:
        for pen in self.todo:
            pen.remove_done_callback(self._on_done)

    async def next_ready(self, deadline: float | None) -> Pending[T] | None:
        """The next completed Pending, or None when ``deadline`` passes first."""
        while not self.ready:
            self._event = event = anyio.Event()
            if self.ready:
                break
            if deadline is None:
                await event.wait()
            else:
                with anyio.move_on_at(deadline):
                    await event.wait()
                if not self.ready:
                    return None
        self._event = None
        return self.ready.popleft()


async def as_completed(
    pendings: Iterable[Pending[T]],
    *,
    timeout: float | None = None,
    cancel_unfinished: bool = False,
) -> AsyncGenerator[Pending[T], None]:
    """Yield each ``Pending`` as it completes (already-done ones first, in given order).

    ``TimeoutError`` if they are not all done after ``timeout`` seconds. Leaving the loop
    early cancels the unfinished ones only if ``cancel_unfinished`` is True.
    """
    collector = _Collector(pendings)
    left = len(collector.todo)
    deadline = None if timeout is None else anyio.current_time() + timeout
    seen: set[Pending[T]] = set()
    try:
        with collector:
            while left:
                pen = await collector.next_ready(deadline)
                if pen is None:
                    raise TimeoutError(f"{left} Pending(s) not done after {timeout} s")
                if pen in seen:  # a Pending given twice is yielded once
                    continue
                seen.add(pen)
                left -= 1
                yield pen
    finally:
        if cancel_unfinished:
            for pen in collector.todo:
                if pen not in seen:
                    pen.cancel("as_completed() ended before it was done")


async def wait(
    pendings: Iterable[Pending[T]],
    *,
    timeout: float | None = None,
    return_when: ReturnWhen = "ALL_COMPLETED",
) -> tuple[set[Pending[T]], set[Pending[T]]]:
    """Like ``asyncio.wait``: wait until ``return_when`` holds or ``timeout`` passes,
    return ``(done, not_done)``. No TimeoutError; nothing is cancelled."""
    if return_when not in (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED):
        raise ValueError(f"invalid return_when: {return_when!r}")
    collector = _Collector(pendings)
    if not collector.todo:
        raise ValueError("Caller.wait() needs at least one Pending")
    done: set[Pending[T]] = set()
    not_done = set(collector.todo)
    deadline = None if timeout is None else anyio.current_time() + timeout
    with collector:
        while not_done:
            pen = await collector.next_ready(deadline)
            if pen is None:
                break
            if pen in done:
                continue
            not_done.discard(pen)
            done.add(pen)
            if return_when == FIRST_COMPLETED:
                break
            if (
                return_when == FIRST_EXCEPTION
                and not pen.cancelled()
                and pen._exception is not None
            ):
                break
    # Anything that completed meanwhile counts as done, as in asyncio.wait.
    for pen in list(not_done):
        if pen.done():
            not_done.discard(pen)
            done.add(pen)
    return done, not_done
