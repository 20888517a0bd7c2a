"""Large payload rows: a 50 MiB binary comm buffer (as ipywidgets and anywidget send arrays), a
20 MiB PNG display_data and a 100 MiB print, each from the kernel to the client: the time until
the client has it, and the peak RSS of the kernel's processes during the transfer (kernelvisor:
supervisor and main worker; the others are one process), with the growth over the RSS before,
counted in payload sizes (about how many copies were alive at once)."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

from bench_lib.kernels import (
    STREAM_TIMEOUT,
    Cell,
    Launched,
    Opts,
    check_ok,
    kv_info,
    launched,
    median,
    ms,
    run_cells,
    run_ok,
)
from bench_lib.procs import MB, PeakRss
from bench_lib.table import KERNELVISOR, Row, Shown, Value, at_most, probe, section

PAYLOADS = section("payloads", "kernel → client transfers")

COMM_BYTES = 50 * MB
PNG_BYTES = 20 * MB
PRINT_BYTES = 100 * MB

# Made once in the kernel before the timed cells, so that only the transfer is timed. Comms:
# `comm.create_comm` (ipykernel, kernelvisor, xeus-python); xeus-python raw's lives in its
# built-in `ipykernel.comm` (comm's default is a DummyComm that sends nothing), and so does its
# `display` (IPython.display does not import there).
SETUP = f"""\
import base64 as _kvb_base64
import comm as _kvb_comm_pkg
_kvb_comm = _kvb_comm_pkg.create_comm(target_name="kv-bench")
if type(_kvb_comm).__name__ == "DummyComm":
    from ipykernel.comm import Comm as _kvb_Comm
    _kvb_comm = _kvb_Comm(target_name="kv-bench")
try:
    from IPython.display import display as _kvb_display
except ImportError:  # xeus-python raw: a built-in IPython.core.display
    from IPython.core.display import display as _kvb_display
_kvb_buf = bytes(range(256)) * {COMM_BYTES // 256}
_kvb_png = _kvb_base64.b64encode(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(range(256)) * {PNG_BYTES // 256})
_kvb_png = _kvb_png.decode()
_kvb_text = ("x" * 99 + "\\n") * {PRINT_BYTES // 100}
"""


@dataclass(frozen=True)
class Payload:
    key: str
    label: str
    code: str
    wire_bytes: int  # the payload's size in the message


def expected_png() -> str:
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * (PNG_BYTES // 256)
    return base64.b64encode(data).decode()


PNG_B64_LEN = len(expected_png())
ITEMS = [
    Payload(
        "comm",
        "50 MiB comm buffer",
        '_kvb_comm.send(data={"n": 1}, buffers=[_kvb_buf])',
        COMM_BYTES,
    ),
    Payload(
        "png",
        f"20 MiB PNG display_data ({PNG_B64_LEN / MB:.1f} MiB base64)",
        '_kvb_display({"image/png": _kvb_png}, raw=True)',
        PNG_B64_LEN,
    ),
    Payload("print", "100 MiB `print`", 'print(_kvb_text, end="")', PRINT_BYTES),
]


def arrived(p: Payload, cell: Cell) -> float:
    """When the client had the whole payload (checked to be exact)."""
    if p.key == "comm":
        msgs = [m for m in cell.iopub if m["msg_type"] == "comm_msg"]
        bufs = msgs[0]["buffers"] if msgs else []
        expected = bytes(range(256)) * (COMM_BYTES // 256)
        if len(bufs) != 1 or bufs[0] != expected:
            raise RuntimeError(f"comm_msg buffers {[len(b) for b in bufs]}")
        return cell.t_first["comm_msg"]
    if p.key == "png":
        shown = [m for m in cell.iopub if m["msg_type"] == "display_data"]
        data = shown[0]["content"]["data"].get("image/png") if shown else None
        if data != expected_png():
            raise RuntimeError(f"display_data image/png of {len(data or '')} chars")
        return cell.t_first["display_data"]
    text = cell.stdout()
    if text != ("x" * 99 + "\n") * (PRINT_BYTES // 100):
        raise RuntimeError(f"stdout of {len(text)} chars, not {PRINT_BYTES}")
    return cell.t_idle


def rows(p: Payload) -> list[Row]:
    return [
        Row(
            f"{p.key}_time", f"{p.label}: time to the client (ms, median)", "{:.0f}", (at_most(1),)
        ),
        Row(f"{p.key}_peak", f"{p.label}: peak RSS (MB)", "{:.0f}"),
        Row(
            f"{p.key}_growth",
            f"{p.label}: peak RSS − RSS before, × payload",
            "{:.2f}",
            ratios=False,
        ),
    ]


def processes(k: Launched, kernel: str) -> list[int]:
    """[kernel] or, for kernelvisor, [supervisor, main worker]."""
    if kernel != KERNELVISOR:
        return [k.pid]
    main = kv_info(k)["pool"]["main"]
    if not main:
        raise RuntimeError("no main worker")
    return [k.pid, int(main["pid"])]


@probe(PAYLOADS, *(r for p in ITEMS for r in rows(p)))
def probe_payloads(kernel: str, opts: Opts) -> dict[str, Value]:
    times: dict[str, list[float]] = {p.key: [] for p in ITEMS}
    peaks: dict[str, list[list[float]]] = {p.key: [] for p in ITEMS}  # per run: per process
    growths: dict[str, list[list[float]]] = {p.key: [] for p in ITEMS}
    with launched(kernel) as k:
        run_ok(k, SETUP)
        pids = processes(k, kernel)
        for _ in range(opts.runs(1, 3)):
            for p in ITEMS:
                time.sleep(0.2)
                peak = PeakRss(pids)
                peak.start()
                [cell] = run_cells(k, [p.code], timeout=STREAM_TIMEOUT)
                peak.stop()
                check_ok([cell])
                times[p.key].append(ms(arrived(p, cell) - cell.t_sent))
                peaks[p.key].append([peak.peak[pid] for pid in pids])
                growths[p.key].append(
                    [(peak.peak[pid] - peak.before[pid]) * MB / p.wire_bytes for pid in pids]
                )
    out: dict[str, Value] = {}
    for p in ITEMS:
        out[f"{p.key}_time"] = median(times[p.key])
        for name, series, fmt in (("peak", peaks, "{:.0f}"), ("growth", growths, "{:.2f}")):
            per_proc = [median([run[i] for run in series[p.key]]) for i in range(len(pids))]
            total = sum(per_proc)
            if len(per_proc) == 1:
                out[f"{p.key}_{name}"] = total
            else:
                sup, worker = (fmt.format(v) for v in per_proc)
                text = f"{fmt.format(total)} (supervisor {sup} + worker {worker})"
                out[f"{p.key}_{name}"] = Shown(total, text)
    return out
