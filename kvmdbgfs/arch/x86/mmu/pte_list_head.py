"""Designs C (v6.4+) and D (ours): new descriptors at the head, every non-head descriptor full."""

from __future__ import annotations

from typing import Final

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.arch.x86.mmu.pte_list_backptr import BackPointers
from kvmdbgfs.arch.x86.mmu.pte_list_base import Hit, PteListDesign, RmapCorruption, desc_head

# Design D's back-pointer: desc id * POS_STRIDE + slot (0 = not in a descriptor).
POS_STRIDE: Final = 16


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class DesignC(PteListDesign):
    """Version C (v6.4+, Lai Jiangshan): ``more``, ``spte_count``, ``tail_count``, ``sptes[14]`` = 128 bytes.

    ``tail_count`` is the number of entries in the descriptors after this one. Only the
    head descriptor may be partial (never empty), so add and count are O(1) and exact; a
    removal searches from the head (newest first) and fills the hole with the head
    descriptor's last entry. Pool: 112 + 3 x 4 (int32 metadata) + 4 (free stack) = 128
    bytes a descriptor.
    """

    name = "C"
    PTE_LIST_EXT = 14
    DESC_BYTES = 128
    POOL_META = ("more", "spte_count", "tail_count")

    def _count_many(self, first: np.ndarray) -> np.ndarray:
        """pte_list_count: ``tail_count + spte_count`` of the head descriptor."""
        self.costs.desc_visits += len(first)
        return self.pool.tail_count[first].astype(np.int64) + self.pool.spte_count[first]

    def _add_many(
        self, heads: np.ndarray, indices: np.ndarray, first: np.ndarray, sptes: np.ndarray
    ) -> np.ndarray:
        """pte_list_add, descriptor form: a full head gets a new head descriptor in front of it."""
        counts = self._count_many(first)
        head = first.copy()
        full = self.pool.spte_count[head] == self.PTE_LIST_EXT
        if full.any():
            new = self.pool.alloc(int(full.sum()))
            self.pool.more[new] = head[full]
            self.pool.tail_count[new] = counts[full]
            head[full] = new
            heads[indices[full]] = desc_head(new)
        slots = self.pool.spte_count[head].astype(np.int64)
        self.pool.sptes[head, slots] = sptes
        self.pool.spte_count[head] = slots + 1
        self.costs.slot_writes += len(head)
        self._placed(sptes, head, slots)
        return counts

    def _add_to_list(self, heads: np.ndarray, index: int, first: int, spte: int) -> int:
        """_add_many() of one list."""
        pool, costs = self.pool, self.costs
        costs.desc_visits += 1
        costs.slot_writes += 1
        head, slot = first, pool.spte_count_view[first]
        count = pool.tail_count_view[first] + slot
        if slot == self.PTE_LIST_EXT:
            head, slot = pool.alloc_one(), 0
            pool.more_view[head] = first
            pool.tail_count_view[head] = count
            heads[index] = (head << 1) | 1
        pool.sptes_view[head * self.PTE_LIST_EXT + slot] = spte
        pool.spte_count_view[head] = slot + 1
        self._placed_one(spte, head, slot)
        return count

    def _remove_many(
        self, heads: np.ndarray, indices: np.ndarray, first: np.ndarray, sptes: np.ndarray
    ) -> None:
        """__pte_list_remove, descriptor form: linear search from the head."""
        descs, slots = self._find(first, sptes)[:2]
        self._fill_from_head(heads, indices, first, descs, slots)

    def _remove_at(self, heads: np.ndarray, index: int, first: int, spte: int, hit: Hit) -> None:
        """_remove_many() of one list, with Python ints."""
        self.costs.desc_visits += hit.visits
        self.costs.slot_reads += hit.reads
        self._fill_from_head_one(heads, index, first, hit.desc, hit.slot)

    def _fill_from_head(
        self, heads: np.ndarray, indices: np.ndarray, first: np.ndarray, descs: np.ndarray, slots: np.ndarray
    ) -> None:
        """pte_list_desc_remove_entry: move the head's last entry into the hole; free an emptied head."""
        last = self.pool.spte_count[first].astype(np.int64) - 1
        moved = self.pool.sptes[first, last]
        self.pool.sptes[descs, slots] = moved
        self.pool.sptes[first, last] = 0
        self.pool.spte_count[first] = last
        self.costs.desc_visits += int((descs != first).sum())
        self.costs.slot_reads += len(first)
        self.costs.slot_writes += 2 * len(first)
        self._placed(moved, descs, slots)
        emptied = last == 0
        if emptied.any():
            gone = first[emptied]
            nxt = self.pool.more[gone]
            heads[indices[emptied]] = np.where(nxt != 0, desc_head(nxt), 0)
            self.pool.free(gone)


    def _fill_from_head_one(self, heads: np.ndarray, index: int, first: int, desc: int, slot: int) -> None:
        """_fill_from_head() of one list, with Python ints."""
        pool, costs, ext = self.pool, self.costs, self.PTE_LIST_EXT
        table, last = pool.sptes_view, pool.spte_count_view[first] - 1
        moved = table[first * ext + last]
        table[desc * ext + slot] = moved
        table[first * ext + last] = 0
        pool.spte_count_view[first] = last
        costs.desc_visits += desc != first
        costs.slot_reads += 1
        costs.slot_writes += 2
        self._placed_one(moved, desc, slot)
        if not last:
            nxt = pool.more_view[first]
            heads[index] = (nxt << 1) | 1 if nxt else 0
            pool.free([first])


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class DesignD(DesignC):
    """Design D (ours): design C plus a back-pointer per spte, for O(1) removal.

    Layout and rules are C's (128-byte descriptor, new descriptors at the head, non-head
    descriptors full, hole filled from the head), so add and count stay O(1). What C
    cannot avoid is the search: the kernel does not know where in the chain an spte sits,
    and a fork-heavy guest exits its children oldest first, i.e. from the far end of C's
    list. D records, for every spte that sits in a descriptor, where it sits:
    ``rmap_pos[spte >> 3] = desc * 16 + slot``. __pte_list_remove then reads that, checks
    the slot really holds the spte, and fills the hole from the head: two descriptor
    visits at most, whatever the list length and removal order. Every store or move of an
    spte in a descriptor updates its entry (counted as a slot write).

    Cost: the descriptor keeps its 128 bytes; the price is one 8-byte word per spte (the
    table is indexed by spte address, so it covers every spte the MMU has allocated,
    rmapped or not, up to the highest one; see pte_list_backptr). In kernel terms this is a
    u64 array beside each shadow page's 512 sptes, 4 KiB per shadow page, the same as
    ``shadowed_translation``; the word can be the address of the slot itself, since
    128-byte-aligned descriptors give the descriptor as ``ptr & ~127``. Single-form
    heads need no entry. What D gives up: the check that an spte is in *this* list is the
    slot check only (a descriptor does not know its head), and an spte may be in at most
    one list at a time, which the MMU guarantees (one gfn per leaf spte).
    """

    name = "D"

    def __init__(self) -> None:
        super().__init__()
        self.rmap_pos = BackPointers()

    @property
    def rmap_pos_bytes_per_spte(self) -> int:
        return self.rmap_pos.itemsize

    def _placed(self, sptes: np.ndarray, descs: np.ndarray, slots: np.ndarray) -> None:
        keys = sptes >> 3
        self.rmap_pos.scatter(keys, np.multiply(descs, POS_STRIDE, dtype=np.int64) + slots)
        self.costs.slot_writes += len(keys)

    def _placed_one(self, spte: int, desc: int, slot: int) -> None:
        self.rmap_pos[spte >> 3] = desc * POS_STRIDE + slot
        self.costs.slot_writes += 1

    def _dropped(self, sptes: np.ndarray) -> None:
        self.rmap_pos.clear(sptes >> 3)
        self.costs.slot_writes += len(sptes)

    def _locate(self, first: int, spte: int) -> Hit | None:
        """The back-pointer names the slot (one visit, one read), if it holds ``spte``."""
        pos = self.rmap_pos[spte >> 3]
        desc, slot = divmod(pos, POS_STRIDE)
        if not pos or self.pool.sptes_view[desc * self.PTE_LIST_EXT + slot] != spte:
            return None
        return Hit(desc, slot, 0, 0, 0, 1, 1)

    def _remove_at(self, heads: np.ndarray, index: int, first: int, spte: int, hit: Hit) -> None:
        """_remove_many() of one spte, with Python ints."""
        super()._remove_at(heads, index, first, spte, hit)
        self.rmap_pos[spte >> 3] = 0  # _dropped()
        self.costs.slot_writes += 1

    def _remove_many(
        self, heads: np.ndarray, indices: np.ndarray, first: np.ndarray, sptes: np.ndarray
    ) -> None:
        """__pte_list_remove in O(1): the back-pointer names the slot."""
        pos = self.rmap_pos.gather(sptes >> 3)
        descs, slots = pos // POS_STRIDE, pos % POS_STRIDE
        if ((pos == 0) | (self.pool.sptes[descs, slots] != sptes)).any():
            raise RmapCorruption("__pte_list_remove: spte not in its rmap")
        self.costs.desc_visits += len(descs)
        self.costs.slot_reads += len(descs)
        self._fill_from_head(heads, indices, first, descs, slots)
        self._dropped(sptes)
