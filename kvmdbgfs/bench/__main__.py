"""``python -m kvmdbgfs.bench [BENCH ...] [--json FILE] [--baseline FILE]``: run the benchmark modules, print
each one's table, write the run's record as JSON (machine, commit, every figure) and, given an earlier record,
print each figure's change since then. Exits 1 when a target is missed.

A module is listed in BENCHES and offers ``TITLE`` and ``run() -> (figures, notes)``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from kvmdbgfs.bench import faults, reads, rmap, running, startup, workloads
from kvmdbgfs.bench.record import BenchResult, RunRecord, compare, default_path, new_record, read_record, write_record
from kvmdbgfs.bench.report import format_table

BENCHES = {module.__name__.rpartition(".")[2]: module for module in (rmap, workloads, startup, reads, running, faults)}
RESULTS_DIR = Path("bench-results")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kvmdbgfs.bench", description=__doc__.splitlines()[0])
    parser.add_argument("benches", nargs="*", metavar="BENCH",
                        help=f"which to run (default: all of {', '.join(BENCHES)})")
    parser.add_argument("--json", type=Path,
                        help=f"where to write the record (default: {RESULTS_DIR}/<start>-<commit>.json)")
    parser.add_argument("--baseline", type=Path, help="an earlier run's record to compare with")
    args = parser.parse_args(argv)
    unknown = [name for name in args.benches if name not in BENCHES]
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)} (choose from {', '.join(BENCHES)})")
    return args


def machine_line(record: RunRecord) -> str:
    machine, commit = record.machine, record.commit or {}
    load = " ".join(f"{x:.1f}" for x in machine["load_average"])
    state = " (with uncommitted changes)" if commit.get("dirty") else ""
    modules = f"compiled ({machine['native']})" if machine.get("native") else "Python"  # older records: Python
    return (f"machine: {machine['cpu_model'] or 'unknown CPU'}, {machine['cpus_usable']} CPUs, load average {load}; "
            f"{machine['python']}; modules {modules}; commit {commit.get('hash', 'unknown')[:10]}{state}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        baseline = read_record(args.baseline) if args.baseline else None
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    record, start = new_record(), time.monotonic()
    path = args.json or default_path(record, RESULTS_DIR)
    print(machine_line(record), end="\n\n", flush=True)
    for name in args.benches or BENCHES:
        bench = BENCHES[name]
        figures, notes = bench.run()
        record.benches.append(BenchResult(name, bench.TITLE, figures, notes))
        print(format_table(bench.TITLE, figures, notes), end="\n\n", flush=True)
        record.seconds = round(time.monotonic() - start, 1)
        record.machine["load_average_end"] = list(os.getloadavg())
        write_record(record, path)  # after each bench: a later failure keeps what was measured
    if baseline is not None:
        commit = (baseline.commit or {}).get("hash", "?")[:10]
        print(f"Changes since {args.baseline} ({baseline.started}, commit {commit})")
        print("\n".join(compare(baseline, record)), end="\n\n")
    missed = record.missed()
    print(f"{missed} target(s) missed" if missed else "all targets met", f"in {record.seconds:.0f} s; record: {path}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
