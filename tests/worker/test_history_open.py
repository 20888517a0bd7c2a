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
    # Constructed without the open; a cell's input is taken (in memory) meanwhile.
    hm.input_hist_parsed.append("x = 1")
    hm.input_hist_raw.append("x = 1")
    written = threading.Event()

    def store_and_write() -> None:
        hm.store_inputs(1, "x = 1")
        hm.writeout_cache()
        written.set()

    threading.Thread(target=store_and_write, daemon=True).start()
    # Writing out waits for the open (and the session's number).
    assert not written.wait(0.3)
    go_on.set()
    assert written.wait(30)
    assert hm.session_number > 0
    assert list(hm.get_range(0, 1, 2)) == [(0, 1, "x = 1")]
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT session, line, source FROM history").fetchall()
    assert rows == [(hm.session_number, 1, "x = 1")]
    # The opener let go of the cache locks (forks and write-outs take them).
    for lock in (hm.db_input_cache_lock, hm.db_output_cache_lock):
        assert lock.acquire(timeout=5)
        lock.release()
    hm.close()


def test_history_in_memory_opens_at_once() -> None:
    hm = HistoryManager(shell=InteractiveShell.instance(), hist_file=":memory:")
    assert hm._opened.is_set()
    assert hm.session_number > 0
    hm.store_inputs(1, "y = 2")
    hm.writeout_cache()
    assert list(hm.get_range(0, 1, 2)) == [(0, 1, "y = 2")]
    hm.close()
