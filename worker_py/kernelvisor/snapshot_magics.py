"""``%snapshot`` (state; ``on`` / ``off``) and ``%undo`` (roll the namespace back to the
snapshot taken before the last cell), also as ``%kernelvisor snapshot|undo``."""

from __future__ import annotations

import queue
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kernelvisor.wiring import Worker

UNDO_WAIT_SECONDS = 5.0


def _mib(n: Any) -> str:
    return f"{n / (1 << 20):.1f} MiB" if isinstance(n, int | float) else "?"


def describe(info: dict[str, Any]) -> str:
    """What ``%snapshot`` prints, from the supervisor's ``snapshot_info``."""
    if not info.get("enabled"):
        return "Snapshots are off (`%snapshot on` turns them on)."
    if not info.get("ready"):
        return f"Snapshots are on, but there is none now: {info.get('why_not') or 'not taken yet'}."
    lines = [
        "Snapshots are on.",
        f"The snapshot holds the namespace as it was before cell [{info.get('before_cell')}]"
        f" ({info.get('age_cells')} cell(s) and {info.get('age_seconds', 0):.1f} s ago).",
        f"Its private memory: {_mib(info.get('private_bytes'))}"
        + (
            f" (budget {_mib(info.get('memory_budget'))})"
            if info.get("memory_budget") is not None
            else ""
        )
        + f"; forking it took {info.get('fork_ms', 0):.1f} ms.",
        "A crash now restores it.",
    ]
    if info.get("undo_ready"):
        lines.append(
            f"`%undo` rolls back to before cell [{info.get('undo_before_cell')}]."
            " Files written, network calls and other processes are not undone."
        )
    return "\n".join(lines)


def register_magics(worker: Worker) -> None:
    shell = worker.shell

    def snapshot(line: str = "") -> None:
        """%snapshot [on|off]: show or switch forked snapshots (crash recovery, %undo)."""
        arg = line.strip().lower()
        if arg in ("on", "off"):
            worker.outbox.control({"op": "snapshot_policy", "enabled": arg == "on"})
            print(f"Snapshots are {arg}.")
            return
        if arg:
            print("usage: %snapshot [on|off]")
            return
        try:
            info = worker.snapshot_info()
        except queue.Empty:
            print("The supervisor did not answer.")
            return
        print(describe(info))

    def undo(line: str = "") -> None:
        """%undo: roll the namespace back to the snapshot taken before the last cell."""
        try:
            info = worker.snapshot_info()
        except queue.Empty:
            print("The supervisor did not answer; nothing was undone.")
            return
        if not info.get("undo_ready"):
            why = info.get("why_not") or "no snapshot from before the last cell"
            print(f"Nothing to undo: {why}.")
            return
        # The supervisor kills this worker and promotes the snapshot; this cell's reply
        # comes from it. Until then, wait.
        worker.outbox.control({"op": "undo"})
        deadline = time.monotonic() + UNDO_WAIT_SECONDS
        while time.monotonic() < deadline:
            time.sleep(0.05)
        print("The undo did not happen (the snapshot was dropped meanwhile).")

    def kernelvisor(line: str = "") -> None:
        """%kernelvisor snapshot [on|off] | undo"""
        word, _, rest = line.strip().partition(" ")
        if word == "snapshot":
            snapshot(rest)
        elif word == "undo":
            undo(rest)
        else:
            print("usage: %kernelvisor snapshot [on|off] | %kernelvisor undo")

    shell.register_magic_function(snapshot, "line", "snapshot")
    shell.register_magic_function(undo, "line", "undo")
    shell.register_magic_function(kernelvisor, "line", "kernelvisor")
