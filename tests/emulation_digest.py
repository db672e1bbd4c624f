"""Digests of what the bench's emulation produces, to show a speed-up changed nothing.

The scenario is the one `make bench` times (kvmdbgfs/bench/workloads.py): a 6 GiB shadow guest booted
idle for 10 s (manual clock, seed 1), then ``rmap_fork children=N``; ``--mmu`` and ``--uptime`` vary it (the
default scenario's guests: ``--uptime 60`` under ``shadow`` and ``tdp-legacy``). After each step, one SHA-256 over
every file of the debugfs tree (read in-process, as cat would) and one over the MMU's state (rmap lists,
shadow pages and their sptes, parents, stats, cost counters, shadowed guest tables): run it before and
after a change and compare. It also prints the CPU time (all threads) each step took, and whether the compiled
modules were in use (kvmdbgfs/native.py).

    .venv/bin/python tests/emulation_digest.py [--children N] [--designs ABCD] [--no-fork] [--mmu MODE] [--uptime S]
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from inprocess import cat, walk_files  # noqa: E402
from mmu_testlib import mmu_state  # noqa: E402

from kvmdbgfs import native  # noqa: E402
from kvmdbgfs.kvm.host import KvmHost  # noqa: E402
from kvmdbgfs.kvm.vm import MMU_MODES, Kvm  # noqa: E402
from kvmdbgfs.vmm.qemu import QemuProcess  # noqa: E402
from kvmdbgfs.vmm.vmm import Vmm  # noqa: E402
from kvmdbgfs.workloads import run_workload  # noqa: E402

GUEST = {"memory": "6G", "vcpus": 2}


def tree_digest(host: KvmHost) -> str:
    """SHA-256 over every file's path and bytes, in path order."""
    digest = hashlib.sha256()
    for path in walk_files(host.debugfs_dir):
        digest.update(path.encode() + b"\0" + cat(host.debugfs_dir, path).encode() + b"\0")
    return digest.hexdigest()


def mmu_digest(kvm: Kvm) -> str:
    """SHA-256 over mmu_state() (tests/mmu_testlib.py), pickled."""
    return hashlib.sha256(pickle.dumps(mmu_state(kvm), protocol=4)).hexdigest()


def workload_cpu(vm: QemuProcess, name: str, settings: dict[str, int]) -> float:
    """Runs the workload to its end; the CPU seconds the whole process used meanwhile."""
    start = time.process_time()
    run_workload(vm, name, settings)
    return time.process_time() - start


def run_design(design: str, children: int, fork: bool, mmu: str, uptime: int) -> None:
    """The bench's scenario under one rmap design: a line per step with its CPU time and both digests."""
    vmm = Vmm(seed=1)
    try:
        vm = vmm.create_vm(vmm.host.make_config(**GUEST, mmu=mmu, rmap_design=design, seed=1))
        steps = [("idle", {"uptime": uptime})] + ([("rmap_fork", {"children": children})] if fork else [])
        for name, settings in steps:
            seconds = workload_cpu(vm, name, settings)
            print(
                f"{design} {name:9s} cpu {seconds:6.2f} s  tree {tree_digest(vmm.host)[:16]}  mmu {mmu_digest(vm.kvm)[:16]}",
                flush=True,
            )
    finally:
        vmm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=500)
    parser.add_argument("--designs", default="ABCD")
    parser.add_argument("--no-fork", action="store_true")
    parser.add_argument("--mmu", default="shadow", choices=MMU_MODES)
    parser.add_argument("--uptime", type=int, default=10, help="seconds of the idle boot")
    args = parser.parse_args()
    print(f"modules: {native.installed or 'python'}", flush=True)  # compiled (kvmdbgfs/native.py) or not
    for design in args.designs:
        run_design(design, args.children, not args.no_fork, args.mmu, args.uptime)


if __name__ == "__main__":
    main()
