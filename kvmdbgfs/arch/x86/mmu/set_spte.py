"""Installing leaf sptes: make_spte() (spte.c) and mmu_set_spte() (mmu.c).

A writable spte for a gfn that is a shadowed guest table is only granted if the
shadow pages of that gfn can go unsync (mmu_try_to_unsync_pages); otherwise it is
installed read-only and a write fault on it must be emulated.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

from kvmdbgfs.arch.x86.mmu.mmu_memslots import MmuSlot
from kvmdbgfs.arch.x86.mmu.nx_huge_pages import huge_page_access
from kvmdbgfs.arch.x86.mmu.shadow_page import KvmMmuPage
from kvmdbgfs.arch.x86.mmu.spte import (
    ACC_WRITE_MASK,
    PG_LEVEL_4K,
    PT_DIRTY_MASK,
    PT_WRITABLE_MASK,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT_MASK,
    SPTE_MMU_WRITEABLE,
    is_large_pte,
    leaf_spte_bits,
    spte_to_pfn,
    sptep,
)
from kvmdbgfs.arch.x86.mmu.unsync import mmu_try_to_unsync_pages
from kvmdbgfs.arch.x86.mmu.zap import drop_parent_pte

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu


class RetPf(IntEnum):
    """RET_PF_*: what a page fault handler did."""

    RETRY = 1
    EMULATE = 2
    FIXED = 3
    SPURIOUS = 4


# The members as module constants, the kernel's names: an enum member lookup costs a metaclass call, and
# every fault compares its result with them.
RET_PF_RETRY, RET_PF_EMULATE, RET_PF_FIXED, RET_PF_SPURIOUS = RetPf.RETRY, RetPf.EMULATE, RetPf.FIXED, RetPf.SPURIOUS


def make_spte(
    mmu: KvmMmu, ms: MmuSlot, level: int, pte_access: int, gfn: int, old_spte: int, prefetch: bool
) -> tuple[int, bool]:
    """make_spte() outside synchronization: (the new spte, whether W had to be withheld). With the NX huge page
    mitigation a huge page is never executable."""
    if level > PG_LEVEL_4K:
        pte_access = huge_page_access(pte_access, level, mmu.nx_huge_pages)
    spte = leaf_spte_bits(pte_access, level, gfn, accessed=not prefetch)
    if not pte_access & ACC_WRITE_MASK:
        return spte, False
    spte |= PT_WRITABLE_MASK | SPTE_MMU_WRITEABLE
    if old_spte & PT_WRITABLE_MASK:  # is_writable_pte()
        return spte, False
    if mmu_try_to_unsync_pages(mmu, ms, gfn, synchronizing=False, prefetch=prefetch):
        return spte & ~(PT_WRITABLE_MASK | SPTE_MMU_WRITEABLE), True
    return spte | PT_DIRTY_MASK, False


def mmu_spte_update(mmu: KvmMmu, sp_id: int, index: int, old_spte: int, new_spte: int) -> bool:
    """mmu_spte_update(): store; True if a writable spte became read-only (a flush is due)."""
    mmu.pool.set(sp_id, index, new_spte)
    return bool(old_spte & SPTE_MMU_PRESENT_MASK and old_spte & SPTE_MMU_WRITEABLE and not new_spte & PT_WRITABLE_MASK)


def mmu_set_spte(
    mmu: KvmMmu, ms: MmuSlot, sp: KvmMmuPage, index: int, pte_access: int, gfn: int, prefetch: bool, write_fault: bool
) -> RetPf:
    """mmu_set_spte(): map ``gfn`` at entry ``index`` of ``sp``; rmap_add it unless it was mapped already.

    Every fault and every prefetched entry comes here, so it reads the entry through the pool's memoryview and
    tests bits in place (is_shadow_present_pte(), sptep())."""
    pool = mmu.pool
    sp_id, level = sp.id, sp.level
    at = sp_id * SPTE_ENT_PER_PAGE + index
    old = pool.words[at]
    was_rmapped = False
    flush = False
    if old & SPTE_MMU_PRESENT_MASK:
        if level > PG_LEVEL_4K and not is_large_pte(old):
            drop_parent_pte(mmu, mmu.sps.by_id[spte_to_pfn(old)], sptep(sp_id, index))
            flush = True
        elif spte_to_pfn(old) != gfn:
            mmu.leaf.drop_sptes(sp_id, level, np.array([index]))
            flush = True
        else:
            was_rmapped = True
        old = pool.words[at]
    spte, wrprot = make_spte(mmu, ms, level, pte_access, gfn, old, prefetch)
    ret = RET_PF_FIXED
    if old == spte:
        ret = RET_PF_SPURIOUS
    else:
        flush |= mmu_spte_update(mmu, sp_id, index, old, spte)
    if wrprot and write_fault:
        ret = RET_PF_EMULATE
    if flush:
        mmu.flush_remote_tlbs()
    pool.access_bytes[at] = pte_access
    if not was_rmapped:
        mmu.leaf.rmap_add(ms, gfn, level, (at + 1) << 3)  # sptep()
    return ret


def make_sptes_synchronizing(
    mmu: KvmMmu, gfns: np.ndarray, pte_access: np.ndarray, old_sptes: np.ndarray
) -> np.ndarray:
    """make_spte() with synchronizing=true (FNAME(sync_spte)) for level-1 entries.

    A gfn with shadow pages never gets W back while syncing (mmu_try_to_unsync_pages refuses). A sync remakes
    one entry nearly always (a few hundred at most), so this runs on Python ints: numpy's fixed cost per
    call was larger than the work."""
    has_gptes = mmu.sps.has_gptes
    sptes = []
    for gfn, access, old in zip(gfns.tolist(), pte_access.tolist(), old_sptes.tolist()):
        spte = leaf_spte_bits(access, PG_LEVEL_4K, gfn, accessed=True)
        if access & ACC_WRITE_MASK:
            if old & PT_WRITABLE_MASK:
                spte |= PT_WRITABLE_MASK | SPTE_MMU_WRITEABLE
            elif not has_gptes(gfn):
                spte |= PT_WRITABLE_MASK | SPTE_MMU_WRITEABLE | PT_DIRTY_MASK
        sptes.append(spte)
    return np.array(sptes, np.uint64)
