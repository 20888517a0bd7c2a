"""The worker's trio backend: trio runs as a guest of the worker's asyncio loop.

The worker's own machinery (reading the supervisor, output, signals) stays on its
asyncio loop; with ``--backend trio`` the cells of the main thread run as trio tasks in
a trio run hosted by that loop (``trio.lowlevel.start_guest_run``), so top-level
``await`` in a cell uses trio, and shell messages keep flowing while a cell awaits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

AsyncFn = Callable[[], Coroutine[Any, Any, None]]


class TrioHost:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._token: Any = None
        self._nursery: Any = None
        # Spawned before the trio run is up: started once it is.
        self._early: list[AsyncFn] = []

    def start(self) -> None:
        """Start the guest run; it begins once the asyncio loop runs."""
        import trio

        trio.lowlevel.start_guest_run(
            self._main,
            run_sync_soon_threadsafe=self._loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=self._loop.call_soon,
            done_callback=self._done,
            # The worker's SigintGate watches signals and wakes this loop (interrupts.py).
            host_uses_signal_set_wakeup_fd=True,
        )

    async def _main(self) -> None:
        import trio

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            early, self._early = self._early, []
            for fn in early:
                nursery.start_soon(fn)
            await trio.sleep_forever()

    def _done(self, outcome: Any) -> None:
        log.error("the trio run ended: %r", outcome)

    def spawn(self, fn: AsyncFn) -> None:
        """Run ``fn()`` as a trio task (from the host loop's thread or any other)."""
        if self._token is None:
            self._loop.call_soon_threadsafe(self._spawn_later, fn)
            return
        self._token.run_sync_soon(self._nursery.start_soon, fn)

    def _spawn_later(self, fn: AsyncFn) -> None:
        if self._token is None:
            self._early.append(fn)
        else:
            self._token.run_sync_soon(self._nursery.start_soon, fn)
