"""Cell filenames like ipykernel's, so that tracebacks and warnings render the same.

ipykernel names each cell's code object ``<tempdir>/ipykernel_<pid>/<hash>.py``, where
``<hash>`` is the 32-bit MurmurHash2 of the cell's source; kernelvisor uses the same
scheme under its own directory, ``<tempdir>/kernelvisor_<pid>/``. The pid is the
supervisor's (``KERNELVISOR_SUPERVISOR_PID``, set for its workers): every worker of a
kernel, one replacing a crashed worker included, names cells alike, as a debugger that
cached the directory (JupyterLab's, from ``debugInfo``) expects. A worker run on its own
uses its own pid. IPython keeps each
cell's source in linecache under that name, which is where tracebacks, warnings and
``inspect`` read it from.

Running a cell writes no file, as with ipykernel (only its debugger's ``dumpCell`` does):
IPython's tracebacks take another path for a frame whose file exists (stack_data, which
hides blank lines and numbers context differently), so a written file would make
tracebacks differ from ipykernel's. ``dump_cell`` writes one on demand, for tools that
need the file (a debugger).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import os
import shutil
import stat
import struct
import tempfile

from IPython.core.compilerop import CachingCompiler

# The seed ipykernel hashes cell sources with: the same source gets the same file name.
CELL_HASH_SEED = 0xC70F6907
DIR_PREFIX = "kernelvisor_"

_MASK = 0xFFFFFFFF
_M = 0x5BD1E995  # MurmurHash2's multiplier
_R = 24  # and shift


def murmur2_x86(data: bytes, seed: int) -> int:
    """MurmurHash2 (Austin Appleby's 32-bit version, little-endian blocks) of ``data``."""
    length = len(data)
    h = (seed ^ length) & _MASK
    body = length - length % 4
    for (k,) in struct.iter_unpack("<I", data[:body]):
        k = (k * _M) & _MASK
        k ^= k >> _R
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    tail = data[body:]
    if tail:  # the last 1 to 3 bytes, as a little-endian number
        h ^= int.from_bytes(tail, "little")
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


@functools.lru_cache(maxsize=256)  # a cell run again is not hashed again
def cell_hash(source: str) -> int:
    return murmur2_x86(source.encode("utf-8", "surrogatepass"), CELL_HASH_SEED)


def kernel_pid() -> int:
    """The supervisor's pid (``KERNELVISOR_SUPERVISOR_PID``, set for its workers), which
    names this kernel's cell directory (see the module doc); ours outside a kernel."""
    try:
        return int(os.environ["KERNELVISOR_SUPERVISOR_PID"])
    except (KeyError, ValueError):
        return os.getpid()


def cell_dir(pid: int | None = None) -> str:
    """Where this kernel's cell files go (not created here)."""
    pid = kernel_pid() if pid is None else pid
    return os.path.join(tempfile.gettempdir(), f"{DIR_PREFIX}{pid}")


def cell_filename(source: str, pid: int | None = None) -> str:
    return os.path.join(cell_dir(pid), f"{cell_hash(source)}.py")


def _private_dir(path: str) -> bool:
    """Create ``path`` (mode 0700) unless it exists; whether it is a directory only this
    user can use (another user may have taken the name first in a shared temp dir). The
    directory is removed when the process exits normally, if this call created it."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    else:
        atexit.register(_remove_dir, path, os.getpid())
    info = os.lstat(path)
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and stat.S_IMODE(info.st_mode) & 0o077 == 0
    )


def _remove_dir(path: str, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child: the directory is its parent's
        shutil.rmtree(path, ignore_errors=True)


class CellCompiler(CachingCompiler):
    """IPython's compiler, naming each cell's code by its source (see the module doc)."""

    def get_code_name(self, raw_code: str, transformed_code: str, number: int) -> str:
        return cell_filename(raw_code)

    def cache(self, transformed_code: str, number: int = 0, raw_code: str | None = None) -> str:
        """IPython's, and the cell's file is known to ``inspect`` as ``__main__``'s (the
        module cells run in): ``inspect.getmodule`` of a cell's frame, which every traceback
        asks, otherwise looks through every loaded module each time, and finds none."""
        name = super().cache(transformed_code, number, raw_code)
        inspect.modulesbyfile[name] = "__main__"
        return name


def dump_cell(source: str) -> str:
    """Write a cell's source to its file (see the module doc) unless it is there already
    (the name is the source's hash); return the file's name. The directory is created on
    first use, mode 0700, and refused if it is not this user's alone."""
    name = cell_filename(source)
    directory = os.path.dirname(name)
    if not _private_dir(directory):
        raise PermissionError(f"{directory} is not a directory private to this user")
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return name
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass", newline="") as f:
            f.write(source)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)  # no partial file for the next dump to keep
        raise
    return name
