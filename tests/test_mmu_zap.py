"""Zapping: the shadow-page limit (zap oldest, mmu_recycled), rmap recycle, memslot deletion,
mmu-notifier invalidation of a gfn range, and VM teardown."""

from __future__ import annotations

import mmu_testlib as lib
import numpy as np
import pytest
from mmu_testlib import BASE, DATA, ToyGuest, check_invariants, gvas, new_vm, rmap_count, vm_stats

from kvmdbgfs.arch.x86.debugfs import kvm_mmu_rmaps_stat_show
from kvmdbgfs.arch.x86.mmu.mmu import LINUX_PAGE_OFFSET
from kvmdbgfs.arch.x86.mmu.pte_list import PTE_LIST_DESIGNS
from kvmdbgfs.arch.x86.mmu.vcpu_mmu import KVM_REQ_TLB_FLUSH
from kvmdbgfs.arch.x86.kvm_arch import X86KvmArchFactory
from kvmdbgfs.kvm.host import KvmHost
from kvmdbgfs.kvm.vm import Kvm


def touch_processes(kvm, guest, count: int, first: int = 0) -> list[int]:
    """``count`` processes, each loading CR3 and touching one page of its own (DATA + 8 * its number):
    4 shadow pages each."""
    pgds = []
    for k in range(first, first + count):
        pgd = guest.new_pgd()
        guest.map(pgd, BASE, [DATA + 8 * k])
        kvm.arch.mmu.load_cr3(0, pgd)
        kvm.arch.mmu.access(0, gvas(BASE, 1), write=False, user=True)
        pgds.append(pgd)
    return pgds


def test_the_default_limit_is_one_page_per_50_pages_of_both_address_spaces() -> None:
    kvm = new_vm(memory="128M")
    pages = sum(s.npages for s in kvm.arch.memslots)
    assert {s.as_id for s in kvm.arch.memslots} == {0, 1}
    assert kvm.arch.mmu.n_max_mmu_pages == pages // 50 == 1476  # KVM's private TSS and APIC slots count


def test_the_default_limit_is_at_least_the_kernels_minimum() -> None:
    """KVM_MIN_ALLOC_MMU_PAGES: 1000 pages in each address space would give 40."""
    host = KvmHost(X86KvmArchFactory())
    kvm = host.kvm_create_vm(host.make_config(memory="64M", vcpus=1, mmu="shadow", seed=0), "1234-10")
    for as_id in (0, 1):
        kvm.kvm_set_memory_region(as_id, as_id, 0x100, 1000)
    assert kvm.arch.mmu.n_max_mmu_pages == 64


def test_zap_oldest_pages_when_fewer_than_five_are_free() -> None:
    kvm = new_vm()
    guest = ToyGuest(kvm)
    mmu = kvm.arch.mmu
    mmu.set_nr_mmu_pages(64)
    touch_processes(kvm, guest, 15)
    assert mmu.n_used_mmu_pages == 60 and vm_stats(kvm, "mmu_recycled") == {"mmu_recycled": 0}
    touch_processes(kvm, guest, 1, first=15)
    # Loading the 16th root finds 4 free pages: the oldest 21 go (processes 0-4 whole, then 5's root).
    assert vm_stats(kvm, "mmu_recycled", "mmu_shadow_zapped") == {"mmu_recycled": 21, "mmu_shadow_zapped": 21}
    assert mmu.n_used_mmu_pages == 60 - 21 + 4
    assert [rmap_count(kvm, DATA + 8 * k) for k in range(7)] == [0, 0, 0, 0, 0, 1, 1]
    check_invariants(kvm)


def test_roots_in_use_are_never_zapped_for_room() -> None:
    kvm = new_vm()
    mmu = kvm.arch.mmu
    mmu.set_nr_mmu_pages(64)
    touch_processes(kvm, ToyGuest(kvm), 40)
    cached = [mmu.vcpu(0).root, *mmu.vcpu(0).prev_roots]
    assert all(root is not None and not root.invalid and root.root_count == 1 for root in cached)
    assert mmu.n_used_mmu_pages <= 64
    check_invariants(kvm)


def touch_the_zero_page_1536_times(kvm: Kvm) -> int:
    """vCPU 0 runs a process with one read-only page (the zero page) mapped 1536 times and reads them all;
    returns the zero page's gfn."""
    guest = ToyGuest(kvm)
    pgd = guest.new_pgd()
    zero = 0x3333
    for table in range(3):
        guest.map(pgd, BASE + (table << 21), [zero] * 512, lib.USER_RO)
    kvm.arch.mmu.load_cr3(0, pgd)
    kvm.arch.mmu.access(0, gvas(BASE, 3 * 512), write=False, user=True)
    return zero


@pytest.mark.parametrize("design", PTE_LIST_DESIGNS)
def test_rmap_recycle_zaps_a_list_past_1000_entries(design: str) -> None:
    """The add that sees 1001 entries (gva 1001, a prefetch of the fault on gva 1000) zaps all 1002, itself
    included; gvas 1000 and 1001 then fault again."""
    kvm = new_vm(design=design)
    zero = touch_the_zero_page_1536_times(kvm)
    assert rmap_count(kvm, zero) == 1536 - 1000
    assert vm_stats(kvm, "max_mmu_rmap_size", "pages_4k") == {"max_mmu_rmap_size": 1001, "pages_4k": 536}
    assert lib.vcpu_stats(kvm, "pf_fixed") == {"pf_fixed": 1536 // 8 + 1}
    # The recycle flushes through kvm_flush_remote_tlbs(): one request, but no remote flush, since this bare
    # VM's only vCPU is the one handling the fault (outside guest mode) and no other had to be kicked.
    assert vm_stats(kvm, "remote_tlb_flush_requests", "remote_tlb_flush") == {
        "remote_tlb_flush_requests": 1,
        "remote_tlb_flush": 0,
    }
    assert lib.leaf_spte(kvm, BASE) == 0 and lib.leaf_spte(kvm, BASE + (3 * 512 - 1) * 4096) != 0
    check_invariants(kvm)


def test_an_rmap_recycle_kicks_another_vcpu_running_guest_code() -> None:
    """With vCPU 1 in guest mode, the recycle's kvm_flush_remote_tlbs() has to IPI it: a remote flush."""
    kvm = new_vm(vcpus=2)
    kvm.arch.mmu.vcpu(1).in_guest_mode = True
    touch_the_zero_page_1536_times(kvm)
    assert vm_stats(kvm, "remote_tlb_flush_requests", "remote_tlb_flush") == {
        "remote_tlb_flush_requests": 1,
        "remote_tlb_flush": 1,
    }
    assert kvm.arch.mmu.vcpu(1).requests & KVM_REQ_TLB_FLUSH
    check_invariants(kvm)


def test_a_host_side_flush_kicks_the_vcpu_whose_exit_was_handled_last() -> None:
    """An mmu-notifier invalidation comes from the host, not from a vCPU: the one vCPU, back in guest mode after
    its last fault, is not the requester and has to be kicked (a remote flush); its own faults' flushes never
    kick it."""
    kvm = new_vm()
    touch_processes(kvm, ToyGuest(kvm), 1)
    kvm.arch.mmu.vcpu(0).in_guest_mode = True
    before = vm_stats(kvm, "remote_tlb_flush_requests", "remote_tlb_flush")
    kvm.arch.mmu.kvm_unmap_gfn_range(DATA, DATA + 1)
    assert rmap_count(kvm, DATA) == 0
    assert vm_stats(kvm, "remote_tlb_flush_requests", "remote_tlb_flush") == {
        "remote_tlb_flush_requests": before["remote_tlb_flush_requests"] + 1,
        "remote_tlb_flush": before["remote_tlb_flush"] + 1,
    }


def test_memslot_deletion_zaps_every_shadow_page_and_frees_the_slots_rmaps() -> None:
    kvm = new_vm()
    guest = ToyGuest(kvm)
    mmu = kvm.arch.mmu
    hotplug = kvm.kvm_set_memory_region(40, 0, 0x80000, 0x8000)  # 128 MiB at 2 GiB
    assert mmu.n_max_mmu_pages == (73824 + 8 + 0x8000) // 50  # 1476 before the hotplug (8: KVM's private pages)
    pgd = guest.new_pgd()
    guest.map(pgd, BASE, range(0x80000, 0x80008))
    guest.map(pgd, BASE + (2 << 20), range(DATA, DATA + 8))
    mmu.load_cr3(0, pgd)
    mmu.access(0, np.concatenate([gvas(BASE, 8), gvas(BASE + (2 << 20), 8)]), write=True, user=True)
    pages = len(mmu.sps.by_id)
    assert rmap_count(kvm, 0x80000) == 1 and rmap_count(kvm, DATA) == 1 and pages == 5
    kvm.kvm_delete_memory_region(hotplug)
    assert hotplug.rmap is None and hotplug not in kvm.arch.memslots
    assert rmap_count(kvm, DATA) == 0 and kvm_mmu_rmaps_stat_show(kvm).count("\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t") == 3
    assert vm_stats(kvm, "mmu_shadow_zapped", "pages_4k") == {"mmu_shadow_zapped": pages, "pages_4k": 0}
    assert mmu.n_max_mmu_pages == 1476
    # The root was in use: it is only freed when the vCPU next enters, and a new one is loaded.
    misses = kvm.stat.mmu_cache_miss
    mmu.access(0, gvas(BASE + (2 << 20), 1), write=False, user=True)
    assert kvm.stat.mmu_cache_miss == misses + 4 and kvm.stat.mmu_shadow_zapped == pages + 1
    check_invariants(kvm)


def test_unmapping_a_gfn_range_empties_its_rmaps_at_every_level() -> None:
    kvm = new_vm()
    guest = ToyGuest(kvm)
    mmu = kvm.arch.mmu
    pgd = guest.new_pgd()
    guest.map(pgd, BASE, range(0x6000, 0x6010))
    mmu.load_cr3(0, pgd)
    mmu.access(0, gvas(BASE, 16), write=False, user=True)
    mmu.access(0, np.array([LINUX_PAGE_OFFSET + (0x6200 << 12)], np.uint64), write=False, user=False)  # a 2M spte
    assert vm_stats(kvm, "pages_4k", "pages_2m") == {"pages_4k": 16, "pages_2m": 1}
    flushes = kvm.stat.remote_tlb_flush_requests
    mmu.kvm_unmap_gfn_range(0x6000, 0x6208)
    assert [rmap_count(kvm, 0x6000 + i) for i in range(16)] == [0] * 16 and rmap_count(kvm, 0x6200, 2) == 0
    assert vm_stats(kvm, "pages_4k", "pages_2m") == {"pages_4k": 0, "pages_2m": 0}
    # kvm_flush_remote_tlbs() counts a request each time, but remote_tlb_flush only when it had to IPI a vCPU
    # in guest mode; this bare VM's only vCPU is the one handling the exit, so no IPI is sent.
    assert (kvm.stat.remote_tlb_flush_requests, kvm.stat.remote_tlb_flush) == (flushes + 1, 0)
    assert lib.leaf_spte(kvm, BASE) == 0
    assert len(mmu.sps.by_id) == 6  # the shadow pages stay; only leaves went
    mmu.access(0, gvas(BASE, 1), write=False, user=True)
    assert rmap_count(kvm, 0x6000) == 1 and lib.vcpu_stats(kvm, "pf_fixed") == {"pf_fixed": 4}
    check_invariants(kvm)


def test_stale_shadow_pages_of_an_exited_process_linger_until_pressure() -> None:
    kvm = new_vm()
    guest = ToyGuest(kvm)
    mmu = kvm.arch.mmu
    first, _second = touch_processes(kvm, guest, 2)
    pd = first + 2
    mmu.store_pte(0, pd, 2, 0)  # exit: the first process's PT is unlinked from its PD ...
    mmu.store_pte(0, first + 1, 0, 0)  # ... and its PD from its PDPT
    assert rmap_count(kvm, DATA) == 1  # ... but the PT's shadow page keeps its sptes
    mmu.set_nr_mmu_pages(64)
    touch_processes(kvm, guest, 14, first=2)
    assert rmap_count(kvm, DATA) == 0 and kvm.stat.mmu_recycled > 0
    check_invariants(kvm)


def test_vm_teardown_zaps_everything() -> None:
    kvm = new_vm()
    guest = ToyGuest(kvm)
    touch_processes(kvm, guest, 3)
    pages = len(kvm.arch.mmu.sps.by_id)
    kvm.kvm_vm_release()  # QEMU exits: its VM fd is closed, the last reference goes
    assert vm_stats(kvm, "pages_4k", "mmu_shadow_zapped") == {"pages_4k": 0, "mmu_shadow_zapped": pages}
    assert kvm.arch.memslots == [] and kvm.arch.mmu.sps.active == {}
