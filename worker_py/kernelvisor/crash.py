"""Last words: what a dying worker printed reaches the supervisor before it dies.

The supervisor reads a dead worker's ``main`` connection to the end before it reports
the death, so output already written into the socket arrives first. Output still
buffered in this process (streams.py coalesces it) is pushed out on the ways a process
can end from within (IPC.md, "Dying"):

- **Fatal signals** (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT): ``FatalSignalFlush``, a
  C-level handler (a ctypes callback) installed *before* ``faulthandler.enable``. A
  fatal signal runs faulthandler's handler first, which dumps the Python stacks to the
  diagnostic fd and then raises the signal again, now running ours: a final flush,
  bounded in time, then the signal with its default action, so that the process still
  dies *of that signal*.
- **``os._exit``** called by user code: ``flush_on_os_exit`` wraps it so that buffered
  output (with C stdio buffers and bytes still in the fd pipes) goes out first. The
  worker's own exits call ``really_exit``, the original.
- **SIGKILL** (and the OOM killer) cannot be caught: the flusher's coalescing window
  (about 50 ms, streams.py; more while a tight print loop competes with the flusher for
  the GIL) bounds what is lost.

The signal handler is best effort, as anything run inside a crashing process is:

- ctypes takes the GIL before the callback's first line runs. A thread that crashed
  while it held the GIL (Python code, ``ctypes.string_at``, ``os.abort``) continues at
  once; one that crashed in C code that had released it (a ``CDLL`` call, a numpy
  kernel) first waits for it, as does a thread Python does not know (a BLAS worker),
  which ctypes also gives a new thread state (an allocation, which may never return if
  the crash left malloc's lock taken). These waits happen before any code of ours can
  bound them; the GIL's wait ends as soon as its holder releases it, unless that holder
  waits for the crashed thread.
- From the callback's first line on, nothing waits without a bound: a kernel timer
  (``timer_create``; ``alarm`` where there is none) delivers the signal again, with its
  default action, if the handler is still running after ``WATCHDOG_SECONDS`` (a hang in
  ``malloc`` after heap corruption, say); locks are taken with a timeout, and not at all
  if this very thread holds them (it stopped mid-send: the socket may hold half a
  message); the socket is written without blocking, up to ``FLUSH_SECONDS``.
- A fault inside the handler itself (the signal's action is already the default one)
  ends the process at once; another fatal signal is turned into the first one. A second
  thread crashing meanwhile waits while the first one flushes.
- On the main thread the handler runs on an alternate signal stack (faulthandler's
  handler runs there, and ours inside it): ``arm`` gives it one large enough for Python
  code, with a guard page below it.
- C stdio buffers are not flushed (``fflush`` takes locks the crashed code may hold, and
  is not async-signal-safe): ``printf`` output without a newline yet is lost, as it is
  when ``abort()`` ends any C program.
- A forked child (its pid is not ours) skips the flush: the connection belongs to its
  parent.

After the flush, the handler writes a **crash report** to the original stderr, after
faulthandler's dump: the crashing thread's frames from the outermost cell frame down,
as IPython shows a traceback (``Cell In[2], line 3`` and the source around the line),
between two marker lines. The supervisor shows it first in the cell's error, with
faulthandler's dump of that thread after a "Details" line (src/exit.rs).
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import functools
import inspect
import linecache
import logging
import mmap
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn

log = logging.getLogger(__name__)

FATAL_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT)
# How long the final flush may take before it gives up (then the process dies).
FLUSH_SECONDS = 1.0
# When the kernel ends a handler that is still running (hung) with the same signal.
WATCHDOG_SECONDS = 2
# Alternate signal stack of the main thread: room for the flush's Python code.
ALT_STACK_BYTES = 512 << 10

# The crash report's first and last lines (src/exit.rs looks for them).
REPORT_BEGIN = "kernelvisor: the crashing thread, from its cell (most recent call last):"
REPORT_END = "kernelvisor: end of the crash report"
# Source lines shown before and after each frame's line, as IPython shows them.
CONTEXT_BEFORE, CONTEXT_AFTER = 4, 2
# Frames shown at most (the innermost ones, if a deep recursion crashed).
REPORT_FRAMES = 20
_CYAN, _GREEN, _BLUE, _RESET = "\x1b[36m", "\x1b[32m", "\x1b[34m", "\x1b[39m"

really_exit: Callable[[int], NoReturn] = getattr(os._exit, "__wrapped__", os._exit)
"""The original ``os._exit``, for the worker's own exits (no second flush)."""

# Linux's generic ABI (glibc and musl): struct layouts and flag values below.
_GENERIC_LINUX = frozenset(
    {"x86_64", "amd64", "aarch64", "arm64", "riscv64", "i386", "i686", "armv7l", "armv6l"}
)
_SA_ONSTACK = 0x08000000
_SA_NODEFER = 0x40000000
_SIG_DFL = 0
_SIGEV_SIGNAL = 0
_CLOCK_MONOTONIC = 1

_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)


class _SigAction(ctypes.Structure):
    _fields_ = [
        ("sa_handler", ctypes.c_void_p),
        ("sa_mask", ctypes.c_ulong * (128 // ctypes.sizeof(ctypes.c_ulong))),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    ]


class _StackT(ctypes.Structure):
    _fields_ = [
        ("ss_sp", ctypes.c_void_p),
        ("ss_flags", ctypes.c_int),
        ("ss_size", ctypes.c_size_t),
    ]


class _SigEvent(ctypes.Structure):
    _fields_ = [
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("_pad", ctypes.c_int * 16),  # the kernel's union; 64 bytes in all, and some spare
    ]


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("it_interval", _TimeSpec), ("it_value", _TimeSpec)]


def _supported() -> str | None:
    """Why the signal handler cannot be installed here, or None."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if platform.machine() not in _GENERIC_LINUX:
        return f"unknown signal ABI on {platform.machine()}"
    if sys.version_info >= (3, 14):
        # CPython 3.14 checks the C stack pointer against the thread's stack: Python code
        # on an alternate signal stack would end in a fatal error (and SIGABRT).
        return "Python >= 3.14"
    return None


class FatalSignalFlush:
    """The fatal-signal handler. ``install`` it before ``faulthandler.enable`` (so that
    faulthandler's dump comes first and chains to it), then ``arm`` it with the flush."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._last_words: Callable[[float], object] | None = None
        self._handling = 0  # the signal being handled, once one is
        self._handling_thread = 0
        self._installed = False
        # Kept alive here: the C handler points into this object.
        self._callback = _HANDLER(self._on_signal)
        self._alt_stack: mmap.mmap | None = None
        # Everything the handler needs is made now, not while the process crashes.
        self._libc: Any = None
        self._timer_create: Any = None
        self._timer_settime: Any = None
        self._default_action = _SigAction()
        self._events: dict[int, _SigEvent] = {}
        self._timer = ctypes.c_void_p()
        self._watchdog = _ITimerSpec()
        self._watchdog.it_value.tv_sec = WATCHDOG_SECONDS
        # The original stderr (faulthandler's file too), kept before fd 2 is captured.
        self._report_fd = -1

    @property
    def installed(self) -> bool:
        return self._installed

    def install(self) -> bool:
        """Install the handler for every fatal signal; False where it cannot be.

        faulthandler, if enabled (``PYTHONFAULTHANDLER``), is disabled: enable it again
        afterwards, so that it runs first and chains to this handler."""
        reason = _supported()
        if reason is not None:
            log.info("no fatal-signal flush: %s", reason)
            return False
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.sigaction.argtypes = [
                ctypes.c_int,
                ctypes.POINTER(_SigAction),
                ctypes.POINTER(_SigAction),
            ]
            libc.sigaltstack.argtypes = [ctypes.POINTER(_StackT), ctypes.POINTER(_StackT)]
            libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._libc = libc
            self._setup_watchdog(libc)
            self._report_fd = os.dup(2)
            if faulthandler.is_enabled():
                faulthandler.disable()
            action = _SigAction()
            action.sa_handler = ctypes.cast(self._callback, ctypes.c_void_p).value
            # As faulthandler's: not blocked while handled (a fault in the handler ends
            # the process), and on the alternate stack where the thread has one.
            action.sa_flags = _SA_NODEFER | _SA_ONSTACK
            for signum in FATAL_SIGNALS:
                if libc.sigaction(signum, ctypes.byref(action), None) != 0:
                    raise OSError(ctypes.get_errno(), f"sigaction({signum})")
        except (OSError, AttributeError, ValueError):
            log.warning("no fatal-signal flush", exc_info=True)
            for signum in FATAL_SIGNALS:
                self._set_default(signum)
            return False
        self._installed = True
        return True

    def _setup_watchdog(self, libc: Any) -> None:
        rt = libc
        if not hasattr(libc, "timer_create"):
            try:  # glibc < 2.34 keeps POSIX timers in librt
                rt = ctypes.CDLL("librt.so.1")
            except OSError:
                return
        try:
            create, settime = rt.timer_create, rt.timer_settime
        except AttributeError:
            return
        create.argtypes = [ctypes.c_int, ctypes.POINTER(_SigEvent), ctypes.POINTER(ctypes.c_void_p)]
        settime.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.POINTER(_ITimerSpec),
            ctypes.c_void_p,
        ]
        self._timer_create, self._timer_settime = create, settime
        for signum in FATAL_SIGNALS:
            event = _SigEvent()
            event.sigev_signo = signum
            event.sigev_notify = _SIGEV_SIGNAL
            self._events[signum] = event

    def arm(self, last_words: Callable[[float], object]) -> None:
        """From now on a fatal signal first calls ``last_words(deadline)`` (a deadline on
        ``time.monotonic()``). Call on the main thread: it also gets a larger alternate
        signal stack."""
        self._pid = os.getpid()
        self._last_words = last_words
        if self._installed and threading.current_thread() is threading.main_thread():
            self._use_large_alt_stack()

    def _use_large_alt_stack(self) -> None:
        """Replace the main thread's alternate signal stack (faulthandler's is sized for
        its C handler, a few kB) with one the flush's Python code fits in."""
        try:
            page = mmap.PAGESIZE
            stack = mmap.mmap(-1, ALT_STACK_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            base = ctypes.addressof(ctypes.c_char.from_buffer(stack))
            # A guard page at the bottom: overflowing the stack faults rather than writing
            # over whatever lies below it.
            if self._libc.mprotect(base, page, 0) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")
            new = _StackT(base + page, 0, ALT_STACK_BYTES - page)
            if self._libc.sigaltstack(ctypes.byref(new), None) != 0:
                raise OSError(ctypes.get_errno(), "sigaltstack")
        except (OSError, ValueError, TypeError, BufferError):
            log.warning("keeping the default alternate signal stack", exc_info=True)
            return
        self._alt_stack = stack  # mapped for as long as the process lives

    # --- inside the signal handler --------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        """The C handler (ctypes took the GIL for us). Always ends the process."""
        try:
            if self._handling:
                if self._handling_thread != threading.get_ident():
                    # Another thread crashed first: let it flush (the watchdog bounds it).
                    time.sleep(WATCHDOG_SECONDS + 1)
                # A fault inside our own flush: end now, of the first signal.
                signum = self._handling
            else:
                self._handling = signum
                self._handling_thread = threading.get_ident()
                # From here a fault in the flush, or the watchdog, ends the process with
                # this very signal.
                self._set_default(signum)
                self._start_watchdog(signum)
                last_words = self._last_words
                if last_words is not None and os.getpid() == self._pid:
                    last_words(time.monotonic() + FLUSH_SECONDS)
                    # The frame the signal interrupted, under this handler's own.
                    self._report(sys._getframe().f_back)
        except BaseException:  # nothing may keep us from dying of signum
            pass
        self._die(signum)

    def _report(self, frame: FrameType | None) -> None:
        """Writes the crash report (the module doc) if the thread was running a cell."""
        lines = crash_report(frame, cell_label)
        if lines and self._report_fd >= 0:
            text = "\n".join([REPORT_BEGIN, *lines, REPORT_END, ""])
            os.write(self._report_fd, text.encode("utf-8", "backslashreplace"))

    def _set_default(self, signum: int) -> None:
        libc = self._libc
        if libc is not None:
            libc.sigaction(signum, ctypes.byref(self._default_action), None)
        else:
            signal.signal(signum, signal.SIG_DFL)

    def _start_watchdog(self, signum: int) -> None:
        event = self._events.get(signum)
        if event is not None and (
            self._timer_create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(self._timer))
            == 0
            and self._timer_settime(self._timer, 0, ctypes.byref(self._watchdog), None) == 0
        ):
            return
        # No POSIX timers: SIGALRM ends a hung handler (the exit status then says SIGALRM).
        self._set_default(signal.SIGALRM)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGALRM,))
        self._libc.alarm(WATCHDOG_SECONDS)

    def _die(self, signum: int) -> NoReturn:
        """Default action, unblocked, raised again: the process dies of ``signum``."""
        with contextlib.suppress(BaseException):
            self._set_default(signum)
        with contextlib.suppress(BaseException):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (signum,))
        with contextlib.suppress(BaseException):
            signal.raise_signal(signum)
        with contextlib.suppress(BaseException):
            os.kill(os.getpid(), signum)
        really_exit(128 + signum)


def flush_on_os_exit(last_words: Callable[[float], object], timeout: float) -> None:
    """Make ``os._exit`` call ``last_words(deadline)`` (at most ``timeout`` seconds) first,
    in this process only (a forked child's connection is its parent's)."""
    pid = os.getpid()

    def _exit(status: int) -> NoReturn:
        if os.getpid() == pid:
            try:
                last_words(time.monotonic() + timeout)
            except BaseException:
                log.exception("flushing output before os._exit failed")
        really_exit(status)

    functools.update_wrapper(_exit, really_exit)
    os._exit = _exit


# --- the crash report -----------------------------------------------------------------


def cell_label(filename: str) -> tuple[str, str] | None:
    """``("Cell", "In[2]")`` for a cell's code, as IPython's tracebacks name it; None for
    other files (or without a running IPython)."""
    module = sys.modules.get("IPython.core.getipython")
    shell = module.get_ipython() if module is not None else None
    if shell is None:
        return None
    label: tuple[str, str] | None = shell.compile.format_code_name(filename)
    return label


def crash_report(
    frame: FrameType | None, label_of: Callable[[str], tuple[str, str] | None]
) -> list[str]:
    """The frames of ``frame``'s stack from the outermost one that ``label_of`` names (a
    cell) down to ``frame``, formatted as IPython formats a traceback; none if no frame
    is a cell's."""
    frames: list[FrameType] = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    labels = [label_of(f.f_code.co_filename) for f in frames]
    first = next((i for i, label in enumerate(labels) if label is not None), None)
    if first is None:
        return []
    shown = list(zip(frames[first:], labels[first:], strict=True))
    lines: list[str] = []
    if len(shown) > REPORT_FRAMES:
        lines.append(f"[... {len(shown) - REPORT_FRAMES} frames not shown ...]")
        shown = shown[-REPORT_FRAMES:]
    for i, (f, label) in enumerate(shown):
        if i:
            lines.append("")
        lines.extend(_frame_lines(f, label))
    return lines


def _frame_lines(frame: FrameType, label: tuple[str, str] | None) -> list[str]:
    code = frame.f_code
    filename, lineno = code.co_filename, frame.f_lineno or 0
    if label is not None:
        header = f"{_CYAN}{label[0]}{_RESET} {_GREEN}{label[1]}, line {lineno}{_RESET}"
    else:
        name = getattr(code, "co_qualname", code.co_name)
        try:
            args = inspect.formatargvalues(*inspect.getargvalues(frame), formatvalue=_no_value)
        except Exception:  # a report line is not worth a failed report
            args = "(...)"
        header = (
            f"{_CYAN}File {_RESET}{_GREEN}{_compress_user(filename)}:{lineno}{_RESET}, "
            f"in {_CYAN}{name}{_RESET}{_BLUE}{args}{_RESET}"
        )
    lines = [header]
    for n in range(max(1, lineno - CONTEXT_BEFORE), lineno + CONTEXT_AFTER + 1):
        text = linecache.getline(filename, n, frame.f_globals)
        if not text:
            continue
        number = str(n)
        if n == lineno:
            arrow = "-" * max(0, 5 - len(number)) + "> "
            prefix = f"{_GREEN}{arrow}{_RESET}{_GREEN}{number}{_RESET}"
        else:
            prefix = f"{_GREEN}{number:>7}{_RESET}"
        lines.append(f"{prefix} {text}".rstrip())
    return lines


def _no_value(value: object) -> str:
    return ""


def _compress_user(path: str) -> str:
    home = os.path.expanduser("~")
    if home not in ("", "/") and path.startswith(home + os.sep):
        return "~" + path[len(home) :]
    return path
