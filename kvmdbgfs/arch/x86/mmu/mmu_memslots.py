"""What the MMU keeps beside each memslot, and gfn -> memslot lookups in address space 0.

Per slot (struct kvm_arch_memory_slot): ``lpage_info`` disallow counts for 2M and 1G
(kvm_alloc_memslot_metadata, account_shadowed) and ``gfn_write_track`` counts (page_track.c).
Lookups try the last slot found, then bisect over the slot bases, as __gfn_to_memslot does with
last_used_slot and search_memslots.
"""

from __future__ import annotations

from typing import Final

import bisect
from collections.abc import Iterable

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.arch.x86.mmu.memslot import KVM_NR_PAGE_SIZES, KvmMemorySlot, gfn_to_index, kvm_mmu_slot_lpages
from kvmdbgfs.arch.x86.mmu.spte import KVM_MAX_HUGEPAGE_LEVEL, KVM_PAGES_PER_HPAGE, PG_LEVEL_2M, PG_LEVEL_4K

KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO: Final = 50  # 5.x wrote it as KVM_PERMILLE_MMU_PAGES 20: the same floor(n / 50)
KVM_MIN_ALLOC_MMU_PAGES: Final = 64


def kvm_mmu_calculate_default_mmu_pages(memslots: Iterable[KvmMemorySlot]) -> int:
    """The default shadow-page limit: one page per 50 pages of every memslot of every address space (SMM's
    included), at least KVM_MIN_ALLOC_MMU_PAGES.

    5.x (kvm_mmu_calculate_default_mmu_pages) loops over both address spaces and takes 20 per mille;
    5.17+ keeps the same sum as kvm->nr_memslot_pages and divides by 50. floor(20n / 1000) == floor(n / 50)
    for every n, so the value is the same for every profile (5.x also recomputes it on a slot move or flags
    change, which leaves the sum, and so the limit, as it was)."""
    nr_memslot_pages = sum(slot.npages for slot in memslots)
    return max(nr_memslot_pages // KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO, KVM_MIN_ALLOC_MMU_PAGES)


class MmioAccess(Exception):
    """A fault on a gfn outside every memslot: KVM would create an MMIO spte and exit to userspace (not modelled)."""


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class MmuSlot:
    """One address-space-0 memslot as the MMU sees it."""

    def __init__(self, slot: KvmMemorySlot) -> None:
        self.slot = slot
        self.base_gfn = slot.base_gfn
        self.end_gfn = slot.base_gfn + slot.npages
        self.disallow_lpage: list[np.ndarray] = []
        for level in range(PG_LEVEL_2M, KVM_NR_PAGE_SIZES + 1):
            linfo = np.zeros(kvm_mmu_slot_lpages(slot, level), np.int32)
            mask = KVM_PAGES_PER_HPAGE(level) - 1
            if self.base_gfn & mask:
                linfo[0] = 1
            if self.end_gfn & mask:
                linfo[-1] += 1
            self.disallow_lpage.append(linfo)
        self.write_track: dict[int, int] = {}

    def lpage_disallowed(self, gfn: int, level: int) -> bool:
        return bool(self.disallow_lpage[level - 2][gfn_to_index(gfn, self.base_gfn, level)])

    def update_disallow_lpage(self, gfn: int, delta: int) -> None:
        """kvm_mmu_gfn_disallow_lpage (+1) / kvm_mmu_gfn_allow_lpage (-1) at 2M and 1G."""
        for level in range(PG_LEVEL_2M, KVM_NR_PAGE_SIZES + 1):
            self.disallow_lpage[level - 2][gfn_to_index(gfn, self.base_gfn, level)] += delta

    def update_write_track(self, gfn: int, delta: int) -> None:
        """update_gfn_write_track."""
        count = self.write_track.get(gfn, 0) + delta
        if count:
            self.write_track[gfn] = count
        else:
            del self.write_track[gfn]


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class MmuMemslots:
    """The MmuSlot of every address-space-0 memslot, sorted by base gfn."""

    def __init__(self, host_max_level: int) -> None:
        self.host_max_level = host_max_level
        self.slots: list[MmuSlot] = []
        self._bases: list[int] = []
        self._base_array = np.zeros(0, np.int64)
        self._end_array = np.zeros(0, np.int64)
        self.last_used_slot: MmuSlot | None = None

    def update(self, memslots: Iterable[KvmMemorySlot]) -> None:
        """After a memslot was created or deleted: keep the MmuSlot of slots that stay, add new ones."""
        known = {id(ms.slot): ms for ms in self.slots}
        current = [slot for slot in memslots if slot.as_id == 0]
        self.slots = sorted((known.get(id(slot)) or MmuSlot(slot) for slot in current), key=lambda ms: ms.base_gfn)
        self._bases = [ms.base_gfn for ms in self.slots]
        self._base_array = np.array(self._bases, np.int64)
        self._end_array = np.array([ms.end_gfn for ms in self.slots], np.int64)
        self.last_used_slot = None

    def lookup(self, gfn: int) -> MmuSlot | None:
        """gfn_to_memslot() in address space 0: the last slot found first (try_get_memslot() on
        slots->last_used_slot), then the search (search_memslots()), which becomes the hint."""
        ms = self.last_used_slot
        if ms is not None and ms.base_gfn <= gfn < ms.end_gfn:
            return ms
        pos = bisect.bisect_right(self._bases, gfn) - 1
        if pos >= 0 and gfn < self.slots[pos].end_gfn:
            ms = self.last_used_slot = self.slots[pos]
            return ms
        return None

    def fault_slot(self, gfn: int) -> MmuSlot:
        """The memslot of a faulting gfn (fault->slot); there must be one."""
        ms = self.lookup(gfn)
        if ms is None:
            raise MmioAccess(f"gfn {gfn:#x} is in no memslot (an MMIO access)")
        return ms

    def lookup_many(self, gfns: np.ndarray) -> np.ndarray:
        """Position in ``slots`` of each gfn's slot, -1 where none."""
        pos = np.searchsorted(self._base_array, gfns, side="right") - 1
        inside = (pos >= 0) & (gfns < self._end_array[np.maximum(pos, 0)])
        return np.where(inside, pos, -1)

    def max_mapping_level(self, ms: MmuSlot, gfn: int, max_level: int) -> int:
        """kvm_mmu_max_mapping_level(): the largest level not disallowed, capped by the host mapping."""
        level = min(max_level, KVM_MAX_HUGEPAGE_LEVEL)
        while level > PG_LEVEL_4K and ms.lpage_disallowed(gfn, level):
            level -= 1
        if level == PG_LEVEL_4K:
            return PG_LEVEL_4K
        return min(level, self.host_max_level)
