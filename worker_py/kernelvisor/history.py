"""IPython's history manager, with its SQLite file opened off the way to the first cell.

Opening ``history.sqlite`` commits the new session's row, an fsync: 15-30 ms of waiting on
the disk, which IPython does while it builds the shell, before the worker can say it is
ready; a forked worker (from the template, or a promoted snapshot) opens it again for a
session of its own. ``HistoryManager`` leaves the open pending instead: it is started by
``open_pending`` (the worker calls it shortly after it starts serving, so after a first
cell sent at once, and the snapshot before it), or by the first caller that needs the
database; the template, which runs no cell, never opens it. A cell's input is stored at once
(in the cache, under IPython's lock); writing the cache out and reading the database
(``db``) wait for the open, which runs on a thread. That thread holds ``open_lock`` from
before it starts until the file is open: every fork (a snapshot's, the template's) takes
that lock, so none copies a half-open database."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from IPython.core import history

log = logging.getLogger(__name__)


class HistoryManager(history.HistoryManager):
    """IPython's ``HistoryManager``, whose database is opened later, by a thread (see
    above)."""

    def __init__(self, **kwargs: Any) -> None:
        self._opened = threading.Event()
        # Held while the database is being opened; forks take it.
        self.open_lock = threading.Lock()
        # The thread opening the database (which must not wait for itself).
        self._opener = 0
        self._conn: Any = None
        # The open waiting to be started; taken under open_lock.
        self._pending: Callable[[], None] | None = None
        # While IPython's constructor runs, opening the file and starting the session wait.
        self._deferring = True
        try:
            super().__init__(**kwargs)
        finally:
            self._deferring = False
        if not self.enabled or str(self.hist_file) == ":memory:":
            # Nothing on disk: open at once, as IPython does.
            self._open()
            self._opened.set()
            return
        self._pending = self._open

    def reopen_later(self) -> None:
        """After a fork: a connection and a session of our own (the other process may
        write lines to its session), and a saving thread (its thread was not copied),
        left pending as the first open is."""
        if self.enabled:
            self._opened.clear()
            self._pending = self._reopen

    def open_pending(self) -> None:
        """Start the pending open, if there is one (from any thread)."""
        if self._pending is None:
            return
        # Taken here, released by the opener: nothing can fork before it is done.
        self.open_lock.acquire()
        open_db, self._pending = self._pending, None
        if open_db is None:
            self.open_lock.release()
            return
        threading.Thread(
            target=self._open_then_release,
            args=(open_db,),
            name="kernelvisor-history-open",
            daemon=True,
        ).start()

    @property  # type: ignore[override]
    def db(self) -> Any:
        """The SQLite connection, once open (callers other than the opener wait)."""
        self._wait_open()
        return self._conn

    @db.setter
    def db(self, value: Any) -> None:
        self._conn = value

    def init_db(self) -> None:
        if not self._deferring:
            super().init_db()

    def new_session(self, conn: Any = None) -> None:
        if not self._deferring:
            super().new_session(conn)

    def writeout_cache(self, conn: Any = None) -> None:
        self._wait_open()
        super().writeout_cache(conn)

    def end_session(self) -> None:
        if self._pending is not None and not self.db_input_cache and not self.db_output_cache:
            return  # never opened, nothing to write: no session to end
        super().end_session()

    def close(self) -> None:
        if self._pending is not None:
            # Never opened here: no connection of ours to close (one copied by a fork is
            # the other process's).
            with self.open_lock:
                self._pending = None
            self._conn = history.DummyDB()
            self._opened.set()
            stop_saving = getattr(self, "_stop_save_thread", None)
            if stop_saving is not None:
                stop_saving()
            return
        super().close()

    def _wait_open(self) -> None:
        if self._deferring or self._opened.is_set() or threading.get_ident() == self._opener:
            return
        self.open_pending()
        self._opened.wait()

    def _open_then_release(self, open_db: Callable[[], None]) -> None:
        self._opener = threading.get_ident()
        try:
            open_db()
        except Exception:
            log.exception("cannot keep history; history is off")
            self.enabled = False
            self._conn = history.DummyDB()
        finally:
            self._opened.set()
            self.open_lock.release()

    def _init_db(self) -> None:
        """IPython's ``init_db``, with a connection that stays open until the shell's own
        exit hook has written the session out: IPython closes it in a ``weakref.finalize``,
        whose exit hook runs before that one when the finalizer was registered after it
        (a worker's reopened history), and the last cells were then lost with a
        "Cannot operate on a closed database" at exit."""
        super().init_db()
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer.atexit = False

    def _open(self) -> None:
        self._opener = threading.get_ident()
        try:
            self._init_db()
            super().new_session()
        except Exception:
            # As IPython's constructor does when it cannot start a session.
            log.exception("cannot open the history %s; it is kept in memory", self.hist_file)
            self.hist_file = ":memory:"
            self._init_db()
            super().new_session()

    def _reopen(self) -> None:
        self._init_db()
        super().new_session()
        saver = self.save_thread
        if saver is not None:
            self.save_thread = type(saver)(self)
            self.save_thread.start()
