"""Issues 4 and 14 benchmark: the emulated guest under the shadow MMU.

1. rmap_fork with 500 children in an idle guest under designs A, B, C and D:
   emulation CPU time and rmap descriptor visits, ratios next to the seed's. Each run is on a freshly booted
   guest (the first emulated, the others restored from its boot snapshot), so the runs repeat one measurement.
2. rmap_fork 500 against issue 14's target (the real kernel took 0.27-0.37 s for the whole guest run).
3. Booting the idle 6 GiB guest.
4. Batch against one-by-one for a fork of a process with 64 MiB touched.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np

from kvmdbgfs.arch.x86.kvm_arch import KvmArch, X86KvmArchFactory
from kvmdbgfs.bench.report import CPU_TIME, Figure, at_most, timed
from kvmdbgfs.guest.distro import Program
from kvmdbgfs.guest.kernel import GuestKernel
from kvmdbgfs.kvm.host import KvmHost
from kvmdbgfs.kvm.vm import Kvm
from kvmdbgfs.vmm.layout import q35_memslots
from kvmdbgfs.vmm.bootcache import BootCache
from kvmdbgfs.vmm.qemu import QemuProcess
from kvmdbgfs.vmm.vmm import Vmm
from kvmdbgfs.workloads import get_workload, run_workload

TITLE = "issues 4 and 14: the emulated guest under the shadow MMU"
SEED_MS = {"A": 367.2, "B": 265.2}  # v5.14 and v5.15 (design B) in the seed's cover letter
# Issue 14's targets: nothing in the run does the same work, so they stay absolute.
FORK_TARGET_S, BOOT_TARGET_S = 1.0, 3.0
FORK_RUNS = 3
FORK_METHOD = f"median of {FORK_RUNS} fresh guests, CPU"
GUEST: dict[str, Any] = {"memory": "6G", "vcpus": 2, "mmu": "shadow"}
BOOT = {"uptime": 10}
FORK = {"children": 500}
HOG = Program("hog", "memhog", ("libc.so.6",), heap_kib=64, text_frac=0.1)
HOG_BYTES = 64 << 20


def rmap_fork(vm: QemuProcess) -> tuple[float, dict]:
    """CPU seconds of rmap_fork x500 on ``vm``, and its summary."""
    return timed(lambda: run_workload(vm, "rmap_fork", FORK), CPU_TIME)


def fork_runs(design: str) -> tuple[float, list[float], float, int, dict]:
    """The idle boot of a 6 GiB shadow guest (CPU seconds), then rmap_fork on FORK_RUNS freshly booted guests:
    the first is that guest, the others restored from its boot snapshot (the same state: byte-identical files
    and behaviour), so every run does the same work. Also a second run on the last guest (later runs on one
    guest cost more: the shadow pages of the children's freed tables stay, as in KVM), and the first run's
    descriptor visits and summary."""
    with tempfile.TemporaryDirectory(prefix="kvmdbgfs-bench-cache-") as directory:
        cache = BootCache(Path(directory))
        vmm = Vmm(seed=1)
        config = vmm.host.make_config(**GUEST, rmap_design=design, seed=1)
        try:
            vm = vmm.create_vm(config)
            key = cache.key(vm, "idle", get_workload("idle").settings(BOOT))
            assert key is not None
            boot, booted = timed(lambda: run_workload(vm, "idle", BOOT), CPU_TIME)  # timed without the save
            cache.save(key, vm, booted)
            cache.flush()
            vmm.boot_cache = cache  # the VMs made from here on restore that boot
            costs = cast(KvmArch, vm.kvm.arch).rmaps.pte_list.costs
            visits_before = costs.desc_visits
            seconds, summary = rmap_fork(vm)
            runs = [seconds]
            visits = costs.desc_visits - visits_before
            for _ in range(FORK_RUNS - 1):
                vmm.destroy_vm(vm.name)
                vm = vmm.create_vm(config)
                run_workload(vm, "idle", BOOT)
                seconds, again_summary = rmap_fork(vm)
                runs.append(seconds)
                if cache.restored != len(runs) - 1 or {**again_summary, "vm": ""} != {**summary, "vm": ""}:
                    raise RuntimeError("a guest restored from the boot snapshot ran rmap_fork differently")
            again = rmap_fork(vm)[0]
        finally:
            vmm.shutdown()
    return boot, runs, again, visits, summary


def fork_rows() -> list[Figure]:
    rows, cpu = [], {}
    for design in ("A", "B", "C", "D"):
        boot, runs, again, visits, summary = fork_runs(design)
        seconds = cpu[design] = statistics.median(runs)
        seed = f"seed (real kernel, whole guest run) {SEED_MS[design]:.0f} ms" if design in SEED_MS else ""
        rows.append(Figure("rmap_fork x500", f"design {design}", seconds, "s", FORK_METHOD,
                           target=at_most(FORK_TARGET_S, True), reference=seed,
                           detail=f"{visits / 1e6:.2f}M desc visits, max rmap {summary['max_mmu_rmap_size']}; "
                                  f"again on the same guest: {again:.2f} s"))
        if design == "C":
            rows.append(Figure("idle boot 6 GiB", "shadow, design C", boot, "s", "one run, CPU",
                               target=at_most(BOOT_TARGET_S, True)))
    for pair in ("A/B", "B/C", "A/C", "C/D"):
        first, second = pair.split("/")
        seed = f"seed {SEED_MS[first] / SEED_MS[second]:.3f}" if first in SEED_MS and second in SEED_MS else ""
        rows.append(Figure("rmap_fork x500", f"{pair} time", cpu[first], "s", FORK_METHOD, cpu[second],
                           f"design {second}", reference=seed))
    return rows


def bare_vm() -> Kvm:
    """A 2 GiB shadow VM without a VMM (no vCPU thread runs): KVM_CREATE_VM, the q35 memslots, the vCPUs."""
    host = KvmHost(X86KvmArchFactory(), seed=2)
    config = host.make_config(memory="2G", vcpus=2, mmu="shadow", seed=2)
    kvm = host.kvm_create_vm(config, "1000-10")
    for slot_id, region in enumerate(q35_memslots(config.memory)):
        kvm.kvm_set_memory_region(slot_id, region.as_id, region.base_gfn, region.npages)
    for vcpu_id in range(config.vcpus):
        host.kvm_vm_ioctl_create_vcpu(kvm, vcpu_id)
    return kvm


def fork_64m(batch: bool) -> float:
    """Seconds to fork a process that has written 64 MiB of private memory."""
    kvm = bare_vm()
    hardware = cast(KvmArch, kvm.arch).guest_hardware
    kernel = GuestKernel(kvm.config.memory, hardware, np.random.default_rng(2), nr_vcpus=2, batch=batch)
    system = kernel.boot()
    hog = kernel.spawn(HOG, system.session[-1])
    region = hog.mmap(HOG_BYTES, name="hog")
    hog.touch(region.start, region.end, write=True)
    seconds, _ = timed(lambda: kernel.fork(hog), CPU_TIME)
    return seconds


def run() -> tuple[list[Figure], list[str]]:
    rows = fork_rows()
    one_by_one, batched = fork_64m(batch=False), fork_64m(batch=True)
    rows.append(Figure("fork of 64 MiB", "one-by-one", one_by_one * 1e3, "ms", "one run, CPU", batched * 1e3, "batch"))
    notes = [
        (
            "the seed measured whole-kernel wall time of rmap_fork on hardware (A: v5.14 367.2 ms, B: v5.15"
            " 265.2 ms); here the rows are emulation time, so compare the ratios, not the milliseconds; the"
            " absolute targets are issue 14's (at most 1 s per design, 3 s for the idle boot); each rmap_fork run"
            " is on a freshly booted guest (one emulated boot, the others restored from its snapshot), and a"
            " second run on the last one is in the detail column; times are the CPU time of"
            " this process (the guest's vCPU thread does the work while this thread waits; the manual clock leaves"
            " nothing else running), which leaves out other processes' turns on a shared machine"
        )
    ]
    return rows, notes
