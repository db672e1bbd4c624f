"""Finding, creating and linking shadow pages (kvm_mmu_get_shadow_page and friends in mmu.c)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvmdbgfs.arch.x86.mmu.page_track import account_shadowed
from kvmdbgfs.arch.x86.mmu.shadow_page import KvmMmuPage, mmu_page_role
from kvmdbgfs.arch.x86.mmu.spte import (
    PAGE_SHIFT,
    PG_LEVEL_4K,
    PT_PAGE_SIZE_MASK,
    SPTE_BASE_ADDR_MASK,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT_MASK,
    is_large_pte,
    is_shadow_present_pte,
    make_nonleaf_spte,
    spte_to_pfn,
    sptep,
)
from kvmdbgfs.arch.x86.mmu.sync import SYNC_ZAPPED, kvm_sync_page
from kvmdbgfs.arch.x86.mmu.unsync import mark_unsync
from kvmdbgfs.arch.x86.mmu.zap import drop_parent_pte, kvm_mmu_commit_zap_page, kvm_mmu_prepare_zap_page

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu


def kvm_mmu_find_shadow_page(mmu: KvmMmu, gfn: int, role: int) -> KvmMmuPage | None:
    """kvm_mmu_find_shadow_page(): walk the gfn's bucket, newest first.

    Pages of other gfns are collisions (max_mmu_page_hash_collisions); a same-gfn page with
    another role is skipped, and zapped if unsync while an upper-level page is wanted; a
    match that is unsync is synced (not marked sync) first. A miss counts mmu_cache_miss."""
    invalid_list: list[KvmMmuPage] = []
    collisions = 0
    found = None
    for sp in reversed(list(mmu.sps.bucket(gfn))):
        if sp.invalid:
            continue
        if sp.gfn != gfn:
            collisions += 1
            continue
        if sp.role != role:
            if role & 0xF > PG_LEVEL_4K and sp.unsync:
                kvm_mmu_prepare_zap_page(mmu, sp, invalid_list)
            continue
        if not sp.direct:
            if sp.unsync:
                synced = kvm_sync_page(mmu, sp, invalid_list)
                if synced == SYNC_ZAPPED:
                    break  # a miss: the caller makes a new page
                if synced:
                    mmu.flush_remote_tlbs()
            sp.write_flooding_count = 0
        found = sp
        break
    if found is None:
        mmu.stat.mmu_cache_miss += 1
    kvm_mmu_commit_zap_page(mmu, invalid_list)
    mmu.stat.max_mmu_page_hash_collisions = max(mmu.stat.max_mmu_page_hash_collisions, collisions)
    return found


def kvm_mmu_alloc_shadow_page(mmu: KvmMmu, gfn: int, role: int) -> KvmMmuPage:
    """kvm_mmu_alloc_shadow_page(): hash it, write-protect the guest table it shadows, count it."""
    sp = KvmMmuPage(mmu.pool.alloc(role & 0xF), gfn, role)
    mmu.sps.add(sp)
    if not sp.direct:
        account_shadowed(mmu, sp)
    mmu.n_used_mmu_pages += 1
    return sp


def kvm_mmu_get_shadow_page(mmu: KvmMmu, gfn: int, role: int) -> KvmMmuPage:
    return kvm_mmu_find_shadow_page(mmu, gfn, role) or kvm_mmu_alloc_shadow_page(mmu, gfn, role)


def kvm_mmu_get_child_sp(
    mmu: KvmMmu, parent: KvmMmuPage, index: int, gfn: int, direct: bool, access: int
) -> tuple[KvmMmuPage, bool]:
    """kvm_mmu_get_child_sp(): (the child, True) when the entry already links one (the kernel's -EEXIST, after
    which the caller follows the link: spte_to_child_sp()), else (the page to link, False). The entry is
    read once, for both."""
    spte = mmu.pool.words[parent.id * SPTE_ENT_PER_PAGE + index]
    if spte & (SPTE_MMU_PRESENT_MASK | PT_PAGE_SIZE_MASK) == SPTE_MMU_PRESENT_MASK:
        return mmu.sps.by_id[(spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT], True
    return kvm_mmu_get_shadow_page(mmu, gfn, mmu_page_role(parent.level - 1, direct, access)), False


def child_sp(mmu: KvmMmu, parent: KvmMmuPage, index: int) -> KvmMmuPage:
    """spte_to_child_sp() of a link."""
    return mmu.sps.by_id[spte_to_pfn(mmu.pool.words[parent.id * SPTE_ENT_PER_PAGE + index])]


def link_shadow_page(mmu: KvmMmu, parent: KvmMmuPage, index: int, sp: KvmMmuPage) -> None:
    """link_shadow_page(): replace a huge leaf if there is one, point the entry at ``sp``, add the parent pte."""
    if is_shadow_present_pte(mmu.pool.words[parent.id * SPTE_ENT_PER_PAGE + index]):
        mmu.leaf.drop_sptes(parent.id, parent.level, np.array([index]))  # drop_large_spte
        mmu.flush_remote_tlbs()
    mmu.pool.set(parent.id, index, make_nonleaf_spte(sp.id))
    mmu.parents.add(sp, sptep(parent.id, index))
    if sp.unsync_children or sp.unsync:
        mark_unsync(mmu, sptep(parent.id, index))


def validate_direct_spte(mmu: KvmMmu, parent: KvmMmuPage, index: int, direct_access: int) -> None:
    """validate_direct_spte(): a direct child of other access is unlinked (and re-created by the caller)."""
    spte = mmu.pool.words[parent.id * SPTE_ENT_PER_PAGE + index]
    if not is_shadow_present_pte(spte) or is_large_pte(spte):
        return
    child = mmu.sps.by_id[spte_to_pfn(spte)]
    if child.access == direct_access:
        return
    drop_parent_pte(mmu, child, sptep(parent.id, index))
    mmu.flush_remote_tlbs()
