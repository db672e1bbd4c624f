"""``python -m kvmdbgfs.bench``: run every benchmark module and print its table.

A module is listed in BENCHES and offers ``TITLE`` and ``run() -> (rows, notes)``.
"""

from __future__ import annotations

import sys

from kvmdbgfs.bench import faults, rmap, running, workloads
from kvmdbgfs.bench.report import format_table

BENCHES = [rmap, workloads, running, faults]


def main() -> int:
    failed = 0
    for bench in BENCHES:
        rows, notes = bench.run()
        print(format_table(bench.TITLE, rows, notes), end="\n\n", flush=True)
        failed += sum(row.passed is False for row in rows)
    print(f"{failed} target(s) missed" if failed else "all targets met")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
