"""A VM's slot rmaps on one pte_list design: __rmap_add/rmap_add, rmap_remove, kvm_zap_rmap, range zaps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from kvmdbgfs.arch.x86.mmu.memslot import KVM_NR_PAGE_SIZES, KvmMemorySlot, gfn_to_index
from kvmdbgfs.arch.x86.mmu.pte_list import make_pte_list, occurrence_rounds

RMAP_RECYCLE_THRESHOLD = 1000


class KvmRmaps:
    """The rmap half of one VM's shadow MMU.

    ``vm_stat`` is any object with int attributes ``max_mmu_rmap_size``,
    ``remote_tlb_flush`` and ``remote_tlb_flush_requests``. ``on_zap``, if given, is
    called with every array of sptes removed by a zap (recycle included), so the MMU can
    clear them as mmu_spte_clear_track_bits would. Scalar calls are one-element batches.
    """

    def __init__(self, design: str, vm_stat: Any, on_zap: Callable[[np.ndarray], None] | None = None) -> None:
        self.pte_list = make_pte_list(design)
        self.vm_stat = vm_stat
        self.on_zap = on_zap

    def rmap_add(self, slot: KvmMemorySlot, gfn: int, level: int, spte: int) -> int:
        """__rmap_add: returns pte_list_add's pre-insert count."""
        return int(self.rmap_add_batch(slot, np.array([gfn]), level, np.array([spte]))[0])

    def rmap_remove(self, slot: KvmMemorySlot, gfn: int, level: int, spte: int) -> None:
        """rmap_remove."""
        self.rmap_remove_batch(slot, np.array([gfn]), level, np.array([spte]))

    def rmap_count(self, slot: KvmMemorySlot, gfn: int, level: int) -> int:
        heads, index = slot.gfn_to_rmap(gfn, level)
        return self.pte_list.count(heads, index)

    def zap_rmapp(self, slot: KvmMemorySlot, gfn: int, level: int) -> int:
        """kvm_zap_rmap of one head; returns the sptes removed (the caller flushes)."""
        heads, index = slot.gfn_to_rmap(gfn, level)
        return self._zap(heads, np.array([index]))

    def rmap_add_batch(
        self, slot: KvmMemorySlot, gfns: np.ndarray, level: int, sptes: np.ndarray
    ) -> np.ndarray:
        """__rmap_add for each (gfn, spte) in order; returns the pre-insert counts in input order."""
        heads, indices = slot.gfn_to_rmap(np.asarray(gfns, np.int64), level)
        sptes = np.asarray(sptes, np.int64)
        counts = np.empty(len(indices), np.int64)
        for pos in occurrence_rounds(indices):
            counts[pos] = self.pte_list.add_unique(heads, indices[pos], sptes[pos])
            self._after_add(heads, indices[pos], counts[pos])
        return counts

    def rmap_remove_batch(self, slot: KvmMemorySlot, gfns: np.ndarray, level: int, sptes: np.ndarray) -> None:
        heads, indices = slot.gfn_to_rmap(np.asarray(gfns, np.int64), level)
        self.pte_list.remove_batch(heads, indices, sptes)

    def zap_gfn_range(self, slot: KvmMemorySlot, start_gfn: int, end_gfn: int) -> int:
        """kvm_unmap_gfn_range / kvm_zap_gfn_range on one slot: every head of every level that
        [start_gfn, end_gfn) touches; returns the sptes removed (the caller flushes if non-zero)."""
        start, end = (max(start_gfn, slot.base_gfn), min(end_gfn, slot.base_gfn + slot.npages))
        if start >= end:
            return 0
        removed = 0
        for level in range(1, KVM_NR_PAGE_SIZES + 1):
            heads, first = slot.gfn_to_rmap(start, level)
            last = gfn_to_index(end - 1, slot.base_gfn, level)
            removed += self._zap(heads, first + np.flatnonzero(heads[first : last + 1]))
        return removed

    def _after_add(self, heads: np.ndarray, indices: np.ndarray, counts: np.ndarray) -> None:
        """The tail of __rmap_add: raise max_mmu_rmap_size, then recycle lists past the threshold."""
        if not len(counts):
            return
        longest = int(np.maximum.reduce(counts))
        self.vm_stat.max_mmu_rmap_size = max(self.vm_stat.max_mmu_rmap_size, longest)
        if longest > RMAP_RECYCLE_THRESHOLD:
            over = counts > RMAP_RECYCLE_THRESHOLD
            flushes = int(over.sum())
            self._zap(heads, indices[over])
            self.vm_stat.remote_tlb_flush_requests += flushes
            self.vm_stat.remote_tlb_flush += flushes

    def _zap(self, heads: np.ndarray, indices: np.ndarray) -> int:
        removed = self.pte_list.zap_heads(heads, indices)
        if self.on_zap is not None and len(removed):
            self.on_zap(removed)
        return len(removed)
