"""A restart hands the template over (README "Restart"): jupyter_client's restart_kernel()
starts a new supervisor, which takes over the warm template the old one left, so its first
worker is a fork away. The namespace is still new; crashes, snapshots and interrupts work
as before; a template that cannot serve the new kernel, or that nobody takes over, exits;
only the kernel's user may take it over."""

from __future__ import annotations

import os
import socket
import time

import psutil
import pytest
from isolation_support import (
    all_worker_pids,
    assert_crashed,
    assert_healthy,
    assert_name_lost,
    is_running,
    kv_env,
    kv_info,
    kv_kernel,
    kv_snapshot_pid,
    main_worker,
    settled,
    supervisor_pid,
    wait_dead,
    wait_pool,
    wait_until,
)
from kvharness import STARTUP_TIMEOUT, Kernel, execute, get_reply, result_text, running_kernel

SEGFAULT = "import ctypes; ctypes.string_at(0)"


def template_pid(kernel: Kernel) -> int:
    pool = wait_pool(kernel.kc, lambda p: p.get("template") is not None, "a template")
    return int(pool["template"]["pid"])


def restart(kernel: Kernel, **launch: object) -> None:
    """What a frontend's restart does: a shutdown_request with restart, then a new kernel."""
    kernel.km.restart_kernel(now=False, **launch)
    kernel.kc.wait_for_ready(timeout=STARTUP_TIMEOUT)


def rendezvous_names() -> set[str]:
    """The abstract sockets where outliving templates wait (``/proc/net/unix``)."""
    with open("/proc/net/unix") as f:
        return {
            line.split()[-1][1:]
            for line in f
            if line.split()[-1].startswith("@kernelvisor-handover-")
        }


def test_a_restart_hands_the_template_over_and_starts_a_new_namespace() -> None:
    # A spare too: the old supervisor's workers, all of them, end.
    with kv_kernel(warm_workers=1) as kernel:
        kc = kernel.kc
        execute(kc, "survivor = 1")
        wait_pool(kc, lambda p: settled(p, 1), "a main and one idle worker")
        template = template_pid(kernel)
        old_sup = supervisor_pid(kernel)
        old_workers = all_worker_pids(kv_info(kc)) - {template}

        restart(kernel)

        new_sup = supervisor_pid(kernel)
        assert new_sup != old_sup
        assert template_pid(kernel) == template, "the template was not taken over"
        assert psutil.Process(template).ppid() != new_sup, "its parent is gone, not us"
        wait_dead(old_workers, "the old supervisor's workers")
        reply, iopub = execute(kc, "1+1")
        assert reply["content"]["execution_count"] == 1, "execution count not reset"
        assert result_text(iopub) == "2"
        assert_name_lost(kc, "survivor")
        # Its workers are its children (it reaps them for the new supervisor), and know the
        # new supervisor (their cell files are named after it).
        _, main = main_worker(kc)
        assert psutil.Process(main).ppid() == template
        reply, iopub = execute(kc, "import os; print(os.environ['KERNELVISOR_SUPERVISOR_PID'])")
        assert "".join(
            m["content"]["text"] for m in iopub if m["msg_type"] == "stream"
        ).strip() == str(new_sup)
        # A second restart hands it over again.
        restart(kernel)
        assert template_pid(kernel) == template
        assert_healthy(kc)
        pool = wait_pool(kc, lambda p: settled(p, 1), "a main and one idle worker")
        workers = all_worker_pids(pool)
    # The final shutdown (no restart) ends the template and everything it forked.
    wait_dead(workers | {template}, "the template and its workers after the shutdown")
    assert not rendezvous_names(), "nobody waits for a next supervisor"


def test_after_a_handover_crashes_keep_the_namespace_and_interrupts_work() -> None:
    with kv_kernel() as kernel:
        kc = kernel.kc
        assert_healthy(kc)
        template = template_pid(kernel)
        restart(kernel)
        assert template_pid(kernel) == template, "the template was not taken over"
        execute(kc, "kept = 41")
        wait_until(lambda: kv_snapshot_pid(kc) is not None, "a snapshot")
        reply, iopub = execute(kc, SEGFAULT)
        # The template reaped the dead worker and told the supervisor how it ended.
        assert_crashed(reply, iopub, "SIGSEGV", restored=True)
        assert_healthy(kc, "kept + 1", "42")
        _, main = main_worker(kc)
        # The promoted snapshot was reparented to the template (its subreaper).
        assert psutil.Process(main).ppid() == template
        # An interrupt reaches a worker the template forked.
        msg_id = kc.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(30)")
        deadline = time.monotonic() + 30
        while True:
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["msg_type"] == "stream" and "sleeping" in msg["content"]["text"]:
                break
        kernel.km.interrupt_kernel()
        reply = get_reply(kc, msg_id)
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
        # A `# process` cell borrows a worker the template forked.
        reply, iopub = execute(kc, "# process\nimport os; print(os.getppid())")
        assert reply["content"]["status"] == "ok", reply["content"]
        assert_healthy(kc, "kept", "41")


def test_a_trio_kernel_hands_its_template_over() -> None:
    with running_kernel("kernelvisor-trio") as kernel:
        kc = kernel.kc
        execute(kc, "kept = 1")
        template = template_pid(kernel)
        restart(kernel)
        assert template_pid(kernel) == template, "the template was not taken over"
        # The first cell after it runs in trio, in a new namespace.
        _, iopub = execute(kc, "import trio; trio.lowlevel.current_root_task() is not None")
        assert result_text(iopub) == "True"
        assert_name_lost(kc, "kept")


def test_a_template_that_cannot_serve_the_new_kernel_is_replaced() -> None:
    with kv_kernel() as kernel:
        kc = kernel.kc
        assert_healthy(kc)
        old = template_pid(kernel)
        # The kernel's environment changes with the restart: the old template was started
        # with the other one, so it refuses, exits, and a new one is spawned.
        restart(kernel, env=kv_env(handover_test="changed"))
        new = template_pid(kernel)
        assert new != old
        assert psutil.Process(new).ppid() == supervisor_pid(kernel)
        wait_dead({old}, "the template that could not serve")
        _, iopub = execute(kc, "import os; os.environ.get('KERNELVISOR_HANDOVER_TEST')")
        assert result_text(iopub) == "'changed'"


def test_a_template_that_nobody_takes_over_exits() -> None:
    with kv_kernel(handover_wait="1") as kernel:
        template, _ = shut_down_for_a_restart(kernel)
        wait_dead({template}, "the template nobody took over", timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to connect as another user")
def test_only_the_kernels_user_may_take_the_template_over() -> None:
    with kv_kernel(handover_wait="5") as kernel:
        template, name = shut_down_for_a_restart(kernel)
        # Another user connects and offers to adopt it: the template closes the connection
        # without an answer, and waits on.
        pid = os.fork()
        if pid == 0:
            os._exit(connect_as_nobody(name))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the connection was not closed unanswered"
        assert is_running(template)
        assert name in rendezvous_names(), "it still waits for the kernel's own supervisor"
        # The kernel's next supervisor still takes it over.
        restart(kernel)
        assert template_pid(kernel) == template


def shut_down_for_a_restart(kernel: Kernel) -> tuple[int, str]:
    """A shutdown_request with restart, and no new kernel after it (a frontend that went
    away): the supervisor exits, and its template outlives it, waiting at the rendezvous.
    Returns the template's pid and the rendezvous's name."""
    kc = kernel.kc
    assert_healthy(kc)
    template = template_pid(kernel)
    before = rendezvous_names()
    msg = kc.session.msg("shutdown_request", {"restart": True})
    kc.control_channel.send(msg)
    get_reply(kc, msg["header"]["msg_id"], channel="control")
    kernel.km.provisioner.process.wait(timeout=10)  # type: ignore[union-attr]
    assert is_running(template), "the template outlives the supervisor"
    [name] = rendezvous_names() - before
    return template, name


def connect_as_nobody(name: str) -> int:
    """In a forked child: connect to ``name`` as user nobody and offer a message. 0: the
    connection was closed without an answer; 1: an answer came; 2: no connection."""
    try:
        os.setuid(65534)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect("\0" + name)
    except OSError:
        return 2
    try:
        s.settimeout(5)
        s.sendall(b"\0\0\0\x08\0\0\0\x01\0\0\0\x00")
        return 0 if s.recv(1) == b"" else 1
    except ConnectionError:
        return 0  # closed with our bytes unread (a reset)
    except OSError:
        return 1
