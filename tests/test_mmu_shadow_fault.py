"""Shadow paging faults (EPT off): shadow pages, leaf sptes, prefetch, write protection of guest tables."""

from __future__ import annotations

import numpy as np
from mmu_testlib import (
    BASE,
    DATA,
    KERNEL_PDPT,
    USER_RO,
    USER_RW,
    ToyGuest,
    check_invariants,
    guest_with_process,
    gvas,
    leaf_spte,
    new_vm,
    rmap_count,
    vcpu_stats,
    vm_stats,
)

from kvmdbgfs.arch.x86.mmu.mmu import LINUX_PAGE_OFFSET
from kvmdbgfs.arch.x86.mmu.shadow_page import kvm_page_table_hashfn, mmu_page_role
from kvmdbgfs.arch.x86.mmu.spte import ACC_ALL, ACC_USER_MASK, ACC_WRITE_MASK, PT_WRITABLE_MASK, sptep
from kvmdbgfs.guest.pte import PT_ACCESSED_MASK, PT_DIRTY_MASK, PT_PAGE_SIZE_MASK, make_pte

# A present leaf: MMU-present, P, host-writable, plus A (a fault, not a prefetch), W + MMU-writable + D, U, NX.
FAULTED_RW = (1 << 63) | 0xE67
PREFETCHED_RW = (1 << 63) | 0xE47  # no A: prefetched sptes are not marked accessed


def test_first_fault_builds_four_shadow_pages_and_prefetches_its_block() -> None:
    kvm, _guest, pgd, pt = guest_with_process()
    mmu = kvm.arch.mmu
    assert vm_stats(kvm, "mmu_cache_miss") == {"mmu_cache_miss": 1}  # the root, at CR3 load
    mmu.access(0, gvas(BASE + 2 * 4096, 1), write=False, user=True)
    assert leaf_spte(kvm, BASE + 2 * 4096) == FAULTED_RW | (DATA + 2) << 12
    for i in (0, 1, 3, 4, 5, 6, 7):
        assert leaf_spte(kvm, BASE + i * 4096) == PREFETCHED_RW | (DATA + i) << 12
    assert [leaf_spte(kvm, BASE + i * 4096) for i in range(8, 16)] == [0] * 8
    assert [rmap_count(kvm, DATA + i) for i in range(16)] == [1] * 8 + [0] * 8
    assert vm_stats(kvm, "mmu_cache_miss", "pages_4k", "pages_2m", "remote_tlb_flush") == {
        "mmu_cache_miss": 4,
        "pages_4k": 8,
        "pages_2m": 0,
        "remote_tlb_flush": 0,
    }
    assert vcpu_stats(kvm, "pf_taken", "pf_fixed", "exits", "tlb_flush", "pf_guest") == {
        "pf_taken": 1,
        "pf_fixed": 1,
        "exits": 2,
        "tlb_flush": 1,
        "pf_guest": 0,
    }
    root = mmu.vcpu(0).root
    pages = sorted(mmu.sps.by_id.values(), key=lambda sp: -sp.level)
    assert [(sp.gfn, sp.level, sp.direct) for sp in pages] == [
        (pgd, 4, False),
        (pgd + 1, 3, False),
        (pgd + 2, 2, False),
        (pt, 1, False),
    ]
    assert pages[0] is root and root.role == mmu_page_role(4, False, ACC_ALL) and root.root_count == 1
    # Each child is linked from exactly one parent spte, recorded in its parent_ptes.
    assert mmu.parents.of(pages[1]) == [sptep(root.id, 0)]
    assert mmu.parents.of(pages[3]) == [sptep(pages[2].id, 2)]
    # The leaf's rmap holds its spte's address.
    assert list(
        kvm.arch.rmaps.pte_list.iterate(
            *next(s for s in kvm.arch.memslots if s.as_id == 0 and s.contains(DATA)).gfn_to_rmap(DATA + 2, 1)
        )
    ) == [sptep(pages[3].id, 2)]
    check_invariants(kvm)


def test_prefetch_skips_present_entries_and_stops_at_the_first_unusable_gpte() -> None:
    kvm, _guest, _pgd, pt = guest_with_process()
    mmu = kvm.arch.mmu
    mmu.memory.store_pte(pt, 5, make_pte(DATA + 5, USER_RW & ~PT_ACCESSED_MASK))  # never accessed: not prefetched
    mmu.access(0, gvas(BASE + 3 * 4096, 1), write=False, user=True)
    assert [rmap_count(kvm, DATA + i) for i in range(8)] == [1, 1, 1, 1, 1, 0, 0, 0]
    mmu.access(0, gvas(BASE + 6 * 4096, 1), write=False, user=True)  # 0-4 are present: skipped, 5 stops it
    assert [rmap_count(kvm, DATA + i) for i in range(8)] == [1, 1, 1, 1, 1, 0, 1, 0]
    assert vcpu_stats(kvm, "pf_fixed") == {"pf_fixed": 2} and vm_stats(kvm, "pages_4k") == {"pages_4k": 6}


def test_a_clean_page_maps_read_only_and_a_later_write_reuses_its_rmap_entry() -> None:
    kvm, _guest, _pgd, pt = guest_with_process(flags=USER_RW & ~PT_DIRTY_MASK)
    mmu = kvm.arch.mmu
    mmu.access(0, gvas(BASE, 1), write=False, user=True)
    assert not leaf_spte(kvm, BASE) & PT_WRITABLE_MASK
    mmu.access(0, gvas(BASE, 1), write=True, user=True)
    assert leaf_spte(kvm, BASE) == FAULTED_RW | DATA << 12
    assert mmu.memory.read_pte(pt, 0) & PT_DIRTY_MASK  # the walk set D in the guest PTE
    assert rmap_count(kvm, DATA) == 1 and vm_stats(kvm, "pages_4k") == {"pages_4k": 8}
    assert vcpu_stats(kvm, "pf_fixed", "exits") == {"pf_fixed": 2, "exits": 3}


def test_a_non_present_guest_pte_is_the_guests_page_fault() -> None:
    kvm, _guest, _pgd, _pt = guest_with_process(npages=4)
    kvm.arch.mmu.access(0, gvas(BASE + 10 * 4096, 1), write=False, user=True)
    assert vcpu_stats(kvm, "pf_taken", "pf_guest", "pf_fixed") == {"pf_taken": 1, "pf_guest": 1, "pf_fixed": 0}
    assert vm_stats(kvm, "mmu_cache_miss", "pages_4k") == {"mmu_cache_miss": 1, "pages_4k": 0}


def test_a_user_write_to_a_read_only_guest_pte_is_the_guests_page_fault() -> None:
    kvm, _guest, _pgd, _pt = guest_with_process(npages=1, flags=USER_RO)
    mmu = kvm.arch.mmu
    mmu.access(0, gvas(BASE, 1), write=False, user=True)
    mmu.access(0, gvas(BASE, 1), write=True, user=True)
    assert vcpu_stats(kvm, "pf_taken", "pf_guest", "pf_fixed") == {"pf_taken": 2, "pf_guest": 1, "pf_fixed": 1}


def test_account_shadowed_write_protects_the_direct_map_spte_of_a_table() -> None:
    kvm, guest, pgd, _pt = guest_with_process()
    mmu = kvm.arch.mmu
    mmu.access(0, gvas(BASE, 1), write=False, user=True)
    table = guest.next_table  # the guest zeroes its next page-table page through the direct map
    mmu.access(0, np.array([LINUX_PAGE_OFFSET + (table << 12)], np.uint64), write=True, user=False)
    direct = leaf_spte(kvm, LINUX_PAGE_OFFSET + (table << 12))
    assert direct & PT_WRITABLE_MASK and rmap_count(kvm, table) == 1
    flushes = kvm.stat.remote_tlb_flush_requests
    assert guest.map(pgd, BASE + (2 << 20), [DATA + 100]) == table  # a second PT page, in that very page
    mmu.access(0, gvas(BASE + (2 << 20), 1), write=False, user=True)
    assert leaf_spte(kvm, LINUX_PAGE_OFFSET + (table << 12)) == direct & ~(PT_WRITABLE_MASK | 1 << 10)
    # kvm_flush_remote_tlbs() counts a request each time, but remote_tlb_flush only when it had to IPI a vCPU
    # in guest mode; this bare VM's only vCPU is the one handling the exit, so no IPI is sent.
    assert (kvm.stat.remote_tlb_flush_requests, kvm.stat.remote_tlb_flush) == (flushes + 1, 0)
    assert rmap_count(kvm, table) == 1  # write protection walks the rmap, it adds nothing
    check_invariants(kvm)


def test_the_direct_map_uses_direct_pages_sized_by_memslot_and_shadowed_gfns() -> None:
    """A 1G guest page: 1G is refused (the RAM slot starts at 1 MiB), 2M where no table is shadowed,
    else a direct 4K page with the neighbours prefetched by gfn."""
    kvm, _guest, _pgd, pt = guest_with_process()
    mmu = kvm.arch.mmu
    mmu.access(0, gvas(BASE, 1), write=False, user=True)  # the process's four tables are now shadowed
    far = 0x5000  # no page table in its 2M frame
    mmu.access(0, np.array([LINUX_PAGE_OFFSET + (far << 12)], np.uint64), write=False, user=False)
    assert vm_stats(kvm, "pages_2m", "pages_4k") == {"pages_2m": 1, "pages_4k": 8}
    assert rmap_count(kvm, far & ~511, level=2) == 1
    near = pt + 3  # in the frame of the process's tables
    mmu.access(0, np.array([LINUX_PAGE_OFFSET + (near << 12)], np.uint64), write=False, user=False)
    assert vm_stats(kvm, "pages_2m", "pages_4k") == {"pages_2m": 1, "pages_4k": 16}
    kpdpt = next(sp for sp in mmu.sps.by_id.values() if sp.gfn == KERNEL_PDPT)
    assert kpdpt.access == ACC_WRITE_MASK | 1 and not kpdpt.direct
    directs = sorted((sp.level, sp.gfn, sp.access) for sp in mmu.sps.by_id.values() if sp.direct)
    assert directs == [(1, 0x2000, ACC_WRITE_MASK), (2, 0, ACC_WRITE_MASK)]
    # The shadowed tables among the prefetched gfns map read-only, the others writable.
    for gfn in range(0x2000, 0x2008):
        writable = bool(leaf_spte(kvm, LINUX_PAGE_OFFSET + (gfn << 12)) & PT_WRITABLE_MASK)
        assert writable == (gfn > pt), hex(gfn)
    check_invariants(kvm)


def test_a_guest_2m_page_gets_a_2m_spte_in_the_shadow_pd() -> None:
    kvm = new_vm()
    guest = ToyGuest(kvm)
    pgd = guest.new_pgd()
    guest.pt_of(pgd, BASE)  # allocates the PDPT, the PD and a PT; the PD gets a 2M entry as well
    pd = pgd + 2
    kvm.arch.mmu.memory.store_pte(pd, 3, make_pte(0x4000, USER_RW | PT_PAGE_SIZE_MASK))
    kvm.arch.mmu.load_cr3(0, pgd)
    kvm.arch.mmu.access(0, gvas(3 << 21, 2), write=True, user=True)
    assert vm_stats(kvm, "pages_2m", "pages_4k", "mmu_cache_miss") == {
        "pages_2m": 1,
        "pages_4k": 0,
        "mmu_cache_miss": 3,
    }
    assert rmap_count(kvm, 0x4000, level=2) == 1
    assert vcpu_stats(kvm, "pf_fixed") == {"pf_fixed": 1}
    check_invariants(kvm)


def test_processes_sharing_a_data_page_each_add_an_rmap_entry() -> None:
    kvm, guest, _pgd, _pt = guest_with_process(npages=1)
    mmu = kvm.arch.mmu
    other = guest.new_pgd()
    guest.map(other, BASE + 5 * 4096, [DATA])
    mmu.access(0, gvas(BASE, 1), write=False, user=True)
    mmu.load_cr3(0, other)
    mmu.access(0, gvas(BASE + 5 * 4096, 1), write=False, user=True)
    assert rmap_count(kvm, DATA) == 2
    assert vm_stats(kvm, "mmu_cache_miss", "max_mmu_rmap_size") == {"mmu_cache_miss": 8, "max_mmu_rmap_size": 1}
    check_invariants(kvm)


def test_supervisor_pages_have_no_user_bit_and_user_tables_keep_their_access_in_the_role() -> None:
    kvm, _guest, _pgd, pt = guest_with_process(npages=1, flags=USER_RW & ~(1 << 2))
    mmu = kvm.arch.mmu
    mmu.access(0, gvas(BASE, 1), write=False, user=False)
    assert leaf_spte(kvm, BASE) == (FAULTED_RW & ~0x4) | DATA << 12
    pt_page = next(sp for sp in mmu.sps.by_id.values() if sp.gfn == pt)
    assert pt_page.access == ACC_ALL and ACC_USER_MASK & pt_page.access


def test_hash_collisions_count_pages_of_other_gfns_walked_in_a_bucket() -> None:
    kvm, _guest, pgd, _pt = guest_with_process(npages=1)
    mmu = kvm.arch.mmu
    bucket = kvm_page_table_hashfn(pgd)
    twin = next(gfn for gfn in range(0x20000, 0x80000) if kvm_page_table_hashfn(gfn) == bucket)
    mmu.memory.store_pte(twin, 0, 0)
    mmu.load_cr3(0, twin)  # a root for a gfn of the same bucket: one other-gfn page walked past
    assert vm_stats(kvm, "max_mmu_page_hash_collisions", "mmu_cache_miss") == {
        "max_mmu_page_hash_collisions": 1,
        "mmu_cache_miss": 2,
    }
