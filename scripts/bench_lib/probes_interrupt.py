"""Interrupt rows: a running `time.sleep(30)` cell → its KeyboardInterrupt reply, by SIGINT to
the kernel's process group (what jupyter_client does for interrupt_mode "signal") and by an
interrupt_request on the control channel."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from bench_lib.kernels import (
    Launched,
    Opts,
    exit_status,
    launched,
    median,
    ms,
    run_ok,
    send_cell,
    wait_reply_or_death,
    wait_started,
)
from bench_lib.table import Row, Value, at_most, probe, section

INTERRUPT = section("interrupt", "a sleeping cell → its KeyboardInterrupt reply")


def by_signal(k: Launched) -> None:
    os.killpg(os.getpgid(k.pid), signal.SIGINT)


def by_request(k: Launched) -> None:
    k.kc.control_channel.send(k.kc.session.msg("interrupt_request", {}))


def interrupt_times(k: Launched, runs: int, interrupt: Callable[[Launched], None]) -> list[float]:
    """ms from the interrupt to the reply, `runs` times."""
    run_ok(k, "import time")
    times = []
    for _ in range(runs):
        cell = send_cell(k, "time.sleep(30)")
        # Interrupt once the cell is surely running (its execute_input came back).
        wait_started(k, cell)
        time.sleep(0.05)
        t0 = time.perf_counter()
        interrupt(k)
        try:
            if not wait_reply_or_death(k, cell, timeout=10):
                raise RuntimeError(f"the kernel died on it ({exit_status(k)})")
        except TimeoutError:
            raise RuntimeError("no reply within 10 s: not interrupted") from None
        assert cell.reply is not None
        content = cell.reply["content"]
        if content.get("ename") != "KeyboardInterrupt":
            raise RuntimeError(f"reply {content['status']} {content.get('ename', '')}")
        times.append(ms(cell.t_reply - t0))
    return times


@probe(
    INTERRUPT,
    Row(
        "interrupt",
        "SIGINT to the process group → KeyboardInterrupt reply (ms, median)",
        targets=(at_most(1),),
    ),
)
def probe_interrupt_signal(kernel: str, opts: Opts) -> dict[str, Value]:
    with launched(kernel) as k:
        return {"interrupt": median(interrupt_times(k, opts.runs(3, 9), by_signal))}


@probe(
    INTERRUPT,
    Row(
        "interrupt_request",
        "interrupt_request → KeyboardInterrupt reply (ms, median)",
        targets=(at_most(1),),
    ),
)
def probe_interrupt_request(kernel: str, opts: Opts) -> dict[str, Value]:
    with launched(kernel) as k:
        return {"interrupt_request": median(interrupt_times(k, opts.runs(3, 9), by_request))}
