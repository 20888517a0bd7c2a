"""A ``Caller``'s ``to_thread`` pool: worker callers (children with their own thread and
loop) taken for one call each and kept idle for the next, and the one reaper thread that
stops workers idle for too long.

Pool state is guarded by the callers' registry lock (``Caller._glock``), as their
families are: a worker that stops leaves its parent's pool in ``Caller._finalize``.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable

    from kernelvisor._pending import Pending
    from kernelvisor.caller import Caller

REAPER_THREAD_NAME = "kernelvisor-caller-reaper"


class PoolStats(NamedTuple):
    """A caller's ``to_thread`` pool: workers waiting for work, workers running a call."""

    idle: int
    busy: int


class ThreadPool:
    """The ``to_thread`` workers of one caller, ``owner``."""

    __slots__ = ("busy", "idle", "owner")

    def __init__(self, owner: Caller) -> None:
        self.owner = owner
        # Idle workers -> when each became idle (time.monotonic()); the last is taken first.
        self.idle: dict[Caller, float] = {}
        self.busy: set[Caller] = set()

    def call(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Pending[Any]:
        """``func(*args, **kwargs)`` in an idle worker, or in a new one."""
        from kernelvisor.caller import Caller

        owner = self.owner
        while True:
            with Caller._glock:
                if owner._stopping():
                    raise RuntimeError(f"{owner!r} is stopped")
                worker = self.idle.popitem()[0] if self.idle else None
                fresh = worker is None
                if worker is None:
                    worker = owner._new_child(
                        f"{owner.name}-worker-{next(Caller._counter)}",
                        owner.backend,
                        owner.backend_options,
                        owner.zmq_context,
                        is_worker=True,
                    )
                self.busy.add(worker)
            if fresh:
                worker._launch_thread(wait=False)
            try:
                pen = worker.call_soon(func, *args, **kwargs)
            except RuntimeError:
                with Caller._glock:
                    self.busy.discard(worker)
                if fresh:  # it could not even start: another one would not either
                    raise
                continue  # an idle worker that stopped meanwhile: take another one
            pen.add_done_callback(functools.partial(self._release, worker))
            return pen

    def _release(self, worker: Caller, _pen: Pending[Any]) -> None:
        """A worker's call is done: keep it idle, or stop it."""
        from kernelvisor.caller import Caller

        owner = self.owner
        with Caller._glock:
            self.busy.discard(worker)
            keep = (
                not owner._stopping()
                and not worker._stopping()
                and len(self.idle) < owner.MAX_IDLE_POOL_INSTANCES
            )
            if keep:
                self.idle[worker] = time.monotonic()
                if owner.IDLE_WORKER_SHUTDOWN_DURATION > 0:
                    _reaper.ensure_running()
        if not keep:
            worker.stop()

    def discard(self, worker: Caller) -> None:
        """A worker that stopped (under ``Caller._glock``)."""
        self.busy.discard(worker)
        self.idle.pop(worker, None)

    def stats(self) -> PoolStats:
        """Idle and busy worker counts (under ``Caller._glock``)."""
        return PoolStats(idle=len(self.idle), busy=len(self.busy))


class _Reaper:
    """One daemon thread for every pool: stops workers idle for longer than their
    parent's ``IDLE_WORKER_SHUTDOWN_DURATION``; it exits once no idle worker can expire,
    and is started again by the next worker that becomes idle."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()

    def ensure_running(self) -> None:
        """Under ``Caller._glock``: start the thread, or have it re-read the durations."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=REAPER_THREAD_NAME, daemon=True)
            self.thread.start()
        else:
            self.wake.set()

    def _run(self) -> None:
        from kernelvisor.caller import Caller

        while True:
            now = time.monotonic()
            expired: list[Caller] = []
            next_due: float | None = None
            with Caller._glock:
                self.wake.clear()
                for parent in Caller.all_callers():
                    duration = parent.IDLE_WORKER_SHUTDOWN_DURATION
                    pool = parent._pool
                    if duration <= 0 or not pool.idle:
                        continue
                    for worker, idle_since in list(pool.idle.items()):
                        due = idle_since + duration
                        if due <= now:
                            del pool.idle[worker]
                            expired.append(worker)
                        elif next_due is None or due < next_due:
                            next_due = due
                if next_due is None and not expired:
                    if self.thread is threading.current_thread():
                        self.thread = None
                    return
            for worker in expired:
                worker.stop()
            if next_due is not None:
                self.wake.wait(max(0.0, next_due - time.monotonic()))

    def stop(self, timeout: float | None) -> bool:
        """Have the thread look again (a stopped caller's workers are gone), and wait for
        it to end; False if it is still running after ``timeout``."""
        from kernelvisor.caller import Caller

        with Caller._glock:
            thread = self.thread
            self.wake.set()
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def forget_after_fork(self) -> None:
        """In a forked child: the thread is gone, and its event may be mid-use."""
        self.thread = None
        self.wake = threading.Event()


_reaper = _Reaper()


def stop_reaper(timeout: float | None) -> bool:
    """See ``_Reaper.stop`` (for ``Caller.stop_all``)."""
    return _reaper.stop(timeout)


def forget_reaper_after_fork() -> None:
    """See ``_Reaper.forget_after_fork`` (registered with ``os.register_at_fork``)."""
    _reaper.forget_after_fork()
