"""The guest OS model (kvmdbgfs/guest) running on the MMU: invariants hold in every mode, and the guest's
batched page-table stores give the MMU exactly the state its one-by-one stores give."""

from __future__ import annotations

import numpy as np
import pytest
from mmu_testlib import check_invariants, mmu_state, new_vm

from kvmdbgfs.arch.x86.debugfs import kvm_mmu_rmaps_stat_show
from kvmdbgfs.arch.x86.mmu.memslot import gfn_to_index
from kvmdbgfs.arch.x86.mmu.rmaps_stat import RMAP_LOG_SIZE, format_mmu_rmaps_stat, rmap_bucket_ffs
from kvmdbgfs.arch.x86.mmu.spte import sptes_large, sptes_present, sptes_to_pfn
from kvmdbgfs.guest.kernel import GuestKernel

MEMORY = 256 << 20


def run_guest(mode: str, batch: bool):
    """systemd, a shell, five forks of it that run and exit, one more program."""
    kvm = new_vm(mode, memory="256M", vcpus=2, design="B")
    kernel = GuestKernel(MEMORY, kvm.arch.guest_hardware, np.random.default_rng(7), nr_vcpus=2, batch=batch)
    init = kernel.kthread("init")
    kernel.exec(init, "systemd")
    shell = kernel.spawn("bash", init)
    children = [kernel.fork(shell) for _ in range(5)]
    for child in children:
        kernel.run(child)
    for child in children:
        kernel.exit(child)
    kernel.spawn("bash", shell)
    return kvm


@pytest.mark.parametrize("mode", ["shadow", "tdp-legacy", "tdp"])
def test_the_guest_os_keeps_the_mmu_consistent(mode: str) -> None:
    kvm = run_guest(mode, batch=True)
    check_invariants(kvm)
    text = kvm_mmu_rmaps_stat_show(kvm)
    if mode == "shadow":
        assert kvm.stat.mmu_unsync >= 0 and kvm.stat.mmu_pte_write and kvm.stat.mmu_shadow_zapped
        assert kvm.vcpu_stat_sum("pf_emulate") and kvm.vcpu_stat_sum("tlb_flush")
        assert sum(int(v) for v in text.splitlines()[1].split("\t")[3:12]) > 0  # lists of 2 or more
    elif mode == "tdp-legacy":
        assert all(v == "0" for line in text.splitlines()[1:] for v in line.split("\t")[3:12])
        assert kvm.stat.pages_2m and not kvm.stat.mmu_pte_write
    else:
        assert text == "" and kvm.stat.pages_2m


@pytest.mark.parametrize("mode", ["shadow", "tdp-legacy"])
def test_batched_and_single_guest_stores_leave_the_same_mmu(mode: str) -> None:
    left, right = mmu_state(run_guest(mode, batch=True)), mmu_state(run_guest(mode, batch=False))
    assert [key for key in left if left[key] != right[key]] == []


def test_mmu_rmaps_stat_matches_the_mapped_leaves() -> None:
    """The file's histogram equals one computed from the present leaf sptes of the shadow pages."""
    kvm = run_guest("shadow", batch=True)
    mmu = kvm.arch.mmu
    leaves: list[list[int]] = [[], [], [], []]  # per level: the gfn of every present leaf spte
    for sp in mmu.sps.by_id.values():
        row = mmu.pool.spt[sp.id]
        leaf = sptes_present(row) & ((sp.level == 1) | sptes_large(row))
        leaves[sp.level - 1].extend(sptes_to_pfn(row[leaf]).tolist())
    hist = np.zeros((3, RMAP_LOG_SIZE), np.int64)
    for slot in kvm.arch.memslots:
        for level, heads in enumerate(slot.rmap or ()):
            counts = np.zeros(len(heads), np.int64)
            gfns = np.array(leaves[level], np.int64)
            mine = gfns[(gfns >= slot.base_gfn) & (gfns < slot.base_gfn + slot.npages)] if slot.as_id == 0 else gfns[:0]
            np.add.at(counts, gfn_to_index(mine, slot.base_gfn, level + 1), 1)
            hist[level] += np.bincount(rmap_bucket_ffs(counts), minlength=RMAP_LOG_SIZE)
    assert kvm_mmu_rmaps_stat_show(kvm) == format_mmu_rmaps_stat(hist)
    assert hist[0, 2:].sum() > 0
