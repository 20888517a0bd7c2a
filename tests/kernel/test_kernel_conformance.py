"""jupyter_kernel_test's protocol conformance suite (it also validates every message it reads
against the v5 message schemas), run on kernelvisor and, as a check of the samples, ipykernel."""

from __future__ import annotations

from typing import Any

import jupyter_kernel_test as jkt
from kvharness import TIMEOUT


class PythonKernelSamples(jkt.KernelTests):
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('oops', file=sys.stderr)"
    completion_samples = ({"text": "zi", "matches": ("zip",)},)
    complete_code_samples = ("1", "print('hello, world')", "def f(x):\n  return x*2\n\n")
    incomplete_code_samples = ("print('''hello", "def f(x):\n  x*2")
    invalid_code_samples = ("import = 7q",)
    code_page_something = "print?"
    code_generate_error = "raise ValueError('boom')"
    code_execute_result = (
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(3)]", "result": "[0, 1, 4]"},
    )
    code_display_data = (
        {
            "code": "from IPython.display import HTML, display; display(HTML('<b>t</b>'))",
            "mime": "text/html",
        },
        {
            "code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))",
            "mime": "text/latex",
        },
    )
    code_history_pattern = "1?2*"
    # "range" is left out: the suite's range query returns nothing even on ipykernel.
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    def get_non_kernel_info_reply(self, timeout: float | None = None) -> dict[str, Any] | None:
        # The suite waits forever by default; inside its subTests a pytest-timeout failure is
        # recorded as one subtest's and the next one hangs unguarded, so bound every wait.
        return super().get_non_kernel_info_reply(TIMEOUT if timeout is None else timeout)


class TestKernelvisorConformance(PythonKernelSamples):
    kernel_name = "kernelvisor"
    # kernelvisor writes cached history out before answering, so a range query by session
    # number finds the cells just run (ipykernel's save thread may not have written them yet).
    supported_history_operations = ("tail", "range", "search")


class TestIpykernelConformance(PythonKernelSamples):
    kernel_name = "python3"


# The base class has no kernel of its own; keep pytest from collecting it a third time.
del PythonKernelSamples


class TestKernelvisorIopubWelcome(jkt.IopubWelcomeTests):
    """JEP 65: IOPub is XPUB, and a new subscriber's first message is `iopub_welcome`."""

    kernel_name = "kernelvisor"
    support_iopub_welcome = True
