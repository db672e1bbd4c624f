"""Zapping shadow pages (kvm_mmu_prepare_zap_page and its callers) and the shadow-page limit.

Zapping a page unlinks its 512 children (a leaf: drop_spte, i.e. rmap_remove; a link:
the child loses that parent), zaps its unsync descendants, unlinks it from its own
parents and puts it on an invalid list; kvm_mmu_commit_zap_page() flushes remote TLBs
once and frees the list. A root still in use is only marked invalid: it is freed when
the last vCPU lets go of it (mmu_free_root_page). Children of a zapped page are not
zapped with it: they linger, rmaps and all, until something zaps them in turn.
"""

from __future__ import annotations

from typing import Final, TYPE_CHECKING

import numpy as np

from kvmdbgfs.arch.x86.mmu.nx_huge_pages import unaccount_nx_huge_page
from kvmdbgfs.arch.x86.mmu.page_track import unaccount_shadowed
from kvmdbgfs.arch.x86.mmu.shadow_page import KvmMmuPage
from kvmdbgfs.arch.x86.mmu.spte import (
    PG_LEVEL_4K,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT_MASK,
    U64,
    is_last_spte,
    is_shadow_present_pte,
    spte_to_pfn,
    sptep,
    sptep_many,
    sptep_to_sp,
    sptep_to_sp_index,
    sptes_large,
    sptes_to_pfn,
)
from kvmdbgfs.arch.x86.mmu.unsync import kvm_unlink_unsync_page, mmu_pages_clear_parents, mmu_unsync_batches
from kvmdbgfs.arch.x86.mmu.vcpu_mmu import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu

KVM_MIN_FREE_MMU_PAGES: Final = 5
KVM_REFILL_PAGES: Final = 25


def drop_parent_pte(mmu: KvmMmu, child: KvmMmuPage, parent_sptep: int) -> None:
    """drop_parent_pte(): ``child`` loses the link ``parent_sptep``, which is cleared."""
    mmu.parents.remove(child, parent_sptep)
    mmu.pool.set(*sptep_to_sp_index(parent_sptep), 0)


def mmu_page_zap_pte(mmu: KvmMmu, sp: KvmMmuPage, index: int) -> None:
    """mmu_page_zap_pte(): drop a leaf (rmap_remove) or unlink a child page."""
    spte = mmu.pool.words[sp.id * SPTE_ENT_PER_PAGE + index]
    if not is_shadow_present_pte(spte):
        return
    if is_last_spte(spte, sp.level):
        mmu.leaf.drop_sptes(sp.id, sp.level, np.array([index]))
    else:
        drop_parent_pte(mmu, mmu.sps.by_id[spte_to_pfn(spte)], sptep(sp.id, index))


def kvm_mmu_page_unlink_children(mmu: KvmMmu, sp: KvmMmuPage) -> None:
    """mmu_page_zap_pte() on all 512 entries, as one batch: leaves in one rmap_remove_batch, links in one
    parent_ptes batch (the two never touch the same list, so the order between them does not matter)."""
    row = mmu.pool.spt[sp.id]
    present = np.flatnonzero(row & U64(SPTE_MMU_PRESENT_MASK))
    if not len(present):
        return
    leaf = np.ones(len(present), bool) if sp.level == PG_LEVEL_4K else sptes_large(row[present])
    mmu.leaf.drop_sptes(sp.id, sp.level, present[leaf])
    links = present[~leaf]
    if len(links):
        children = sptes_to_pfn(mmu.pool.clear_many(np.full(len(links), sp.id), links))
        mmu.parents.remove_batch(children, sptep_many(sp.id, links))


def kvm_mmu_unlink_parents(mmu: KvmMmu, sp: KvmMmuPage) -> None:
    """kvm_mmu_unlink_parents(): clear every spte linking to ``sp``."""
    parent_sptes = mmu.parents.zap(sp)
    if len(parent_sptes):
        mmu.pool.clear_many(*sptep_to_sp(parent_sptes))


def mmu_zap_unsync_children(mmu: KvmMmu, parent: KvmMmuPage, invalid_list: list[KvmMmuPage]) -> int:
    """mmu_zap_unsync_children(): zap every unsync page below ``parent``; returns how many."""
    if parent.level == PG_LEVEL_4K:
        return 0
    zapped = 0
    for batch in mmu_unsync_batches(mmu, parent):
        for sp, path in batch:
            kvm_mmu_prepare_zap_page(mmu, sp, invalid_list)
            mmu_pages_clear_parents(mmu, sp, path)
            zapped += 1
    return zapped


def __kvm_mmu_prepare_zap_page(mmu: KvmMmu, sp: KvmMmuPage, invalid_list: list[KvmMmuPage]) -> tuple[bool, int]:
    """__kvm_mmu_prepare_zap_page(): returns (list unstable, pages zapped including ``sp`` when it is freed)."""
    mmu.stat.mmu_shadow_zapped += 1
    nr_zapped = mmu_zap_unsync_children(mmu, sp, invalid_list)
    kvm_mmu_page_unlink_children(mmu, sp)
    kvm_mmu_unlink_parents(mmu, sp)
    list_unstable = nr_zapped > 0
    if not sp.invalid and not sp.direct:
        unaccount_shadowed(mmu, sp)
    if sp.nx_huge_page_disallowed:
        unaccount_nx_huge_page(mmu, sp)
    if sp.unsync:
        kvm_unlink_unsync_page(mmu, sp)
    zapped_root = False
    if not sp.root_count:
        nr_zapped += 1
        invalid_list.append(sp)
        mmu.n_used_mmu_pages -= 1
    else:
        zapped_root = not sp.invalid
    if not sp.invalid:
        mmu.sps.invalidate(sp)
    if zapped_root:
        mmu.make_all_cpus_request(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
    return list_unstable, nr_zapped


def kvm_mmu_prepare_zap_page(mmu: KvmMmu, sp: KvmMmuPage, invalid_list: list[KvmMmuPage]) -> bool:
    return __kvm_mmu_prepare_zap_page(mmu, sp, invalid_list)[0]


def kvm_mmu_commit_zap_page(mmu: KvmMmu, invalid_list: list[KvmMmuPage]) -> None:
    """Flush remote TLBs once, then free the zapped pages."""
    if not invalid_list:
        return
    mmu.flush_remote_tlbs()
    for sp in invalid_list:
        mmu.sps.free(sp)
        mmu.pool.free(sp.id)
    invalid_list.clear()


def kvm_mmu_remote_flush_or_zap(mmu: KvmMmu, invalid_list: list[KvmMmuPage], remote_flush: bool) -> None:
    if invalid_list:
        kvm_mmu_commit_zap_page(mmu, invalid_list)
    elif remote_flush:
        mmu.flush_remote_tlbs()


def _zap_active_pages(mmu: KvmMmu, oldest_first: bool, nr_to_zap: int | None) -> int:
    """The loop of kvm_mmu_zap_oldest_mmu_pages (``nr_to_zap`` given: roots in use are skipped) and of
    kvm_zap_obsolete_pages / kvm_mmu_zap_all (every page): zap active_mmu_pages in order, restarting when
    zapping unsync children made the list unstable. Returns the pages zapped."""
    invalid_list: list[KvmMmuPage] = []
    total = 0
    restart = True
    while restart:
        restart = False
        pages = list(mmu.sps.active.values())
        for sp in pages if oldest_first else reversed(pages):
            if sp.invalid or (nr_to_zap is not None and sp.root_count):
                continue
            unstable, nr_zapped = __kvm_mmu_prepare_zap_page(mmu, sp, invalid_list)
            total += nr_zapped
            if nr_to_zap is not None and total >= nr_to_zap:
                break
            if unstable:
                restart = True
                break
    kvm_mmu_commit_zap_page(mmu, invalid_list)
    return total


def kvm_mmu_unprotect_page(mmu: KvmMmu, gfn: int) -> bool:
    """kvm_mmu_unprotect_page(): zap every shadow page of ``gfn`` (a write fault not to be emulated)."""
    invalid_list: list[KvmMmuPage] = []
    zapped = False
    for sp in mmu.sps.valid_with_gptes(gfn):
        if not sp.invalid:
            zapped = True
            kvm_mmu_prepare_zap_page(mmu, sp, invalid_list)
    kvm_mmu_commit_zap_page(mmu, invalid_list)
    return zapped


def kvm_mmu_zap_oldest_mmu_pages(mmu: KvmMmu, nr_to_zap: int) -> int:
    """kvm_mmu_zap_oldest_mmu_pages(): free at least ``nr_to_zap`` pages, oldest first (mmu_recycled)."""
    if not mmu.sps.active:
        return 0
    total = _zap_active_pages(mmu, oldest_first=True, nr_to_zap=nr_to_zap)
    mmu.stat.mmu_recycled += total
    return total


def kvm_mmu_available_pages(mmu: KvmMmu) -> int:
    return max(mmu.n_max_mmu_pages - mmu.n_used_mmu_pages, 0)


def make_mmu_pages_available(mmu: KvmMmu) -> None:
    """make_mmu_pages_available(): refill to KVM_REFILL_PAGES when fewer than KVM_MIN_FREE_MMU_PAGES are free."""
    avail = kvm_mmu_available_pages(mmu)
    if avail >= KVM_MIN_FREE_MMU_PAGES:
        return
    kvm_mmu_zap_oldest_mmu_pages(mmu, KVM_REFILL_PAGES - avail)
    if not kvm_mmu_available_pages(mmu):
        raise RuntimeError("KVM_RUN: -ENOSPC, no shadow page can be freed (every page is a root in use)")


def kvm_mmu_change_mmu_pages(mmu: KvmMmu, goal_nr_mmu_pages: int) -> None:
    """kvm_mmu_change_mmu_pages(): set n_max_mmu_pages, zapping the oldest pages above it."""
    if mmu.n_used_mmu_pages > goal_nr_mmu_pages:
        kvm_mmu_zap_oldest_mmu_pages(mmu, mmu.n_used_mmu_pages - goal_nr_mmu_pages)
        goal_nr_mmu_pages = mmu.n_used_mmu_pages
    mmu.n_max_mmu_pages = goal_nr_mmu_pages


def kvm_mmu_zap_all_fast(mmu: KvmMmu) -> None:
    """kvm_mmu_zap_all_fast(): every page becomes obsolete; vCPUs drop their roots, the rest is zapped oldest first."""
    mmu.make_all_cpus_request(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
    _zap_active_pages(mmu, oldest_first=True, nr_to_zap=None)


def kvm_mmu_zap_all(mmu: KvmMmu) -> None:
    """kvm_mmu_zap_all() (kvm_arch_flush_shadow_all): zap every page, newest first."""
    _zap_active_pages(mmu, oldest_first=False, nr_to_zap=None)


def mmu_free_root_page(mmu: KvmMmu, sp: KvmMmuPage, invalid_list: list[KvmMmuPage]) -> None:
    """mmu_free_root_page(): drop a vCPU's reference; an invalid root goes when the last one does."""
    sp.root_count -= 1
    if not sp.root_count and sp.invalid:
        kvm_mmu_prepare_zap_page(mmu, sp, invalid_list)
