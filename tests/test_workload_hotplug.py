"""The hotplug workload on a KVM guest, in-process: the DIMM's rmaps while plugged, nothing left after unplug."""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pytest
from inprocess import cat, walk_files
from mmu_testlib import check_invariants, rmap_entries
from test_guest_helpers import user_pte
from test_workloads import booted, histogram, on_vcpu_thread, running_vmm

from kvmdbgfs.arch.x86.mmu.spte import PG_LEVEL_4K, sptes_large, sptes_present, sptes_to_pfn
from kvmdbgfs.guest.pte import pte_gfn
from kvmdbgfs.guest.vaddr import PAGE_SIZE
from kvmdbgfs.kvm.host import KvmHost
from kvmdbgfs.kvm.vm import Kvm
from kvmdbgfs.vmm.qemu import QemuProcess
from kvmdbgfs.workloads import run_workload
from kvmdbgfs.workloads.hotplug import Dimm, dimm_slot, fill_buffers, plug, unplug

SIZE, USE = 256 << 20, 64 << 20
USE_PAGES = USE // PAGE_SIZE


def leaf_gfns(kvm: Kvm) -> np.ndarray:
    """The gfn of every present leaf spte the MMU holds (4K, or the first frame of a large one)."""
    pool, gfns = kvm.arch.mmu.pool, []
    for sp in kvm.arch.mmu.sps.by_id.values():
        row = pool.spt[sp.id]
        leaf = sptes_present(row) & (np.full(len(row), sp.level == PG_LEVEL_4K) | sptes_large(row))
        gfns.append(sptes_to_pfn(row[leaf]))
    return np.concatenate(gfns) if gfns else np.zeros(0, np.int64)


def buffer_frames(vm: QemuProcess, buffers) -> np.ndarray:
    """The frames the buffers' pages map, read from the guest's page tables."""
    kernel = vm.guest.kernel
    return np.array(
        [pte_gfn(user_pte(kernel, task, va)) for task, vma in buffers for va in range(vma.start, vma.end, PAGE_SIZE)]
    )


def plug_and_fill(vm: QemuProcess, dimm: Dimm) -> list:
    """On the vCPU thread, as the hotplug workload does: plug the DIMM, four services fill 64 MiB of buffers on
    it, 5 s of guest time pass."""
    plug(vm, dimm)
    buffers = fill_buffers(vm.guest.services[:4], USE_PAGES)
    vm.guest.advance(5)
    return buffers


@pytest.fixture(scope="module", params=["shadow", "tdp-legacy"])
def plugged(request) -> Iterator:
    """A booted 1 GiB guest with a 256 MiB DIMM plugged and 64 MiB of four services' buffers on it."""
    with booted(request.param) as (host, vm):
        dimm = dimm_slot(vm, SIZE)
        slots_before = len(vm.kvm.arch.memslots)
        buffers = on_vcpu_thread(vm, lambda vm: plug_and_fill(vm, dimm))
        yield host, vm, dimm, buffers, slots_before


def test_plugged_dimm_has_rmaps_and_holds_the_buffers(plugged) -> None:
    host, vm, dimm, buffers, slots_before = plugged
    kvm = vm.kvm
    assert len(kvm.arch.memslots) == slots_before + 2 and [s.as_id for s in dimm.slots] == [0, 1]
    frames = buffer_frames(vm, buffers)
    assert len(frames) == USE_PAGES and ((frames >= dimm.start) & (frames < dimm.end)).all()
    in_use = [int(np.count_nonzero(heads)) for heads in dimm.slots[0].rmap]
    if kvm.arch.mmu.shadow_paging:  # the buffers' 4K mappings and the direct map's 2M pages
        assert in_use[0] >= USE_PAGES and in_use[1] > 0
    else:  # EPT maps guest memory with 2M pages wherever the slot allows
        assert in_use[0] == 0 and in_use[1] >= USE // (2 << 20)
    assert not any(np.count_nonzero(heads) for heads in dimm.slots[1].rmap)  # SMM: never touched
    assert sum(histogram(host, kvm)["4K"]) == sum(len(s.rmap[0]) for s in kvm.arch.memslots)
    check_invariants(kvm)


def test_unplug_migrates_the_buffers_and_leaves_nothing_on_the_removed_gfns(plugged) -> None:
    _host, vm, dimm, buffers, slots_before = plugged
    kvm = vm.kvm
    slots = list(dimm.slots)
    start, end = dimm.start, dimm.end
    resident = [task.resident_pages() for task, _ in buffers]
    result = on_vcpu_thread(vm, lambda vm: unplug(vm, dimm))
    assert result.pages >= USE_PAGES and result.ptes >= USE_PAGES
    assert len(kvm.arch.memslots) == slots_before and all(slot not in kvm.arch.memslots for slot in slots)
    assert all(slot.rmap is None for slot in slots)
    gfns = leaf_gfns(kvm)
    assert not ((gfns >= start) & (gfns < end)).any()
    for base, _, _ in rmap_entries(kvm):
        assert not start <= base < end
    frames = buffer_frames(vm, buffers)
    assert len(np.unique(frames)) == USE_PAGES and not ((frames >= start) & (frames < end)).any()
    assert [task.resident_pages() for task, _ in buffers] == resident
    on_vcpu_thread(vm, lambda vm: vm.guest.advance(5))  # the guest runs on, faulting its memory back in
    assert not ((leaf_gfns(kvm) >= start) & (leaf_gfns(kvm) < end)).any()
    check_invariants(kvm)  # pages_4k/2m/1g match the leaf sptes the MMU holds, rmaps hold exactly those


def rmaps_after_hotplug(seed: int) -> str:
    with booted("shadow", memory="512M", seed=seed) as (host, vm):
        summary = run_workload(vm, "hotplug", {"size": "128M", "use": "32M", "rounds": 2})
        assert summary["pages_migrated"] >= 2 * (32 << 20) // PAGE_SIZE
        return cat(host.debugfs_dir, f"{vm.name}/mmu_rmaps_stat")


def test_same_seed_same_rmaps_stat() -> None:
    assert rmaps_after_hotplug(11) == rmaps_after_hotplug(11)


@pytest.fixture(scope="module")
def small() -> Iterator[tuple[KvmHost, QemuProcess]]:
    with booted("shadow", memory="512M", seed=4) as pair:
        yield pair


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"size": "128M", "use": "256M"}, "use (268435456) must not exceed the DIMM size (134217728)"),
        ({"size": "200M"}, "size must be a multiple of 128M (the guest's memory block), not 209715200"),
        ({"use": "17G"}, "use must be between 0 and 17179869184, not 18253611008"),
    ],
)
def test_bad_parameters_change_nothing(small, settings: dict, message: str) -> None:
    host, vm = small
    before = {path: cat(host.debugfs_dir, path) for path in walk_files(host.debugfs_dir)}
    runs, slots = vm.workload_runs, list(vm.kvm.arch.memslots)
    with pytest.raises(ValueError, match=re.escape(message)):
        run_workload(vm, "hotplug", settings)
    assert {path: cat(host.debugfs_dir, path) for path in walk_files(host.debugfs_dir)} == before
    assert vm.workload_runs == runs and vm.kvm.arch.memslots == slots


def test_use_must_fit_in_the_guest_memory_left(small) -> None:
    _host, vm = small
    stats = vm.guest.kernel.stats()
    with pytest.raises(ValueError, match=r"hotplug: use \(2147483648\) and the DIMM's memmap do not fit"):
        run_workload(vm, "hotplug", {"size": "2G", "use": "2G"})
    assert vm.guest.kernel.stats() == stats and vm.guest.kernel.ctx.pages.movable is None


@pytest.mark.parametrize(("memory", "base"), [("512M", 4 << 30), ("6G", 8 << 30), ("7G", 9 << 30)])
def test_dimm_goes_above_ram_1g_aligned(memory: str, base: int) -> None:
    with running_vmm() as vmm:
        vm = vmm.create_vm(vmm.host.make_config(memory=memory, vcpus=1, mmu="tdp"))
        assert dimm_slot(vm, SIZE) == Dimm(base // PAGE_SIZE, SIZE // PAGE_SIZE)
