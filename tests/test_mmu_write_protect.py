"""Guest page-table writes under shadow paging: emulated writes, write flooding, unsync and resync."""

from __future__ import annotations

import numpy as np
from mmu_testlib import (
    BASE,
    DATA,
    USER_RW,
    check_invariants,
    faulted_process,
    gvas,
    leaf_spte,
    rmap_count,
    vcpu_stats,
    vm_stats,
)

from kvmdbgfs.arch.x86.mmu.mmu import LINUX_PAGE_OFFSET
from kvmdbgfs.arch.x86.mmu.spte import PT_WRITABLE_MASK
from kvmdbgfs.guest.pte import make_pte

PT_INDEX_OF_PD = 2  # BASE is 4 MiB: PD entry 2


def page(kvm, gfn: int):
    return next(sp for sp in kvm.arch.mmu.sps.by_id.values() if sp.gfn == gfn and not sp.direct)


def test_a_store_to_an_upper_level_table_is_emulated_and_unlinks_the_child() -> None:
    kvm, _guest, _pgd, pd, pt = faulted_process()
    before = vcpu_stats(kvm, "exits", "pf_taken")
    pt_page = page(kvm, pt)
    kvm.arch.mmu.store_pte(0, pd, PT_INDEX_OF_PD, 0)  # free_pgtables: pmd_clear
    assert kvm.arch.mmu.memory.read_pte(pd, PT_INDEX_OF_PD) == 0
    assert vcpu_stats(kvm, "pf_emulate", "insn_emulation") == {"pf_emulate": 1, "insn_emulation": 1}
    assert vcpu_stats(kvm, "exits", "pf_taken") == {"exits": before["exits"] + 1, "pf_taken": before["pf_taken"] + 1}
    assert vm_stats(kvm, "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded", "mmu_shadow_zapped") == {
        "mmu_pte_write": 1,
        "mmu_pde_zapped": 0,
        "mmu_flooded": 0,
        "mmu_shadow_zapped": 0,
    }
    # The PT's shadow page is unlinked, not zapped: it lingers with its leaf sptes in the rmaps.
    assert kvm.arch.mmu.parents.of(pt_page) == []
    assert pt_page.id in kvm.arch.mmu.sps.by_id and not pt_page.invalid
    assert [rmap_count(kvm, DATA + i) for i in range(8)] == [1] * 8
    # The direct-map spte of the PD, installed by the write fault, stays read-only (the PD is write-tracked).
    assert not leaf_spte(kvm, LINUX_PAGE_OFFSET + (pd << 12)) & PT_WRITABLE_MASK
    check_invariants(kvm)


def test_write_flooding_zaps_an_upper_level_page_on_the_third_emulated_write() -> None:
    kvm, _guest, _pgd, pd, _pt = faulted_process()
    mmu = kvm.arch.mmu
    mmu.store_pte(0, pd, 5, make_pte(0x2100, USER_RW))
    mmu.store_pte(0, pd, 6, make_pte(0x2101, USER_RW))
    assert vm_stats(kvm, "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded") == {
        "mmu_pte_write": 2,
        "mmu_pde_zapped": 2,
        "mmu_flooded": 0,
    }
    pd_page = page(kvm, pd)
    mmu.store_pte(0, pd, 7, make_pte(0x2102, USER_RW))
    assert vm_stats(kvm, "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded", "mmu_shadow_zapped") == {
        "mmu_pte_write": 3,
        "mmu_pde_zapped": 2,
        "mmu_flooded": 1,
        "mmu_shadow_zapped": 1,
    }
    assert pd_page.invalid and pd_page.id not in mmu.sps.by_id
    # The PT page's 8 sptes linger; the write faults mapped the PD's direct-map block (8 sptes).
    assert vm_stats(kvm, "pages_4k") == {"pages_4k": 16} and rmap_count(kvm, DATA) == 1
    # No longer tracked: the next store faults once more and gets a writable direct-map spte, then runs freely.
    exits = kvm.vcpu_stat_sum("exits")
    mmu.store_ptes(0, pd, np.arange(8, 12), np.zeros(4, np.uint64))
    assert kvm.vcpu_stat_sum("exits") == exits + 1
    assert vcpu_stats(kvm, "pf_emulate", "pf_fixed") == {"pf_emulate": 3, "pf_fixed": 2}
    check_invariants(kvm)


def test_a_fault_through_a_page_resets_its_flooding_count() -> None:
    kvm, _guest, _pgd, pd, _pt = faulted_process()
    mmu = kvm.arch.mmu
    mmu.store_pte(0, pd, 5, 0)
    mmu.store_pte(0, pd, 6, 0)
    mmu.access(0, gvas(BASE + 12 * 4096, 1), write=False, user=True)  # walks through the PD's shadow page
    mmu.store_pte(0, pd, 7, 0)
    assert vm_stats(kvm, "mmu_flooded") == {"mmu_flooded": 0} and page(kvm, pd).write_flooding_count == 1


def test_a_write_to_a_last_level_table_unsyncs_it_until_the_next_cr3_load() -> None:
    kvm, _guest, _pgd, pd, pt = faulted_process()
    mmu = kvm.arch.mmu
    pt_page, pd_page = page(kvm, pt), page(kvm, pd)
    mmu.store_pte(0, pt, 20, make_pte(DATA + 20, USER_RW))
    assert vm_stats(kvm, "mmu_unsync", "mmu_pte_write") == {"mmu_unsync": 1, "mmu_pte_write": 0}
    assert vcpu_stats(kvm, "pf_fixed", "pf_emulate") == {"pf_fixed": 2, "pf_emulate": 0}
    assert pt_page.unsync and pd_page.unsync_child_bitmap == 1 << PT_INDEX_OF_PD and pd_page.unsync_children == 1
    assert mmu.vcpu(0).root.unsync_children == 1
    assert leaf_spte(kvm, LINUX_PAGE_OFFSET + (pt << 12)) & PT_WRITABLE_MASK
    exits = kvm.vcpu_stat_sum("exits")
    mmu.store_pte(0, pt, 0, 0)  # the guest unmaps page 0 ...
    mmu.store_pte(0, pt, 1, make_pte(DATA + 100, USER_RW))  # ... and remaps page 1 elsewhere: no exits
    assert kvm.vcpu_stat_sum("exits") == exits
    assert leaf_spte(kvm, BASE) and rmap_count(kvm, DATA) == 1  # stale until the guest flushes
    flushes = kvm.stat.remote_tlb_flush_requests
    mmu.flush_tlb(0)
    assert vm_stats(kvm, "mmu_unsync") == {"mmu_unsync": 0} and not pt_page.unsync
    assert pd_page.unsync_child_bitmap == 0 and mmu.vcpu(0).root.unsync_children == 0
    assert leaf_spte(kvm, BASE) == 0 and leaf_spte(kvm, BASE + 4096) == 0
    assert [rmap_count(kvm, DATA + i) for i in range(8)] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert not leaf_spte(kvm, LINUX_PAGE_OFFSET + (pt << 12)) & PT_WRITABLE_MASK  # write-protected again
    # Two flushes: the write protection, then the dropped sptes. kvm_flush_remote_tlbs() counts a request each
    # time, but remote_tlb_flush only when it had to IPI a vCPU in guest mode; this bare VM's only vCPU is the
    # one handling the exit, so no IPI is sent.
    assert (kvm.stat.remote_tlb_flush_requests, kvm.stat.remote_tlb_flush) == (flushes + 2, 0)
    assert vcpu_stats(kvm, "tlb_flush") == {"tlb_flush": 2}
    check_invariants(kvm)


def test_sync_updates_the_access_of_a_pte_made_read_only() -> None:
    """fork() write-protects the parent's PTEs; the resync turns the sptes read-only, rmaps untouched."""
    kvm, _guest, _pgd, _pd, pt = faulted_process()
    mmu = kvm.arch.mmu
    wrprotected = np.array([make_pte(DATA + i, USER_RW & ~2) for i in range(8)], np.uint64)
    mmu.store_ptes(0, pt, np.arange(8), wrprotected)
    assert vcpu_stats(kvm, "exits") == {"exits": 3}  # CR3, the first fault, one write fault to unsync
    mmu.flush_tlb(0)
    assert all(
        leaf_spte(kvm, BASE + i * 4096) and not leaf_spte(kvm, BASE + i * 4096) & PT_WRITABLE_MASK for i in range(8)
    )
    assert [rmap_count(kvm, DATA + i) for i in range(8)] == [1] * 8
    check_invariants(kvm)


def test_invlpg_syncs_the_one_spte_of_an_unsync_page() -> None:
    kvm, _guest, _pgd, _pd, pt = faulted_process()
    mmu = kvm.arch.mmu
    mmu.store_ptes(0, pt, np.array([0, 1]), np.zeros(2, np.uint64))
    mmu.invlpg(0, BASE)
    assert leaf_spte(kvm, BASE) == 0 and leaf_spte(kvm, BASE + 4096) != 0
    assert page(kvm, pt).unsync and vcpu_stats(kvm, "invlpg") == {"invlpg": 1}
    check_invariants(kvm)


def test_a_data_write_to_a_stale_upper_level_table_unprotects_it_instead_of_emulating() -> None:
    """The guest freed a PD page whose shadow page lingers, and zeroes it as a data page: KVM zaps the
    shadow pages of the gfn (kvm_mmu_unprotect_page) and lets the guest retry."""
    kvm, _guest, _pgd, pd, _pt = faulted_process()
    mmu = kvm.arch.mmu
    mmu.access(0, np.array([LINUX_PAGE_OFFSET + (pd << 12)], np.uint64), write=False, user=False)
    zapped = kvm.stat.mmu_shadow_zapped
    mmu.access(0, np.array([LINUX_PAGE_OFFSET + (pd << 12)], np.uint64), write=True, user=False)
    assert kvm.stat.mmu_shadow_zapped == zapped + 1 and not mmu.sps.has_gptes(pd)
    assert vcpu_stats(kvm, "pf_emulate", "insn_emulation") == {"pf_emulate": 1, "insn_emulation": 1}
    assert leaf_spte(kvm, LINUX_PAGE_OFFSET + (pd << 12)) & PT_WRITABLE_MASK
    check_invariants(kvm)


def test_an_emulated_write_to_a_gfn_shadowed_at_two_levels_drops_the_written_leaf() -> None:
    """A page that is a PT for one process and a PD for another cannot go unsync: a store into it is
    emulated and zaps the written entry in both shadow pages (for the PT one: drop_spte -> rmap_remove)."""
    kvm, guest, _pgd, _pd, pt = faulted_process()
    mmu = kvm.arch.mmu
    other, pdpt, table = guest.new_pgd(), guest.alloc_table(), guest.alloc_table()
    mmu.memory.store_pte(other, 0, make_pte(pdpt, USER_RW & ~(1 << 63)))
    mmu.memory.store_pte(pdpt, 0, make_pte(pt, USER_RW & ~(1 << 63)))  # pt is the other process's PD
    mmu.memory.store_pte(pt, 30, make_pte(table, USER_RW & ~(1 << 63)))  # its entry 30 links a PT
    mmu.memory.store_pte(table, 0, make_pte(DATA + 50, USER_RW))
    mmu.load_cr3(0, other)
    mmu.access(0, np.array([30 << 21], np.uint64), write=False, user=True)
    assert [sp.level for sp in mmu.sps.valid_with_gptes(pt)] == [2, 1]
    mmu.store_pte(0, pt, 3, 0)
    assert vcpu_stats(kvm, "pf_emulate") == {"pf_emulate": 1}
    assert rmap_count(kvm, DATA + 3) == 0 and vm_stats(kvm, "mmu_pte_write") == {"mmu_pte_write": 1}
    check_invariants(kvm)


def test_unsync_pages_are_synced_when_their_root_is_loaded_again() -> None:
    """A CR3 load syncs the root being loaded: pages unsync under a cached previous root wait for it."""
    kvm, guest, pgd, _pd, pt = faulted_process()
    mmu = kvm.arch.mmu
    other = guest.new_pgd()
    guest.map(other, BASE, [DATA + 200])
    mmu.store_pte(0, pt, 0, 0)
    mmu.load_cr3(0, other)
    assert page(kvm, pt).unsync and rmap_count(kvm, DATA) == 1
    assert mmu.vcpu(0).prev_roots[0].gfn == pgd and mmu.vcpu(0).prev_roots[0].root_count == 1
    misses = kvm.stat.mmu_cache_miss
    mmu.load_cr3(0, pgd)  # found in the previous-roots cache: no lookup, but a sync
    assert kvm.stat.mmu_cache_miss == misses and not page(kvm, pt).unsync and rmap_count(kvm, DATA) == 0
    check_invariants(kvm)


def test_the_root_cache_keeps_four_roots_and_frees_the_least_recent() -> None:
    kvm, guest, pgd, _pd, _pt = faulted_process()
    mmu = kvm.arch.mmu
    pgds = [pgd] + [guest.new_pgd() for _ in range(4)]
    for other in pgds[1:]:
        mmu.load_cr3(0, other)
    vcpu = mmu.vcpu(0)
    assert [vcpu.root.gfn] + [root.gfn for root in vcpu.prev_roots] == pgds[:0:-1]
    assert page(kvm, pgd).root_count == 0 and not page(kvm, pgd).invalid  # evicted, not zapped
    assert kvm.stat.mmu_cache_miss == 4 + 4
