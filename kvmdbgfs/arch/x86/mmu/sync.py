"""Syncing unsync shadow pages with the guest tables they shadow (FNAME(sync_spte), kvm_sync_page,
mmu_sync_children, kvm_mmu_sync_roots).

Syncing re-reads each guest PTE behind a present spte: a PTE that is gone, not accessed
or points elsewhere drops the spte (rmap_remove); one whose permissions changed updates
it. mmu_sync_children() also write-protects each page's gfn again and marks it sync.
Kernels before v5.16 flush inside the sync of each page and zap a page it left empty
(the profile's ``sync_page_zaps_empty``).
"""

from __future__ import annotations

from typing import Final, TYPE_CHECKING

import numpy as np

from kvmdbgfs.arch.x86.mmu.page_track import kvm_vcpu_write_protect_gfn
from kvmdbgfs.arch.x86.mmu.paging_tmpl import (
    gpte_access,
    gpte_valid_for_prefetch,
    gptes_access,
    protect_clean_gpte,
    read_gptes,
)
from kvmdbgfs.arch.x86.mmu.set_spte import make_sptes_synchronizing
from kvmdbgfs.arch.x86.mmu.shadow_page import KvmMmuPage
from kvmdbgfs.arch.x86.mmu.spte import (
    PT_ACCESSED_MASK,
    PT_PRESENT_MASK,
    PT_WRITABLE_MASK,
    SPTE_BASE_ADDR_MASK,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT_MASK,
    SPTE_MMU_WRITEABLE,
    U64,
    spte_to_pfn,
    sptes_to_pfn,
)
from kvmdbgfs.arch.x86.mmu.unsync import kvm_unlink_unsync_page, mmu_pages_clear_parents, mmu_unsync_batches
from kvmdbgfs.arch.x86.mmu.zap import kvm_mmu_prepare_zap_page, kvm_mmu_remote_flush_or_zap

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu, MmuVcpu

SCALAR_SYNC: Final = 4  # up to this many present entries, syncing them one by one in Python beats numpy


ALL_ENTRIES: Final = np.arange(SPTE_ENT_PER_PAGE)
_PRESENT = U64(SPTE_MMU_PRESENT_MASK)
_GPTE_VALID = U64(PT_PRESENT_MASK | PT_ACCESSED_MASK)
_FRAME = U64(SPTE_BASE_ADDR_MASK)  # a guest PTE's frame bits are where an spte's are


def sync_spte(mmu: KvmMmu, sp: KvmMmuPage, index: int) -> bool:
    """FNAME(sync_spte) on entry ``index`` of a last-level page, if present; True if a flush is due. The entry
    is read as a Python int: an absent one (most of INVLPG's) costs no array operation."""
    spte = mmu.pool.words[sp.id * SPTE_ENT_PER_PAGE + index]
    return bool(spte & SPTE_MMU_PRESENT_MASK) and _sync_sptes_few(mmu, sp, [index], [spte])


def _sync_sptes(mmu: KvmMmu, sp: KvmMmuPage, indices: np.ndarray, row: np.ndarray) -> bool:
    """FNAME(sync_spte) on the present entries among ``indices`` of a last-level page, given their sptes
    (``row``, read before any of them changes); True if a flush is due."""
    present = (row & _PRESENT).nonzero()[0]
    if not len(present):
        return False
    if len(present) <= SCALAR_SYNC:
        return _sync_sptes_few(mmu, sp, indices[present].tolist(), row[present].tolist())
    indices, old = indices[present], row[present]
    gptes = read_gptes(mmu.memory, sp.gfn, indices)
    # FNAME(prefetch_invalid_gpte) (not present and accessed), or another frame: the spte goes
    drop = ((gptes & _GPTE_VALID) != _GPTE_VALID) | ((gptes ^ old) & _FRAME != 0)
    dropped = indices[drop]
    flush = len(dropped) > 0
    if flush:
        mmu.leaf.drop_sptes(sp.id, sp.level, dropped)
    access = sp.access & gptes_access(gptes, protect_clean=True)
    changed = ~drop & (mmu.pool.access[sp.id, indices] != access)
    if np.count_nonzero(changed):
        flush |= _update_sptes(mmu, sp, indices[changed], sptes_to_pfn(gptes[changed]), access[changed], old[changed])
    return flush


def _sync_sptes_few(mmu: KvmMmu, sp: KvmMmuPage, indices: list[int], old: list[int]) -> bool:
    """_sync_sptes() of a few present entries (``old`` their sptes), one by one with Python ints: the same
    drops, updates and result as the numpy path, without its fixed cost per call. The recorded access bits
    are read through the pool's flat memoryview (``access_bytes``)."""
    access_bytes, row = mmu.pool.access_bytes, sp.id * SPTE_ENT_PER_PAGE
    dropped: list[int] = []
    changed: list[tuple[int, int, int, int]] = []  # (index, gfn, access, old spte)
    for index, spte in zip(indices, old):
        gpte = mmu.memory.read_pte(sp.gfn, index)
        gfn = spte_to_pfn(gpte) if gpte_valid_for_prefetch(gpte) else -1  # FNAME(prefetch_invalid_gpte)
        if gfn != spte_to_pfn(spte):
            dropped.append(index)
            continue
        access = protect_clean_gpte(sp.access & gpte_access(gpte), gpte)
        if access_bytes[row + index] != access:
            changed.append((index, gfn, access, spte))
    if dropped:
        mmu.leaf.drop_sptes(sp.id, sp.level, np.array(dropped, np.int64))
    flush = bool(dropped)
    if changed:
        at, gfns, access_bits, sptes = zip(*changed)
        flush |= _update_sptes(
            mmu,
            sp,
            np.array(at, np.int64),
            np.array(gfns, np.int64),
            np.array(access_bits, np.uint8),
            np.array(sptes, np.uint64),
        )
    return flush


def _update_sptes(
    mmu: KvmMmu, sp: KvmMmuPage, indices: np.ndarray, gfns: np.ndarray, access: np.ndarray, old: np.ndarray
) -> bool:
    """The part of FNAME(sync_spte) for entries whose access changed: record it and remake the sptes;
    True if a writable spte lost W (a flush is due)."""
    mmu.pool.access[sp.id, indices] = access
    new = make_sptes_synchronizing(mmu, gfns, access, old)
    mmu.pool.store_many(sp.id, indices, new)
    return bool((((old & U64(SPTE_MMU_WRITEABLE)) != 0) & ((new & U64(PT_WRITABLE_MASK)) == 0)).any())


SYNC_ZAPPED: Final = -1


def kvm_sync_page(mmu: KvmMmu, sp: KvmMmuPage, invalid_list: list[KvmMmuPage]) -> int:
    """kvm_sync_page(): sync all 512 entries; 1 when a remote flush is due, 0 when not, SYNC_ZAPPED when the
    page went to ``invalid_list`` instead. From v5.16 the sync never fails here (only a role mismatch would
    zap). Before, FNAME(sync_page) flushed by itself and returned the number of sptes it left present:
    none zaps the page."""
    flush = _sync_sptes(mmu, sp, ALL_ENTRIES, mmu.pool.spt[sp.id])  # the page's row itself: no copy of it
    if not mmu.rules.sync_page_zaps_empty:
        return int(flush)
    if flush:
        mmu.flush_remote_tlbs()
    if not (mmu.pool.spt[sp.id] & U64(SPTE_MMU_PRESENT_MASK)).any():
        kvm_mmu_prepare_zap_page(mmu, sp, invalid_list)
        return SYNC_ZAPPED
    return 0


def mmu_sync_children(mmu: KvmMmu, parent: KvmMmuPage) -> None:
    """mmu_sync_children(): write-protect and sync every unsync page below ``parent``, 16 entries at a time.
    Before v5.16 a write protection flushed without committing the zaps, which wait for the end."""
    invalid_list: list[KvmMmuPage] = []
    flush = False
    for batch in mmu_unsync_batches(mmu, parent):
        protected = False
        for sp, _ in batch:
            protected |= kvm_vcpu_write_protect_gfn(mmu, sp.gfn)
        if protected:
            if mmu.rules.sync_page_zaps_empty:
                mmu.flush_remote_tlbs()
            else:
                kvm_mmu_remote_flush_or_zap(mmu, invalid_list, True)
            flush = False
        for sp, path in batch:
            kvm_unlink_unsync_page(mmu, sp)
            flush |= kvm_sync_page(mmu, sp, invalid_list) > 0
            mmu_pages_clear_parents(mmu, sp, path)
    kvm_mmu_remote_flush_or_zap(mmu, invalid_list, flush)


def kvm_mmu_sync_roots(mmu: KvmMmu, vcpu: MmuVcpu) -> None:
    """kvm_mmu_sync_roots(): sync what is unsync below the vCPU's current root (shadow paging only)."""
    root = vcpu.root
    if root is None or root.direct or not (root.unsync or root.unsync_children):
        return
    mmu_sync_children(mmu, root)
