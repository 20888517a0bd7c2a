"""The template (IPC.md "Template"): a worker process that imports everything a worker
needs, builds its shell and runs the startup files, then never runs a cell. The
supervisor asks it to ``fork`` each worker instead of starting a Python: the worker shares
the template's pages (copy on write), and is ready in milliseconds.

The fork reuses the snapshot machinery (snapshot.py): the template's own locks are held
across it (``Snapshots.quiet``), and the new worker rebuilds what does not survive a fork
as a promoted snapshot does (``Worker.rewire_after_fork``: its event loop's selector,
the fd capture, the flusher, the links, the debugger thread, the history session). The
template forks twice, and the middle process exits at once: the worker is reparented to
the supervisor (a child subreaper), which then reaps and signals it as its own child. The
worker's stderr is a pipe of its own, which the supervisor sends with ``fork``
(``SCM_RIGHTS``) and reads for the worker's crash report.
"""

from __future__ import annotations

import collections
import gc
import importlib
import json
import logging
import os
import socket
import time
from typing import NoReturn, TextIO

from kernelvisor.compiler import kernel_pid
from kernelvisor.crash import FatalSignalFlush, flush_on_os_exit, really_exit
from kernelvisor.handover import Handover
from kernelvisor.ipc import Connection, ProtocolError
from kernelvisor.messages import Fork, hello
from kernelvisor.outbox import control_frame
from kernelvisor.snapshot import _import_in_progress, _let_go_of, die_with_parent
from kernelvisor.wiring import SHUTDOWN_GRACE_SECONDS, Worker

log = logging.getLogger(__name__)

REPARENT_SECONDS = 5.0
"""How long a forked worker waits to become the supervisor's child before it gives up."""

WARM_MODULES = (
    "kernelvisor.caller",  # every worker makes its main thread's Caller when it serves
    "anyio._backends._asyncio",  # ... whose first use loads anyio's backend
    "IPython.core.logger",  # the first cell
    "bdb",
)
"""Imported by the template for its workers, which would each import them (and write to
the template's pages as they allocate) on their way to serving."""


def run_template(
    path: str,
    worker_id: int,
    token: str,
    diag: TextIO,
    fatal_signals: FatalSignalFlush,
    backend: str,
) -> NoReturn:
    """``--template``: warm up as a worker does, then connect the link and fork workers
    (a Python that cannot get that far is a failed start, as a worker's would be). Until
    then the worker's ``aux`` is a socket pair's end: the template says nothing there."""
    placeholder, other_end = socket.socketpair()
    other_end.close()
    worker = Worker(path, Connection(placeholder), worker_id, diag, fatal_signals, backend, token)
    worker.start_capture()
    worker.start_shell()
    try:
        link = Connection.connect(path)
    except OSError:
        log.exception("cannot connect to %s", path)
        really_exit(1)
    worker.aux_conn.close()
    worker.aux_conn = link
    worker.outbox.attach_aux(link)
    serve(worker, link)


def serve(worker: Worker, link: Connection) -> NoReturn:
    """Say hello on ``link`` (the shell is built), then fork a worker for each ``fork``
    until the supervisor closes the link. The rest of the warm-up (``_warm_up``) comes
    once a second worker has been forked: the first (the main worker, which a client is
    waiting for) would not share it, and most kernels never fork another, so it would
    only cost the idle tree its pages (~9 MB). The third and later workers share it."""
    # Every worker imports these on its way to serving: the first one too.
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.debug("template: not warming %s: %s", name, exc)
    # What exists now is the template's, shared by every worker: out of the collector's
    # sight, so that a worker's collections never write to (and so copy) its pages.
    gc.collect()
    gc.freeze()
    handover = Handover(worker.shell, worker.backend)
    link.send([control_frame(hello("template", worker.worker_id, os.getpid(), worker.token))])
    log.info("template %d ready (pid %d)", worker.worker_id, os.getpid())
    forks = 0
    warm = False
    fds: collections.deque[int] = collections.deque()
    quieted: list[int] = []
    while True:
        try:
            messages, received = link.recv_with_fds()
        except (EOFError, OSError, ProtocolError):
            if not handover.outliving:
                # Adopted: the workers we reap are stopping too; report their ends first.
                handover.until_childless(SHUTDOWN_GRACE_SECONDS)
                really_exit(0)
            link = _adopted(worker, handover, quieted, link)
            continue
        fds.extend(received)
        for frames in messages:
            # Every message comes with one descriptor: a fork's is the new worker's stderr.
            fd = fds.popleft() if fds else None
            try:
                control = json.loads(frames[0])
                op = control.get("op") if isinstance(control, dict) else None
                if op == "outlive":
                    if handover.outlive(link, control):
                        quieted = _let_go_of(worker.diag.fileno())
                elif op == "fork":
                    _fork(worker, link, Fork.from_control(control), fd, handover)
                    forks += 1
                else:
                    raise ProtocolError(f"not a template op: {frames[0][:80]!r}")
            except (ValueError, ProtocolError) as exc:
                log.warning("template: ignoring a message: %s", exc)
            if fd is not None:
                os.close(fd)
        if forks >= 2 and not warm:
            warm = True
            _warm_up(worker)
            handover.note_imports()


def _adopted(worker: Worker, handover: Handover, quieted: list[int], old: Connection) -> Connection:
    """The supervisor we outlived is gone: wait for the next one (handover.py), then serve it
    as its template, our diagnostics going to the stderr it sent. Until then the ``old``
    link stays open: the reaper reports on it the ends of the workers it stops."""
    adopt, stderr = handover.await_adopter()
    if stderr is not None:
        for fd in quieted:
            os.dup2(stderr, fd, inheritable=False)
        os.close(stderr)
    try:
        link = Connection.connect(adopt.path)
    except OSError:
        log.exception("cannot connect to %s", adopt.path)
        really_exit(1)
    worker.path = adopt.path
    worker.worker_id = adopt.worker_id
    worker.token = adopt.token
    worker.aux_conn = link
    worker.outbox.attach_aux(link)
    link.send([control_frame(hello("template", worker.worker_id, os.getpid(), worker.token))])
    handover.adopted_by(adopt, link, old)
    log.info("template %d adopted by supervisor %d", worker.worker_id, adopt.supervisor_pid)
    return link


def _warm_up(worker: Worker) -> None:
    """What each worker would otherwise do (and copy pages for) on its own, done once here
    after the second fork (``serve``), which it would delay: a first traceback; a full
    collection."""
    _warm_tracebacks(worker)
    gc.collect()
    gc.freeze()


def _warm_tracebacks(worker: Worker) -> None:
    """Format (never show) one traceback, as the first interrupt or error of every worker
    would: stack_data, pygments and the Python lexer's compiled token table are then the
    template's, shared, instead of costing each worker's first traceback ~100 ms."""
    from kernelvisor import tracebacks

    tracebacks.install()
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as exc:
        try:
            worker.shell.InteractiveTB.structured_traceback(type(exc), exc, exc.__traceback__)
        except Exception:  # only a warm-up: a worker formats its own when it needs one
            log.debug("template: traceback warm-up failed", exc_info=True)


def _fork(
    worker: Worker, link: Connection, fork: Fork, stderr: int | None, handover: Handover
) -> None:
    """Fork worker ``fork.worker_id`` (twice: see the module's doc; once when adopted, see
    handover.py), or say why not."""
    # No thread of ours may be inside an import: its lock would stay held in the worker.
    deadline = time.monotonic() + 1.0
    while _import_in_progress() is not None and time.monotonic() < deadline:
        time.sleep(0.001)
    # The process that will reap the worker: it waits to be that one's child.
    parent = os.getpid() if handover.adopted else kernel_pid()
    try:
        with worker.snapshots.quiet():
            pid = os.fork()
            if pid == 0 and not handover.adopted:
                # The middle process: leave at once, so the worker is reparented.
                try:
                    if os.fork() != 0:
                        really_exit(0)
                except BaseException:
                    really_exit(1)
    except OSError as exc:
        _failed(link, fork, str(exc))
        return
    if pid == 0:
        _become_worker(worker, link, fork, stderr, parent)
    if handover.adopted:
        handover.forked()
        return
    _, status = os.waitpid(pid, 0)
    if status != 0:
        _failed(link, fork, "the second fork failed")


def _failed(link: Connection, fork: Fork, reason: str) -> None:
    log.warning("cannot fork worker %d: %s", fork.worker_id, reason)
    link.send([control_frame({"op": "fork_failed", "worker_id": fork.worker_id, "reason": reason})])


def _become_worker(
    worker: Worker, link: Connection, fork: Fork, stderr: int | None, parent: int
) -> NoReturn:
    """In the forked worker: become ``parent``'s child (the supervisor's, or an adopted
    template's), then worker ``fork.worker_id`` (the rebuild of a promoted snapshot), and
    serve."""
    try:
        deadline = time.monotonic() + REPARENT_SECONDS
        while os.getppid() != parent:
            if time.monotonic() > deadline:
                really_exit(1)
            time.sleep(0.0001)
        # Die with our parent, as a spawned worker does (checked again after: it may
        # have died before this).
        die_with_parent()
        if os.getppid() != parent:
            really_exit(0)
        # A process group of its own, as a spawned worker has.
        os.setpgid(0, 0)
        link.abandon()
        if stderr is not None:
            # Our own stderr: faulthandler's dumps and our logs go to the supervisor as ours.
            for fd in _let_go_of(worker.diag.fileno()):
                os.dup2(stderr, fd)
        _relabel_logs()
        worker.worker_id = fork.worker_id
        worker.token = fork.token
        worker.rewire_after_fork(1)
        # Fatal signals and os._exit flush output again: the connections are ours now.
        worker.fatal_signals.arm(worker._last_words)
        flush_on_os_exit(worker._last_words_before_exit, SHUTDOWN_GRACE_SECONDS)
        log.info("worker %d forked from the template (pid %d)", fork.worker_id, os.getpid())
    except BaseException:
        log.exception("a worker forked from the template could not start")
        really_exit(1)
    worker.run(rewired=True)
    really_exit(0)


def _relabel_logs() -> None:
    """The worker's log lines name its own pid, not the template's."""
    for handler in logging.getLogger("kernelvisor").handlers:
        handler.setFormatter(
            logging.Formatter(
                f"kernelvisor-worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s"
            )
        )
