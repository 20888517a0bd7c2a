from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import pytest
from kernelvisor.interrupts import SigintGate


@pytest.fixture
def gate() -> Iterator[SigintGate]:
    previous = signal.getsignal(signal.SIGINT)
    g = SigintGate()
    g.install()
    try:
        yield g
    finally:
        signal.signal(signal.SIGINT, previous)


def test_idle_sigint_is_ignored(gate: SigintGate) -> None:
    signal.raise_signal(signal.SIGINT)


def test_raising_turns_sigint_into_keyboard_interrupt(gate: SigintGate) -> None:
    with pytest.raises(KeyboardInterrupt), gate.raising():
        signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGINT)  # disarmed again


def test_hold_defers_until_the_block_ends(gate: SigintGate) -> None:
    reached = []
    with pytest.raises(KeyboardInterrupt), gate.raising():
        with gate.hold():
            signal.raise_signal(signal.SIGINT)
            reached.append("end of held block")
        reached.append("after")  # not reached: raised on leaving hold()
    assert reached == ["end of held block"]


def test_pending_interrupt_is_dropped_when_disarmed(gate: SigintGate) -> None:
    with gate.raising(), gate.hold():
        signal.raise_signal(signal.SIGINT)
        gate._action = None  # the cell ended while the send was held
    signal.raise_signal(signal.SIGINT)


def test_calling_invokes_action(gate: SigintGate) -> None:
    calls = []
    with gate.calling(lambda frame: calls.append(frame is not None)):
        signal.raise_signal(signal.SIGINT)
    assert calls == [True]


def test_other_threads_cannot_arm(gate: SigintGate) -> None:
    def arm_elsewhere() -> None:
        with gate.raising():
            done.wait(5)

    done = threading.Event()
    t = threading.Thread(target=arm_elsewhere)
    t.start()
    try:
        signal.raise_signal(signal.SIGINT)  # main thread not armed: ignored
    finally:
        done.set()
        t.join()
