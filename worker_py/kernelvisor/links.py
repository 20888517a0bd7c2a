"""The readers of the worker's two connections (IPC.md): ``main`` is read by the main
thread's event loop itself (and by an ``input()`` waiting there), ``aux`` by a thread of
its own. Each message read goes to the router."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from kernelvisor.ipc import ProtocolError

if TYPE_CHECKING:
    from kernelvisor.wiring import Worker

log = logging.getLogger(__name__)

OnMessage = Callable[[list[bytes], str], None]
"""Takes one message's frames and the name of the connection it came on."""


class Links:
    """Reads ``main`` and ``aux`` (the worker's current connections) and hands each
    message to ``on_message``; the end of either ends the worker."""

    def __init__(self, worker: Worker, on_message: OnMessage) -> None:
        self._worker = worker
        self._on_message = on_message
        # Messages read from main but not yet handled.
        self.inbox: collections.deque[list[bytes]] = collections.deque()

    def serve(self) -> None:
        """Start reading ``aux`` (a thread) and ``main`` (the loop, and a waiting input())."""
        worker = self._worker
        assert worker.main_conn is not None, "connect_main first"
        threading.Thread(target=self._read_aux, name="kernelvisor-aux-reader", daemon=True).start()
        main_fd = worker.main_conn.fileno()
        worker.loop.add_reader(main_fd, self.read_main)
        worker.stdin.watch_fd = main_fd
        worker.stdin.on_watch_readable = self.read_main

    # --- main connection: read by the main thread --------------------------------------

    def read_main(self) -> None:
        """The event loop's reader of ``main`` (also called by a waiting input())."""
        worker = self._worker
        conn = worker.main_conn
        if conn is None:
            return
        if worker.shutting_down:
            self.stop_reading_main()
            return
        try:
            messages = conn.recv_nowait()
        except EOFError:
            log.info("supervisor closed the main connection")
            worker.shutdown()
            return
        except (ProtocolError, OSError):
            log.exception("IPC connection broken (main)")
            self.stop_reading_main()
            worker.exit(1)
            return
        self.inbox.extend(messages)
        self.handle_inbox()

    def handle_inbox(self) -> None:
        """Handle what was read from ``main``. Through one queue, so that a nested call
        (from an input() waiting inside a cell started by an outer call) still handles
        messages in arrival order."""
        inbox = self.inbox
        while inbox and not self._worker.shutting_down:
            self._on_message(inbox.popleft(), "main")

    def stop_reading_main(self) -> None:
        worker = self._worker
        worker.stdin.watch_fd = None
        if worker.main_conn is not None and threading.current_thread() is threading.main_thread():
            worker.loop.remove_reader(worker.main_conn.fileno())

    # --- aux connection: read by a thread ----------------------------------------------

    def _read_aux(self) -> None:
        worker = self._worker
        while not worker.shutting_down:
            try:
                frames = worker.aux_conn.recv()
            except EOFError:
                log.info("supervisor closed the aux connection")
                worker.shutdown()
                return
            except (ProtocolError, OSError):
                log.exception("IPC connection broken (aux)")
                worker.exit(1)
                return
            self._on_message(frames, "aux")
