"""Issue 11 benchmark: a suspended client stalls nobody.

A `kvmdbgfs run kbuild` client is stopped (SIGSTOP) while its workload runs; meanwhile `cat` of that
VM's mmu_rmaps_stat and exits, and `vm list` (one control round trip, and the CLI process), are timed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from kvmdbgfs.bench.mounts import REPO, Served, mounted, wait_for
from kvmdbgfs.bench.report import Figure, at_most
from kvmdbgfs.bench.running import idle_vm_scenario, spread, spread_text
from kvmdbgfs.control.client import poll_periods, request

TITLE = "issue 11: a suspended client during a workload (real FUSE mount)"
TARGET_S = 1.0
SUSPENDED_S = 10.0
WORKLOAD = ("kbuild", "files=200")  # outlasts the suspension
SCENARIO = idle_vm_scenario(3, "1G", "uptime = 0, workers = 4, logins = 1")


def timed_run(command: list[str], served: Served) -> float:
    """Wall seconds of one command, which must succeed."""
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=served.env, capture_output=True, check=True, timeout=30)
    return time.perf_counter() - start


def suspended_client_times(served: Served) -> dict[str, list[float]]:
    """Start a waiting `run`, stop it once its workload runs, and time the readers for SUSPENDED_S."""
    vm = served.vms()[0]["name"]
    cli = [sys.executable, "-m", "kvmdbgfs.cli", "-m", str(served.path)]
    client = subprocess.Popen([*cli, "run", WORKLOAD[0], "--vm", vm, "--set", WORKLOAD[1]], cwd=REPO,
                              env=served.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times: dict[str, list[float]] = {"cat mmu_rmaps_stat": [], "cat exits": [], "vm.list request": [],
                                     "CLI vm list": []}
    try:
        wait_for(lambda: served.vms()[0]["workload"] == WORKLOAD[0], 60, f"{WORKLOAD[0]} to start", poll_periods())
        client.send_signal(signal.SIGSTOP)
        end = time.monotonic() + SUSPENDED_S
        while time.monotonic() < end:
            times["cat mmu_rmaps_stat"].append(timed_run(["cat", str(served.path / vm / "mmu_rmaps_stat")], served))
            times["cat exits"].append(timed_run(["cat", str(served.path / vm / "exits")], served))
            start = time.perf_counter()
            request(served.control, "vm.list")
            times["vm.list request"].append(time.perf_counter() - start)
            times["CLI vm list"].append(timed_run([*cli, "vm", "list"], served))
        running = served.vms()[0]["workload"] == WORKLOAD[0]
    finally:
        client.send_signal(signal.SIGCONT)
        client.kill()
        client.wait(30)
    times["workload still running at the end"] = [float(running)]
    return times


def run() -> tuple[list[Figure], list[str]]:
    with mounted(SCENARIO) as served:
        times = suspended_client_times(served)
    still_running = bool(times.pop("workload still running at the end")[0])
    rows = []
    for item, seconds in times.items():
        limited = item != "CLI vm list"  # its interpreter start-up is in it
        rows.append(Figure("client stopped 10 s", f"{item} max", spread(seconds)[2], "ms", f"max of n={len(seconds)}",
                           target=at_most(TARGET_S * 1e3, True) if limited else None,
                           detail=spread_text(seconds) + ("" if limited else "; interpreter start-up included")))
    notes = [
        f"a `kvmdbgfs run {WORKLOAD[0]} --set {WORKLOAD[1]}` client is SIGSTOPped for {SUSPENDED_S:.0f} s once its "
        "workload runs; each reader runs in turn meanwhile (cat and the CLI as processes)",
        f"the workload was {'still' if still_running else 'no longer'} running when the readers stopped",
        f"machine: {os.cpu_count()} CPUs, 1-minute load average {os.getloadavg()[0]:.1f}",
    ]
    return rows, notes
