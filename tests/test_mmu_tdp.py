"""EPT modes: the shadow MMU with direct pages (tdp-legacy) and the TDP MMU (tdp)."""

from __future__ import annotations

import numpy as np
import pytest
from mmu_testlib import BASE, DATA, ToyGuest, check_invariants, gvas, new_vm, rmap_count, vcpu_stats, vm_stats

from kvmdbgfs.arch.x86.debugfs import kvm_mmu_rmaps_stat_show

LOW = 0x10  # in the 640 KiB slot, whose end is not 2M-aligned: 4K pages only


def two_processes(mode: str) -> tuple:
    kvm = new_vm(mode)
    guest = ToyGuest(kvm)
    first, second = guest.new_pgd(), guest.new_pgd()
    guest.map(first, BASE, range(DATA, DATA + 16))
    guest.map(second, BASE + 8 * 4096, range(DATA, DATA + 16))
    guest.map(second, BASE + (1 << 21), range(LOW, LOW + 4))
    return kvm, guest, first, second


@pytest.mark.parametrize("mode", ["tdp-legacy", "tdp"])
def test_guest_memory_maps_with_2m_pages_once_per_gfn(mode: str) -> None:
    kvm, _guest, first, second = two_processes(mode)
    mmu = kvm.arch.mmu
    mmu.load_cr3(0, first)
    mmu.access(0, gvas(BASE, 16), write=True, user=True)
    mmu.load_cr3(0, second)
    mmu.access(0, gvas(BASE + 8 * 4096, 16), write=False, user=True)
    assert vm_stats(kvm, "pages_2m", "pages_4k") == {"pages_2m": 1, "pages_4k": 0}
    assert vcpu_stats(kvm, "exits", "pf_taken", "pf_fixed", "tlb_flush") == {
        "exits": 1,
        "pf_taken": 1,
        "pf_fixed": 1,
        "tlb_flush": 0,
    }
    if mode == "tdp-legacy":
        assert rmap_count(kvm, DATA & ~511, level=2) == 1 and rmap_count(kvm, DATA) == 0
        assert vm_stats(kvm, "mmu_cache_miss") == {"mmu_cache_miss": 3} and kvm.arch.mmu.n_used_mmu_pages == 3
    else:
        assert kvm_mmu_rmaps_stat_show(kvm) == ""
        assert vm_stats(kvm, "mmu_cache_miss") == {"mmu_cache_miss": 0} and kvm.arch.mmu.n_used_mmu_pages == 0
    check_invariants(kvm)


@pytest.mark.parametrize("mode", ["tdp-legacy", "tdp"])
def test_memory_that_cannot_be_mapped_huge_gets_4k_pages(mode: str) -> None:
    kvm, _guest, _first, second = two_processes(mode)
    kvm.arch.mmu.load_cr3(0, second)
    kvm.arch.mmu.access(0, gvas(BASE + (1 << 21), 1), write=False, user=True)
    if mode == "tdp-legacy":  # with the block of 8 prefetched by gfn
        assert vm_stats(kvm, "pages_4k") == {"pages_4k": 8}
        assert [rmap_count(kvm, LOW + i) for i in range(-1, 9)] == [0] + [1] * 8 + [0]
    else:
        assert vm_stats(kvm, "pages_4k") == {"pages_4k": 1}


@pytest.mark.parametrize("mode", ["tdp-legacy", "tdp"])
def test_page_table_writes_cr3_loads_and_flushes_do_not_exit(mode: str) -> None:
    """The guest writes its tables like any memory: only the first write to a frame with no EPT entry exits."""
    kvm, guest, first, second = two_processes(mode)
    mmu = kvm.arch.mmu
    mmu.load_cr3(0, first)
    pt = guest.pt_of(first, BASE)
    mmu.store_pte(0, pt, 100, 0)
    assert vcpu_stats(kvm, "exits", "pf_fixed") == {"exits": 1, "pf_fixed": 1}
    mmu.store_ptes(0, pt, np.arange(4), np.zeros(4, np.uint64))
    mmu.load_cr3(0, second)
    mmu.flush_tlb(0)
    mmu.invlpg(0, BASE)
    assert vcpu_stats(kvm, "exits", "tlb_flush", "invlpg") == {"exits": 1, "tlb_flush": 0, "invlpg": 0}
    assert vm_stats(kvm, "mmu_pte_write", "mmu_unsync") == {"mmu_pte_write": 0, "mmu_unsync": 0}
    assert mmu.memory.read_pte(pt, 0) == 0


def test_tdp_legacy_shows_only_the_0_and_1_columns() -> None:
    kvm, _guest, first, second = two_processes("tdp-legacy")
    mmu = kvm.arch.mmu
    for pgd, base in ((first, BASE), (second, BASE + 8 * 4096), (second, BASE + (1 << 21))):
        mmu.load_cr3(0, pgd)
        mmu.access(0, gvas(base, 4), write=False, user=True)
    lines = kvm_mmu_rmaps_stat_show(kvm).splitlines()[1:]
    assert [line.split("\t")[3:12] for line in lines] == [["0"] * 9] * 3
    assert lines[0].split("\t")[2] == "8" and lines[1].split("\t")[2] == "1"


@pytest.mark.parametrize("mode", ["tdp-legacy", "tdp"])
def test_memslot_deletion_and_range_invalidation_in_ept_modes(mode: str) -> None:
    kvm, _guest, _first, second = two_processes(mode)
    mmu = kvm.arch.mmu
    mmu.load_cr3(0, second)
    mmu.access(0, np.concatenate([gvas(BASE + 8 * 4096, 1), gvas(BASE + (1 << 21), 1)]), write=False, user=True)
    small = 8 if mode == "tdp-legacy" else 1
    assert vm_stats(kvm, "pages_2m", "pages_4k") == {"pages_2m": 1, "pages_4k": small}
    mmu.kvm_unmap_gfn_range(LOW, LOW + 1)
    assert vm_stats(kvm, "pages_2m", "pages_4k") == {"pages_2m": 1, "pages_4k": small - 1}
    hotplug = kvm.kvm_set_memory_region(40, 0, 0x80000, 0x200)
    kvm.kvm_delete_memory_region(hotplug)
    assert vm_stats(kvm, "pages_2m", "pages_4k") == {"pages_2m": 0, "pages_4k": 0}
    mmu.access(0, gvas(BASE + 8 * 4096, 1), write=False, user=True)
    assert vm_stats(kvm, "pages_2m") == {"pages_2m": 1}
    check_invariants(kvm)
