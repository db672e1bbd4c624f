"""Shadow-MMU rules that changed between kernels, run as the VM's profile says (kvm/profiles.py,
ShadowMmuRules): one hand-built guest per rule, on ``v5.15`` and on ``latest``, whose stats differ
exactly where the two kernels differ and nowhere else."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from inprocess import cat
from mmu_testlib import BASE, DATA, USER_RW, USER_TABLE, faulted_process, guest_with_process, gvas
from mmu_testlib import check_invariants, leaf_spte, rmap_count

from kvmdbgfs.arch.x86.mmu.spte import PT_ACCESSED_MASK, PT_WRITABLE_MASK
from kvmdbgfs.guest.pte import make_pte
from kvmdbgfs.kvm.profiles import ALL_VCPU_STATS, ALL_VM_STATS
from kvmdbgfs.kvm.vm import Kvm

KERNELS = ("v5.15", "latest")


def all_stats(kvm: Kvm) -> dict[str, int]:
    """Every stat the model keeps for the VM as its debugfs files read it, vCPU stats summed."""
    stats = {desc.name: kvm.stat.read_u64(desc.name) for desc in ALL_VM_STATS}
    return stats | {desc.name: kvm.vcpu_stat_sum(desc.name) for desc in ALL_VCPU_STATS}


def run_on_both(scenario: Callable[[str], Kvm]) -> dict[str, tuple[int, int]]:
    """The stats that differ after ``scenario`` ran on v5.15 and on latest: name -> (v5.15, latest)."""
    old, new = (all_stats(scenario(kernel)) for kernel in KERNELS)
    return {name: (old[name], new[name]) for name in old if old[name] != new[name]}


def test_invlpg_prefetches_the_new_gpte_up_to_6_3() -> None:
    """The guest fills in entry 20 of an unsync PT and remaps entry 1, then INVLPGs both. Up to 6.3
    FNAME(invlpg) zaps each leaf and prefetches it from the new gPTE (not accessed: speculative); 6.4+ syncs
    only the present spte of entry 1, which it drops."""
    leaves = {}

    def scenario(kernel: str) -> Kvm:
        kvm, _guest, _pgd, _pd, pt = faulted_process(kernel)
        mmu = kvm.arch.mmu
        mmu.store_pte(0, pt, 20, make_pte(DATA + 20, USER_RW))  # unsyncs the PT
        mmu.store_pte(0, pt, 1, make_pte(DATA + 100, USER_RW))
        mmu.invlpg(0, BASE + 20 * 4096)
        mmu.invlpg(0, BASE + 4096)
        leaves[kernel] = [leaf_spte(kvm, BASE + i * 4096) for i in (1, 20)]
        assert [rmap_count(kvm, gfn) for gfn in (DATA + 1, DATA + 20, DATA + 100)] == (
            [0, 1, 1] if kernel == "v5.15" else [0, 0, 0]
        )
        check_invariants(kvm)
        return kvm

    assert run_on_both(scenario) == {"pages_4k": (17, 15)}  # entries 1 and 20 mapped again on 5.15 only
    assert all(leaf and not leaf & PT_ACCESSED_MASK for leaf in leaves["v5.15"]) and leaves["latest"] == [0, 0]


def test_sync_zaps_a_page_it_leaves_empty_up_to_5_15() -> None:
    """The guest unmaps every page of an unsync PT, then reloads CR3. Up to 5.15 kvm_sync_page() zaps the
    page left without a present spte, and the next access through it misses; 5.16+ keeps the empty page,
    which the guest's next store unsyncs again."""

    def scenario(kernel: str) -> Kvm:
        kvm, _guest, _pgd, _pd, pt = faulted_process(kernel)
        mmu = kvm.arch.mmu
        mmu.store_ptes(0, pt, np.arange(8), np.zeros(8, np.uint64))
        mmu.flush_tlb(0)
        mmu.store_pte(0, pt, 9, make_pte(DATA + 9, USER_RW))  # a write fault on the PT's gfn
        mmu.access(0, gvas(BASE + 9 * 4096, 1), write=False, user=True)
        check_invariants(kvm)
        return kvm

    assert run_on_both(scenario) == {
        "mmu_shadow_zapped": (1, 0),
        # 5.15: the zap left the PT's gfn unshadowed, so the store to entry 9 unsynced nothing; the access then
        # missed, made a new PT page and write-protected the gfn again (one more flush).
        "mmu_unsync": (0, 1),
        "mmu_cache_miss": (8, 7),
        # 5.15: write protection, FNAME(sync_page)'s own flush, the zap's commit, the new page's write
        # protection; 5.16+: write protection, then one flush for the dropped sptes.
        "remote_tlb_flush_requests": (4, 2),
        "tlb_flush": (3, 2),  # the vCPU serviced one more KVM_REQ_TLB_FLUSH on its way back in
    }


def test_a_lookup_that_syncs_an_empty_page_misses_up_to_5_15() -> None:
    """Process B's PD links process A's PT, which is unsync with all its sptes stale. B's first fault finds
    the page in the hash and syncs it: up to 5.15 the sync leaves nothing present, so the page is zapped and
    the lookup is a miss (a new page, write-protecting the gfn again); 5.16+ reuses it, still unsync."""

    def scenario(kernel: str) -> Kvm:
        kvm, guest, _pgd, _pd, pt = faulted_process(kernel)
        mmu = kvm.arch.mmu
        mmu.store_ptes(0, pt, np.arange(10), np.array([0] * 9 + [make_pte(DATA + 9, USER_RW)], np.uint64))
        pgd_b = guest.new_pgd()
        guest.pt_of(pgd_b, BASE)
        guest.memory.store_pte(pgd_b + 2, 2, make_pte(pt, USER_TABLE))  # B's PD entry 2 -> A's PT
        mmu.load_cr3(0, pgd_b)
        mmu.access(0, gvas(BASE + 9 * 4096, 1), write=False, user=True)
        assert rmap_count(kvm, DATA + 9) == 1
        check_invariants(kvm)
        return kvm

    assert run_on_both(scenario) == {
        "mmu_shadow_zapped": (1, 0),
        "mmu_cache_miss": (11, 10),
        "mmu_unsync": (0, 1),
        # Both flush for the dropped sptes (5.15 in FNAME(sync_page), 5.16+ after kvm_sync_page); 5.15 also
        # commits the zap and write-protects the gfn for the new page.
        "remote_tlb_flush_requests": (6, 4),
    }


def test_a_prefetched_writable_spte_unsyncs_up_to_5_15() -> None:
    """Entry 1 of the process's PT maps the PT itself, writable and dirty. The fault on page 0 prefetches
    it: up to 5.15 the prefetch unsyncs the PT like a write fault would and maps it writable; 5.16+ leaves
    the PT sync and the prefetched spte read-only."""
    writable = {}

    def scenario(kernel: str) -> Kvm:
        kvm, _guest, _pgd, pt = guest_with_process(kernel=kernel)
        kvm.arch.mmu.memory.store_pte(pt, 1, make_pte(pt, USER_RW))
        kvm.arch.mmu.access(0, gvas(BASE, 1), write=False, user=True)
        writable[kernel] = bool(leaf_spte(kvm, BASE + 4096) & PT_WRITABLE_MASK)
        check_invariants(kvm)
        return kvm

    assert run_on_both(scenario) == {"mmu_unsync": (1, 0)}
    assert writable == {"v5.15": True, "latest": False}


def test_max_mmu_rmap_size_reads_0_on_5_15() -> None:
    """Pages 0 and 1 map the same gfn: the prefetch of page 1 finds one spte in its rmap. 5.15 never updates
    max_mmu_rmap_size (4293ddb788c1; fixed in 6.0-rc7, never in 5.15.y), so its file reads 0."""
    files = {}

    def scenario(kernel: str) -> Kvm:
        kvm, _guest, _pgd, pt = guest_with_process(kernel=kernel)
        kvm.arch.mmu.memory.store_pte(pt, 1, make_pte(DATA, USER_RW))
        kvm.arch.mmu.access(0, gvas(BASE, 1), write=False, user=True)
        assert rmap_count(kvm, DATA) == 2
        files[kernel] = cat(kvm.host.debugfs_dir, f"{kvm.name}/max_mmu_rmap_size")
        return kvm

    assert run_on_both(scenario) == {"max_mmu_rmap_size": (0, 1)}
    assert files == {"v5.15": "0\n", "latest": "1\n"}
