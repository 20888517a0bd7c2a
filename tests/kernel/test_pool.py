"""The worker pool (warm spares, the idle policy) and the lifecycle of the supervisor's processes:
restart, shutdown, and no orphans when the supervisor or its parent is killed."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from isolation_support import (
    all_worker_pids,
    assert_crashed,
    assert_healthy,
    assert_name_lost,
    assert_namespace_as_reported,
    describe,
    idle_workers,
    is_running,
    kill_pid,
    kv_info,
    kv_kernel,
    kv_snapshot_pid,
    kv_snapshot_pids,
    main_worker,
    settled,
    start_cell_marked,
    supervisor_pid,
    wait_dead,
    wait_pool,
    wait_until,
    zombie_children,
)
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from kvharness import STARTUP_TIMEOUT, Kernel, collect_iopub, execute, get_reply, result_text

EXIT_3 = "import os; os._exit(3)"
SLEEP_MARKED = 'import time\nprint("sleeping", flush=True)\ntime.sleep(30)'


def test_default_pool_keeps_no_spare_beside_the_template(kernel: Kernel) -> None:
    """The template forks a worker when one is needed: no warm spare is kept by default."""
    kc = kernel.kc
    sup = supervisor_pid(kernel)
    assert_healthy(kc)
    pool = wait_pool(kc, lambda p: settled(p, 0), "a main worker")
    assert pool["warm"] == 0
    assert pool["max_idle"] == 2
    assert pool["idle_shutdown_seconds"] == 60
    assert_stays(kc, idle=0)
    _, main_pid = main_worker(kc)
    assert_own_child_and_group(main_pid, sup)
    # And the template it was forked from (test_template.py).
    template_pid = pool["template"]["pid"]
    assert {c.pid for c in psutil.Process(sup).children()} == {main_pid, template_pid}


def test_one_warm_worker_is_kept_when_asked_for() -> None:
    with kv_kernel(warm_workers=1) as kernel:
        kc = kernel.kc
        pool = wait_pool(kc, lambda p: settled(p, 1), "a main and one idle worker")
        assert pool["warm"] == 1
        (idle_id, idle_pid), (main_id, main_pid) = idle_workers(pool)[0], main_worker(kc)
        assert idle_id != main_id and idle_pid != main_pid
        for pid in (main_pid, idle_pid):
            assert_own_child_and_group(pid, supervisor_pid(kernel))


def assert_own_child_and_group(pid: int, sup: int) -> None:
    """The worker is the supervisor's child, and leads its own process group (the client's
    group-wide SIGINT misses it). It does not inherit the supervisor's blocked signals
    (signals.rs): SIGINT interrupts its cells, SIGTERM and SIGCHLD work as usual."""
    assert psutil.Process(pid).ppid() == sup, f"worker {pid} is not the supervisor's child"
    assert os.getpgid(pid) == pid
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        assert not mask & (1 << (sig - 1)), f"worker {pid} blocks {sig.name}"


def test_crash_swaps_in_the_warm_worker_and_refills() -> None:
    """Without a snapshot to promote (snapshots off), the warm spare takes over."""
    with kv_kernel(snapshots="off", warm_workers=1) as kernel:
        crash_swaps_in_the_warm_worker(kernel)


def crash_swaps_in_the_warm_worker(kernel: Kernel) -> None:
    kc = kernel.kc
    execute(kc, "1")
    pool = wait_pool(kc, lambda p: settled(p, 1), "a main and one idle worker")
    old_main = main_worker(kc)
    [(spare_id, spare_pid)] = idle_workers(pool)

    reply, iopub = execute(kc, EXIT_3)
    assert_crashed(reply, iopub, "exit code 3")

    # The spare took over (no Python start-up)...
    assert main_worker(kc) == (spare_id, spare_pid)
    # ...and the pool refills behind it with a new worker.
    pool = wait_pool(kc, lambda p: settled(p, 1), "the pool refilled to one idle worker")
    [(new_id, new_pid)] = idle_workers(pool)
    assert new_id not in (old_main[0], spare_id)
    assert new_pid not in (old_main[1], spare_pid)
    assert not is_running(old_main[1])
    assert zombie_children(supervisor_pid(kernel)) == []
    assert_healthy(kc)
    assert main_worker(kc) == (spare_id, spare_pid)


def test_killed_idle_worker_is_replaced_silently() -> None:
    with kv_kernel(warm_workers=1) as kernel:
        kc = kernel.kc
        execute(kc, "survivor = 8")
        pool = wait_pool(kc, lambda p: settled(p, 1), "a main and one idle worker")
        main = main_worker(kc)
        [(spare_id, spare_pid)] = idle_workers(pool)

        kill_pid(spare_pid, signal.SIGKILL)

        pool = wait_pool(
            kc,
            lambda p: settled(p, 1) and p["idle"][0]["id"] != spare_id,
            "a new idle worker in place of the killed one",
        )
        assert main_worker(kc) == main
        assert not is_running(spare_pid)
        assert zombie_children(supervisor_pid(kernel)) == []
        # The main worker never noticed: no error, namespace intact.
        reply, iopub = execute(kc, "survivor")
        assert reply["content"]["status"] == "ok", describe(iopub)
        assert result_text(iopub) == "8"


def assert_stays(kc: BlockingKernelClient, idle: int, checks: int = 10) -> None:
    """The pool holds a main and exactly ``idle`` idle workers, with nothing starting, at each of
    several looks spread over a second or so."""
    for _ in range(checks):
        pool = kv_info(kc)
        assert pool["main"] is not None, pool
        assert len(pool["idle"]) == idle and not pool["starting"], pool
        time.sleep(0.1)


def test_max_idle_zero_keeps_no_spare() -> None:
    with kv_kernel(max_idle_pool_instances=0) as k:
        kc = k.kc
        assert_healthy(kc)
        pool = kv_info(kc)
        assert pool["max_idle"] == 0
        assert_stays(kc, idle=0)
        old_id, old_pid = main_worker(kc)

        reply, iopub = execute(kc, EXIT_3)
        assert_crashed(reply, iopub, "exit code 3")
        # No spare to swap in: the next cell waits for a fresh worker, and runs.
        assert_healthy(kc)
        new_id, new_pid = main_worker(kc)
        assert new_id > old_id and new_pid != old_pid
        assert_stays(kc, idle=0)


def test_warm_workers_are_kept_past_the_idle_duration() -> None:
    """IDLE_WORKER_SHUTDOWN_DURATION retires idle workers only down to --warm-workers: the one
    warm spare outlives the duration many times over."""
    with kv_kernel(idle_worker_shutdown_duration=1, warm_workers=1) as k:
        kc = k.kc
        assert_healthy(kc)
        pool = wait_pool(kc, lambda p: settled(p, 1), "a main and one idle worker")
        assert pool["idle_shutdown_seconds"] == 1
        [(spare_id, spare_pid)] = idle_workers(pool)
        pool = wait_pool(
            kc,
            lambda p: not p["idle"] or p["idle"][0]["idle_seconds"] > 3,
            "the spare idle for three times the duration",
        )
        assert idle_workers(pool) == [(spare_id, spare_pid)], pool
        assert not pool["retiring"], pool
        assert is_running(spare_pid)


def test_zero_warm_workers_keeps_no_idle_worker() -> None:
    """With --warm-workers 0 no spare is started; a crash costs a fork, nothing more."""
    with kv_kernel(warm_workers=0, idle_worker_shutdown_duration=1) as k:
        kc = k.kc
        execute(kc, "survivor = 1")
        assert kv_info(kc)["warm"] == 0
        assert_stays(kc, idle=0)
        old_id, _ = main_worker(kc)
        reply, iopub = execute(kc, EXIT_3)
        assert_crashed(reply, iopub, "exit code 3")
        assert_namespace_as_reported(kc, reply, "survivor")
        assert_healthy(kc)
        assert main_worker(kc)[0] > old_id
        assert_stays(kc, idle=0)


# ---- restart and shutdown ----


def test_restart_replaces_supervisor_and_workers() -> None:
    with kv_kernel(warm_workers=1) as k:
        km, kc = k.km, k.kc
        execute(kc, "survivor = 1")
        execute(kc, "2")
        wait_pool(kc, lambda p: settled(p, 1), "a main and one idle worker")
        old_sup = supervisor_pid(k)
        pool = kv_info(kc)
        template = int(pool["template"]["pid"])
        old_procs = [psutil.Process(old_sup), *psutil.Process(old_sup).children(recursive=True)]
        old_workers = all_worker_pids(pool)
        assert old_workers and old_workers <= {p.pid for p in old_procs}

        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=STARTUP_TIMEOUT)

        new_sup = supervisor_pid(k)
        assert new_sup != old_sup
        # Everything ends but the template, which the new supervisor takes over
        # (test_handover.py): it never ran a cell.
        old_procs = [p for p in old_procs if p.pid != template]
        _, alive = psutil.wait_procs(old_procs, timeout=15)
        assert not alive, f"left from before the restart: {[p.pid for p in alive]}"
        assert int(kv_info(kc)["template"]["pid"]) == template
        reply, iopub = execute(kc, "1+1")
        assert reply["content"]["status"] == "ok"
        assert reply["content"]["execution_count"] == 1, "execution count not reset"
        assert result_text(iopub) == "2"
        assert_name_lost(kc, "survivor")
        assert not all_worker_pids(kv_info(kc)) & (old_workers - {template}), "a worker kept"


def test_stale_shutdown_request_is_refused() -> None:
    """A shutdown_request dated before the supervisor started (one meant for the kernel it
    replaced) is refused in its first seconds; the kernel keeps running."""
    with kv_kernel() as k:
        kc = k.kc
        started = psutil.Process(supervisor_pid(k)).create_time()
        msg = kc.session.msg("shutdown_request", {"restart": False})
        msg["header"]["date"] = datetime.datetime.fromtimestamp(started - 60, datetime.UTC)
        kc.control_channel.send(msg)
        # Only in its first seconds does the supervisor trust our clock over its own.
        if time.time() - started > 4:
            pytest.skip("the kernel took too long to become ready to test the start-up guard")
        reply = get_reply(kc, msg["header"]["msg_id"], channel="control")
        assert reply["msg_type"] == "shutdown_reply"
        assert reply["content"]["status"] == "error", reply["content"]
        assert reply["content"]["ename"] == "StaleShutdown", reply["content"]
        assert k.km.is_alive()
        assert_healthy(kc)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_shutdown_leaves_no_worker(busy: bool) -> None:
    with kv_kernel(warm_workers=2) as k:
        kc = k.kc
        assert_healthy(kc)
        pool = wait_pool(kc, lambda p: settled(p, 2), "a main and two idle workers")
        sup = supervisor_pid(k)
        assert kv_snapshot_pid(kc) is not None

        def tree() -> set[int]:
            return {c.pid for c in psutil.Process(sup).children(True)}

        # Three workers, and the main worker's snapshots (its children), once none is
        # being forked.
        wait_until(
            lambda: tree() == all_worker_pids(pool) | kv_snapshot_pids(kc),
            "the process tree to be the workers and their snapshots",
        )
        pids = tree()
        if busy:
            start_cell_marked(kc, SLEEP_MARKED, "sleeping")
        k.km.shutdown_kernel(now=False)
        wait_dead({sup, *pids}, "the supervisor and its workers to exit")


@contextmanager
def direct_kernel(
    kv_bin: Path, tmp_path: Path, wrapped: bool
) -> Iterator[tuple[subprocess.Popen[bytes], int, BlockingKernelClient]]:
    """Launches ``kernelvisor -f`` without jupyter_client's manager: as our child, or (wrapped) as
    the child of a small Python parent process. Yields (our child, supervisor pid, client)."""
    conn_file, _ = write_connection_file(
        str(tmp_path / "conn.json"), ip="127.0.0.1", key=os.urandom(16).hex().encode()
    )
    cmd = [str(kv_bin), "-f", conn_file, "--python", sys.executable]
    parent_code = (
        "import subprocess, sys, time\nchild = subprocess.Popen(sys.argv[1:])\n"
        "print(child.pid, flush=True)\ntime.sleep(600)\n"
    )
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        if wrapped:
            proc = subprocess.Popen(
                [sys.executable, "-c", parent_code, *cmd],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
            assert proc.stdout is not None
            sup = int(proc.stdout.readline())
        else:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
            sup = proc.pid
    kc = BlockingKernelClient(connection_file=conn_file)
    kc.load_connection_file()
    kc.start_channels()
    known: set[int] = {sup}
    try:
        kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
        yield proc, sup, kc
    finally:
        kc.stop_channels()
        # Whatever the outcome, leave nothing running.
        try:
            known |= {c.pid for c in psutil.Process(sup).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        for pid in [proc.pid, *known]:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def collect_workers(kc: BlockingKernelClient, sup: int) -> set[int]:
    """Runs a cell, waits for the pool to settle, and returns every worker pid."""
    msg_id = kc.execute("1+1")
    assert get_reply(kc, msg_id)["content"]["status"] == "ok"
    collect_iopub(kc, msg_id)
    pool = wait_pool(kc, lambda p: settled(p, 0), "a main worker")
    assert kv_snapshot_pid(kc) is not None, "the snapshot before the first cell"

    def expected() -> set[int]:
        return all_worker_pids(pool) | kv_snapshot_pids(kc)

    # The snapshot from before the cell and the one taken once it was idle.
    wait_until(
        lambda: expected() == {c.pid for c in psutil.Process(sup).children(recursive=True)},
        "the process tree to be the workers and their snapshots",
    )
    pids = expected()
    # Main, the template and one or two snapshots.
    assert len(pids) in (3, 4), pids
    return pids


def test_killed_parent_takes_supervisor_and_workers(kv_bin: Path, tmp_path: Path) -> None:
    with direct_kernel(kv_bin, tmp_path, wrapped=True) as (parent, sup, kc):
        workers = collect_workers(kc, sup)
        assert psutil.Process(sup).ppid() == parent.pid

        parent.kill()
        parent.wait()

        wait_dead({sup, *workers}, "the supervisor and its workers to exit after their parent")


def test_killed_supervisor_takes_its_workers(kv_bin: Path, tmp_path: Path) -> None:
    with direct_kernel(kv_bin, tmp_path, wrapped=False) as (proc, sup, kc):
        workers = collect_workers(kc, sup)
        start_cell_marked(kc, SLEEP_MARKED, "sleeping")  # a busy one too

        proc.kill()
        proc.wait()

        wait_dead(workers, "the workers to die with the supervisor")
        wait_until(lambda: not is_running(sup), "the supervisor to be gone")


def _voluntary_switches(pids: list[int]) -> int:
    """Voluntary context switches so far of every thread of ``pids``: how often they slept
    and were woken."""
    total = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
    return total


def test_an_idle_kernel_stays_asleep() -> None:
    """With nothing in flight, the supervisor's watchdog looks once a second: the idle tree
    wakes about twice a second, not twenty times (a 100 ms tick, which it keeps while
    anything is in motion). ipykernel wakes about once a second here. The client's
    heartbeat is paused, so that its pings do not count."""
    with kv_kernel() as kernel:
        kc = kernel.kc
        assert_healthy(kc)
        pool = wait_pool(kc, lambda p: settled(p, 0), "a settled pool")
        wait_until(lambda: kv_snapshot_pid(kc) is not None, "the idle snapshot")
        pids = [supervisor_pid(kernel), *all_worker_pids(pool), *kv_snapshot_pids(kc)]
        kc.hb_channel.pause()
        time.sleep(1.5)  # the last request's reply, then IDLE_TICK's first second
        before = _voluntary_switches(pids)
        time.sleep(4.0)
        rate = (_voluntary_switches(pids) - before) / 4.0
        kc.hb_channel.unpause()
        assert rate <= 5.0, f"the idle kernel woke {rate:.1f} times a second"
        assert_healthy(kc)
