"""Benchmark rows and the table they print as."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    """One measured line: ``passed`` is None for information rows without a target."""

    section: str
    item: str
    measured: str
    target: str = ""
    passed: bool | None = None

    @property
    def verdict(self) -> str:
        return {None: "", True: "pass", False: "FAIL"}[self.passed]


def timed(run: Callable[[], T]) -> tuple[float, T]:
    """Seconds one call of ``run`` takes, and what it returns."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def best_time(run: Callable[[], object], repeat: int = 3) -> float:
    """Fastest of ``repeat`` runs, in seconds."""
    return min(timed(run)[0] for _ in range(repeat))


def format_table(title: str, rows: list[Row], notes: list[str]) -> str:
    header = ("section", "item", "measured", "target", "result")
    cells = [header] + [(r.section, r.item, r.measured, r.target, r.verdict) for r in rows]
    widths = [max(len(cell[i]) for cell in cells) for i in range(len(header))]
    lines = [title, "=" * len(title)]
    for k, cell in enumerate(cells):
        lines.append("  ".join(text.ljust(width) for text, width in zip(cell, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)
