"""The template (README "How it works"): workers are forked from one warm process that never runs
a cell, so they share its pages; a crash without a snapshot and a `# process` cell get forked
workers; the template's own death costs nothing but a new template."""

from __future__ import annotations

import os

import psutil
from isolation_support import (
    assert_crashed,
    assert_healthy,
    assert_name_lost,
    idle_workers,
    kill_pid,
    kv_info,
    kv_kernel,
    main_worker,
    settled,
    supervisor_pid,
    wait_dead,
    wait_pool,
)
from kvharness import cell_stdout, collect_requests, execute, result_text, stream_text

MB = 2**20


def private_share(pid: int) -> float:
    """The part of a process's resident memory that no other process maps (USS / RSS)."""
    mem = psutil.Process(pid).memory_full_info()
    return float(mem.uss / mem.rss)


def test_workers_are_forked_from_the_template_and_share_its_pages() -> None:
    # No snapshot: its pages would be shared with the main worker whatever the template does.
    with kv_kernel(snapshots="off", warm_workers=1) as kernel:
        kc = kernel.kc
        sup = supervisor_pid(kernel)
        assert_healthy(kc)
        pool = wait_pool(kc, lambda p: settled(p, 1), "a main and one idle worker")
        template = int(pool["template"]["pid"])
        [(_, spare)] = idle_workers(pool)
        _, main = main_worker(kc)
        for pid in (main, spare, template):
            # The supervisor's children, each leading its own process group.
            assert psutil.Process(pid).ppid() == sup
            assert os.getpgid(pid) == pid
        # Forked after IPython was imported: most of each worker's memory is the template's
        # pages, mapped by the template and the other worker too. (A spawned worker's own
        # share is about two thirds of its RSS: only libraries' code pages are shared.)
        # The main worker is forked before the template's last warm-up (a first traceback:
        # the client waits for the main worker), so less of its memory is the template's.
        for pid, most in ((main, 0.5), (spare, 0.35)):
            share = private_share(pid)
            assert share < most, f"worker {pid} owns {share:.0%} of its resident memory"
        # Its memory as a whole is counted about once: summed PSS well under summed RSS.
        procs = [psutil.Process(p).memory_full_info() for p in (main, spare, template)]
        pss, rss = sum(m.pss for m in procs), sum(m.rss for m in procs)
        assert pss < 0.6 * rss, (pss / MB, rss / MB)


def test_a_crash_without_snapshot_and_process_cells_get_forked_workers() -> None:
    with kv_kernel(snapshots="off") as kernel:
        kc = kernel.kc
        execute(kc, "x = 1")
        pool = wait_pool(kc, lambda p: settled(p, 0), "a main worker")
        template = int(pool["template"]["pid"])
        _, old_main = main_worker(kc)

        reply, iopub = execute(kc, "import os; os._exit(3)")
        assert_crashed(reply, iopub, "exit code 3", restored=False)
        assert_name_lost(kc, "x")
        assert_healthy(kc)
        pool = wait_pool(kc, lambda p: settled(p, 0), "a new main worker")
        assert int(pool["template"]["pid"]) == template, "the template runs no cell, so lives on"
        _, main = main_worker(kc)
        assert main != old_main
        # No spare was waiting (the default beside a template): the replacement was forked
        # for the crash and shares the template's pages (as the main worker, it came before
        # the template's last warm-up: a spawned worker owns two thirds of its memory).
        assert psutil.Process(main).ppid() == supervisor_pid(kernel)
        assert private_share(main) < 0.5, "the replacement is forked too"

        cell = kc.execute("# process\nimport os; print(os.getpid(), 'x' in globals())")
        pid, sees_x = cell_stdout(collect_requests(kc, [cell])[cell]).split()
        assert sees_x == "False" and int(pid) not in (main, template)
        # Two at once: the second is forked for it.
        cells = [kc.execute("# process\nimport time; time.sleep(0.5); 6*7") for _ in range(2)]
        done = collect_requests(kc, cells)
        assert [done[c]["reply"]["status"] for c in cells] == ["ok", "ok"], done
        assert result_text(execute(kc, "2+3")[1]) == "5"


def test_a_dead_template_is_replaced_and_workers_carry_on() -> None:
    with kv_kernel(snapshots="off") as kernel:
        kc = kernel.kc
        execute(kc, "y = 5")
        pool = wait_pool(kc, lambda p: settled(p, 0), "a main worker")
        old = int(pool["template"]["pid"])
        _, main = main_worker(kc)

        kill_pid(old)
        wait_dead({old}, "the template to die")
        pool = wait_pool(
            kc,
            lambda p: p.get("template") is not None and int(p["template"]["pid"]) != old,
            "a new template",
        )
        # The namespace was never the template's.
        assert result_text(execute(kc, "y")[1]) == "5"
        assert main_worker(kc)[1] == main
        # And the new template forks: a crash is recovered with a worker it forked.
        reply, iopub = execute(kc, "import os; os._exit(4)")
        assert_crashed(reply, iopub, "exit code 4", restored=False)
        assert_healthy(kc)
        wait_pool(kc, lambda p: settled(p, 0), "a main worker")
        assert kv_info(kc)["template"]["pid"] == pool["template"]["pid"]


def test_template_off_spawns_each_worker() -> None:
    with kv_kernel(template="off", snapshots="off") as kernel:
        kc = kernel.kc
        # Without a template, one spare is kept by default: a start-up takes ~300 ms.
        pool = wait_pool(kc, lambda p: settled(p, 1), "a main and one idle worker")
        assert pool["template"] is None and pool["warm"] == 1
        [(_, spare)] = idle_workers(pool)
        # Started on its own: most of its memory is its own.
        assert private_share(spare) > 0.35
        reply, iopub = execute(kc, "import os; os._exit(5)")
        assert_crashed(reply, iopub, "exit code 5", restored=False)
        assert_healthy(kc)


TRACEBACKS_WARM = (
    "import sys\nfrom kernelvisor import tracebacks\n"
    "print('stack_data.core' in sys.modules, tracebacks._lexer_class is not None)"
)


def test_later_workers_come_with_tracebacks_warm() -> None:
    """Once it has forked a second worker, the template formats one traceback, so the
    workers after it (`# process` cells', a crash's replacement) do not import stack_data
    and pygments and compile the Python lexer on their first interrupt or error (~100 ms).
    The first two and spawned workers leave that to their first traceback: most kernels
    fork no second worker, and their idle tree would carry the warm-up's ~9 MB for
    nothing."""
    for template, third in (("on", "True"), ("off", "False")):
        with kv_kernel(template=template, snapshots="off") as kernel:
            kc = kernel.kc
            spares = 0 if template == "on" else 1
            wait_pool(kc, lambda p, spares=spares: settled(p, spares), "a settled pool")
            # The main worker, then the second worker (a `# process` cell's, kept idle).
            for where in ("", "# process\n"):
                reply, iopub = execute(kc, where + TRACEBACKS_WARM)
                assert stream_text(iopub) == "False False\n", (template, where, reply["content"])
            # Two `# process` cells at once: one takes the idle second worker, the other
            # gets a third.
            slow = "# process\nimport time; time.sleep(0.5)\n" + TRACEBACKS_WARM
            cells = [kc.execute(slow) for _ in range(2)]
            done = collect_requests(kc, cells)
            seen = sorted(cell_stdout(done[c]) for c in cells)
            assert seen == sorted(["False False\n", f"{third} {third}\n"]), (template, seen)


# The inodes of the sockets that wake this worker's main loop: its self-pipe (other threads'
# call_soon_threadsafe) and its signal wake-up socket.
WAKE_SOCKETS = (
    "import asyncio, os, signal\n"
    "loop = asyncio.get_running_loop()\n"
    "fd = signal.set_wakeup_fd(-1)\n"
    "signal.set_wakeup_fd(fd, warn_on_full_buffer=False)\n"
    "print(os.fstat(loop._ssock.fileno()).st_ino, os.fstat(fd).st_ino)"
)


def test_sibling_workers_do_not_share_what_wakes_their_loops() -> None:
    """Workers forked from one template inherit its descriptors. A self-pipe shared by two
    workers' loops lets one swallow the other's wake-ups: a trio cell, woken by trio's I/O
    thread that way, hung for good when the spare read the byte."""
    with kv_kernel() as kernel:
        kc = kernel.kc
        assert_healthy(kc)
        wait_pool(kc, lambda p: settled(p, 0), "a main worker")
        main = set(stream_text(execute(kc, WAKE_SOCKETS)[1]).split())
        borrowed = set(stream_text(execute(kc, "# process\n" + WAKE_SOCKETS)[1]).split())
        assert len(main) == 2 and len(borrowed) == 2, (main, borrowed)
        assert not main & borrowed, (main, borrowed)
