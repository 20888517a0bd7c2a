"""The bench's table: values, rows and their targets, probes registered per section, and the
markdown that prints them (one column per kernel, ratios against ipykernel and xeus-python raw)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Columns, in order; names as in kernels.KERNELS.
IPYKERNEL, KERNELVISOR, XPYTHON, XPYTHON_RAW = (
    "ipykernel",
    "kernelvisor",
    "xeus-python",
    "xeus-python raw",
)


@dataclass(frozen=True)
class Fail:
    """A probe that failed: its reason is shown in every cell it owns."""

    reason: str

    def __str__(self) -> str:
        return f"FAIL ({self.reason})"


@dataclass(frozen=True)
class Missing:
    """Not measured, and why (a kernel not installed, a build without the feature)."""

    reason: str

    def __str__(self) -> str:
        return f"n/a ({self.reason})"


@dataclass(frozen=True)
class Shown:
    """A number shown with more text; `judged` (if set) is what a "value" target judges."""

    value: float
    text: str
    judged: float | None = None

    def __str__(self) -> str:
        return self.text


Value = float | int | str | bool | Fail | Missing | Shown


@dataclass(frozen=True)
class Target:
    """A goal: `on` is a column whose value kernelvisor's is divided by, or "value" to judge
    kernelvisor's own value (or a Shown's `judged`)."""

    text: str
    met: Callable[[float], bool]
    on: str = IPYKERNEL


def at_most(limit: float, on: str = IPYKERNEL, text: str = "") -> Target:
    return Target(text or f"≤ {limit:g}", lambda r: r <= limit, on)


def at_least(limit: float, on: str = IPYKERNEL, text: str = "") -> Target:
    return Target(text or f"≥ {limit:g}", lambda r: r >= limit, on)


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    fmt: str = "{:.1f}"
    targets: tuple[Target, ...] = ()
    ratios: bool = True  # False: the kv ÷ columns would mislead (e.g. near-zero denominators)


Probe = Callable[[str, Any], dict[str, Value]]


@dataclass
class ProbeSpec:
    func: Probe
    section: str
    rows: list[Row] = field(default_factory=list)
    # Kernels it runs on (None: all); the others show "—".
    kernels: tuple[str, ...] | None = None


PROBES: list[ProbeSpec] = []
SECTIONS: dict[str, str] = {}  # name -> one-line description, in registration order


def section(name: str, about: str) -> str:
    SECTIONS.setdefault(name, about)
    return name


def probe(
    section_name: str, *rows: Row, kernels: tuple[str, ...] | None = None
) -> Callable[[Probe], Probe]:
    """Registers a probe `(kernel display name, opts) -> {row key: value}`."""

    def register(func: Probe) -> Probe:
        PROBES.append(ProbeSpec(func, section_name, list(rows), kernels))
        return func

    return register


# --- rendering ---------------------------------------------------------------------------------


def number(v: Value | None) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, Shown):
        return v.value
    return None


def fmt_value(row: Row, v: Value | None) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int | float):
        return row.fmt.format(v)
    return str(v).replace("|", "/")


def ratio(kv: Value | None, other: Value | None) -> float | None:
    a, b = number(kv), number(other)
    return a / b if a is not None and b else None


def judge(row: Row, values: dict[str, Value]) -> str:
    kv = values.get(KERNELVISOR)
    parts = []
    for t in row.targets:
        if t.on == "value":
            if isinstance(kv, Shown) and kv.judged is not None:
                judged: float | None = kv.judged
            elif isinstance(kv, bool):
                judged = float(kv)
            else:
                judged = number(kv)
        else:
            judged = ratio(kv, values.get(t.on))
        mark = "" if judged is None else (" ✓" if t.met(judged) else " ✗")
        parts.append(t.text + mark)
    return "; ".join(parts) or "—"


def ratio_cell(kv: Value | None, other: Value | None) -> str:
    r = ratio(kv, other)
    return f"{r:.2f}" if r is not None else "—"


def render(results: dict[tuple[str, str], Value], kernels: list[str], sections: list[str]) -> str:
    """The markdown table: a header row per section, then its rows."""
    ratio_cols = [k for k in (IPYKERNEL, XPYTHON_RAW) if k in kernels and KERNELVISOR in kernels]
    head = ["metric", *kernels, *(f"kv ÷ {k}" for k in ratio_cols), "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    blank = [""] * (len(head) - 1)
    for name in sections:
        specs = [s for s in PROBES if s.section == name]
        if not specs:
            continue
        lines.append("| " + " | ".join([f"**{name}**: {SECTIONS[name]}", *blank]) + " |")
        for spec in specs:
            for row in spec.rows:
                values = {k: v for k in kernels if (v := results.get((row.key, k))) is not None}
                cells = [row.label, *(fmt_value(row, values.get(k)) for k in kernels)]
                kv = values.get(KERNELVISOR)
                cells += [ratio_cell(kv, values.get(k)) if row.ratios else "—" for k in ratio_cols]
                cells.append(judge(row, values))
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
