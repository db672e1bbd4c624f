"""Memslots and their rmap arrays (struct kvm_memory_slot, gfn_to_index, kvm_mmu_slot_lpages)."""

from __future__ import annotations

from typing import Final, cast, overload

import numpy as np
from mypy_extensions import mypyc_attr

PG_LEVEL_4K: Final = 1
PG_LEVEL_2M: Final = 2
PG_LEVEL_1G: Final = 3
KVM_NR_PAGE_SIZES: Final = 3
KVM_ADDRESS_SPACE_NUM: Final = 2  # x86 with SMM: the normal and the SMM address space


def KVM_HPAGE_GFN_SHIFT(level: int) -> int:
    """gfn bits below one page of ``level``: 0, 9, 18."""
    return (level - PG_LEVEL_4K) * 9


@overload
def gfn_to_index(gfn: int, base_gfn: int, level: int) -> int: ...
@overload
def gfn_to_index(gfn: np.ndarray, base_gfn: int, level: int) -> np.ndarray: ...
def gfn_to_index(gfn: int | np.ndarray, base_gfn: int, level: int) -> int | np.ndarray:
    """Index of ``gfn``'s rmap head at ``level``, counted from the level-aligned frame holding base_gfn."""
    shift = KVM_HPAGE_GFN_SHIFT(level)
    return (gfn >> shift) - (base_gfn >> shift)


def kvm_mmu_slot_lpages(slot: KvmMemorySlot, level: int) -> int:
    """Rmap heads a slot needs at ``level``: every level-aligned frame it touches."""
    return gfn_to_index(slot.base_gfn + slot.npages - 1, slot.base_gfn, level) + 1


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class KvmMemorySlot:
    """struct kvm_memory_slot with the x86 ``arch.rmap[level - 1]`` head arrays."""

    def __init__(self, id: int, as_id: int, base_gfn: int, npages: int) -> None:
        self.id = id
        self.as_id = as_id
        self.base_gfn = base_gfn
        self.npages = npages
        self.rmap: list[np.ndarray] | None = None

    def alloc_rmaps(self) -> None:
        """memslot_rmap_alloc: zeroed heads for the three levels (kept if already allocated)."""
        if self.rmap is None:
            self.rmap = [
                np.zeros(kvm_mmu_slot_lpages(self, level), np.int64)
                for level in range(1, KVM_NR_PAGE_SIZES + 1)
            ]

    def free_rmaps(self) -> None:
        """memslot_rmap_free."""
        self.rmap = None

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    @overload
    def gfn_to_rmap(self, gfn: int, level: int) -> tuple[np.ndarray, int]: ...
    @overload
    def gfn_to_rmap(self, gfn: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]: ...
    def gfn_to_rmap(self, gfn: int | np.ndarray, level: int) -> tuple[np.ndarray, int | np.ndarray]:
        """gfn_to_rmap: the level's head array and the index (or indices) of ``gfn``'s head."""
        rmap = self.rmap
        if rmap is None:
            raise ValueError(f"memslot {self.as_id}:{self.id} has no rmaps allocated")
        if type(gfn) is int:  # one gfn (every fault's rmap_add): Python ints only, gfn_to_index() written out
            base_gfn = self.base_gfn
            if not base_gfn <= gfn < base_gfn + self.npages:
                raise IndexError(f"gfn outside memslot {self.as_id}:{self.id}")
            shift = (level - PG_LEVEL_4K) * 9
            return rmap[level - 1], (gfn >> shift) - (base_gfn >> shift)
        gfns = np.asarray(gfn)
        if gfns.size:  # ufunc reductions: no Python-level dispatch as in ndarray.min/max
            lowest, highest = int(np.minimum.reduce(gfns, axis=None)), int(np.maximum.reduce(gfns, axis=None))
            if not (self.contains(lowest) and self.contains(highest)):
                # The kernel trusts its callers; numpy would silently wrap a negative index.
                raise IndexError(f"gfn outside memslot {self.as_id}:{self.id}")
        return rmap[level - 1], gfn_to_index(cast(np.ndarray, gfn), self.base_gfn, level)
