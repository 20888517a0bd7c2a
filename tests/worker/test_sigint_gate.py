"""The interrupt gate: which running cell a SIGINT (or a targeted interrupt) reaches, and
how: raised in the code that is executing, cancelled where it awaits."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from kernelvisor.cells import Cell
from kernelvisor.interrupts import AT_START_KEPT, SigintGate


def guarded(cell: Cell, body: Callable[[], None]) -> None:
    """Stands for the executor's frame around a cell's code (the gate's ``guard``)."""
    body()


@pytest.fixture
def gate() -> Iterator[SigintGate]:
    previous = signal.getsignal(signal.SIGINT)
    g = SigintGate()
    g.guard = guarded.__code__
    g.install()
    try:
        yield g
    finally:
        signal.signal(signal.SIGINT, previous)


def suspended(req_id: int, cancels: list[int]) -> Cell:
    """A main-thread cell waiting in an await: an interrupt cancels it."""
    cell = Cell(req_id, b"{}", False)
    cell.cancel = lambda: cancels.append(req_id)
    return cell


def test_idle_sigint_is_ignored(gate: SigintGate) -> None:
    signal.raise_signal(signal.SIGINT)


def test_sigint_raises_in_the_executing_cell(gate: SigintGate) -> None:
    cell = Cell(1, b"{}", False)
    with pytest.raises(KeyboardInterrupt), gate.running(cell):
        guarded(cell, lambda: signal.raise_signal(signal.SIGINT))
    assert cell.interrupted == "interrupt"
    signal.raise_signal(signal.SIGINT)  # no cell runs any more: ignored


def test_sigint_cancels_awaiting_cells_and_raises_in_the_executing_one(gate: SigintGate) -> None:
    cancels: list[int] = []
    waiting = suspended(2, cancels)
    running = Cell(3, b"{}", False)
    with gate.running(waiting), pytest.raises(KeyboardInterrupt), gate.running(running):
        guarded(running, lambda: signal.raise_signal(signal.SIGINT))
    assert cancels == [2]
    assert waiting.interrupted == running.interrupted == "interrupt"


def test_sigint_outside_any_cell_code_only_cancels(gate: SigintGate) -> None:
    cancels: list[int] = []
    with gate.running(suspended(4, cancels)):
        signal.raise_signal(signal.SIGINT)  # e.g. the event loop waiting: no raise here
    assert cancels == [4]


def test_hold_defers_until_the_block_ends(gate: SigintGate) -> None:
    cell = Cell(5, b"{}", False)
    reached = []

    def body() -> None:
        with gate.hold():
            signal.raise_signal(signal.SIGINT)
            reached.append("end of held block")
        reached.append("after")  # not reached: raised on leaving hold()

    with pytest.raises(KeyboardInterrupt), gate.running(cell):
        guarded(cell, body)
    assert reached == ["end of held block"]


def test_held_interrupt_is_dropped_when_the_cell_ended(gate: SigintGate) -> None:
    cell = Cell(6, b"{}", False)
    with gate.hold(), gate.running(cell):
        signal.raise_signal(signal.SIGINT)
        # the cell ended while the send was held: nothing left to interrupt
    assert cell.interrupted is None


def test_targeted_interrupt_reaches_only_its_cell(gate: SigintGate) -> None:
    cancels: list[int] = []
    other = suspended(7, cancels)
    target = suspended(8, cancels)
    with gate.running(other), gate.running(target):
        t = threading.Thread(target=gate.interrupt_cell, args=(8, 1.5))
        t.start()
        t.join()
        time.sleep(0.05)  # the signal is handled between two bytecodes of this thread
    assert cancels == [8]
    assert target.interrupted == 1.5 and other.interrupted is None
    assert isinstance(target.interrupt_error(KeyboardInterrupt()), TimeoutError)


def test_interrupt_raises_in_a_thread_cell_executing_code(gate: SigintGate) -> None:
    started = threading.Event()
    outcome: list[str] = []

    def thread_cell() -> None:
        cell = Cell(9, b"{}", False)

        def spin() -> None:
            started.set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # pure Python: interruptible
                pass
            outcome.append("not interrupted")

        try:
            with gate.running(cell):
                guarded(cell, spin)
        except KeyboardInterrupt:
            outcome.append("KeyboardInterrupt")

    t = threading.Thread(target=thread_cell)
    t.start()
    assert started.wait(5)
    signal.raise_signal(signal.SIGINT)
    t.join(10)
    assert outcome == ["KeyboardInterrupt"]


def test_interrupt_cancels_a_thread_cell_that_awaits(gate: SigintGate) -> None:
    cancels: list[int] = []
    cell = suspended(10, cancels)
    ready, done = threading.Event(), threading.Event()

    def thread_cell() -> None:
        cell.thread_ident = threading.get_ident()
        with gate.running(cell):
            ready.set()
            done.wait(5)  # not in the guard: stands for a loop waiting on the cell's await

    t = threading.Thread(target=thread_cell)
    t.start()
    assert ready.wait(5)
    signal.raise_signal(signal.SIGINT)
    done.set()
    t.join(5)
    assert cancels == [10]


def test_a_cell_not_yet_running_its_code_is_marked(gate: SigintGate) -> None:
    """Between its start and its code (nothing to raise in, nothing to cancel), a cell is
    marked; the executor ends it when it gets to its code."""
    cell = Cell(11, b"{}", False)
    with gate.running(cell):
        signal.raise_signal(signal.SIGINT)  # no raise: not in the guard
    assert cell.interrupted == "interrupt"


def test_an_interrupt_for_a_cell_not_started_stops_it_when_it_starts(gate: SigintGate) -> None:
    gate.interrupt_cell(20)  # the user's (no timeout): the cell is not here yet
    later = Cell(21, b"{}", False)
    with gate.running(later):
        assert later.interrupted is None, "another cell is not touched"
    target = Cell(20, b"{}", False)
    with gate.running(target):
        assert target.interrupted == "interrupt"
    again = Cell(20, b"{}", False)
    with gate.running(again):
        assert again.interrupted is None, "taken once"


def test_a_timeout_for_a_cell_not_running_is_dropped(gate: SigintGate) -> None:
    gate.interrupt_cell(22, 1.0)  # its timeout= tag: it has ended, nothing to remember
    cell = Cell(22, b"{}", False)
    with gate.running(cell):
        assert cell.interrupted is None


def test_interrupts_for_cells_that_never_start_are_not_kept_forever(gate: SigintGate) -> None:
    for req_id in range(1000, 1000 + AT_START_KEPT + 10):
        gate.interrupt_cell(req_id)  # ended already: they never start
    oldest, newest = Cell(1000, b"{}", False), Cell(1000 + AT_START_KEPT + 9, b"{}", False)
    with gate.running(oldest), gate.running(newest):
        assert oldest.interrupted is None, "pushed out"
        assert newest.interrupted == "interrupt"


def test_a_sigint_right_after_the_op_is_the_same_click(gate: SigintGate) -> None:
    """The supervisor's op first, VS Code's own SIGINT to the worker just after (one click
    that reached the kernel first): the second must not cut the clean-up short."""
    cell = Cell(30, b"{}", False)
    steps = []

    def body() -> None:
        try:
            gate.interrupt_cell(30)
            time.sleep(5)  # not reached: interrupted
        except KeyboardInterrupt:
            steps.append("caught")
            signal.raise_signal(signal.SIGINT)
            steps.append("clean-up ran to its end")

    with gate.running(cell):
        guarded(cell, body)
    assert steps == ["caught", "clean-up ran to its end"]
