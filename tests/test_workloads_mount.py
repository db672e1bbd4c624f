"""Workloads driven through a real mount with the CLI; the files show what they did."""

from __future__ import annotations

import json
import re

from conftest import Mount


def test_run_idle_then_rmap_fork_through_the_cli(empty_mount: Mount) -> None:
    name = empty_mount.create_vm("--memory", "1G", "--mmu", "shadow", "--seed", "3")
    listed = empty_mount.cli("workloads").stdout
    assert re.search(r"^rmap_fork: .*\n  children=500  \(10\.\.1000\)", listed, re.M)
    out = empty_mount.cli("run", "idle", "--vm", name, "--set", "uptime=5").stdout
    assert f"vm: {name}" in out and "workload: idle" in out
    before = int(empty_mount.sh(f"cat {name}/max_mmu_rmap_size"))
    summary = json.loads(empty_mount.cli("run", "rmap_fork", "--vm", name, "--set", "children=40", "--json").stdout)
    after = int(empty_mount.sh(f"cat {name}/max_mmu_rmap_size"))
    assert summary["max_mmu_rmap_size"] == after and 40 <= after - before <= 55
    assert int(empty_mount.sh("cat max_mmu_rmap_size")) == after
    columns = empty_mount.sh(f"sed -n 2p {name}/mmu_rmaps_stat | cut -f3-").split()
    assert sum(map(int, columns)) > 100  # shared gfns: lists of 2 and more


def test_bad_workload_requests_change_nothing(empty_mount: Mount) -> None:
    name = empty_mount.create_vm("--memory", "256M")
    before = empty_mount.cli("vm", "list", "--json").stdout
    cases = [
        (["run", "rmap_fork", "--vm", name], 1, f"kvmdbgfs: error: VM {name} has not booted: run the idle workload on it first"),
        (["run", "idle", "--vm", name, "--set", "uptime=-3"], 1, "kvmdbgfs: error: uptime must be between 0 and 3600, not -3"),
        (["run", "idle", "--vm", name, "--set", "uptime"], 1, "kvmdbgfs: error: --set takes key=value, not 'uptime'"),
        (["run", "nosuch", "--vm", name], 1, "kvmdbgfs: error: unknown workload 'nosuch' (known: idle, rmap_fork, kbuild, memhog, hotplug)"),
        (["run", "idle", "--vm", "1-1"], 1, "kvmdbgfs: error: no VM named '1-1'"),
        (["run", "idle"], 2, "kvmdbgfs: error: the following arguments are required: --vm"),
    ]
    for argv, status, message in cases:
        result = empty_mount.cli(*argv, check=False)
        assert (result.returncode, result.stderr, result.stdout) == (status, message + "\n", ""), argv
    assert empty_mount.cli("vm", "list", "--json").stdout == before
