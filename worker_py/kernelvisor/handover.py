"""A template that outlives a restart (IPC.md "Handover"): the next supervisor of the same
kernel takes it over, and its first worker is a fork away instead of a Python start-up.

At a ``shutdown_request`` with ``restart: true`` the supervisor sends the template
``outlive``: the template stops dying with the supervisor, listens on an abstract Unix
socket whose name the supervisor derived from the kernel's key and connection file, and
says ``outliving``. When the link closes it waits ``HANDOVER_WAIT_SECONDS`` for a supervisor
to connect there. The first one that does, run by the same user (``SO_PEERCRED``), sends
``adopt``: what it would give a worker it spawned (interpreter, backend, working
directory, environment) and a new id, token and socket. The template serves it only if
all of that is what it was started with, and no module it imported, nor a file of its
IPython profile, changed on disk since; otherwise it says ``stale`` and exits, and the
supervisor starts a fresh template. Adopted, it connects to the new socket as the
template and forks workers as before, except that the new supervisor is not its parent
and cannot reap them: the template forks once, becomes their subreaper (so the snapshots
of a dead worker become its children), reaps them all, and reports each end as
``exited``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from kernelvisor.ipc import IPC_VERSION, Connection, ProtocolError
from kernelvisor.outbox import control_frame
from kernelvisor.snapshot import PR_SET_PDEATHSIG, prctl

log = logging.getLogger(__name__)

HANDOVER_WAIT_SECONDS = float(os.environ.get("KERNELVISOR_HANDOVER_WAIT", "10"))
"""How long an outliving template waits for the next supervisor before it exits."""

_PR_SET_CHILD_SUBREAPER = 36
_UCRED = struct.Struct("3i")

CONFIG = (".py", ".ipy", ".json")
"""The files of the IPython profile that the template read (config and startup files; not
its history database, which every cell writes)."""

IGNORED_ENV = ("KERNELVISOR_SUPERVISOR_PID",)
"""Set by each supervisor for its workers: the one variable that differs after a restart."""


@dataclass(frozen=True)
class Adopt:
    """``adopt``: a supervisor's offer, and what it would start a worker with."""

    worker_id: int
    token: str
    path: str
    supervisor_pid: int
    python: str
    backend: str
    cwd: str
    env: dict[str, str]
    ipc_version: int

    @classmethod
    def from_control(cls, control: Any) -> Adopt:
        try:
            if not isinstance(control, dict) or control.get("op") != "adopt":
                raise TypeError("not an adopt")
            adopt = cls(**{k: v for k, v in control.items() if k != "op"})
        except TypeError as exc:
            raise ProtocolError(f"bad adopt: {exc}") from None
        fields = (
            (adopt.worker_id, int),
            (adopt.supervisor_pid, int),
            (adopt.token, str),
            (adopt.path, str),
            (adopt.python, str),
            (adopt.backend, str),
            (adopt.cwd, str),
            (adopt.env, dict),
            (adopt.ipc_version, int),
        )
        if not all(isinstance(value, kind) for value, kind in fields):
            raise ProtocolError("bad adopt: a field of the wrong type")
        return adopt


def _files(paths: list[str]) -> dict[str, tuple[int, int]]:
    """Modification time and size of each file that exists."""
    seen: dict[str, tuple[int, int]] = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        seen[path] = (st.st_mtime_ns, st.st_size)
    return seen


def _initial_environment() -> dict[str, str]:
    """The environment this process was started with (``/proc/self/environ`` does not
    change when Python or a startup file sets a variable), decoded as the supervisor
    decodes its own (invalid UTF-8 replaced)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
    except OSError:
        return {k: v for k, v in os.environ.items()}
    env = {}
    for entry in block.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep:
            env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return env


class Handover:
    """The template's side of a restart: what it was started with, and its state (serving
    the supervisor that spawned it, outliving it, or adopted by the next one)."""

    def __init__(self, shell: Any, backend: str) -> None:
        self.backend = backend
        self.python = (getattr(sys, "orig_argv", None) or [sys.executable])[0]
        self.cwd = os.getcwd()
        self.env = {k: v for k, v in _initial_environment().items() if k not in IGNORED_ENV}
        self.profile_dir = getattr(getattr(shell, "profile_dir", None), "location", None)
        self.fingerprint: dict[str, tuple[int, int]] = {}
        self.note_imports()
        self.listener: socket.socket | None = None
        self.adopted = False
        self._link: Connection | None = None
        self._link_lock = threading.Lock()
        self._children = threading.Event()

    # -- what the template is made of ----------------------------------------------------

    def _watched(self) -> list[str]:
        paths = [
            f
            for m in list(sys.modules.values())
            if isinstance(f := getattr(m, "__file__", None), str)
        ]
        if self.profile_dir:
            for sub in ("", "startup"):
                d = os.path.join(self.profile_dir, sub)
                with contextlib.suppress(OSError):
                    paths += [
                        os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(CONFIG)
                    ]
        return paths

    def note_imports(self) -> None:
        """Records the files of what was imported since the last call (a file already
        recorded keeps the state it had when the template read it)."""
        new = [p for p in self._watched() if p not in self.fingerprint]
        self.fingerprint.update(_files(new))

    def stale(self, adopt: Adopt) -> str | None:
        """Why this template cannot serve the supervisor that sent ``adopt``, or None."""
        if adopt.ipc_version != IPC_VERSION:
            return f"the supervisor speaks IPC version {adopt.ipc_version}, not {IPC_VERSION}"
        if adopt.python != self.python:
            return f"the interpreter is {adopt.python!r}, not {self.python!r}"
        if adopt.backend != self.backend:
            return f"the backend is {adopt.backend}, not {self.backend}"
        if adopt.cwd != self.cwd:
            return "the working directory changed"
        env = {k: v for k, v in adopt.env.items() if k not in IGNORED_ENV}
        if env != self.env:
            changed = sorted(set(env.items()) ^ set(self.env.items()))
            return f"the environment changed ({', '.join(sorted({k for k, _ in changed}))})"
        now = _files(list(self.fingerprint))
        for path, was in self.fingerprint.items():
            if now.get(path) != was:
                return f"{path} changed since the template read it"
        if self.profile_dir:
            added = [p for p in self._watched() if p.startswith(self.profile_dir)]
            if any(p not in self.fingerprint for p in added):
                return "a file was added to the IPython profile"
        return None

    # -- outliving the supervisor ---------------------------------------------------------

    def outlive(self, link: Connection, control: Any) -> bool:
        """``outlive``: stop dying with the supervisor, listen where the next one will
        look, and say ``outliving`` (True); or, if that cannot be, say nothing and die
        with it as usual (False)."""
        name = control.get("name")
        if not isinstance(name, str) or not name or self.listener is not None:
            log.warning("template: ignoring a bad outlive")
            return False
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind("\0" + name)
            listener.listen(1)
            prctl(PR_SET_PDEATHSIG, 0)
        except OSError as exc:
            listener.close()
            log.warning("template: cannot outlive the supervisor: %s", exc)
            return False
        self.listener = listener
        # What was imported since the warm-up (rarely anything) is checked too.
        self.note_imports()
        link.send([control_frame({"op": "outliving"})])
        return True

    @property
    def outliving(self) -> bool:
        return self.listener is not None

    def await_adopter(self) -> tuple[Adopt, int | None]:
        """After the link closed: the next supervisor's ``adopt`` and the stderr it sent.
        A connection from another user, or one that says no valid ``adopt``, is closed
        and the wait goes on; exits when none comes in time, or when the first valid one
        cannot be served."""
        from kernelvisor.crash import really_exit

        listener = self.listener
        assert listener is not None
        self.listener = None
        deadline = time.monotonic() + HANDOVER_WAIT_SECONDS
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.info("template: no supervisor came; exiting")
                really_exit(0)
            listener.settimeout(remaining)
            try:
                sock, _ = listener.accept()
            except OSError as exc:
                log.info("template: no supervisor came (%s); exiting", exc)
                really_exit(0)
            offered = self._offer(sock, deadline)
            if offered is None:
                sock.close()
                continue
            listener.close()
            conn, adopt, stderr = offered
            reason = self.stale(adopt)
            if reason is not None:
                log.info("template: stale for the new supervisor: %s", reason)
                conn.send([control_frame({"op": "stale", "reason": reason})])
                really_exit(0)
            conn.send([control_frame({"op": "adopted"})])
            conn.close()
            return adopt, stderr

    def _offer(
        self, sock: socket.socket, deadline: float
    ) -> tuple[Connection, Adopt, int | None] | None:
        """The ``adopt`` a connection sends, if it comes from our user, in time."""
        uid = _peer_uid(sock)
        if uid != os.geteuid():
            log.warning("template: refused a connection from uid %s", uid)
            return None
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        conn = Connection(sock)
        fds: list[int] = []
        try:
            messages: list[list[bytes]] = []
            while not messages:
                messages, more = conn.recv_with_fds()
                fds += more
            adopt = Adopt.from_control(json.loads(messages[0][0]))
        except (EOFError, OSError, ProtocolError, ValueError, IndexError) as exc:
            log.warning("template: no valid adopt: %s", exc)
            for fd in fds:
                os.close(fd)
            return None
        sock.settimeout(None)
        for fd in fds[1:]:
            os.close(fd)
        return conn, adopt, (fds[0] if fds else None)

    # -- serving the next supervisor --------------------------------------------------------

    def adopted_by(self, adopt: Adopt, link: Connection, old: Connection) -> None:
        """Become the forked workers' reaper (the new supervisor cannot be their parent):
        a subreaper, whose reaper thread reports every end on ``link`` from now on. The
        ``old`` link is closed once the reaper cannot be using it."""
        os.environ["KERNELVISOR_SUPERVISOR_PID"] = str(adopt.supervisor_pid)
        with self._link_lock:
            self._link = link
            old.close()
        if not self.adopted:
            self.adopted = True
            prctl(_PR_SET_CHILD_SUBREAPER, 1)
            threading.Thread(target=self._reap, name="kernelvisor-reaper", daemon=True).start()

    def until_childless(self, limit: float) -> None:
        """Waits (at most ``limit`` seconds) until the reaper has reaped every child: when
        the supervisor stops, so that each worker's end is reported before we exit."""
        if not self.adopted:
            return
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            time.sleep(0.005)

    def forked(self) -> None:
        """A child was forked: the reaper has something to wait for."""
        self._children.set()

    def _reap(self) -> None:
        """Reaps every child, and reports each end to the supervisor of the moment (one
        that ends while no supervisor is there concerns nobody)."""
        while True:
            self._children.wait()
            self._children.clear()
            while True:
                try:
                    pid, status = os.waitpid(-1, 0)
                except ChildProcessError:
                    break
                except InterruptedError:
                    continue
                report = control_frame({"op": "exited", "pid": pid, "status": status})
                with self._link_lock, contextlib.suppress(OSError):
                    if self._link is not None:
                        self._link.send([report])


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    _pid, uid, _gid = _UCRED.unpack(raw)
    return uid
