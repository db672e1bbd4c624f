"""A VM's slot rmaps on one pte_list design: __rmap_add/rmap_add, rmap_remove, kvm_zap_rmap, range zaps.

The engine only keeps the lists: every call that zaps returns the sptes it removed
(kvm_zap_all_rmap_sptes) and leaves clearing them and flushing TLBs to its caller, the
MMU's LeafRmaps.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.arch.x86.mmu.memslot import KVM_NR_PAGE_SIZES, KvmMemorySlot, gfn_to_index
from kvmdbgfs.arch.x86.mmu.pte_list import make_pte_list, occurrence_rounds

RMAP_RECYCLE_THRESHOLD: Final = 1000


class RmapAdds(NamedTuple):
    """What a batch of __rmap_add did to the lists.

    ``counts``: pte_list_add's pre-insert count of every add, in input order.
    ``recycled``: one array per list that an add recycled (its pre-insert count passed
    RMAP_RECYCLE_THRESHOLD), in the order of those adds: the sptes kvm_zap_all_rmap_sptes
    removed, the triggering one included. The caller clears them and flushes once per array.
    """

    counts: np.ndarray
    recycled: list[np.ndarray]


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class KvmRmaps:
    """The rmap half of one VM's shadow MMU.

    ``vm_stat`` is any object with an int attribute ``max_mmu_rmap_size``, which __rmap_add
    raises unless ``updates_max_rmap_size`` is false (the 5.15 kernels never update it). Zaps (a recycle inside __rmap_add, kvm_zap_rmap of one head or of a gfn range)
    return the removed sptes; the caller clears them as mmu_spte_clear_track_bits would and
    flushes (kvm_flush_remote_tlbs_gfn after a recycle). Scalar calls are one-element batches.
    """

    def __init__(self, design: str, vm_stat: Any, updates_max_rmap_size: bool = True) -> None:
        self.pte_list = make_pte_list(design)
        self.vm_stat = vm_stat
        self.updates_max_rmap_size = updates_max_rmap_size

    def rmap_add(self, slot: KvmMemorySlot, gfn: int, level: int, spte: int) -> RmapAdds:
        """__rmap_add of one spte (its rmap part: no flush)."""
        count, recycled = self.rmap_add_one(slot, gfn, level, spte)
        return RmapAdds(np.array([count]), [] if recycled is None else [recycled])

    def rmap_add_one(self, slot: KvmMemorySlot, gfn: int, level: int, spte: int) -> tuple[int, np.ndarray | None]:
        """rmap_add() on Python ints (the MMU adds one spte per fault): the pre-insert count, and the sptes
        of the list if the add recycled it."""
        heads, index = slot.gfn_to_rmap(gfn, level)
        count = self.pte_list.add(heads, index, spte)
        self._note_rmap_size(count)
        return count, self._recycle(heads, index) if count > RMAP_RECYCLE_THRESHOLD else None

    def rmap_remove(self, slot: KvmMemorySlot, gfn: int, level: int, spte: int) -> None:
        """rmap_remove."""
        self.rmap_remove_batch(slot, np.array([gfn]), level, np.array([spte]))

    def rmap_count(self, slot: KvmMemorySlot, gfn: int, level: int) -> int:
        heads, index = slot.gfn_to_rmap(gfn, level)
        return self.pte_list.count(heads, index)

    def zap_rmapp(self, slot: KvmMemorySlot, gfn: int, level: int) -> np.ndarray:
        """kvm_zap_rmap of one head; returns the sptes removed (the caller clears them and flushes)."""
        heads, index = slot.gfn_to_rmap(gfn, level)
        return self.pte_list.zap_heads(heads, np.array([index]))

    def rmap_add_batch(self, slot: KvmMemorySlot, gfns: np.ndarray, level: int, sptes: np.ndarray) -> RmapAdds:
        """__rmap_add for each (gfn, spte) in order, recycles included, exactly as one call per add."""
        heads, indices = slot.gfn_to_rmap(np.asarray(gfns, np.int64), level)
        sptes = np.asarray(sptes, np.int64)
        counts = np.empty(len(indices), np.int64)
        recycled: dict[int, np.ndarray] = {}
        for pos in occurrence_rounds(indices):
            counts[pos] = self.pte_list.add_unique(heads, indices[pos], sptes[pos])
            recycled.update(self._after_add(heads, indices, pos, counts[pos]))
        return RmapAdds(counts, [recycled[at] for at in sorted(recycled)])

    def rmap_remove_batch(self, slot: KvmMemorySlot, gfns: np.ndarray, level: int, sptes: np.ndarray) -> None:
        heads, indices = slot.gfn_to_rmap(np.asarray(gfns, np.int64), level)
        self.pte_list.remove_batch(heads, indices, sptes)

    def zap_gfn_range(self, slot: KvmMemorySlot, start_gfn: int, end_gfn: int) -> np.ndarray:
        """kvm_unmap_gfn_range / kvm_zap_gfn_range on one slot: every head of every level that
        [start_gfn, end_gfn) touches; returns the sptes removed (the caller clears them, and flushes
        if there are any)."""
        start, end = (max(start_gfn, slot.base_gfn), min(end_gfn, slot.base_gfn + slot.npages))
        if start >= end:
            return np.empty(0, np.int64)
        removed = []
        for level in range(1, KVM_NR_PAGE_SIZES + 1):
            heads, first = slot.gfn_to_rmap(start, level)
            last = gfn_to_index(end - 1, slot.base_gfn, level)
            removed.append(self.pte_list.zap_heads(heads, first + np.flatnonzero(heads[first : last + 1])))
        return np.concatenate(removed)

    def _after_add(
        self, heads: np.ndarray, indices: np.ndarray, pos: np.ndarray, counts: np.ndarray
    ) -> dict[int, np.ndarray]:
        """The tail of __rmap_add for the adds at ``pos`` (distinct heads) that returned ``counts``: raise
        max_mmu_rmap_size, then kvm_zap_all_rmap_sptes on every list past the threshold; returns the sptes
        each recycle removed, by the batch position of the add that triggered it."""
        if not len(counts):
            return {}
        longest = int(np.maximum.reduce(counts))
        self._note_rmap_size(longest)
        if longest <= RMAP_RECYCLE_THRESHOLD:
            return {}
        over = pos[counts > RMAP_RECYCLE_THRESHOLD].tolist()
        return {at: self._recycle(heads, int(indices[at])) for at in over}

    def _note_rmap_size(self, count: int) -> None:
        """__rmap_add: max_mmu_rmap_size follows the longest pre-insert count."""
        if self.updates_max_rmap_size and count > self.vm_stat.max_mmu_rmap_size:
            self.vm_stat.max_mmu_rmap_size = count

    def _recycle(self, heads: np.ndarray, index: int) -> np.ndarray:
        """kvm_zap_all_rmap_sptes on a list an add took past RMAP_RECYCLE_THRESHOLD; returns its sptes."""
        return self.pte_list.zap_heads(heads, np.array([index]))
