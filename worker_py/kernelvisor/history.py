"""IPython's history manager, with its SQLite file opened off the way to the first cell.

Opening ``history.sqlite`` commits the new session's row, an fsync: 15-30 ms of waiting on
the disk, which IPython does while it builds the shell, before the worker can say it is
ready. ``HistoryManager`` opens it on a thread instead, while the worker goes on starting.
The thread holds the two cache locks from before it starts until the file is open, so
anything that writes history out, and every fork made under those locks (a snapshot's, the
template's), waits for the open; reading the database (``db``) waits for it too. Only the
first cell's input, stored under the same lock, can wait for what is left of it."""

from __future__ import annotations

import logging
import threading
from typing import Any

from IPython.core import history

log = logging.getLogger(__name__)


class HistoryManager(history.HistoryManager):
    """IPython's ``HistoryManager``, whose database is opened by a thread (see above)."""

    def __init__(self, **kwargs: Any) -> None:
        self._opened = threading.Event()
        # The thread opening the database (which must not wait for itself).
        self._opener = 0
        self._conn: Any = None
        # While IPython's constructor runs, opening the file and starting the session wait.
        self._deferring = True
        try:
            super().__init__(**kwargs)
        finally:
            self._deferring = False
        if not self.enabled or str(self.hist_file) == ":memory:":
            # Nothing on disk: open at once, as IPython does.
            self._open_now()
            return
        # Taken here, released by the opener: no fork or write-out can come in before it.
        self.db_input_cache_lock.acquire()
        self.db_output_cache_lock.acquire()
        threading.Thread(target=self._open, name="kernelvisor-history-open", daemon=True).start()

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

    def _wait_open(self) -> None:
        if self._deferring or self._opened.is_set() or threading.get_ident() == self._opener:
            return
        self._opened.wait()

    def _open_now(self) -> None:
        self._opener = threading.get_ident()
        try:
            super().init_db()
            super().new_session()
        except Exception:
            # As IPython's constructor does when it cannot start a session.
            log.exception("cannot open the history %s; it is kept in memory", self.hist_file)
            self.hist_file = ":memory:"
            super().init_db()
            super().new_session()
        finally:
            self._opened.set()

    def _open(self) -> None:
        try:
            self._open_now()
        except Exception:
            log.exception("cannot keep history; history is off")
            self.enabled = False
            self._conn = history.DummyDB()
        finally:
            self._opened.set()
            self.db_output_cache_lock.release()
            self.db_input_cache_lock.release()
