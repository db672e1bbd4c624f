"""The page-table pages an MMU builds (each kvm_mmu_page's ``spt``), as rows of one numpy array.

Page ``id`` owns row ``id`` of ``spt`` (its 512 sptes), of ``access`` (the access bits
recorded per spte, ``shadowed_translation``) and ``level``. Ids come back LIFO when
pages are freed, as slab objects do; id 0 is never used. Rows are zero when handed
out, like pages from the zeroing shadow-page cache.

``revoke_seq`` moves whenever a translation may have gone: a present spte is cleared, loses W or U,
gains NX, or points to another frame or page size (as a non-leaf spte: another child page), and when a page
is freed (its id may come back as a new root). A batch of accesses uses it to know when translations it found
usable must be checked again, and leaf_spte() to know when the walks it remembers may have changed. So every
store into ``spt`` goes through the methods here (a page's own row may be filled before it is linked).
"""

from __future__ import annotations

from typing import Final

import numpy as np

from kvmdbgfs.arch.x86.mmu.spte import (
    PAGE_SHIFT,
    PT_PAGE_SIZE_MASK,
    SPTE_BASE_ADDR_MASK,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT_MASK,
    SPTE_PERM_MASK,
    PT64_NX_MASK,
    U64,
    sptes_to_pfn,
)
from kvmdbgfs.instance_state import set_attributes
from kvmdbgfs.zero_extend import zero_extended

INITIAL_PAGES: Final = 64
WALK_SPAN_SHIFT: Final = PAGE_SHIFT + 9  # addresses alike above these bits take the same walk down to the last level
SPTE_TARGET_MASK: Final = SPTE_BASE_ADDR_MASK | PT_PAGE_SIZE_MASK  # what a present spte translates to


def revokes_any(old: np.ndarray, new: np.ndarray) -> bool:
    """Whether storing ``new`` over ``old`` may take a translation away (see ``revoke_seq``), for any of
    several stores: a permission lost, or a present spte that gains NX or translates elsewhere."""
    present = (old & U64(SPTE_MMU_PRESENT_MASK)) != 0
    moved = ((new & ~old & U64(PT64_NX_MASK)) | ((old ^ new) & U64(SPTE_TARGET_MASK))) != 0
    return bool(((old & ~new & U64(SPTE_PERM_MASK)) != 0).any() or (present & moved).any())


# SptPool's state (__getstate__), in the order __init__ sets it; the rest is made again from it.
_STATE = ("spt", "access", "level", "free_ids", "next_id", "revoke_seq")


class SptPool:
    def __init__(self) -> None:
        self.spt = np.zeros((INITIAL_PAGES, SPTE_ENT_PER_PAGE), np.uint64)
        self.access = np.zeros((INITIAL_PAGES, SPTE_ENT_PER_PAGE), np.uint8)
        self.level = np.zeros(INITIAL_PAGES, np.int8)
        self.free_ids: list[int] = []
        self.next_id = 1
        self.revoke_seq = 0
        self._bind()
        self._forget_walks()

    def _bind(self) -> None:
        """Views of the arrays, made again whenever they are replaced. ``words``: ``spt`` as one flat run of u64
        (row ``sp_id`` from ``sp_id * 512``) and ``_levels``: ``level``, both memoryviews, whose indexing costs a
        fraction of ndarray.item or of an ndarray store (measured in instructions: about 120 against 850 for a
        read, 270 against 740 for a store). The MMU's paths read single sptes as
        ``words[sp_id * SPTE_ENT_PER_PAGE + index]`` in place, as the scalar paths below do: the fault paths
        read sptes about a million times in a boot, and a Python method around the read would cost a frame each
        time (stores go through set(), for revoke_seq). ``get(sp_id, index)``: the same read as ``spt.item``
        itself, for readers off those paths (the tests). ``access_bytes``: ``access`` as one flat memoryview the
        same way, for mmu_set_spte's store of one entry's access."""
        self.get = self.spt.item
        self.words = self.spt.data.cast("B").cast("Q")
        self._levels = self.level.data
        self.access_bytes = self.access.data.cast("B")

    def __getstate__(self) -> dict[str, object]:
        """Pickled (boot snapshots) and deep-copied without the views, which are made again after. The
        attributes are named, not taken from ``__dict__``: a class compiled by mypyc has none."""
        return {name: getattr(self, name) for name in _STATE}

    def __setstate__(self, state: dict[str, object]) -> None:
        set_attributes(self, state)
        self._bind()
        self._forget_walks()

    def _forget_walks(self) -> None:
        """leaf_spte()'s memory of its walks: (root id, address >> WALK_SPAN_SHIFT) -> (row start in ``words``,
        shift) of the entry that ended the last walk there (a last-level entry, a huge leaf, or one not
        present), valid while ``revoke_seq`` is ``_walks_seq``: the links above that entry only change by a
        store that moves revoke_seq (cleared, repointed, made a huge leaf) or by freeing a page."""
        self._walks: dict[tuple[int, int], tuple[int, int]] = {}
        self._walks_seq = self.revoke_seq

    @property
    def capacity(self) -> int:
        return len(self.level)

    def alloc(self, level: int) -> int:
        """A zeroed page for ``level``; returns its id."""
        if self.free_ids:
            sp_id = self.free_ids.pop()
        else:
            sp_id = self.next_id
            self.next_id += 1
            if sp_id >= self.capacity:
                self._grow()
        self.level[sp_id] = level
        return sp_id

    def free(self, sp_id: int) -> None:
        """The page goes back to the cache; its row is cleared for the next user."""
        self.spt[sp_id] = 0
        self.access[sp_id] = 0
        self.free_ids.append(sp_id)
        self.revoke_seq += 1

    def _grow(self) -> None:
        """Double every array; the new rows are zero."""
        size = 2 * self.capacity
        self.spt, self.access = zero_extended(self.spt, size), zero_extended(self.access, size)
        self.level = zero_extended(self.level, size)
        self._bind()

    def set(self, sp_id: int, index: int, spte: int) -> None:
        """mmu_spte_set / mmu_spte_update / mmu_spte_clear: store one spte."""
        at = sp_id * SPTE_ENT_PER_PAGE + index
        old = self.words[at]
        if old != spte and (  # revokes_any() of this one store, on ints
            old & ~spte & SPTE_PERM_MASK
            or old & SPTE_MMU_PRESENT_MASK and (spte & ~old & PT64_NX_MASK or (old ^ spte) & SPTE_TARGET_MASK)
        ):
            self.revoke_seq += 1
        self.words[at] = spte

    def store_many(self, sp_id: int, indices: np.ndarray, sptes: np.ndarray) -> np.ndarray:
        """Store several sptes of one page; returns their old values."""
        old = self.spt[sp_id, indices]
        if revokes_any(old, sptes):
            self.revoke_seq += 1
        self.spt[sp_id, indices] = sptes
        return old

    def clear_many(self, sp_ids: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Clear several sptes; returns their old values."""
        old = self.spt[sp_ids, indices]
        if len(old):
            self.revoke_seq += 1
            self.spt[sp_ids, indices] = 0
        return old

    def clear_bits(self, sp_ids: np.ndarray, indices: np.ndarray, bits: int) -> np.ndarray:
        """Clear ``bits`` in several sptes; returns which of them had any of those bits."""
        old = self.spt[sp_ids, indices]
        had = (old & U64(bits)) != 0
        if had.any():
            self.revoke_seq += 1
            self.spt[sp_ids[had], indices[had]] = old[had] & ~U64(bits)
        return had

    def clear_bits_one(self, sp_id: int, index: int, bits: int) -> bool:
        """clear_bits() of one spte, with scalar reads: whether it had any of ``bits``."""
        at = sp_id * SPTE_ENT_PER_PAGE + index
        old = self.words[at]
        if not old & bits:
            return False
        self.revoke_seq += 1
        self.words[at] = old & ~bits
        return True

    def leaf_sptes(self, root_id: int, addrs: np.ndarray) -> np.ndarray:
        """The leaf spte that translates each address (a gva, or a gpa under EPT) from page ``root_id``; 0 where
        the walk ends at a non-present entry."""
        addrs = np.asarray(addrs, np.uint64)
        out = np.zeros(len(addrs), np.uint64)
        alive = np.arange(len(addrs))
        pages = np.full(len(addrs), root_id, np.int64)
        for level in range(int(self.level[root_id]), 0, -1):
            index = ((addrs[alive] >> U64(PAGE_SHIFT + 9 * (level - 1))) & U64(SPTE_ENT_PER_PAGE - 1)).astype(np.int64)
            sptes = self.spt[pages[alive], index]
            present = (sptes & U64(SPTE_MMU_PRESENT_MASK)) != 0
            leaf = present & ((sptes & U64(PT_PAGE_SIZE_MASK)) != 0) if level > 1 else present
            out[alive[leaf]] = sptes[leaf]
            down = present & ~leaf
            pages[alive[down]] = sptes_to_pfn(sptes[down])
            alive = alive[down]
        return out

    def leaf_spte(self, root_id: int, addr: int) -> int:
        """leaf_sptes() of one address, walked in Python (cheaper than numpy for one). At the last level the
        walk ends whatever bit 7 is (PAT there, not a large page). Where a walk ended is remembered (see
        _forget_walks), as a paging-structure cache would: the next walk in the same 2 MiB from the same root
        starts from that entry, read live (a link made there since is followed down)."""
        if self._walks_seq != self.revoke_seq:
            self._forget_walks()
        words = self.words
        span = (root_id, addr >> WALK_SPAN_SHIFT)
        walk = self._walks.get(span)
        if walk is None:
            row, shift = root_id * SPTE_ENT_PER_PAGE, PAGE_SHIFT + 9 * (self._levels[root_id] - 1)
        else:
            row, shift = walk
        while True:
            spte = words[row + ((addr >> shift) & (SPTE_ENT_PER_PAGE - 1))]
            if not spte & SPTE_MMU_PRESENT_MASK:
                spte = 0
                break
            if spte & PT_PAGE_SIZE_MASK or shift == PAGE_SHIFT:
                break
            row, shift = ((spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT) * SPTE_ENT_PER_PAGE, shift - 9
            walk = None  # it ends lower now
        if walk is None:
            self._walks[span] = (row, shift)
        return spte
