"""kernelvisor.history: the history file is opened by a thread, off the worker's start-up,
and whatever needs the database waits for it (nothing is lost or written to a wrong
session)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from IPython.core import history as ipython_history
from IPython.core.interactiveshell import InteractiveShell
from kernelvisor.history import HistoryManager


def test_history_is_opened_off_the_constructor_and_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shell = InteractiveShell.instance()
    # The open is held up (as by a slow fsync) until the test lets it go on.
    go_on = threading.Event()
    new_session = ipython_history.HistoryManager.new_session

    def slow_new_session(self: ipython_history.HistoryManager, conn: object = None) -> None:
        assert go_on.wait(30)
        new_session(self, conn)

    monkeypatch.setattr(ipython_history.HistoryManager, "new_session", slow_new_session)
    path = tmp_path / "history.sqlite"
    hm = HistoryManager(shell=shell, hist_file=str(path))
    # Constructed without the open (nothing holds it up, so a fork would not wait); a
    # cell's input is stored at once (in the cache).
    assert hm.open_lock.acquire(timeout=5)
    hm.open_lock.release()

    def store(line: int, code: str) -> None:
        hm.input_hist_parsed.append(code)
        hm.input_hist_raw.append(code)
        hm.store_inputs(line, code)

    def write_out_once_opened() -> None:
        """Writing out waits for the open (and the session's number), and so would a fork;
        then the open is let go on, and the write-out ends."""
        written = threading.Event()

        def write_out() -> None:
            hm.writeout_cache()
            written.set()

        threading.Thread(target=write_out, daemon=True).start()
        assert not written.wait(0.3)
        assert not hm.open_lock.acquire(timeout=0.1)
        go_on.set()
        assert written.wait(30)

    store(1, "x = 1")
    write_out_once_opened()
    assert hm.session_number > 0
    assert list(hm.get_range(0, 1, 2)) == [(0, 1, "x = 1")]
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT session, line, source FROM history").fetchall()
    assert rows == [(hm.session_number, 1, "x = 1")]
    # The opener let go of its lock (forks take it).
    assert hm.open_lock.acquire(timeout=5)
    hm.open_lock.release()

    # After a fork: a session of its own, opened the same way.
    first_session = hm.session_number
    go_on.clear()
    hm.reopen_later()
    # Nothing is opened yet: a fork would not wait.
    assert hm.open_lock.acquire(timeout=5)
    hm.open_lock.release()
    store(2, "y = 2")
    # Writing out opens it, and waits.
    write_out_once_opened()
    assert hm.session_number > first_session
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT session, line, source FROM history ORDER BY session").fetchall()
    assert rows == [(first_session, 1, "x = 1"), (hm.session_number, 2, "y = 2")]
    hm.close()


def test_history_in_memory_opens_at_once() -> None:
    hm = HistoryManager(shell=InteractiveShell.instance(), hist_file=":memory:")
    assert hm._opened.is_set()
    assert hm.session_number > 0
    hm.store_inputs(1, "y = 2")
    hm.writeout_cache()
    assert list(hm.get_range(0, 1, 2)) == [(0, 1, "y = 2")]
    hm.close()


def test_history_never_needed_is_never_opened(tmp_path: Path) -> None:
    """The template's case: no cell, no history request; ending it opens nothing."""
    hm = HistoryManager(shell=InteractiveShell.instance(), hist_file=str(tmp_path / "h.sqlite"))
    hm.end_session()
    assert not hm._opened.is_set()
    hm.close()
    with sqlite3.connect(tmp_path / "h.sqlite") as db:
        tables = db.execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == []
