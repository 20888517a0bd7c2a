"""input() and getpass() in cells, answered by the client through the supervisor."""

from __future__ import annotations

import builtins
import contextlib
import getpass
import os
import queue
import select
import threading
import warnings
from collections.abc import Callable
from typing import Any

from kernelvisor.cells import Cell, current_cell
from kernelvisor.interrupts import SigintGate
from kernelvisor.outbox import Outbox

# A wait for input_reply wakes up this often even if nothing happens (SIGINT interrupts
# the wait at once anyway).
_POLL_MS = 1000


def _nothing() -> None:
    pass


def _stdin_not_implemented(what: str) -> Exception:
    from IPython.core.error import StdinNotImplementedError

    # ipykernel's message, word for word: frontends and tests match on it.
    return StdinNotImplementedError(
        f"{what} was called, but this frontend does not support input requests."
    )


class StdinBridge:
    def __init__(self, outbox: Outbox, gate: SigintGate) -> None:
        self._outbox = outbox
        self._gate = gate
        # One question at a time: an input_reply does not say which question it answers.
        self._asking = threading.Lock()
        self._replies: queue.SimpleQueue[str] = queue.SimpleQueue()
        # deliver() writes a byte here to wake a waiting input().
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # While input() waits, the main thread does not run the event loop that reads
        # the main connection: the wait watches this fd and calls on_watch_readable
        # (the worker's main-connection reader), so an input_reply sent on main, or a
        # shutdown, is still seen.
        self.watch_fd: int | None = None
        self.on_watch_readable: Callable[[], None] = _nothing

    def install(self) -> None:
        builtins.input = self.input
        getpass.getpass = self.getpass  # type: ignore[assignment]

    def deliver(self, value: str) -> None:
        """An input_reply arrived (called from any thread)."""
        self._replies.put(value)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def input(self, prompt: Any = "") -> str:
        asker = current_cell.get()
        if asker is None or not asker.allow_stdin:
            raise _stdin_not_implemented("raw_input")  # the Python 2 name, as ipykernel says
        return self._ask(asker, str(prompt), password=False)

    def getpass(
        self, prompt: str = "Password: ", stream: Any = None, *, echo_char: str | None = None
    ) -> str:
        asker = current_cell.get()
        if asker is None or not asker.allow_stdin:
            raise _stdin_not_implemented("getpass")
        for name, value in (("stream", stream), ("echo_char", echo_char)):
            if value is not None:
                warnings.warn(
                    f"The `{name}` parameter of `getpass.getpass` will have no effect"
                    " when using kernelvisor",
                    UserWarning,
                    stacklevel=2,
                )
        return self._ask(asker, str(prompt), password=True)

    def _ask(self, asker: Cell, prompt: str, password: bool) -> str:
        try:
            with self._asking:
                while True:  # forget answers to questions nobody is asking any more
                    try:
                        self._replies.get_nowait()
                    except queue.Empty:
                        break
                # The outbox flushes buffered output first, so the prompt follows it.
                self._outbox.stdin_request(
                    asker.req_id, asker.header, {"prompt": prompt, "password": password}
                )
                value = self._wait()
        except KeyboardInterrupt:  # the cell was interrupted while it waited
            raise KeyboardInterrupt("Interrupted by user") from None
        if value == "\x04":  # Ctrl-D in the client means end of file
            raise EOFError
        return value

    def _wait(self) -> str:
        while True:
            try:
                return self._replies.get_nowait()
            except queue.Empty:
                pass
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            # Only the main thread reads main (a waiting thread cell leaves it to the loop).
            watch = self.watch_fd if threading.current_thread() is threading.main_thread() else None
            if watch is not None:
                poller.register(watch, select.POLLIN)
            for fd, _events in poller.poll(_POLL_MS):
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                elif fd == watch:
                    # Whole messages only: a SIGINT waits until they are read.
                    with self._gate.hold():
                        self.on_watch_readable()
