"""``python -m kernelvisor ARGS``: runs the installed kernelvisor binary with ARGS.

``python -m kernelvisor install --user`` registers the kernelspec for *this* Python (as
``python -m ipykernel install`` does), unless ``--python`` is given.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

BIN_NAME = "kernelvisor"


def find_binary() -> Path:
    """The kernelvisor binary: ``$KERNELVISOR_BIN``, else the one pip installed beside this
    Python (the environment's scripts dir, or the user scheme's), else the first on PATH."""
    override = os.environ.get("KERNELVISOR_BIN")
    if override:
        return Path(override)
    dirs = [sysconfig.get_path("scripts")]
    user_scheme = f"{os.name}_user"
    if user_scheme in sysconfig.get_scheme_names():
        dirs.append(sysconfig.get_path("scripts", user_scheme))
    for d in dirs:
        candidate = Path(d) / BIN_NAME
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which(BIN_NAME)
    if on_path:
        return Path(on_path)
    raise FileNotFoundError(
        f"the {BIN_NAME} binary is not installed beside {sys.executable} nor on PATH "
        "(installing kernelvisor's wheel puts it there; or set KERNELVISOR_BIN)"
    )


def command(args: list[str]) -> list[str]:
    """The binary's argv for ``python -m kernelvisor`` ``args``."""
    argv = [str(find_binary()), *args]
    is_install = bool(args) and args[0] == "install"
    has_python = any(a == "--python" or a.startswith("--python=") for a in args)
    if is_install and not has_python and "--help" not in args and "-h" not in args:
        argv += ["--python", sys.executable]
    return argv


def main() -> None:
    """Replaces this process with the binary."""
    try:
        argv = command(sys.argv[1:])
    except FileNotFoundError as e:
        sys.exit(f"kernelvisor: {e}")
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
