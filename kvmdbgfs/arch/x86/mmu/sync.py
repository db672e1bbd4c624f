"""Syncing unsync shadow pages with the guest tables they shadow (FNAME(sync_spte), kvm_sync_page,
mmu_sync_children, kvm_mmu_sync_roots, and INVLPG's kvm_mmu_invalidate_addr).

Syncing re-reads each guest PTE behind a present spte: a PTE that is gone, not accessed
or points elsewhere drops the spte (rmap_remove); one whose permissions changed updates
it. mmu_sync_children() also write-protects each page's gfn again and marks it sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvmdbgfs.arch.x86.mmu.page_track import kvm_vcpu_write_protect_gfn
from kvmdbgfs.arch.x86.mmu.paging_tmpl import gptes_access, read_gptes
from kvmdbgfs.arch.x86.mmu.set_spte import make_sptes_synchronizing
from kvmdbgfs.arch.x86.mmu.shadow_page import KvmMmuPage
from kvmdbgfs.arch.x86.mmu.spte import (
    PT_ACCESSED_MASK,
    PT_PRESENT_MASK,
    PT_WRITABLE_MASK,
    SPTE_MMU_PRESENT_MASK,
    SPTE_MMU_WRITEABLE,
    U64,
    is_last_spte,
    is_shadow_present_pte,
    spte_index,
    spte_to_pfn,
    sptes_to_pfn,
)
from kvmdbgfs.arch.x86.mmu.unsync import kvm_unlink_unsync_page, mmu_pages_clear_parents, mmu_unsync_batches
from kvmdbgfs.arch.x86.mmu.zap import kvm_mmu_remote_flush_or_zap

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu, MmuVcpu


def sync_sptes(mmu: KvmMmu, sp: KvmMmuPage, indices: np.ndarray) -> bool:
    """FNAME(sync_spte) on the present entries among ``indices`` of a last-level page; True if a flush is due."""
    row = mmu.pool.spt[sp.id, indices]
    present = (row & U64(SPTE_MMU_PRESENT_MASK)).nonzero()[0]
    if not len(present):
        return False
    indices, old = indices[present], row[present]
    gptes = read_gptes(mmu.memory, sp.gfn, indices)
    valid = (gptes & U64(PT_PRESENT_MASK | PT_ACCESSED_MASK)) == U64(PT_PRESENT_MASK | PT_ACCESSED_MASK)
    gfns = np.where(valid, sptes_to_pfn(gptes), -1)
    drop = gfns != sptes_to_pfn(old)
    dropped = indices[drop]
    flush = len(dropped) > 0
    if flush:
        mmu.leaf.drop_sptes(sp.id, sp.level, dropped)
    access = sp.access & gptes_access(gptes, protect_clean=True)
    changed = ~drop & (mmu.pool.access[sp.id, indices] != access)
    if np.count_nonzero(changed):
        at = indices[changed]
        mmu.pool.access[sp.id, at] = access[changed]
        new = make_sptes_synchronizing(mmu, gfns[changed], access[changed], old[changed])
        mmu.pool.store_many(sp.id, at, new)
        flush |= bool((((old[changed] & U64(SPTE_MMU_WRITEABLE)) != 0) & ((new & U64(PT_WRITABLE_MASK)) == 0)).any())
    return flush


def kvm_sync_page(mmu: KvmMmu, sp: KvmMmuPage) -> bool:
    """kvm_sync_page(): sync all 512 entries (the sync never fails here, so nothing is zapped)."""
    return sync_sptes(mmu, sp, np.arange(512))


def mmu_sync_children(mmu: KvmMmu, parent: KvmMmuPage) -> None:
    """mmu_sync_children(): write-protect and sync every unsync page below ``parent``, 16 entries at a time."""
    invalid_list: list[KvmMmuPage] = []
    flush = False
    for batch in mmu_unsync_batches(mmu, parent):
        protected = False
        for sp, _ in batch:
            protected |= kvm_vcpu_write_protect_gfn(mmu, sp.gfn)
        if protected:
            kvm_mmu_remote_flush_or_zap(mmu, invalid_list, True)
            flush = False
        for sp, path in batch:
            kvm_unlink_unsync_page(mmu, sp)
            flush |= kvm_sync_page(mmu, sp)
            mmu_pages_clear_parents(path)
    kvm_mmu_remote_flush_or_zap(mmu, invalid_list, flush)


def kvm_mmu_sync_roots(mmu: KvmMmu, vcpu: MmuVcpu) -> None:
    """kvm_mmu_sync_roots(): sync what is unsync below the vCPU's current root (shadow paging only)."""
    root = vcpu.root
    if root is None or root.direct or not (root.unsync or root.unsync_children):
        return
    mmu_sync_children(mmu, root)


def kvm_mmu_invalidate_addr(mmu: KvmMmu, vcpu: MmuVcpu, gva: int) -> None:
    """kvm_mmu_invalidate_addr() for every cached root: sync the unsync sptes on ``gva``'s walk."""
    for root in [vcpu.root, *vcpu.prev_roots]:
        if root is None:
            continue
        sp = root
        while True:
            index = spte_index(gva, sp.level)
            if sp.unsync and sync_sptes(mmu, sp, np.array([index])):
                mmu.flush_remote_tlbs()
            if not sp.unsync_children:
                break
            spte = mmu.pool.get(sp.id, index)
            if not is_shadow_present_pte(spte) or is_last_spte(spte, sp.level):
                break
            sp = mmu.sps.by_id[spte_to_pfn(spte)]
