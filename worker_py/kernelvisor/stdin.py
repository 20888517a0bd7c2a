"""input() and getpass() in cells, answered by the client through the supervisor."""

from __future__ import annotations

import builtins
import getpass
import queue
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kernelvisor.interrupts import SigintGate
from kernelvisor.outbox import Outbox

# How long a wait for input_reply sleeps between checks, so SIGINT is handled promptly.
_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class _Asker:
    req_id: int
    parent: bytes
    allow_stdin: bool


class StdinBridge:
    def __init__(self, outbox: Outbox, gate: SigintGate) -> None:
        self._outbox = outbox
        self._gate = gate
        self._replies: queue.SimpleQueue[str] = queue.SimpleQueue()
        # The execute request that input() would ask for (one runs at a time).
        self._asker: _Asker | None = None

    def install(self) -> None:
        builtins.input = self.input
        getpass.getpass = self.getpass  # type: ignore[assignment]

    @contextmanager
    def asking_for(self, req_id: int, parent: bytes, allow_stdin: bool) -> Iterator[None]:
        self._asker = _Asker(req_id, parent, allow_stdin)
        try:
            yield
        finally:
            self._asker = None

    def deliver(self, value: str) -> None:
        """An input_reply arrived (called from the IPC reader thread)."""
        self._replies.put(value)

    def input(self, prompt: Any = "") -> str:
        return self._ask(str(prompt), password=False, what="input")

    def getpass(self, prompt: str = "Password: ", stream: Any = None, **_: Any) -> str:
        if stream is not None:
            warnings.warn(
                "getpass's stream argument is ignored by kernelvisor", UserWarning, stacklevel=2
            )
        return self._ask(str(prompt), password=True, what="getpass")

    def _ask(self, prompt: str, password: bool, what: str) -> str:
        asker = self._asker
        if asker is None or not asker.allow_stdin:
            from IPython.core.error import StdinNotImplementedError

            raise StdinNotImplementedError(
                f"{what}() was called, but this frontend does not support input requests."
            )
        while True:  # forget answers to questions nobody is asking any more
            try:
                self._replies.get_nowait()
            except queue.Empty:
                break
        # The outbox flushes buffered output first, so the prompt follows it.
        self._outbox.stdin_request(
            asker.req_id, asker.parent, {"prompt": prompt, "password": password}
        )
        try:
            with self._gate.raising():
                value = self._wait()
        except KeyboardInterrupt:
            raise KeyboardInterrupt("Interrupted by user") from None
        if value == "\x04":  # Ctrl-D in the client means end of file
            raise EOFError
        return value

    def _wait(self) -> str:
        while True:
            try:
                return self._replies.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
