"""Benchmark figures: one record type for every bench, the table they print as, and the repeated-measurement
helpers they share.

A figure is one measured value with its unit and how it was measured (median of N, best of N, max of n).
When something in the same run can be compared with it (a peer: the bare filesystem, a numpy floor, another
rmap design), the peer's value is kept beside it and the target is a bound on the ratio value / peer; a
target in fixed units is marked absolute, and stays only where nothing in the run compares.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

T = TypeVar("T")
OPERATORS = ("<=", ">=", "+-")


@dataclass(frozen=True)
class Target:
    """``ratio`` (or, when ``absolute``, the value) ``op`` ``bound``; ``+-`` means within ``tolerance`` (a
    fraction) of ``bound``."""

    op: str
    bound: float
    absolute: bool = False
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        if self.op not in OPERATORS:
            raise ValueError(f"target operator {self.op!r}: one of {OPERATORS}")

    def met(self, judged: float) -> bool:
        if self.op == "<=":
            return bool(judged <= self.bound)
        if self.op == ">=":
            return bool(judged >= self.bound)
        return bool(abs(judged - self.bound) <= self.bound * self.tolerance)

    def text(self, unit: str) -> str:
        bound = f"{self.bound:g} {unit}" if self.absolute else f"{self.bound:g}x"
        if self.op == "+-":
            bound += f" +-{self.tolerance:.0%}"
        else:
            bound = f"{self.op} {bound}"
        return f"{bound} (absolute)" if self.absolute else f"ratio {bound}"


def at_most(bound: float, absolute: bool = False) -> Target:
    return Target("<=", bound, absolute)


def at_least(bound: float, absolute: bool = False) -> Target:
    return Target(">=", bound, absolute)


@dataclass(frozen=True)
class Figure:
    """One measured figure. ``value`` is None when it could not be measured (``detail`` says why)."""

    section: str
    item: str
    value: float | None
    unit: str
    method: str = ""  # how it was repeated: "median of 5", "best of 3", "max of n=40"
    peer: float | None = None  # the same quantity of what it is compared with, measured in the same run
    peer_name: str = ""
    target: Target | None = None
    reference: str = ""  # a printed reference (the seed's, the real kernel's figure): never judged
    detail: str = ""

    @property
    def ratio(self) -> float | None:
        """value / peer, when both were measured."""
        if self.value is None or self.peer is None or self.peer == 0:
            return None
        return self.value / self.peer

    @property
    def passed(self) -> bool | None:
        """None without a target; a target that could not be judged (nothing measured) is missed."""
        if self.target is None:
            return None
        judged = self.value if self.target.absolute else self.ratio
        return judged is not None and self.target.met(judged)

    @property
    def verdict(self) -> str:
        return {None: "", True: "pass", False: "FAIL"}[self.passed]

    def measured_text(self) -> str:
        if self.value is None:
            return "not measured"
        text = f"{format_number(self.value)} {self.unit}"
        if self.peer is not None:
            text += f" vs {format_number(self.peer)} {self.unit} {self.peer_name}".rstrip()
            if self.ratio is not None:
                text += f" = {format_number(self.ratio)}x"
        return text

    def target_text(self) -> str:
        parts = [self.target.text(self.unit)] if self.target else []
        if self.reference:
            parts.append(f"ref: {self.reference}")
        return "; ".join(parts)

    def key(self) -> str:
        return f"{self.section} / {self.item}"

    def as_json(self) -> dict[str, Any]:
        """The figure as JSON types (numpy scalars become Python floats)."""
        record = asdict(self)
        for name in ("value", "peer"):
            record[name] = None if record[name] is None else float(record[name])
        record["ratio"] = None if self.ratio is None else float(self.ratio)
        record["passed"] = self.passed
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Figure:
        fields = {k: v for k, v in record.items() if k not in ("ratio", "passed")}
        if fields.get("target") is not None:
            fields["target"] = Target(**fields["target"])
        return cls(**fields)


def format_number(value: float) -> str:
    """Three significant digits or more, no exponent: 0.123, 1.23, 12.3, 123, 12345."""
    magnitude = abs(value)
    if magnitude >= 100 or magnitude == 0:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_table(title: str, figures: list[Figure], notes: list[str]) -> str:
    header = ("section", "item", "measured", "how", "target", "result", "detail")
    cells = [header] + [
        (f.section, f.item, f.measured_text(), f.method, f.target_text(), f.verdict, f.detail) for f in figures
    ]
    widths = [max(len(cell[i]) for cell in cells) for i in range(len(header))]
    lines = [title, "=" * len(title)]
    for k, cell in enumerate(cells):
        lines.append("  ".join(text.ljust(width) for text, width in zip(cell, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)


Clock = Callable[[], float]
# The CPU time of this process: for work done in-process by this thread alone it leaves out the time other
# processes on a busy machine had the CPU (wall time of a run longer than a time slice includes their turns).
CPU_TIME: Clock = time.process_time


def timed(run: Callable[[], T], clock: Clock = time.perf_counter) -> tuple[float, T]:
    """Seconds one call of ``run`` takes by ``clock`` (wall time by default), and what it returns."""
    start = clock()
    result = run()
    return clock() - start, result


def best_time(run: Callable[[], object], repeat: int = 3, clock: Clock = time.perf_counter) -> float:
    """Fastest of ``repeat`` runs, in seconds by ``clock``."""
    return min(timed(run, clock)[0] for _ in range(repeat))


def interleaved_medians(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Each of ``runs`` (returning a measurement) once per round, in turn, ``rounds`` times; the median of
    each. Interleaving lets every run see the same drifting machine load."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(run())
    return {name: statistics.median(values) for name, values in samples.items()}
