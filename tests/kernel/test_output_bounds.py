"""Output floods stay bounded in memory (issue 9): a cell that prints 1 GB, read by a prompt
client or by one that stops reading IOPub for 20 s, keeps the kernel's process tree (supervisor
and workers) within 256 MB of its memory before the cell, every byte arrives in order, and
control, heartbeat, the worker's aux connection, `# process` cells and other subshells' cells
answer while the output is stalled.

The tree's memory is its processes' PSS (proportional set size: a page shared by n processes
counts 1/n in each), not the sum of their RSS: workers forked from the template, and the
snapshot forked after a cell, share most of their pages, which RSS would count once per
process (a snapshot forked right after the flood's reply added its worker's whole RSS again).
The RSS sum is printed too."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest
import zmq
from isolation_support import kv_info, settled, supervisor_pid, wait_pool
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.session import Session
from kvharness import Kernel, Msg, get_reply, is_idle, parent_id, running_kernel, send_execute

MB = 1 << 20
# What the whole tree may grow by while the flood runs (the target).
BUDGET = 256 * MB
LINE = 500_000
LINES = 2000
FLOOD = f"for i in range({LINES}): print('x' * {LINE})"
# The same bytes written below Python, to fd 1 (as C code and subprocesses write).
FD_FLOOD = f"import os\nfor i in range({LINES}): os.write(1, b'x' * {LINE} + b'\\n')"
STALL = 20.0
# Generous: reading 1 GB of JSON through jupyter_client takes a while on a loaded 2-core box.
FLOOD_TIMEOUT = 600.0


def tree_memory(pid: int) -> tuple[int, int]:
    """PSS and RSS bytes of a process and all its descendants (what has exited counts 0)."""
    pss = rss = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for proc in procs:
        try:
            info = proc.memory_full_info()  # smaps_rollup: cheap
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss += info.pss
        rss += info.rss
    return pss, rss


def tree_pss(pid: int) -> int:
    return tree_memory(pid)[0]


class PeakRss:
    """Samples the tree's memory every 20 ms in a thread; ``peak`` is the largest PSS,
    ``rss_peak - rss_first`` how far the RSS sum grew."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.peak = 0
        self.rss_first: int | None = None
        self.rss_peak = 0
        self.supervisor_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pss, rss = tree_memory(self._pid)
            self.peak = max(self.peak, pss)
            if self.rss_first is None:
                self.rss_first = rss
            self.rss_peak = max(self.rss_peak, rss)
            try:
                self.supervisor_peak = max(
                    self.supervisor_peak, psutil.Process(self._pid).memory_info().rss
                )
            except psutil.NoSuchProcess:
                pass
            self._stop.wait(0.02)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def peak_rss(pid: int) -> Iterator[PeakRss]:
    """Samples the tree of ``pid`` while the block runs."""
    sampler = PeakRss(pid)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


class FloodText:
    """Checks the flood's stdout as it arrives, without keeping it: each chunk must continue
    ``('x' * LINE + '\\n') * LINES`` where the previous one stopped."""

    PERIOD = "x" * LINE + "\n"

    def __init__(self) -> None:
        self.chars = 0

    def feed(self, text: str) -> None:
        offset = self.chars % len(self.PERIOD)
        reps = (offset + len(text)) // len(self.PERIOD) + 1
        expected = (self.PERIOD * reps)[offset : offset + len(text)]
        assert text == expected, f"stdout differs from the flood's text at char {self.chars}"
        self.chars += len(text)

    @property
    def complete(self) -> bool:
        return self.chars == LINES * len(self.PERIOD)


@contextmanager
def own_client(kernel: Kernel, rcvhwm: int | None = None) -> Iterator[BlockingKernelClient]:
    """A client of ``kernel`` with its own zmq context (IOPub's receive queue limited to
    ``rcvhwm`` messages, if given), replacing the fixture's client: a second subscriber that
    nobody reads would hold the output up."""
    kernel.kc.stop_channels()
    ctx = zmq.Context()
    if rcvhwm is not None:
        # Context options apply to sockets created afterwards, before they connect.
        ctx.setsockopt(zmq.RCVHWM, rcvhwm)
    # A new session: the kernel's ROUTERs may still hold the old client's identity.
    session = Session(
        key=kernel.km.session.key, signature_scheme=kernel.km.session.signature_scheme
    )
    kc = kernel.km.client(context=ctx, session=session)
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield kc
    finally:
        kc.stop_channels()
        ctx.destroy(linger=0)


def baseline(kernel: Kernel, kc: BlockingKernelClient) -> int:
    """The tree's PSS once the pool has settled (the main worker, no spare)."""
    wait_pool(kc, lambda p: settled(p, 0), "a main worker")
    time.sleep(0.5)
    return tree_pss(supervisor_pid(kernel))


def read_flood(kc: BlockingKernelClient, msg_id: str, text: FloodText) -> list[Msg]:
    """Reads IOPub until the flood cell is idle, checking its stdout; returns its other
    messages."""
    others: list[Msg] = []
    deadline = time.monotonic() + FLOOD_TIMEOUT
    while True:
        assert time.monotonic() < deadline, f"flood unfinished: {text.chars} chars so far"
        try:
            msg = kc.get_iopub_msg(timeout=5)
        except queue.Empty:
            continue
        if parent_id(msg) != msg_id:
            continue
        if msg["msg_type"] == "stream":
            assert msg["content"]["name"] == "stdout", msg["content"]["name"]
            text.feed(msg["content"]["text"])
            continue
        others.append(msg)
        if is_idle(msg):
            return others


@pytest.mark.parametrize(
    "code",
    [FLOOD, FD_FLOOD],
    ids=["print", "fd"],
)
def test_flood_with_a_prompt_reader_is_bounded(code: str) -> None:
    with running_kernel("kernelvisor") as kernel, own_client(kernel) as kc:
        base = baseline(kernel, kc)
        text = FloodText()
        with peak_rss(supervisor_pid(kernel)) as rss:
            msg_id = kc.execute(code)
            others = read_flood(kc, msg_id, text)
            reply = get_reply(kc, msg_id, timeout=FLOOD_TIMEOUT)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert text.complete, f"{text.chars} chars arrived"
        assert [m["msg_type"] for m in others] == ["status", "execute_input", "status"]
        grew = rss.peak - base
        print(
            f"prompt reader: baseline {base / MB:.0f} MB, peak +{grew / MB:.0f} MB"
            f" (supervisor alone {rss.supervisor_peak / MB:.0f} MB;"
            f" RSS sum +{(rss.rss_peak - (rss.rss_first or 0)) / MB:.0f} MB)"
        )
        assert grew <= BUDGET, f"the tree grew by {grew / MB:.0f} MB (limit {BUDGET / MB:.0f})"


def test_flood_with_a_stalled_reader_is_bounded_and_the_kernel_answers() -> None:
    with running_kernel("kernelvisor") as kernel, own_client(kernel, rcvhwm=1) as kc:
        base = baseline(kernel, kc)
        text = FloodText()
        with peak_rss(supervisor_pid(kernel)) as rss:
            msg_id = kc.execute(FLOOD)
            stalled_until = time.monotonic() + STALL
            # Meanwhile, with nobody reading IOPub: control, heartbeat and the worker's aux
            # connection (completion) answer.
            time.sleep(2)
            while time.monotonic() < stalled_until - 3:
                t0 = time.monotonic()
                info = kc.session.msg("kernel_info_request", {})
                kc.control_channel.send(info)
                get_reply(kc, info["header"]["msg_id"], timeout=5, channel="control")
                complete = kc.complete("impo", 4)
                assert get_reply(kc, complete, timeout=5)["content"]["matches"] == ["import"]
                assert kv_info(kc, timeout=5)["main"] is not None
                assert kc.hb_channel.is_beating()
                assert time.monotonic() - t0 < 5
                time.sleep(1)
            # A `# process` cell runs in another worker, whose connection is read apart.
            process = kc.execute("# process\n1 + 1")
            assert get_reply(kc, process, timeout=30)["content"]["status"] == "ok"
            # The cell is still running: its output waits for the reader.
            assert not kc.shell_channel.msg_ready(), "the flood cell finished while stalled"
            time.sleep(max(0.0, stalled_until - time.monotonic()))
            stalled_peak = rss.peak
            others = read_flood(kc, msg_id, text)
            reply = get_reply(kc, msg_id, timeout=FLOOD_TIMEOUT)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert text.complete, f"{text.chars} chars arrived"
        assert [m["msg_type"] for m in others] == ["status", "execute_input", "status"]
        grew = rss.peak - base
        print(
            f"stalled reader: baseline {base / MB:.0f} MB, peak +{(stalled_peak - base) / MB:.0f}"
            f" MB while stalled, +{grew / MB:.0f} MB overall"
            f" (supervisor alone {rss.supervisor_peak / MB:.0f} MB;"
            f" RSS sum +{(rss.rss_peak - (rss.rss_first or 0)) / MB:.0f} MB)"
        )
        assert grew <= BUDGET, f"the tree grew by {grew / MB:.0f} MB (limit {BUDGET / MB:.0f})"


def test_streams_and_displays_keep_their_order_in_a_flood() -> None:
    """Prints and displays interleaved, each print larger than what a message carries:
    they arrive in the order the cell made them."""
    n = 100
    code = f"for i in range({n}):\n    print('x' * {LINE})\n    display(i)"
    with running_kernel("kernelvisor") as kernel, own_client(kernel) as kc:
        base = baseline(kernel, kc)
        with peak_rss(supervisor_pid(kernel)) as rss:
            msg_id = kc.execute(code)
            seen: list[str] = []
            chars = 0
            deadline = time.monotonic() + FLOOD_TIMEOUT
            while True:
                assert time.monotonic() < deadline
                msg = kc.get_iopub_msg(timeout=FLOOD_TIMEOUT)
                if parent_id(msg) != msg_id:
                    continue
                if msg["msg_type"] == "stream":
                    chars += len(msg["content"]["text"])
                    if chars % (LINE + 1) == 0:
                        seen.append("line")
                elif msg["msg_type"] == "display_data":
                    assert chars % (LINE + 1) == 0, "a display arrived inside a print"
                    seen.append(msg["content"]["data"]["text/plain"])
                if is_idle(msg):
                    break
        assert seen == [x for i in range(n) for x in ("line", str(i))]
        assert rss.peak - base <= BUDGET


def test_an_interrupt_stops_a_cell_waiting_on_a_stalled_reader() -> None:
    """A cell blocked in ``print`` (its output waiting for a client that does not read) is
    interrupted as any cell is; once the client reads, its output and its KeyboardInterrupt
    arrive, in order."""
    with running_kernel("kernelvisor") as kernel, own_client(kernel, rcvhwm=1) as kc:
        msg_id = kc.execute("while True:\n    print('y' * 100_000)")
        time.sleep(5)  # long enough to fill every buffer on the way
        interrupt = kc.session.msg("interrupt_request", {})
        kc.control_channel.send(interrupt)
        get_reply(kc, interrupt["header"]["msg_id"], timeout=10, channel="control")
        chars = 0
        seen: list[str] = []
        deadline = time.monotonic() + FLOOD_TIMEOUT
        while True:
            assert time.monotonic() < deadline
            msg = kc.get_iopub_msg(timeout=60)
            if parent_id(msg) != msg_id:
                continue
            if msg["msg_type"] == "stream":
                assert msg["content"]["name"] == "stdout"
                assert set(msg["content"]["text"]) <= {"y", "\n"}
                chars += len(msg["content"]["text"])
                continue
            seen.append(msg["msg_type"])
            if is_idle(msg):
                break
        assert seen == ["status", "execute_input", "error", "status"], seen
        reply = get_reply(kc, msg_id, timeout=60)
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
        # Whole lines, but for the last one's newline if the interrupt came between
        # print's two writes.
        assert chars > 0 and chars % 100_001 in (0, 100_000), chars


def _subshell(kc: BlockingKernelClient) -> str:
    """A new subshell's id (JEP 91, over control)."""
    msg = kc.session.msg("create_subshell_request", {})
    kc.control_channel.send(msg)
    reply = get_reply(kc, msg["header"]["msg_id"], timeout=10, channel="control")
    assert reply["content"]["status"] == "ok", reply["content"]
    return str(reply["content"]["subshell_id"])


def _shell_reply(kc: BlockingKernelClient, msg_id: str, others: list[Msg], timeout: float) -> Msg:
    """The reply to ``msg_id``; replies to other requests that come first go to ``others``."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no reply to {msg_id} in {timeout}s"
        try:
            msg = kc.get_shell_msg(timeout=remaining)
        except queue.Empty:
            continue
        if parent_id(msg) == msg_id:
            return msg
        others.append(msg)


def test_other_subshells_answer_while_a_flood_waits_for_a_stalled_reader() -> None:
    """Subshell A floods a client that does not read IOPub. Output credit is per request, so
    cells of subshell B and of the main shell, in the same worker, still run and get their
    replies within seconds (their output waits its turn on IOPub, as A's does). Once the
    client reads, every byte of A's output arrives in order, each cell's output comes whole,
    and memory stays within the budget throughout."""
    with running_kernel("kernelvisor") as kernel, own_client(kernel, rcvhwm=1) as kc:
        flooder, other = _subshell(kc), _subshell(kc)
        base = baseline(kernel, kc)
        text = FloodText()
        replies: list[Msg] = []
        with peak_rss(supervisor_pid(kernel)) as rss:
            flood = send_execute(kc, FLOOD, subshell_id=flooder)
            time.sleep(5)  # long enough to fill every buffer on the way
            small: list[tuple[str, int]] = []
            for i in range(3):
                t0 = time.monotonic()
                msg_id = send_execute(kc, f"{i} + 1", subshell_id=other)
                reply = _shell_reply(kc, msg_id, replies, timeout=30)
                took = time.monotonic() - t0
                assert reply["content"]["status"] == "ok", reply["content"]
                assert took < 5, f"a cell of another subshell took {took:.1f} s"
                small.append((msg_id, i + 1))
            t0 = time.monotonic()
            main_cell = send_execute(kc, "40 + 2")
            reply = _shell_reply(kc, main_cell, replies, timeout=30)
            assert reply["content"]["status"] == "ok", reply["content"]
            assert time.monotonic() - t0 < 5, "a main-shell cell waited for the flood"
            small.append((main_cell, 42))
            assert not replies, "the flood cell finished while nobody read its output"
            stalled_peak = rss.peak
            # Now read: each cell's messages in order, the flood's text whole.
            others: dict[str, list[str]] = {msg_id: [] for msg_id, _ in small}
            results: dict[str, str] = {}
            flood_msgs: list[str] = []
            deadline = time.monotonic() + FLOOD_TIMEOUT
            flood_idle = False
            while not (flood_idle and all(kinds[-1:] == ["idle"] for kinds in others.values())):
                assert time.monotonic() < deadline, f"unfinished: {text.chars} chars of the flood"
                try:
                    msg = kc.get_iopub_msg(timeout=5)
                except queue.Empty:
                    continue
                parent = parent_id(msg)
                kind = msg["msg_type"]
                if kind == "status":
                    kind = msg["content"]["execution_state"]
                if parent == flood:
                    if kind == "stream":
                        text.feed(msg["content"]["text"])
                    else:
                        flood_msgs.append(kind)
                        flood_idle = kind == "idle"
                elif parent in others:
                    others[parent].append(kind)
                    if kind == "execute_result":
                        results[parent] = msg["content"]["data"]["text/plain"]
            reply = _shell_reply(kc, flood, replies, timeout=FLOOD_TIMEOUT)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert text.complete, f"{text.chars} chars arrived"
        assert flood_msgs == ["busy", "execute_input", "idle"], flood_msgs
        for msg_id, value in small:
            assert others[msg_id] == ["busy", "execute_input", "execute_result", "idle"]
            assert results[msg_id] == str(value)
        grew = rss.peak - base
        print(
            f"stalled reader, other subshells: baseline {base / MB:.0f} MB, peak"
            f" +{(stalled_peak - base) / MB:.0f} MB while stalled, +{grew / MB:.0f} MB overall"
            f" (supervisor alone {rss.supervisor_peak / MB:.0f} MB;"
            f" RSS sum +{(rss.rss_peak - (rss.rss_first or 0)) / MB:.0f} MB)"
        )
        assert grew <= BUDGET, f"the tree grew by {grew / MB:.0f} MB (limit {BUDGET / MB:.0f})"
