"""Worker entry point: ``python -m kernelvisor.worker --connect PATH --worker-id N``.

Sets up the process (arguments, the secret, diagnostics, fatal-signal flushing), then
builds the ``Worker`` (wiring.py) and serves. The pieces, one concern each:

- ``wiring.py``: the ``Worker``, which ties the others together and owns shutdown.
- ``links.py``: the readers of the two connections (IPC.md): ``aux`` by a thread, so
  introspection is answered while a cell runs; ``main`` by the main thread's event loop
  itself, where cells and comm handlers run, so a cell starts without any thread hop.
- ``router.py``: tables from op and from msg_type to handler.
- ``run_modes.py``: how a cell starts (``queue``, ``task``, ``thread``).

The flusher and the fd capture threads move output (streams.py, capture.py).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
from typing import TextIO

from kernelvisor.crash import FatalSignalFlush, really_exit
from kernelvisor.ipc import IPC_VERSION
from kernelvisor.wiring import Worker

# Not __name__: run with -m, this module is "__main__", outside the "kernelvisor" logger.
log = logging.getLogger("kernelvisor.worker")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kernelvisor.worker")
    parser.add_argument("--connect", required=True, metavar="SOCKET_PATH")
    parser.add_argument("--worker-id", required=True, type=int)
    parser.add_argument(
        "--token-fd",
        type=int,
        default=None,
        metavar="FD",
        help="read the worker's secret from this inherited fd (then close it)",
    )
    parser.add_argument(
        "--ipc-version",
        type=int,
        default=None,
        metavar="N",
        help="the IPC version the supervisor speaks; any but this worker's own is refused",
    )
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the event loop of main-thread cells (trio: a guest of the worker's asyncio loop)",
    )
    parser.add_argument(
        "--template",
        action="store_true",
        help="be the template workers are forked from, never a worker itself (template.py)",
    )
    return parser.parse_args(argv)


def setup_diagnostics() -> TextIO:
    """Keep the original stderr (the supervisor logs it) for crash dumps and our logs.

    faulthandler's handlers chain to those installed before (a FatalSignalFlush's)."""
    diag_fd = os.dup(2)
    faulthandler.enable(file=diag_fd, all_threads=True)
    diag = open(  # noqa: SIM115 - lives as long as the process
        diag_fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
    )
    handler = logging.StreamHandler(diag)
    handler.setFormatter(
        logging.Formatter(f"kernelvisor-worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger("kernelvisor")
    root.addHandler(handler)
    root.propagate = False
    level_name = os.environ.get("KERNELVISOR_WORKER_LOG", "WARNING").upper()
    level = logging.getLevelName(level_name)
    root.setLevel(level if isinstance(level, int) else logging.WARNING)
    return diag


def read_token(fd: int | None) -> str:
    """The secret the supervisor passed in an inherited pipe; the fd is closed after."""
    if fd is None:
        return ""
    try:
        data = b""
        while chunk := os.read(fd, 256):
            data += chunk
        return data.decode("ascii").strip()
    finally:
        os.close(fd)


def check_ipc_version(theirs: int | None) -> None:
    """Exit, saying why, if the supervisor speaks another IPC version than this worker
    (a kernelvisor binary and a Python package from different builds)."""
    if theirs == IPC_VERSION:
        return
    said = "no IPC version" if theirs is None else f"IPC version {theirs}"
    sys.stderr.write(
        f"kernelvisor: this worker ({__file__}) speaks IPC version {IPC_VERSION}, and its "
        f"supervisor (the kernelvisor binary) passed {said}: the two come from different "
        "builds. Install them together (pip install kernelvisor, or scripts/install in a "
        "checkout).\n"
    )
    sys.stderr.flush()
    os._exit(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    token = read_token(args.token_fd)
    check_ipc_version(args.ipc_version)
    # Before faulthandler: a fatal signal dumps the stacks first, then flushes output.
    fatal_signals = FatalSignalFlush()
    fatal_signals.install()
    diag = setup_diagnostics()
    if args.template:
        from kernelvisor.template import run_template

        run_template(args.connect, args.worker_id, token, diag, fatal_signals, args.backend)
    try:
        worker = Worker.connect(
            args.connect, args.worker_id, diag, fatal_signals, args.backend, token
        )
    except OSError:
        log.exception("cannot connect to %s", args.connect)
        sys.exit(1)
    worker.start_capture()
    worker.start_shell()
    try:
        worker.connect_main()
    except OSError:
        log.exception("cannot connect to %s", args.connect)
        really_exit(1)
    log.info("worker %d ready (pid %d)", args.worker_id, os.getpid())
    worker.run()


if __name__ == "__main__":
    main()
