"""Forked snapshots (IPC.md "Snapshots"): between cells, on the supervisor's ``snapshot``
op, the worker forks a paused copy of itself. The copy closes its share of the worker's
connections, connects back as a ``snapshot`` link and waits. If the worker dies, the
supervisor sends the copy ``promote``: it rebuilds what did not survive the fork (threads,
connections, the fd capture, the event loop's selector, the history database connection)
and carries on as the worker, with the namespace as it was at the fork.

What is shared across the fork: open files, sockets and database connections that user
code holds are the same open descriptions in both processes (a file position, a socket's
peer). After a promotion they still work, but whatever the dead worker did with them
after the fork (bytes written, a transaction half done) is not undone. Threads and
background tasks started by cells do not survive; user threads are named in the log.
"""

from __future__ import annotations

import _signal
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kernelvisor.crash import really_exit
from kernelvisor.ipc import Connection, ProtocolError, encode
from kernelvisor.messages import Promote, hello
from kernelvisor.outbox import control_frame

if TYPE_CHECKING:
    from kernelvisor.wiring import Worker

log = logging.getLogger(__name__)

FORK_UNSAFE_ATTR = "__kernelvisor_fork_unsafe__"
"""A module that sets this attribute (to a reason string) stops snapshots while loaded."""

PR_SET_PDEATHSIG = 1


def prctl(option: int, value: int) -> None:
    """``prctl(2)`` with one argument; OSError if it fails."""
    if ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def die_with_parent() -> None:
    """Be killed (SIGKILL) when the parent dies: for a process reparented to the supervisor
    (a promoted snapshot, a worker forked by the template), as a spawned worker is."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def fork_unsafe_reason(worker: Worker) -> str | None:
    """Why forking now would give a broken copy, or None. Never imports anything. (The
    trio backend is refused by the supervisor, which never asks a trio worker for a
    snapshot: it knows the backend, and so saves the IPC round.)"""
    if type(worker.loop).__module__.startswith("uvloop"):
        return "not supported with uvloop yet"
    modules = sys.modules
    if "pydevd" in modules or "debugpy.server" in modules:
        # debugpy's threads and its adapter connection cannot be carried over a fork.
        return "the debugger (debugpy) is on"
    torch = modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_initialized():
                return "CUDA was initialized (torch)"
    xla_bridge = modules.get("jax._src.xla_bridge")
    if xla_bridge is not None:
        backends = getattr(xla_bridge, "_backends", None) or {}
        if any(name != "cpu" for name in backends):
            return "jax initialized an accelerator backend"
    if "cupy" in modules:
        return "CuPy is loaded (CUDA does not survive fork)"
    for name, module in list(modules.items()):
        reason = _fork_unsafe_attr(module)
        if reason:
            return f"{name} is not fork-safe ({reason})"
    importing = _import_in_progress()
    if importing is not None:
        return f"another thread was importing {importing}"
    return None


def _import_in_progress() -> str | None:
    """A module another thread is importing right now (its import lock is held): a copy
    forked now would keep that lock held forever, and hang on its next import of it (the
    debugger's thread importing debugpy while the worker is asked for a snapshot)."""
    try:
        from importlib import _bootstrap

        locks = list(_bootstrap._module_locks.items())  # type: ignore[attr-defined]
    except Exception:
        return None
    me = threading.get_ident()
    for name, ref in locks:
        lock = ref() if callable(ref) else ref
        owner = getattr(lock, "owner", None)
        if owner is not None and owner != me:
            return str(name)
    return None


def _fork_unsafe_attr(module: object) -> object:
    """``module``'s FORK_UNSAFE_ATTR. A module's own namespace is read directly: 8x faster
    than getattr over a few hundred modules (no module ``__getattr__`` runs), and a lazily
    loaded module (importlib.util.LazyLoader) is not loaded by the check."""
    if isinstance(module, types.ModuleType):
        namespace = object.__getattribute__(module, "__dict__")
        return namespace.get(FORK_UNSAFE_ATTR)
    return getattr(module, FORK_UNSAFE_ATTR, None) if module is not None else None


def heir_diagnostics_path(socket_path: str, worker_id: int) -> str:
    """Where a promoted snapshot writes its diagnostics (faulthandler's dump, the crash
    report): a file in the supervisor's private socket directory, which the supervisor
    reads when that worker dies (a spawned worker's go to its stderr pipe instead)."""
    return os.path.join(os.path.dirname(socket_path), f"diag-{worker_id}.log")


def _let_go_of(fd: int) -> list[int]:
    """Points every descriptor open on the same file as ``fd`` (the worker's original
    stderr, which faulthandler and the crash report keep copies of) at /dev/null.
    Returns them, for a promotion to point them at its own diagnostics file."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
        names = os.listdir("/proc/self/fd")
    except OSError:
        names, target = [str(fd)], ""
    devnull = os.open(os.devnull, os.O_WRONLY)
    redirected = []
    try:
        for name in names:
            other = int(name)
            if other in (0, 1, 2, devnull):
                continue
            try:
                same = other == fd or os.readlink(f"/proc/self/fd/{other}") == target
            except OSError:
                continue
            if same:
                os.dup2(devnull, other)
                redirected.append(other)
    finally:
        os.close(devnull)
    return redirected


_PID_MARKER = 987654321987654321
"""Stands for the copy's pid in the hello that the worker encodes for it."""


@dataclasses.dataclass(frozen=True)
class PausePlan:
    """What a snapshot does between its fork and its promotion, decided by the worker
    before the fork. Every page the copy writes stops being shared with the worker, and
    running Python writes to the page of each object it touches (reference counts): the
    copy's own work is kept to a few calls."""

    path: str
    """Where the supervisor listens."""
    close: tuple[int, ...]
    """The worker's links and pidfds: the worker's death must close its links, and the
    supervisor must see the copy only on the link it makes."""
    diag: int
    """The worker's stderr: the supervisor reads it to its end when the worker dies."""
    hello: tuple[bytes, bytes]
    """The copy's hello, encoded, before and after its pid."""


def _paused(plan: PausePlan) -> tuple[socket.socket, list[int]]:
    """The copy, right after the fork: let go of the worker's descriptors, say hello on
    a link of its own, and wait until something comes on it (left unread). Returns the
    link and the descriptors it pointed away from the worker's stderr. Exits if the link
    closes (a newer snapshot, shutdown, or the supervisor's death)."""
    # One click of a frontend that signals every process in the tree must not reach a
    # paused copy.
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    for fd in plan.close:
        with contextlib.suppress(OSError):
            os.close(fd)
    diag_fds = _let_go_of(plan.diag)
    head, tail = plan.hello
    link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        link.connect(plan.path)
        link.sendall(encode([head + str(os.getpid()).encode() + tail]))
        if not link.recv(1, socket.MSG_PEEK):
            really_exit(0)
    except OSError:
        really_exit(0)
    return link, diag_fds


class Snapshots:
    """The worker's side: forking on request, reaping its snapshot children, and, in a
    snapshot, waiting for promotion."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        # Snapshot children not yet reaped: pid -> pidfd (or -1).
        self._children: dict[int, int] = {}
        self.last: dict[str, Any] | None = None
        # In a snapshot: the descriptors that were the worker's diagnostics.
        self._diag_fds: list[int] = []

    def take(self, seq: int) -> None:
        """Fork a snapshot (main thread, no cell running). In the parent, report it; in
        the child, this returns only once the snapshot is promoted."""
        w = self._worker
        reason = fork_unsafe_reason(w)
        if reason is None and w.gate.running_cells():
            reason = "a cell was running"
        if reason is not None:
            w.outbox.control({"op": "snapshot_refused", "seq": seq, "reason": reason})
            return
        w.outbox.flush_streams()
        user_threads = [
            t.name
            for t in threading.enumerate()
            if t is not threading.main_thread() and not t.name.startswith("kernelvisor")
        ]
        count = w.shell.execution_count
        plan = self._pause_plan(seq)
        with self.quiet():
            started = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                # The copy: paused here, inside the block, until a message comes.
                link, diag_fds = _paused(plan)
        if pid == 0:
            self._promoted(Connection(link), diag_fds, user_threads)
            return
        fork_ms = (time.perf_counter() - started) * 1000
        self._watch(pid)
        self.last = {"pid": pid, "seq": seq, "at": time.time(), "count": count}
        w.outbox.control({"op": "snapshot_taken", "seq": seq, "pid": pid, "fork_ms": fork_ms})

    def _pause_plan(self, seq: int) -> PausePlan:
        """What the copy does before it waits, worked out here in the worker: the copy
        then runs as little Python as it can (``_paused``)."""
        w = self._worker
        links = [w.aux_conn.fileno()]
        if w.main_conn is not None:
            links.append(w.main_conn.fileno())
        frame = control_frame(hello("snapshot", w.worker_id, _PID_MARKER, w.token, seq=seq))
        key = b'"pid":'
        head, _, tail = frame.partition(key + str(_PID_MARKER).encode())
        return PausePlan(
            path=w.path,
            close=tuple(links + [fd for fd in self._children.values() if fd >= 0]),
            diag=w.diag.fileno(),
            hello=(head + key, tail),
        )

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Hold the locks the copy needs free (output, sends, history) across the fork,
        so no thread of ours is inside them when it happens. Same order as senders.
        The template (template.py) forks workers inside it too."""
        w = self._worker
        hm = getattr(w.shell, "history_manager", None)
        locks: list[Any] = [w.outbox._lock, w.capture._lock]
        if hm is not None:
            locks += [hm.db_input_cache_lock, hm.db_output_cache_lock, hm.open_lock]
        with w.gate.hold(), contextlib.ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            yield

    def _watch(self, pid: int) -> None:
        """Reap the child when it exits (it is dropped, or replaced by a newer one)."""
        loop = self._worker.loop
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._children[pid] = -1
            return
        self._children[pid] = pidfd
        loop.add_reader(pidfd, self._reap, pid)

    def _reap(self, pid: int) -> None:
        pidfd = self._children.pop(pid, -1)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
        if pidfd >= 0:
            self._worker.loop.remove_reader(pidfd)
            os.close(pidfd)

    # --- in the snapshot ----------------------------------------------------------------

    def _promoted(self, link: Connection, diag_fds: list[int], user_threads: list[str]) -> None:
        """The copy, once something came on its link (``_paused``): forget what the pause
        closed, and become the worker once ``promote`` comes."""
        w = self._worker
        # Their descriptors were closed by the pause: their numbers may be reused since.
        if w.main_conn is not None:
            w.main_conn.forget()
        w.aux_conn.forget()
        self._children = {}
        self._diag_fds = diag_fds
        w.discard_inbox()
        promote = self._wait(link)
        self._become_worker(promote, link, user_threads)

    def _wait(self, link: Connection) -> Promote:
        """Paused until promoted; exits when the supervisor drops the link (a newer
        snapshot, shutdown, or the supervisor's death)."""
        import json

        while True:
            try:
                frames = link.recv()
                control = json.loads(frames[0])
            except (EOFError, OSError, ProtocolError, ValueError, IndexError):
                really_exit(0)
            if isinstance(control, dict) and control.get("op") == "promote":
                try:
                    return Promote.from_control(control)
                except ProtocolError:
                    really_exit(1)

    def _diagnose_to_file(self, path: str) -> None:
        """faulthandler and the crash report write to ``path`` from now on."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as e:
            log.warning("no diagnostics file for this worker: %s", e)
            return
        try:
            for target in self._diag_fds:
                os.dup2(fd, target, inheritable=False)
        finally:
            os.close(fd)

    def _become_worker(self, promote: Promote, link: Connection, user_threads: list[str]) -> None:
        w = self._worker
        # Our worker is dead and we were reparented to the supervisor (a subreaper): die
        # with it from now on, as a spawned worker does.
        die_with_parent()
        if os.getppid() == 1:
            really_exit(0)
        link.abandon()
        w.worker_id = promote.worker_id
        w.token = promote.token
        self._diagnose_to_file(heir_diagnostics_path(w.path, w.worker_id))
        w.rewire_after_fork(promote.execution_count)
        if user_threads:
            log.warning(
                "restored from a snapshot; threads started by cells are gone: %s",
                ", ".join(user_threads),
            )
        log.info("snapshot promoted: worker %d (pid %d)", w.worker_id, os.getpid())
