"""Issue 14 benchmark, start-up: mount.py with the default scenario (manual clock), as a new user starts it.

1. Time to serve: from starting mount.py until a file inside the mount can be stat'ed, against the bare
   mfusepy filesystem's start (kvmdbgfs.bench.bare_fs: the interpreter, mfusepy and the mount alone).
2. Cold boot: from starting mount.py until every guest of the scenario has booted (`status`), with an empty
   boot cache (KVMDBGFS_CACHE_DIR); beside it the same with every guest booted in the server
   (`--boot-workers 0`: no worker process boots the second guest ahead).
3. Cached boot: the same with the cache directory a cold start filled, against the cold boot.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from kvmdbgfs.bench.mounts import bare_mounted, mounted, wait_booted
from kvmdbgfs.bench.report import Figure, at_most
from kvmdbgfs.vmm.boot_ahead import spare_cpus

TITLE = "issue 14: start-up of the default scenario (mount.py, manual clock)"
ROUNDS, BARE_RUNS_PER_ROUND = 2, 3
# Issue 14: served within 1 s, about 5x the bare filesystem's start on a quiet 2-core machine when the target was
# set (0.16-0.2 s). The bare start has since measured 0.07-0.08 s there, which makes the ratio the stricter one.
SERVE_RATIO = 5.0
COLD_BOOT_S = 5.0  # absolute: the boot with no worker printed beside it is the slower way, not a floor
CACHED_RATIO = 0.2  # issue 14: cached at most 1 s against a cold 5 s


def start(cache: str, *args: str) -> tuple[float, float]:
    """Start mount.py with the default scenario, ``args`` and the boot cache in ``cache``: seconds until served,
    and until every guest booted."""
    with mounted("default", "manual", env={"KVMDBGFS_CACHE_DIR": cache}, args=args) as served:
        wait_booted(served)
        return served.start_seconds, time.monotonic() - served.started


def bare_start() -> float:
    with bare_mounted() as bare:
        return bare.start_seconds


def run() -> tuple[list[Figure], list[str]]:
    serve, cold, alone, cached, bare = [], [], [], [], []
    # Interleaved each round: cold (an empty cache), cached (the cache that start filled), cold with no boot
    # worker, bare.
    for _ in range(ROUNDS):
        with tempfile.TemporaryDirectory(prefix="kvmdbgfs-bench-cache-") as cache:
            served_s, booted_s = start(cache)
            serve.append(served_s)
            cold.append(booted_s)
            cached.append(start(cache)[1])
        with tempfile.TemporaryDirectory(prefix="kvmdbgfs-bench-cache-") as cache:
            alone.append(start(cache, "--boot-workers", "0")[1])
        bare += [bare_start() for _ in range(BARE_RUNS_PER_ROUND)]
    median = statistics.median
    runs = f"median of {ROUNDS}"
    figures = [
        Figure("start-up", "mount.py default: served", median(serve), "s", runs, median(bare), "bare mfusepy start",
               at_most(SERVE_RATIO), detail=f"bare: median of {len(bare)}"),
        Figure("start-up", "mount.py default: cold boot", median(cold), "s", runs, median(alone), "--boot-workers 0",
               at_most(COLD_BOOT_S, True), detail=f"boot workers: {spare_cpus()} (the CPUs less one)"),
        Figure("start-up", "mount.py default: cached boot", median(cached), "s", runs, median(cold), "cold boot",
               at_most(CACHED_RATIO)),
    ]
    notes = [
        "start-up: mount.py --scenario default --clock manual, timed from the process start until a file inside can "
        "be stat'ed (served) and until `status` says the guests booted (boot); each round a cold start with an "
        "empty boot cache (KVMDBGFS_CACHE_DIR), then a start with the cache it left (cached)",
        f"served: issue 14's 1 s was about {SERVE_RATIO:.0f}x the bare filesystem's start on a quiet 2-core machine "
        "(0.16-0.2 s), so the target is that ratio (stricter than 1 s wherever the bare start is faster); cold "
        "boot stays absolute (issue 14's 5 s): the run with every guest booted in the server is printed beside it, "
        "but it is the slower way, no floor",
    ]
    return figures, notes
