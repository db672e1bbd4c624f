"""The MMU's side of the slot rmaps: rmap_add, drop_spte, rmap write protection and rmap zaps.

Leaf sptes are added to the rmap of their gfn and level when installed (__rmap_add,
with kvm_update_page_stats) and removed when dropped (drop_spte -> rmap_remove, with
mmu_spte_clear_track_bits). Whole-list zaps (recycle, kvm_zap_rmap over a range) run in
the rmap engine, which returns the sptes it removed; this side clears them in their pages.
A recycle is __rmap_add's: its sptes are cleared and remote TLBs flushed right here, once
per recycled list (kvm_flush_remote_tlbs_gfn, which on this host, without range flushes,
is kvm_flush_remote_tlbs: the MMU's ``flush_remote_tlbs``). A range zap's flush is left to
the caller.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.arch.x86.mmu.memslot import KvmMemorySlot
from kvmdbgfs.arch.x86.mmu.mmu_memslots import MmuMemslots, MmuSlot
from kvmdbgfs.arch.x86.mmu.rmap import KvmRmaps
from kvmdbgfs.arch.x86.mmu.spt_pool import SptPool
from kvmdbgfs.arch.x86.mmu.spte import (
    KVM_MAX_HUGEPAGE_LEVEL,
    PG_LEVEL_4K,
    PT_WRITABLE_MASK,
    SPTE_MMU_WRITEABLE,
    sptep_many,
    sptep_to_sp,
    sptep_to_sp_index,
    sptes_large,
    sptes_present,
    sptes_to_pfn,
)
from kvmdbgfs.kvm.stats import StatBlock


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class LeafRmaps:
    """The VM's KvmRmaps seen from the MMU: the page-size stats and leaf counts move with every add and removal.

    ``flush_remote_tlbs`` is the MMU's kvm_flush_remote_tlbs(), called once per list an add recycles.
    """

    def __init__(
        self,
        rmaps: KvmRmaps,
        pool: SptPool,
        memslots: MmuMemslots,
        vm_stat: StatBlock,
        flush_remote_tlbs: Callable[[], None],
    ) -> None:
        self.rmaps = rmaps
        self.pool = pool
        self.memslots = memslots
        self.vm_stat = vm_stat
        self.flush_remote_tlbs = flush_remote_tlbs

    def rmap_add(self, ms: MmuSlot, gfn: int, level: int, sptep: int) -> None:
        """__rmap_add: count the page, add ``sptep`` to the rmap of (gfn, level), and recycle the list if the
        add took it past the threshold: its sptes are cleared, then kvm_flush_remote_tlbs_gfn."""
        self.vm_stat.account_pages(level, 1)
        recycled = self.rmaps.rmap_add_one(ms.slot, gfn, level, sptep)[1]
        if recycled is not None:
            self._clear_zapped(recycled)
            self.flush_remote_tlbs()

    def drop_sptes(self, sp_id: int, level: int, indices: np.ndarray) -> None:
        """drop_spte() of present leaf entries of one page, in order: clear, uncount, rmap_remove."""
        if not len(indices):
            return
        gfns = sptes_to_pfn(self.pool.clear_many(np.full(len(indices), sp_id), indices))
        sptes = sptep_many(sp_id, indices)
        self.vm_stat.account_pages(level, -len(gfns))
        positions = self.memslots.lookup_many(gfns)
        for pos in np.unique(positions).tolist():
            mine = positions == pos
            self.rmaps.rmap_remove_batch(self.memslots.slots[pos].slot, gfns[mine], level, sptes[mine])

    def _clear_zapped(self, sptes: np.ndarray) -> None:
        """The rmap engine zapped these sptes (kvm_zap_all_rmap_sptes): clear them in their pages.

        sptes the MMU does not hold (added by a caller driving the engine directly) are ignored."""
        sp_ids, indices = sptep_to_sp(sptes)
        known = sp_ids < self.pool.capacity
        sp_ids, indices, sptes = sp_ids[known], indices[known], sptes[known]
        values = self.pool.spt[sp_ids, indices]
        levels = self.pool.level[sp_ids].astype(np.int64)
        leaf = sptes_present(values) & ((levels == PG_LEVEL_4K) | sptes_large(values))
        self.pool.clear_many(sp_ids[leaf], indices[leaf])
        for level, count in enumerate(np.bincount(levels[leaf]).tolist()):
            if count:
                self.vm_stat.account_pages(level, -count)  # mmu_spte_clear_track_bits

    def write_protect_gfn(self, ms: MmuSlot, gfn: int) -> bool:
        """kvm_mmu_slot_gfn_write_protect(..., PG_LEVEL_4K): clear W in every spte of the gfn's rmaps at
        every level; returns whether any spte was writable (the caller flushes)."""
        protected = False
        bits = PT_WRITABLE_MASK | SPTE_MMU_WRITEABLE
        for level in range(PG_LEVEL_4K, KVM_MAX_HUGEPAGE_LEVEL + 1):
            heads, index = ms.slot.gfn_to_rmap(gfn, level)
            head = heads.item(index)
            if head & 1:
                sptes = self.rmaps.pte_list.gather(heads, np.array([index]))[1]
                protected |= bool(self.pool.clear_bits(*sptep_to_sp(sptes), bits).any())
            elif head:  # a single spte: no descriptor to walk
                protected |= self.pool.clear_bits_one(*sptep_to_sp_index(head), bits)
        return protected

    def zap_gfn_range(self, memslots: list[KvmMemorySlot], start: int, end: int) -> int:
        """kvm_unmap_gfn_range's rmap part: kvm_zap_rmap on every head of every level over [start, end),
        then clear what it removed; returns how many sptes that was (the caller flushes if any)."""
        zapped = [self.rmaps.zap_gfn_range(slot, start, end) for slot in memslots if slot.rmap is not None]
        for sptes in zapped:
            self._clear_zapped(sptes)
        return sum(len(sptes) for sptes in zapped)
