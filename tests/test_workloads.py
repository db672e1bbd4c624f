"""Workloads on emulated guests, in-process: what they leave in the MMU and in the debugfs files."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from inprocess import cat, walk_files

from kvmdbgfs.kvm.host import KvmHost
from kvmdbgfs.vmm.qemu import QemuProcess, WorkloadJob
from kvmdbgfs.vmm.vmm import Vmm
from kvmdbgfs.workloads import run_workload, wait_workload

ROW = re.compile(r"Level=(4K|2M|1G):\t((?:\d+\t){11})\n")


def histogram(host: KvmHost, vm: Any) -> dict[str, list[int]]:
    """The mmu_rmaps_stat rows of ``vm`` (anything with the VM's ``name``: a QemuProcess or a Kvm)."""
    text = cat(host.debugfs_dir, f"{vm.name}/mmu_rmaps_stat")
    return {level: [int(v) for v in values.split()] for level, values in ROW.findall(text)}


@contextlib.contextmanager
def running_vmm(kernel: str = "latest", seed: int = 0) -> Iterator[Vmm]:
    """A VMM (manual clock) that is shut down, its VMs' threads with it, when the block ends."""
    vmm = Vmm(profile=kernel, seed=seed)
    try:
        yield vmm
    finally:
        vmm.shutdown()


@contextlib.contextmanager
def booted(
    mmu: str, memory: str = "1G", kernel: str = "latest", seed: int = 5
) -> Iterator[tuple[KvmHost, QemuProcess]]:
    """A VM booted by the idle workload (10 s of uptime): (host, QEMU process), for the block's duration."""
    with running_vmm(kernel, seed) as vmm:
        vm = vmm.create_vm(vmm.host.make_config(memory=memory, vcpus=2, mmu=mmu, seed=seed))
        run_workload(vm, "idle", {"uptime": 10})
        yield vmm.host, vm


def on_vcpu_thread(vm: QemuProcess, step: Callable[[QemuProcess], Any]) -> Any:
    """Run ``step(vm)`` on the VM's vCPU thread, as a workload's code runs (not counted as a workload run);
    its return value. Keep assertions out of ``step``: its exceptions come back as ValueError."""
    job = vm.submit(WorkloadJob("test step", lambda vm, progress: {"value": step(vm)}))
    return wait_workload(job)["value"]


@pytest.fixture(scope="module")
def shadow() -> Iterator[tuple[KvmHost, QemuProcess]]:
    with booted("shadow") as pair:
        yield pair


@pytest.fixture
def vmm() -> Iterator[Vmm]:
    with running_vmm() as vmm:
        yield vmm


def test_idle_shadow_guest_shares_pages_across_processes(shadow) -> None:
    host, vm = shadow
    kvm = vm.kvm
    rows = histogram(host, kvm)
    assert sum(rows["4K"]) == 2 * (160 + 64 + 261888 + 4096 + 64) + 32 + 2 * (3 + 1)  # + the private TSS, APIC slots
    assert sum(rows["4K"][2:]) > 1000  # many gfns mapped by several processes
    assert kvm.stat.max_mmu_rmap_size >= 8
    assert kvm.stat.pages_4k > 10000 and kvm.stat.mmu_cache_miss > 100
    assert int(cat(host.debugfs_dir, f"{kvm.name}/pages_4k")) == kvm.stat.pages_4k
    assert int(cat(host.debugfs_dir, f"{kvm.name}/pf_fixed")) > 0
    # Under shadow paging every guest #PF exits first and is reflected back into the guest.
    assert int(cat(host.debugfs_dir, f"{kvm.name}/pf_guest")) == kvm.vcpu_stat_sum("pf_guest") > 1000


def test_booted_vcpus_show_their_thread_ids(shadow) -> None:
    """The first KVM_RUN gives each vCPU its thread's pid: QEMU's main thread and RCU thread come first."""
    host, vm = shadow
    for vcpu_id in range(2):
        assert cat(host.debugfs_dir, f"{vm.name}/vcpu{vcpu_id}/pid") == f"{vm.pid + 2 + vcpu_id}\n"


def test_idle_tdp_legacy_has_only_0_and_1_columns() -> None:
    with booted("tdp-legacy") as (host, vm):
        kvm = vm.kvm
        rows = histogram(host, kvm)
        for level in ("4K", "2M", "1G"):
            assert sum(rows[level][2:]) == 0, level
        # EPT over THP-backed host memory maps the guest with 2M leaves wherever a slot covers the frame.
        assert rows["2M"][1] == kvm.stat.pages_2m > 50 and kvm.stat.max_mmu_rmap_size <= 1
        assert kvm.vcpu_stat_sum("pf_guest") == 0  # with EPT the guest's own faults never exit


def test_idle_tdp_has_no_rmaps_but_counts_pages() -> None:
    with booted("tdp") as (host, vm):
        assert cat(host.debugfs_dir, f"{vm.name}/mmu_rmaps_stat") == ""
        assert vm.kvm.stat.pages_2m > 50  # 2M leaves, as with tdp-legacy, but no rmap behind them


def test_rmap_fork_grows_max_rmap_size_by_about_n() -> None:
    with booted("shadow", seed=6) as (host, vm):
        kvm = vm.kvm
        before = kvm.stat.max_mmu_rmap_size
        summary = run_workload(vm, "rmap_fork", {"children": 60})
        assert summary["max_mmu_rmap_size_before"] == before
        assert 60 <= kvm.stat.max_mmu_rmap_size - before <= 75
        assert cat(host.debugfs_dir, f"{kvm.name}/max_mmu_rmap_size") == f"{kvm.stat.max_mmu_rmap_size}\n"


def test_same_seed_same_tree() -> None:
    def tree() -> dict[str, str]:
        with booted("shadow", memory="512M", seed=9) as (host, vm):
            run_workload(vm, "rmap_fork", {"children": 10})
            return {path: cat(host.debugfs_dir, path) for path in walk_files(host.debugfs_dir)}

    assert tree() == tree()


@pytest.mark.parametrize("name", ["rmap_fork", "kbuild", "memhog", "hotplug"])
def test_workloads_need_a_booted_guest_and_change_nothing_without_one(name: str, vmm: Vmm) -> None:
    host = vmm.host
    vm = vmm.create_vm(host.make_config(memory="256M", vcpus=1, mmu="shadow"))
    before = {path: cat(host.debugfs_dir, path) for path in walk_files(host.debugfs_dir)}
    with pytest.raises(ValueError, match="has not booted: run the idle workload on it first"):
        run_workload(vm, name, {})
    assert {path: cat(host.debugfs_dir, path) for path in walk_files(host.debugfs_dir)} == before
    assert vm.workload_runs == 0 and vm.kvm.users_count == 1


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("idle", {"uptime": -1}, "uptime must be between 0 and 3600, not -1"),
        ("rmap_fork", {"children": 5}, "children must be between 10 and 1000, not 5"),
        ("rmap_fork", {"kids": 5}, "rmap_fork: unknown parameter 'kids'"),
        ("memhog", {"size": "1Q"}, "size: not a size: '1Q'"),
        ("nosuch", {}, "unknown workload 'nosuch'"),
    ],
)
def test_bad_parameters_are_refused_first(name: str, settings: dict, message: str, vmm: Vmm) -> None:
    vm = vmm.create_vm(vmm.host.make_config(memory="256M", vcpus=1, mmu="shadow"))
    with pytest.raises(ValueError, match=re.escape(message)):
        run_workload(vm, name, settings)
    assert vm.guest is None and vm.workload_runs == 0


def test_idle_twice_is_refused(shadow) -> None:
    host, vm = shadow
    runs = vm.workload_runs
    with pytest.raises(ValueError, match="has already booted"):
        run_workload(vm, "idle", {})
    assert vm.workload_runs == runs


def test_kbuild_memhog_hotplug(shadow) -> None:
    host, vm = shadow
    kvm = vm.kvm
    assert run_workload(vm, "kbuild", {"files": 4, "jobs": 2})["compiles"] == 4
    summary = run_workload(vm, "memhog", {"size": "64M"})
    assert summary["resident_pages"] >= (64 << 20) // 4096 and summary["pages_2m"] > 0
    slots = len(kvm.arch.memslots)
    heads = sum(histogram(host, kvm)["4K"])
    summary = run_workload(vm, "hotplug", {"size": "256M", "rounds": 2})
    assert summary["rounds"] == 2 and summary["shadow_pages_zapped"] > 0
    assert len(kvm.arch.memslots) == slots and sum(histogram(host, kvm)["4K"]) == heads
