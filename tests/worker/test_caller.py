"""kernelvisor.Caller and Pending (worker_py/kernelvisor/caller.py, _pending.py).

Every test runs against asyncio and trio (trio's are skipped when it is not installed:
``pip install 'kernelvisor[trio]'``). Nothing here asserts on elapsed time: waits have
generous timeouts and pool changes are observed (pool_stats, live threads), not assumed.
An autouse fixture stops every caller after each test and checks no thread is left.
"""

from __future__ import annotations

import contextvars
import importlib.util
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar, cast

import anyio
import anyio.lowlevel
import pytest
from ipc_client import WORKER_PY, WorkerProcess
from kernelvisor import Caller, Pending, PendingCancelled
from kernelvisor.caller import FIRST_COMPLETED, FIRST_EXCEPTION, InvalidStateError, PoolStats

T = TypeVar("T")
Backend = Literal["asyncio", "trio"]

TIMEOUT = 10.0  # generous: only reached when something is broken

HAVE_TRIO = importlib.util.find_spec("trio") is not None
_needs_trio = pytest.mark.skipif(
    not HAVE_TRIO, reason="trio is not installed (pip install 'kernelvisor[trio]')"
)
BACKENDS = [pytest.param("asyncio"), pytest.param("trio", marks=_needs_trio)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return cast(Backend, request.param)


def _other(backend: Backend) -> Backend:
    return "trio" if backend == "asyncio" else "asyncio"


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    assert Caller.stop_all(timeout=TIMEOUT), "a caller did not stop"
    assert Caller.all_callers() == []
    eventually(lambda: set(threading.enumerate()) <= before, "threads to end")
    assert threading.active_count() == len(before)


def eventually(predicate: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; threads: {threading.enumerate()}")
        time.sleep(0.005)


def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> Pending[T]:
    """Run fn in a plain new thread ("helper"); its outcome as a Pending."""
    pen: Pending[T] = Pending()

    def target() -> None:
        try:
            pen.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed over to the Pending
            pen.set_exception(exc)

    threading.Thread(target=target, name="helper").start()
    return pen


def thread_name() -> str:
    return threading.current_thread().name


async def async_thread_name(delay: float = 0.0) -> str:
    await anyio.sleep(delay)
    return threading.current_thread().name


def worker_threads(parent: Caller) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"{parent.name}-worker-")]


# --- getting a caller ----------------------------------------------------------------------


def test_current_thread_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="needs an event loop running"):
        Caller("CurrentThread")
    with pytest.raises(RuntimeError, match="needs an event loop running"):
        in_thread(Caller, "CurrentThread").wait_sync(TIMEOUT)


def test_current_thread(backend: Backend) -> None:
    async def main() -> Caller:
        caller = Caller()
        assert Caller("CurrentThread") is caller
        assert caller.thread is threading.current_thread()
        assert caller.backend == backend
        assert caller.name == threading.current_thread().name
        assert await caller.call_soon(thread_name) == threading.current_thread().name
        assert await caller.call_soon(async_thread_name) == threading.current_thread().name
        with pytest.raises(ValueError, match="name"):
            Caller("CurrentThread", name="another name")
        with pytest.raises(ValueError, match="backend"):
            Caller("CurrentThread", backend=_other(backend))
        return caller

    first = anyio.run(main, backend=backend)
    # The loop has ended, so has its caller; a new loop in this thread gets a new one.
    assert first.join(TIMEOUT) and first.stopped
    with pytest.raises(RuntimeError, match="stopped"):
        first.call_soon(thread_name)
    second = anyio.run(main, backend=backend)
    assert second is not first


def test_stop_current_thread_caller_inside_its_loop(backend: Backend) -> None:
    async def main() -> None:
        caller = Caller()
        long = caller.call_soon(anyio.sleep, 60)
        await anyio.sleep(0.01)
        caller.stop()
        await caller.wait_stopped()
        assert caller.stopped
        assert long.cancelled()
        assert Caller() is not caller  # the thread's caller is a new one now

    anyio.run(main, backend=backend)


def test_main_thread(backend: Backend) -> None:
    assert threading.current_thread() is threading.main_thread()

    def from_another_thread() -> tuple[Caller, threading.Thread]:
        main_caller = Caller("MainThread")
        return main_caller, main_caller.call_soon(threading.current_thread).wait_sync(TIMEOUT)

    async def main() -> Caller:
        caller = Caller("MainThread")
        assert caller is Caller()
        assert caller.thread is threading.main_thread()
        other, ran_in = await in_thread(from_another_thread)
        assert other is caller
        assert ran_in is threading.main_thread()
        return caller

    caller = anyio.run(main, backend=backend)
    assert caller.join(TIMEOUT) and caller.stopped


def test_main_thread_errors() -> None:
    # In the main thread, without a loop.
    with pytest.raises(RuntimeError, match="needs an event loop running"):
        Caller("MainThread")
    # From another thread, before the main thread has a caller.
    with pytest.raises(RuntimeError, match="main thread's caller"):
        in_thread(Caller, "MainThread").wait_sync(TIMEOUT)


def test_new_thread(backend: Backend) -> None:
    one = Caller("NewThread", name="loop one", backend=backend)
    two = Caller("NewThread", backend=backend)
    assert one is not two and one.thread is not two.thread
    assert one.running and one.backend == backend
    assert one.thread is not None and one.thread.name == "loop one" and one.thread.daemon
    assert one.call_soon(thread_name).wait_sync(TIMEOUT) == "loop one"
    assert two.call_soon(async_thread_name).wait_sync(TIMEOUT) == two.name
    # Inside its thread, Caller() is that caller.
    assert one.call_soon(Caller).wait_sync(TIMEOUT) is one
    assert one.call_soon(Caller, "CurrentThread").wait_sync(TIMEOUT) is one


def test_no_modifier_without_a_loop_starts_a_new_thread(backend: Backend) -> None:
    caller = Caller(name="my event loop", backend=backend)
    assert caller.thread is not threading.current_thread()
    assert caller.call_soon(thread_name).wait_sync(TIMEOUT) == "my event loop"
    assert caller.backend == backend


def test_new_thread_from_a_loop_defaults_to_its_backend(backend: Backend) -> None:
    async def main() -> str:
        return Caller("NewThread").backend

    assert anyio.run(main, backend=backend) == backend


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="modifier"):
        Caller("SomeThread")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        Caller("NewThread", backend="curio")  # type: ignore[arg-type]


BAD_OPTIONS: dict[str, dict[str, Any]] = {
    "asyncio": {"loop_factory": 42},  # not callable
    "trio": {"no_such_option": True},
}


def test_a_loop_that_cannot_start_is_an_error(backend: Backend) -> None:
    with pytest.raises(RuntimeError, match="failed to start"):
        Caller("NewThread", backend=backend, backend_options=BAD_OPTIONS[backend])
    manual = Caller("manual", backend=backend, backend_options=BAD_OPTIONS[backend])
    early = manual.call_soon(thread_name)
    with pytest.raises(RuntimeError, match="failed to start"):
        manual.start_sync()
    with pytest.raises(TypeError):  # the loop's error, for calls that were waiting
        early.wait_sync(TIMEOUT)


def test_trio_backend_without_trio(monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs whether or not trio is installed: hide it from the import system.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "trio" else real_find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="kernelvisor\\[trio\\]"):
        Caller("NewThread", backend="trio")


def test_manual_start_sync(backend: Backend) -> None:
    caller = Caller("manual", name="manual one", backend=backend)
    assert not caller.running and caller.thread is None
    early = caller.call_soon(thread_name)  # queued until started
    assert not early.done()
    caller.start_sync()
    assert caller.running
    assert early.wait_sync(TIMEOUT) == "manual one"
    caller.start_sync()  # already started: no-op
    caller.stop()
    assert caller.join(TIMEOUT)
    with pytest.raises(RuntimeError, match="stopped"):
        caller.start_sync()


def test_manual_async_with(backend: Backend) -> None:
    async def main() -> None:
        caller = Caller("manual", name="scoped")
        early = caller.call_soon(thread_name)
        async with caller as entered:
            assert entered is caller
            assert await early == threading.current_thread().name  # runs in this loop
            assert await caller.call_soon(async_thread_name) == threading.current_thread().name
            long = caller.call_soon(anyio.sleep, 60)
        # The block's end stopped it (and waited).
        assert caller.stopped
        assert long.cancelled()
        with pytest.raises(RuntimeError, match="stopped"):
            caller.call_soon(thread_name)
        with pytest.raises(RuntimeError, match="stopped"):
            async with caller:
                pass

    anyio.run(main, backend=backend)


@_needs_trio
def test_manual_backend_must_match_the_loop_it_enters() -> None:
    async def main() -> None:
        caller = Caller("manual", backend="trio")
        with pytest.raises(RuntimeError, match="entered in a 'asyncio' loop"):
            async with caller:
                pass
        caller.stop()

    anyio.run(main, backend="asyncio")


def test_async_with_a_new_thread_caller(backend: Backend) -> None:
    async def main() -> Caller:
        async with Caller("NewThread", backend=backend) as caller:
            assert await caller.call_soon(thread_name) == caller.name
        assert caller.stopped
        return caller

    caller = anyio.run(main, backend=backend)
    assert caller.join(TIMEOUT)


# --- children ------------------------------------------------------------------------------

OPTIONS = {
    "asyncio": {"debug": False},
    "trio": {"restrict_keyboard_interrupt_to_checkpoints": False},
}


def test_children_copy_options_and_stop_with_their_parent(backend: Backend) -> None:
    zmq_context = object()  # opaque to kernelvisor
    parent = Caller(
        "NewThread",
        name="parent",
        backend=backend,
        backend_options=OPTIONS[backend],
        zmq_context=zmq_context,
    )
    child = parent.get("kid")
    assert child.name == "kid" and child.parent is parent and child in parent.children
    assert child.backend == backend
    assert child.backend_options == OPTIONS[backend]
    assert child.zmq_context is zmq_context
    assert child.thread is not None and child.thread.name == "kid"
    assert child.call_soon(thread_name).wait_sync(TIMEOUT) == "kid"
    assert parent.get("kid") is child
    assert parent.get(name="kid", backend=backend) is child
    grandchild = child.get()
    anonymous = parent.get(zmq_context=None)
    assert anonymous.zmq_context is None and anonymous is not child
    long = grandchild.call_soon(anyio.sleep, 60)

    parent.stop()
    assert parent.join(TIMEOUT)
    for caller in (parent, child, grandchild, anonymous):
        assert caller.stopped
        assert caller.thread is not None and not caller.thread.is_alive()
    assert long.cancelled()
    assert parent.children == frozenset()
    with pytest.raises(RuntimeError, match="stopped"):
        parent.get("kid")


@_needs_trio
def test_child_with_another_backend_does_not_copy_backend_options() -> None:
    parent = Caller("NewThread", backend="asyncio", backend_options={"debug": False})
    child = parent.get("trio kid", backend="trio")
    assert child.backend == "trio" and child.backend_options is None
    assert child.call_soon(async_thread_name).wait_sync(TIMEOUT) == "trio kid"
    with pytest.raises(ValueError, match="backend"):
        parent.get("trio kid", backend="asyncio")
    same = parent.get("asyncio kid", backend="asyncio")
    assert same.backend_options == {"debug": False}


def test_stopping_a_child_leaves_the_parent_running(backend: Backend) -> None:
    parent = Caller("NewThread", backend=backend)
    child = parent.get("kid")
    child.stop()
    assert child.join(TIMEOUT)
    assert parent.running and child not in parent.children
    assert parent.get("kid") is not child  # a new one under that name


# --- scheduling ----------------------------------------------------------------------------


def test_call_soon_starts_calls_in_order(backend: Backend) -> None:
    caller = Caller("NewThread", backend=backend)
    started: list[int] = []

    async def record_async(i: int) -> int:
        started.append(i)
        await anyio.lowlevel.checkpoint()
        return i

    def record(i: int) -> int:
        started.append(i)
        return i

    pens = [caller.call_soon(record_async if i % 2 else record, i) for i in range(300)]
    assert [p.wait_sync(TIMEOUT) for p in pens] == list(range(300))
    assert started == list(range(300))


def test_call_later_and_call_soon_order(backend: Backend) -> None:
    caller = Caller("NewThread", backend=backend)
    order: list[str] = []
    pens = [
        caller.call_later(0.4, order.append, "late"),
        caller.call_later(0.2, order.append, "middle"),
        caller.call_later(0.2, order.append, "middle, scheduled next"),
        caller.call_soon(order.append, "soon"),
        caller.call_later(0, order.append, "zero delay"),
    ]
    for pen in pens:
        pen.wait_sync(TIMEOUT)
    assert order == ["soon", "zero delay", "middle", "middle, scheduled next", "late"]


def test_call_later_due_together_start_in_deadline_order(backend: Backend) -> None:
    caller = Caller("NewThread", backend=backend)
    order: list[int] = []
    release = threading.Event()
    blocker = caller.call_soon(release.wait, TIMEOUT)  # holds the loop: all become due
    pens = [caller.call_later(0.01 * (10 - i), order.append, i) for i in range(10)]
    # Not an assertion: lets the deadlines pass while the loop is held (the order must be
    # the deadlines' whether they become due together or not).
    time.sleep(0.15)
    release.set()
    assert blocker.wait_sync(TIMEOUT) is True
    for pen in pens:
        pen.wait_sync(TIMEOUT)
    assert order == list(range(9, -1, -1))


def test_queue_call_runs_one_after_another(backend: Backend) -> None:
    caller = Caller("NewThread", backend=backend)
    log: list[tuple[str, int]] = []

    async def step(i: int) -> int:
        log.append(("start", i))
        await anyio.sleep(0.002 * (i % 3))
        await anyio.lowlevel.checkpoint()
        log.append(("end", i))
        return i

    def sync_step(i: int) -> int:
        log.append(("start", i))
        log.append(("end", i))
        return i

    pens = [caller.queue_call(sync_step if i % 4 == 3 else step, i) for i in range(40)]
    assert [p.wait_sync(TIMEOUT) for p in pens] == list(range(40))
    assert log == [(what, i) for i in range(40) for what in ("start", "end")]


def test_sync_and_async_functions(backend: Backend) -> None:
    caller = Caller("NewThread", backend=backend)

    def add(a: int, b: int = 0) -> int:
        return a + b

    async def async_add(a: int, b: int = 0) -> int:
        await anyio.lowlevel.checkpoint()
        return a + b

    def fail() -> None:
        raise ValueError("sync failure")

    async def async_fail() -> None:
        await anyio.lowlevel.checkpoint()
        raise KeyError("async failure")

    assert caller.call_soon(add, 1, b=2).wait_sync(TIMEOUT) == 3
    assert caller.call_soon(async_add, 3, b=4).wait_sync(TIMEOUT) == 7
    assert caller.call_later(0.01, async_add, 5).wait_sync(TIMEOUT) == 5
    assert caller.queue_call(add, 6).wait_sync(TIMEOUT) == 6

    for func, exc_type in ((fail, ValueError), (async_fail, KeyError)):
        pen = caller.call_soon(func)
        with pytest.raises(exc_type):
            pen.wait_sync(TIMEOUT)
        assert isinstance(pen.exception(), exc_type)
        assert not pen.cancelled()
        with pytest.raises(exc_type):
            pen.result()

    async def main() -> None:
        with pytest.raises(KeyError, match="async failure"):
            await caller.call_soon(async_fail)

    anyio.run(main, backend=backend)


def test_calls_run_in_the_scheduling_context(backend: Backend) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    caller = Caller("NewThread", backend=backend)

    async def read_and_write() -> str:
        value = var.get()
        var.set("changed by the call")
        return value

    var.set("scheduler's value")
    assert caller.call_soon(read_and_write).wait_sync(TIMEOUT) == "scheduler's value"
    assert caller.queue_call(var.get).wait_sync(TIMEOUT) == "scheduler's value"
    assert var.get() == "scheduler's value"


def test_current_pending(backend: Backend) -> None:
    caller = Caller("NewThread", backend=backend)
    pen = caller.call_soon(Caller.current_pending)
    assert pen.wait_sync(TIMEOUT) is pen
    assert Caller.current_pending() is None


# --- Pending across threads and loops ------------------------------------------------------


@pytest.mark.parametrize("awaiter", BACKENDS)
def test_await_from_another_threads_loop(backend: Backend, awaiter: str) -> None:
    caller = Caller("NewThread", name="runner", backend=backend)
    gate: Pending[str] = Pending()
    waiting = threading.Event()

    async def job() -> tuple[str, str]:
        return threading.current_thread().name, await gate

    async def awaiting() -> tuple[tuple[str, str], str]:
        pen = caller.call_soon(job)
        waiting.set()
        return await pen, threading.current_thread().name

    result = in_thread(anyio.run, awaiting, backend=awaiter)
    assert waiting.wait(TIMEOUT)
    gate.set_result("opened")
    assert result.wait_sync(TIMEOUT) == (("runner", "opened"), "helper")


def test_await_from_the_same_and_from_another_caller(backend: Backend) -> None:
    one = Caller("NewThread", name="one", backend=backend)
    two = Caller("NewThread", name="two", backend=_other(backend) if HAVE_TRIO else backend)

    async def nested() -> list[str]:
        names = [await one.call_soon(async_thread_name, 0.01)]  # same caller
        names.append(await two.call_soon(async_thread_name, 0.01))  # another thread and loop
        return names

    assert one.call_soon(nested).wait_sync(TIMEOUT) == ["one", "two"]


def test_wait_sync(backend: Backend) -> None:
    caller = Caller("NewThread", backend=backend)
    gate: Pending[int] = Pending()

    async def gated() -> int:
        return await gate

    pen = caller.call_soon(gated)
    with pytest.raises(TimeoutError):
        pen.wait_sync(0.05)
    assert not pen.done() and not pen.cancelled()  # a sync timeout does not cancel
    gate.set_result(7)
    assert pen.wait_sync(TIMEOUT) == 7

    # In the caller's own thread, waiting for one of its calls could never end.
    def deadlock() -> None:
        caller.call_soon(thread_name).wait_sync(TIMEOUT)

    with pytest.raises(RuntimeError, match="deadlock"):
        caller.call_soon(deadlock).wait_sync(TIMEOUT)


def test_cancel_a_running_call_from_another_thread(backend: Backend) -> None:
    caller = Caller("NewThread", backend=backend)
    started = threading.Event()
    seen: list[str] = []

    async def long() -> str:
        started.set()
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            seen.append("cancelled in its loop")
            raise
        return "slept"

    pen = caller.call_soon(long)
    assert started.wait(TIMEOUT)
    assert in_thread(pen.cancel, "stop it").wait_sync(TIMEOUT) is True
    with pytest.raises(PendingCancelled, match="stop it"):
        pen.wait_sync(TIMEOUT)
    assert pen.done() and pen.cancelled()
    assert seen == ["cancelled in its loop"]
    assert pen.cancel() is False  # already done
    with pytest.raises(PendingCancelled):
        pen.exception()
    assert caller.running  # only that call was cancelled
    assert caller.call_soon(thread_name).wait_sync(TIMEOUT) == caller.name


def test_cancel_before_start_never_runs(backend: Backend) -> None:
    caller = Caller("NewThread", backend=backend)
    ran: list[str] = []
    release = threading.Event()
    blocking = caller.call_soon(release.wait, TIMEOUT)  # blocks the caller's loop

    soon = caller.call_soon(ran.append, "soon")
    later = caller.call_later(60, ran.append, "later")
    gate: Pending[None] = Pending()
    first_in_queue = caller.queue_call(gate.wait)  # the queue's head waits for gate
    queued = caller.queue_call(ran.append, "queued")
    for pen in (soon, later, queued):
        assert in_thread(pen.cancel).wait_sync(TIMEOUT) is True
        assert pen.done() and pen.cancelled()  # not started: cancelled at once
    release.set()
    assert blocking.wait_sync(TIMEOUT) is True
    gate.set_result(None)
    first_in_queue.wait_sync(TIMEOUT)
    caller.queue_call(ran.append, "after").wait_sync(TIMEOUT)
    caller.call_soon(ran.append, "after").wait_sync(TIMEOUT)
    assert ran == ["after", "after"]


def test_cancelled_or_timed_out_await_cancels_unless_protected(backend: Backend) -> None:
    caller = Caller("NewThread", backend=backend)

    async def main() -> None:
        pen = caller.call_soon(anyio.sleep, 60)
        with pytest.raises(TimeoutError):
            await pen.wait(timeout=0.05)
        with pytest.raises(PendingCancelled):
            await pen

        gate: Pending[str] = Pending()
        protected = caller.call_soon(gate.wait)
        with pytest.raises(TimeoutError):
            await protected.wait(timeout=0.01, protect=True)
        gate.set_result("still running")
        assert await protected == "still running"

        other = caller.call_soon(anyio.sleep, 60)
        with anyio.move_on_after(0.05):
            await other  # the awaiting task is cancelled: so is the call
        with pytest.raises(PendingCancelled):
            await other
        assert other.cancelled()

    anyio.run(main, backend=backend)


def test_result_exception_and_done_callbacks(backend: Backend) -> None:
    pen: Pending[int] = Pending()
    assert not pen.done() and not pen.cancelled()
    with pytest.raises(InvalidStateError):
        pen.result()
    with pytest.raises(InvalidStateError):
        pen.exception()
    pen.set_result(5)
    assert pen.result() == 5 and pen.exception() is None
    with pytest.raises(InvalidStateError):
        pen.set_result(6)
    with pytest.raises(InvalidStateError):
        pen.set_exception(ValueError())
    got: list[Pending[int]] = []
    pen.add_done_callback(got.append)  # already done: called at once
    assert got == [pen]

    failed: Pending[int] = Pending()
    failed.set_exception(ValueError("bad"))
    assert isinstance(failed.exception(), ValueError)
    with pytest.raises(ValueError, match="bad"):
        failed.result()

    manual: Pending[int] = Pending()
    assert manual.cancel("no longer needed") is True
    assert manual.done() and manual.cancelled()
    with pytest.raises(PendingCancelled, match="no longer needed"):
        manual.result()

    caller = Caller("NewThread", name="completer", backend=backend)
    gate: Pending[int] = Pending()

    async def gated() -> int:
        return await gate

    job = caller.call_soon(gated)
    calls: list[tuple[str, Pending[int]]] = []

    def record(p: Pending[int]) -> None:
        calls.append((threading.current_thread().name, p))

    def boom(p: Pending[int]) -> None:
        raise RuntimeError("callback failure is logged, not raised")

    removed: list[Pending[int]] = []
    job.add_done_callback(removed.append)
    job.add_done_callback(boom)
    job.add_done_callback(record)
    assert job.remove_done_callback(removed.append) == 1
    gate.set_result(11)
    assert job.wait_sync(TIMEOUT) == 11
    eventually(lambda: calls, "the done callback")
    assert calls == [("completer", job)]  # in the thread that completed it
    assert removed == []


def test_failing_done_callback_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    pen: Pending[int] = Pending()

    def boom(_: Pending[int]) -> None:
        raise RuntimeError("boom")

    ok: list[int] = []
    pen.add_done_callback(boom)
    pen.add_done_callback(lambda p: ok.append(p.result()))
    with caplog.at_level(logging.ERROR, logger="kernelvisor.caller"):
        pen.set_result(1)
    assert ok == [1]
    assert "done callback" in caplog.text


# --- as_completed / wait -------------------------------------------------------------------


def test_as_completed(backend: Backend) -> None:
    caller = Caller("NewThread", backend=backend)
    gates: list[Pending[int]] = [Pending() for _ in range(3)]

    async def job(i: int) -> int:
        return await gates[i]

    pens = [caller.call_soon(job, i) for i in range(3)]
    following = {2: 0, 0: 1}

    async def consume() -> list[int]:
        order = []
        gates[2].set_result(2)  # only one can finish at a time: the order is fixed
        async for pen in Caller.as_completed(pens):
            i = pens.index(pen)
            assert pen.done() and pen.result() == i
            order.append(i)
            if i in following:
                gates[following[i]].set_result(following[i])
        return order

    assert anyio.run(consume, backend=backend) == [2, 0, 1]


def test_as_completed_timeout_and_cancel_unfinished(backend: Backend) -> None:
    caller = Caller("NewThread", backend=backend)

    async def main() -> None:
        never = caller.call_soon(anyio.sleep, 60)
        with pytest.raises(TimeoutError):
            async for _ in Caller.as_completed([never], timeout=0.05):
                pass
        assert not never.done()

        quick = caller.call_soon(async_thread_name)
        both: list[Pending[Any]] = [never, quick]
        agen = Caller.as_completed(both, cancel_unfinished=True)
        async for pen in agen:
            assert pen is quick
            break
        await agen.aclose()
        with pytest.raises(PendingCancelled):
            await never

        nothing: list[Pending[Any]] = []
        assert [p async for p in Caller.as_completed(nothing)] == []

    anyio.run(main, backend=backend)


def test_wait(backend: Backend) -> None:
    caller = Caller("NewThread", backend=backend)
    gates: list[Pending[int]] = [Pending() for _ in range(3)]

    async def job(i: int) -> int:
        return await gates[i]

    pens = [caller.call_soon(job, i) for i in range(3)]

    async def main() -> None:
        done, not_done = await Caller.wait(pens, timeout=0.05)  # no TimeoutError
        assert done == set() and not_done == set(pens)
        assert not any(p.cancelled() for p in pens)

        gates[1].set_result(1)
        done, not_done = await Caller.wait(pens, return_when=FIRST_COMPLETED)
        assert done == {pens[1]} and not_done == {pens[0], pens[2]}

        gates[2].set_exception(ValueError("two"))
        done, not_done = await Caller.wait(pens, return_when=FIRST_EXCEPTION)
        assert pens[2] in done and not_done == {pens[0]}

        gates[0].set_result(0)
        done, not_done = await Caller.wait(pens)  # ALL_COMPLETED
        assert done == set(pens) and not_done == set()

        with pytest.raises(ValueError):
            await Caller.wait([])

    anyio.run(main, backend=backend)


# --- to_thread and its worker pool ---------------------------------------------------------


def test_to_thread_runs_in_a_worker_like_its_parent(backend: Backend) -> None:
    zmq_context = object()
    parent = Caller("NewThread", name="parent", backend=backend, zmq_context=zmq_context)

    def describe() -> tuple[str, str, object, bool]:
        worker = Caller()  # the worker's own caller
        return worker.name, worker.backend, worker.zmq_context, worker.parent is parent

    name, worker_backend, worker_zmq, is_child = parent.to_thread(describe).wait_sync(TIMEOUT)
    assert name.startswith("parent-worker-") and name == parent.to_thread(thread_name).wait_sync(
        TIMEOUT
    )
    assert worker_backend == backend and worker_zmq is zmq_context and is_child
    assert parent.to_thread(async_thread_name, 0.01).wait_sync(TIMEOUT) == name  # reused
    eventually(lambda: parent.pool_stats() == PoolStats(idle=1, busy=0), "the worker to idle")


def test_to_thread_pool_grows_then_keeps_max_idle(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Caller, "MAX_IDLE_POOL_INSTANCES", 3)
    monkeypatch.setattr(Caller, "IDLE_WORKER_SHUTDOWN_DURATION", 0)  # no timed retirement
    parent = Caller("NewThread", name="pool", backend=backend)
    n = 5
    arrived = threading.Barrier(n + 1)
    release = threading.Event()

    def blocking() -> str:
        arrived.wait(TIMEOUT)  # all n run at the same time, so in n workers
        release.wait(TIMEOUT)
        return threading.current_thread().name

    pens = [parent.to_thread(blocking) for _ in range(n)]
    arrived.wait(TIMEOUT)
    assert parent.pool_stats() == PoolStats(idle=0, busy=n)
    assert len(worker_threads(parent)) == n
    release.set()
    names = {pen.wait_sync(TIMEOUT) for pen in pens}
    assert len(names) == n

    # Idle workers beyond MAX_IDLE_POOL_INSTANCES stopped at once; the others stay.
    eventually(lambda: parent.pool_stats() == PoolStats(idle=3, busy=0), "3 idle workers")
    eventually(lambda: len(worker_threads(parent)) == 3, "2 workers to stop")
    kept = {t.name for t in worker_threads(parent)}
    assert kept < names

    # Idle workers are reused, no thread is started.
    reused = {parent.to_thread(thread_name).wait_sync(TIMEOUT) for _ in range(5)}
    assert reused <= kept
    eventually(lambda: parent.pool_stats() == PoolStats(idle=3, busy=0), "3 idle workers")
    assert {t.name for t in worker_threads(parent)} == kept

    parent.stop()
    assert parent.join(TIMEOUT)
    assert worker_threads(parent) == [] and parent.pool_stats() == PoolStats(0, 0)


def test_idle_workers_are_retired(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Caller, "IDLE_WORKER_SHUTDOWN_DURATION", 0.2)
    parent = Caller("NewThread", name="retiring", backend=backend)
    n = 4
    arrived = threading.Barrier(n + 1)

    pens = [parent.to_thread(arrived.wait, TIMEOUT) for _ in range(n)]
    arrived.wait(TIMEOUT)
    assert len(worker_threads(parent)) == n  # MAX_IDLE_POOL_INSTANCES (10) keeps all 4
    for pen in pens:
        pen.wait_sync(TIMEOUT)
    eventually(lambda: parent.pool_stats() == PoolStats(idle=0, busy=0), "workers to retire")
    eventually(lambda: worker_threads(parent) == [], "worker threads to end")
    reapers = [t for t in threading.enumerate() if t.name == "kernelvisor-caller-reaper"]
    eventually(lambda: not any(t.is_alive() for t in reapers), "the reaper to exit")
    assert parent.running
    # The pool still works afterwards.
    assert parent.to_thread(thread_name).wait_sync(TIMEOUT).startswith("retiring-worker-")


def test_to_thread_cancel_returns_the_worker_to_the_pool(backend: Backend) -> None:
    parent = Caller("NewThread", name="p", backend=backend)
    started = threading.Event()

    async def long() -> None:
        started.set()
        await anyio.sleep(60)

    pen = parent.to_thread(long)
    assert started.wait(TIMEOUT)
    assert parent.pool_stats() == PoolStats(idle=0, busy=1)
    pen.cancel()
    with pytest.raises(PendingCancelled):
        pen.wait_sync(TIMEOUT)
    eventually(lambda: parent.pool_stats() == PoolStats(idle=1, busy=0), "an idle worker")


def test_stop_cancels_calls_and_refuses_new_ones(backend: Backend) -> None:
    caller = Caller("NewThread", backend=backend)
    started = threading.Event()

    async def long() -> None:
        started.set()
        await anyio.sleep(60)

    running = caller.call_soon(long)
    assert started.wait(TIMEOUT)
    blocking = threading.Event()
    release = threading.Event()

    def block() -> bool:
        blocking.set()
        return release.wait(TIMEOUT)

    blocker = caller.call_soon(block)
    assert blocking.wait(TIMEOUT)
    queued = caller.call_soon(thread_name)  # not started: blocker holds the loop
    worker_call = caller.to_thread(anyio.sleep, 60)
    caller.stop()
    assert queued.cancelled()  # cancelled by stop() itself
    release.set()
    assert caller.join(TIMEOUT)
    assert caller.stopped and caller.thread is not None and not caller.thread.is_alive()
    assert blocker.result() is True
    for pen in (running, queued, worker_call):
        with pytest.raises(PendingCancelled):
            pen.wait_sync(TIMEOUT)
    for schedule in (
        lambda: caller.call_soon(thread_name),
        lambda: caller.call_later(1, thread_name),
        lambda: caller.queue_call(thread_name),
        lambda: caller.to_thread(thread_name),
        lambda: caller.get("child"),
    ):
        with pytest.raises(RuntimeError, match="stopped"):
            schedule()
    caller.stop()  # idempotent


# --- packaging and the worker --------------------------------------------------------------


def test_import_kernelvisor_stays_cheap() -> None:
    code = (
        "import sys, kernelvisor\n"
        "assert 'anyio' not in sys.modules and 'IPython' not in sys.modules\n"
        "from kernelvisor import Caller, Pending\n"
        "assert 'anyio' in sys.modules and 'IPython' not in sys.modules\n"
        "assert Caller.__module__ == 'kernelvisor.caller'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(WORKER_PY))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_in_a_notebook_cell(worker: WorkerProcess) -> None:
    code = (
        "import threading\n"
        "from kernelvisor import Caller\n"
        "caller = Caller()\n"
        "assert caller is Caller('MainThread') and caller.thread is threading.main_thread()\n"
        "r1 = await caller.call_soon(lambda: 20)\n"
        "r2 = await caller.to_thread(lambda: 22)\n"
        "w = await caller.to_thread(lambda: threading.current_thread().name)\n"
        "r1 + r2, w.startswith('MainThread-worker-')"
    )
    ex = worker.execute(code)
    assert ex.reply.content["status"] == "ok", ex.reply.content
    (msg,) = ex.iopub("execute_result")
    assert msg.content["data"]["text/plain"] == "(42, True)"
