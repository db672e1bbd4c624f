"""The MMU's side of the slot rmaps: rmap_add, drop_spte, rmap write protection and rmap zaps.

Leaf sptes are added to the rmap of their gfn and level when installed (__rmap_add,
with kvm_update_page_stats) and removed when dropped (drop_spte -> rmap_remove, with
mmu_spte_clear_track_bits). Whole-list zaps (recycle, kvm_zap_rmap over a range) run in
the rmap engine, which returns the sptes it removed; this side clears them in their pages.
A recycle is __rmap_add's: its sptes are cleared and remote TLBs flushed right here, once
per recycled list (kvm_flush_remote_tlbs_gfn, which on this host, without range flushes,
is kvm_flush_remote_tlbs: the MMU's ``flush_remote_tlbs``). A range zap's flush is left to
the caller.

Adds are deferred while the MMU lock is held and committed in one ``rmap_add_batch``
before anything else reads or changes the rmaps (``flush``), so a batch of faults costs
one engine call. That is exact: the engine's batch equals the adds one by one, and an
add is never deferred when its list could pass the recycle threshold (the slot's
``leaf_count`` says how long every list is), since recycle must happen at that add.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kvmdbgfs.arch.x86.mmu.memslot import KvmMemorySlot, gfn_to_index
from kvmdbgfs.arch.x86.mmu.mmu_memslots import MmuMemslots, MmuSlot
from kvmdbgfs.arch.x86.mmu.rmap import RMAP_RECYCLE_THRESHOLD, KvmRmaps
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
        self._pending: dict[tuple[int, int], tuple[MmuSlot, list[int], list[int]]] = {}

    def rmap_add(self, ms: MmuSlot, gfn: int, level: int, sptep: int) -> None:
        """__rmap_add: count the page, then add ``sptep`` to the rmap of (gfn, level)."""
        self.vm_stat.account_pages(level, 1)
        counts = ms.leaf_count[level - 1]
        index = gfn_to_index(gfn, ms.base_gfn, level)
        length = int(counts[index])
        counts[index] = length + 1
        if length > RMAP_RECYCLE_THRESHOLD:
            self.flush()
            self._add_batch(ms.slot, [gfn], level, [sptep])
            return
        key = (id(ms), level)
        if key not in self._pending:
            self._pending[key] = (ms, [], [])
        _, gfns, sptes = self._pending[key]
        gfns.append(gfn)
        sptes.append(sptep)

    def flush(self) -> None:
        """Commit the deferred adds: one rmap_add_batch per (slot, level)."""
        if not self._pending:  # the common case: every MMU entry point flushes when it lets go of the lock
            return
        pending, self._pending = self._pending, {}
        for (_, level), (ms, gfns, sptes) in pending.items():
            self._add_batch(ms.slot, gfns, level, sptes)

    def _add_batch(self, slot: KvmMemorySlot, gfns: list[int], level: int, sptes: list[int]) -> None:
        """The engine's rmap_add_batch, then the rest of __rmap_add for every list it recycled
        (kvm_zap_all_rmap_sptes): clear its sptes, then kvm_flush_remote_tlbs_gfn."""
        adds = self.rmaps.rmap_add_batch(slot, np.array(gfns, np.int64), level, np.array(sptes, np.int64))
        for recycled in adds.recycled:
            self._clear_zapped(recycled)
            self.flush_remote_tlbs()

    def drop_sptes(self, sp_id: int, level: int, indices: np.ndarray) -> None:
        """drop_spte() of present leaf entries of one page, in order: clear, uncount, rmap_remove."""
        if not len(indices):
            return
        old = self.pool.clear_many(np.full(len(indices), sp_id), indices)
        self.flush()
        self._uncount_level(sptes_to_pfn(old), level, sptep_many(sp_id, indices), remove=True)

    def _uncount(self, gfns: np.ndarray, levels: np.ndarray, sptes: np.ndarray, remove: bool) -> None:
        """mmu_spte_clear_track_bits' page stats and the leaf counts (plus rmap_remove if ``remove``)."""
        for level in np.unique(levels).tolist():
            at_level = levels == level
            self._uncount_level(gfns[at_level], level, sptes[at_level], remove)

    def _uncount_level(self, gfns: np.ndarray, level: int, sptes: np.ndarray, remove: bool) -> None:
        """_uncount() of leaves that are all at ``level``."""
        self.vm_stat.account_pages(level, -len(gfns))
        positions = self.memslots.lookup_many(gfns)
        for pos in np.unique(positions).tolist():
            ms = self.memslots.slots[pos]
            mine = positions == pos
            np.subtract.at(ms.leaf_count[level - 1], gfn_to_index(gfns[mine], ms.base_gfn, level), 1)
            if remove:
                self.rmaps.rmap_remove_batch(ms.slot, gfns[mine], level, sptes[mine])

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
        self._uncount(sptes_to_pfn(values[leaf]), levels[leaf], sptes[leaf], remove=False)

    def write_protect_gfn(self, ms: MmuSlot, gfn: int) -> bool:
        """kvm_mmu_slot_gfn_write_protect(..., PG_LEVEL_4K): clear W in every spte of the gfn's rmaps at
        every level; returns whether any spte was writable (the caller flushes)."""
        self.flush()
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
        self.flush()
        zapped = [self.rmaps.zap_gfn_range(slot, start, end) for slot in memslots if slot.rmap is not None]
        for sptes in zapped:
            self._clear_zapped(sptes)
        return sum(len(sptes) for sptes in zapped)
