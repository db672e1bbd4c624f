"""Progress bars for long workload runs (tqdm on stderr, silent when stderr is not a terminal)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from tqdm import tqdm

from kvmdbgfs.workloads.base import Progress


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[Progress]:
    """A ``(done, total)`` callback drawing one bar for the duration of the block."""
    with tqdm(total=0, desc=label, unit="step", disable=None, leave=False, file=sys.stderr) as bar:

        def update(done: int, total: int, idle_ns: int = 0) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield update
