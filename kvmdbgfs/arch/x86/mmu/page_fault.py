"""Page faults of the shadow MMU: FNAME(page_fault)/FNAME(fetch) for shadow paging, direct_page_fault()/
direct_map() for EPT over the shadow MMU (tdp-legacy), the prefetch of neighbouring entries, and the
common wrapper kvm_mmu_do_page_fault() with its vCPU stats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmdbgfs.arch.x86.mmu.mmu_memslots import MmuSlot
from kvmdbgfs.arch.x86.mmu.nx_huge_pages import (
    HugePageFault,
    account_nx_huge_page,
    disallowed_hugepage_adjust,
    kvm_mmu_hugepage_adjust,
)
from kvmdbgfs.arch.x86.mmu.page_hash import child_sp, kvm_mmu_get_child_sp, link_shadow_page, validate_direct_spte
from kvmdbgfs.arch.x86.mmu.page_track import kvm_gfn_is_write_tracked
from kvmdbgfs.arch.x86.mmu.paging_tmpl import (
    GuestWalker,
    gpte_access,
    gpte_valid_for_prefetch,
    protect_clean_gpte,
    walk_addr,
)
from kvmdbgfs.arch.x86.mmu.set_spte import (
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    RetPf,
    mmu_set_spte,
)
from kvmdbgfs.arch.x86.mmu.shadow_page import KvmMmuPage
from kvmdbgfs.arch.x86.mmu.spte import (
    ACC_ALL,
    KVM_MAX_HUGEPAGE_LEVEL,
    PAGE_SHIFT,
    PG_LEVEL_4K,
    PTE_PREFETCH_NUM,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT_MASK,
    gfn_round_for_level,
    is_last_spte,
    is_shadow_present_pte,
    spte_index,
    spte_to_pfn,
)
from kvmdbgfs.arch.x86.mmu.sync import mmu_sync_children
from kvmdbgfs.arch.x86.mmu.zap import make_mmu_pages_available
from kvmdbgfs.guest.pte import pte_gfn

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu, MmuVcpu


def kvm_mmu_do_page_fault(
    mmu: KvmMmu, vcpu: MmuVcpu, addr: int, write: bool, user: bool, present: bool, fetch: bool = False
) -> RetPf:
    """kvm_mmu_do_page_fault(): the MMU's fault handler, counted in pf_taken and pf_fixed/emulate/spurious.
    ``fetch`` is PFERR_FETCH_MASK: the access was an instruction fetch."""
    stat = vcpu.stat
    stat.pf_taken += 1
    if mmu.tdp is not None:
        ret = mmu.tdp.page_fault(addr >> PAGE_SHIFT, fetch)
    elif not mmu.shadow_paging:
        ret = direct_page_fault(mmu, vcpu, addr >> PAGE_SHIFT, write, fetch)
    else:
        ret = paging64_page_fault(mmu, vcpu, addr, write, user, present, fetch)
    if ret == RET_PF_FIXED:
        stat.pf_fixed += 1
    elif ret == RET_PF_EMULATE:
        stat.pf_emulate += 1
    elif ret == RET_PF_SPURIOUS:
        stat.pf_spurious += 1
    return ret


def paging64_page_fault(
    mmu: KvmMmu, vcpu: MmuVcpu, gva: int, write: bool, user: bool, present: bool, fetch: bool
) -> RetPf:
    """FNAME(page_fault)(): walk the guest tables, then map the address through shadow pages."""
    assert vcpu.cr3 is not None
    walker = walk_addr(mmu.memory, vcpu.cr3, gva, write, user)
    if walker is None:
        vcpu.stat.pf_guest += 1  # kvm_inject_emulated_page_fault()
        return RET_PF_RETRY
    ms = mmu.memslots.fault_slot(walker.gfn)
    if present and write and kvm_gfn_is_write_tracked(ms, walker.gfn):
        shadow_page_table_clear_flood(mmu, vcpu, gva)  # page_fault_handle_page_track()
        return RET_PF_EMULATE
    make_mmu_pages_available(mmu)
    return paging64_fetch(mmu, vcpu, gva, walker, ms, write, fetch)


def shadow_page_table_clear_flood(mmu: KvmMmu, vcpu: MmuVcpu, gva: int) -> None:
    """Reset the write-flooding count of every page on ``gva``'s shadow walk."""
    sp = vcpu.root
    while sp is not None:
        sp.write_flooding_count = 0
        spte = mmu.pool.words[sp.id * SPTE_ENT_PER_PAGE + spte_index(gva, sp.level)]
        linked = is_shadow_present_pte(spte) and not is_last_spte(spte, sp.level)
        sp = mmu.sps.by_id[spte_to_pfn(spte)] if linked else None  # spte_to_child_sp()


def paging64_fetch(
    mmu: KvmMmu, vcpu: MmuVcpu, gva: int, gw: GuestWalker, ms: MmuSlot, write: bool, fetch: bool
) -> RetPf:
    """FNAME(fetch)(): indirect pages for the guest tables down to the guest leaf's level, direct pages
    below a guest huge page where the host cannot map it whole (or an instruction fetch may not use it),
    then the leaf and the prefetch."""
    sp = vcpu.root
    assert sp is not None
    level = sp.level
    shift = PAGE_SHIFT + (level - 1) * 9
    while True:
        index = (gva >> shift) & (SPTE_ENT_PER_PAGE - 1)  # spte_index()
        sp.write_flooding_count = 0  # clear_sp_write_flooding_count()
        if level == gw.level:
            break
        child, linked = kvm_mmu_get_child_sp(mmu, sp, index, gw.table_gfn[level - 2], False, gw.pt_access[level - 2])
        if not linked:
            if child.unsync_children:
                mmu_sync_children(mmu, child)
            link_shadow_page(mmu, sp, index, child)
        sp, level, shift = child, level - 1, shift - 9
    base_gfn = gw.gfn
    if level > PG_LEVEL_4K:  # below a 4K guest leaf, kvm_mmu_hugepage_adjust() has nothing to adjust
        sp, index, base_gfn = paging64_fetch_direct(mmu, sp, gva, gw, ms, fetch)
    ret = mmu_set_spte(mmu, ms, sp, index, gw.pte_access, base_gfn, prefetch=False, write_fault=write)
    if ret != RET_PF_SPURIOUS:
        paging64_pte_prefetch(mmu, sp, index)
    return ret


def paging64_fetch_direct(
    mmu: KvmMmu, sp: KvmMmuPage, gva: int, gw: GuestWalker, ms: MmuSlot, fetch: bool
) -> tuple[KvmMmuPage, int, int]:
    """FNAME(fetch)() below a guest huge leaf (``sp`` is at its level): kvm_mmu_hugepage_adjust(), then direct
    pages down to the goal level. Returns the page, the index and the base gfn of the leaf to set."""
    level = sp.level
    fault = kvm_mmu_hugepage_adjust(mmu.memslots, ms, gw.gfn, level, fetch, mmu.nx_huge_pages)
    while True:
        index = spte_index(gva, level)
        nx_disallowed_hugepage_adjust(mmu, fault, sp, index, level)
        base_gfn = gfn_round_for_level(gw.gfn, level)
        if level == fault.goal_level:
            return sp, index, base_gfn
        validate_direct_spte(mmu, sp, index, gw.pte_access)
        child, linked = kvm_mmu_get_child_sp(mmu, sp, index, base_gfn, True, gw.pte_access)
        if not linked:
            link_shadow_page(mmu, sp, index, child)
            if fault.huge_page_disallowed:
                account_nx_huge_page(mmu, child, fault.req_level >= level)
        sp, level = child, level - 1


def nx_disallowed_hugepage_adjust(mmu: KvmMmu, fault: HugePageFault, sp: KvmMmuPage, index: int, level: int) -> None:
    """The shadow MMU's call of disallowed_hugepage_adjust() on entry ``index`` of ``sp``, when the mitigation
    is on."""
    if not fault.nx_huge_page_workaround_enabled:
        return
    spte = mmu.pool.words[sp.id * SPTE_ENT_PER_PAGE + index]
    marked = True
    if mmu.rules.nx_marks_every_disallowed_page and is_shadow_present_pte(spte) and not is_last_spte(spte, level):
        marked = child_sp(mmu, sp, index).nx_huge_page_disallowed
    disallowed_hugepage_adjust(fault, spte, level, marked)


def paging64_pte_prefetch(mmu: KvmMmu, sp: KvmMmuPage, index: int) -> None:
    """FNAME(pte_prefetch)(): map the other accessed guest PTEs of the 8-entry block, stopping at the first
    one that cannot be; present entries are skipped. Direct pages prefetch by gfn instead.

    The block's guest PTEs are read once, its sptes one at a time (an entry is only looked at after the
    prefetch of the ones before it, which may have recycled an rmap)."""
    if sp.level > PG_LEVEL_4K:
        return
    if sp.direct:
        direct_pte_prefetch(mmu, sp, index)
        return
    first = index & ~(PTE_PREFETCH_NUM - 1)
    if not mmu.memory.holds_table(sp.gfn):  # a page the guest never wrote: no PTE to prefetch
        return
    gptes = mmu.memory.table(sp.gfn)[first : first + PTE_PREFETCH_NUM].tolist()
    words, row = mmu.pool.words, sp.id * SPTE_ENT_PER_PAGE
    for entry, gpte in enumerate(gptes, start=first):
        if entry == index or words[row + entry] & SPTE_MMU_PRESENT_MASK:
            continue
        if not prefetch_gpte(mmu, sp, entry, gpte):
            break


def prefetch_gpte(mmu: KvmMmu, sp: KvmMmuPage, index: int, gpte: int) -> bool:
    """FNAME(prefetch_gpte)()."""
    if not gpte_valid_for_prefetch(gpte):
        return False
    gfn = pte_gfn(gpte)
    ms = mmu.memslots.lookup(gfn)
    if ms is None:
        return False
    pte_access = protect_clean_gpte(sp.access & gpte_access(gpte), gpte)
    mmu_set_spte(mmu, ms, sp, index, pte_access, gfn, prefetch=True, write_fault=False)
    return True


def direct_pte_prefetch(mmu: KvmMmu, sp: KvmMmuPage, index: int) -> None:
    """__direct_pte_prefetch(): map each run of empty entries of the 8-entry block by gfn."""
    first = index & ~(PTE_PREFETCH_NUM - 1)
    start = None
    words, row = mmu.pool.words, sp.id * SPTE_ENT_PER_PAGE
    for entry in range(first, first + PTE_PREFETCH_NUM):
        if entry == index or words[row + entry] & SPTE_MMU_PRESENT_MASK:
            if start is None:
                continue
            if not direct_pte_prefetch_many(mmu, sp, start, entry):
                return
            start = None
        elif start is None:
            start = entry
    if start is not None:
        direct_pte_prefetch_many(mmu, sp, start, first + PTE_PREFETCH_NUM)


def direct_pte_prefetch_many(mmu: KvmMmu, sp: KvmMmuPage, start: int, end: int) -> bool:
    """direct_pte_prefetch_many(): the run must lie in one memslot (gfn_to_page_many_atomic)."""
    gfn = sp.gfn_at(start)
    ms = mmu.memslots.lookup(gfn)
    if ms is None or gfn + end - start > ms.end_gfn:
        return False
    for i in range(end - start):
        mmu_set_spte(mmu, ms, sp, start + i, sp.access, gfn + i, prefetch=True, write_fault=False)
    return True


def direct_page_fault(mmu: KvmMmu, vcpu: MmuVcpu, gfn: int, write: bool, fetch: bool) -> RetPf:
    """direct_page_fault() (kvm_tdp_page_fault with EPT over the shadow MMU)."""
    ms = mmu.memslots.fault_slot(gfn)
    make_mmu_pages_available(mmu)
    return direct_map(mmu, vcpu, gfn, ms, write, fetch)


def direct_map(mmu: KvmMmu, vcpu: MmuVcpu, gfn: int, ms: MmuSlot, write: bool, fetch: bool) -> RetPf:
    """direct_map(): direct pages from the root down to the largest level the memslot and host allow (4K for
    an instruction fetch under the NX huge page mitigation)."""
    fault = kvm_mmu_hugepage_adjust(mmu.memslots, ms, gfn, KVM_MAX_HUGEPAGE_LEVEL, fetch, mmu.nx_huge_pages)
    gpa = gfn << PAGE_SHIFT
    sp = vcpu.root
    assert sp is not None
    level = sp.level
    while True:
        index = spte_index(gpa, level)
        nx_disallowed_hugepage_adjust(mmu, fault, sp, index, level)
        base_gfn = gfn_round_for_level(gfn, level)
        if level == fault.goal_level:
            break
        child, linked = kvm_mmu_get_child_sp(mmu, sp, index, base_gfn, True, ACC_ALL)
        if not linked:
            link_shadow_page(mmu, sp, index, child)
            if fault.huge_page_disallowed:
                account_nx_huge_page(mmu, child, fault.req_level >= level)
        sp, level = child, level - 1
    ret = mmu_set_spte(mmu, ms, sp, index, ACC_ALL, base_gfn, prefetch=False, write_fault=write)
    if ret != RET_PF_SPURIOUS and sp.level == PG_LEVEL_4K:
        direct_pte_prefetch(mmu, sp, index)
    return ret
