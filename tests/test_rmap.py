"""KvmRmaps: __rmap_add's max_mmu_rmap_size and recycle, removal, zaps over gfn ranges (reference §1.2-1.4)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kvmdbgfs.arch.x86.mmu.memslot import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, KvmMemorySlot
from kvmdbgfs.arch.x86.mmu.pte_list import PTE_LIST_DESIGNS, RmapCorruption
from kvmdbgfs.arch.x86.mmu.rmap import RMAP_RECYCLE_THRESHOLD, KvmRmaps

BASE = 0x100


def make(design: str) -> tuple[KvmRmaps, KvmMemorySlot]:
    rmaps = KvmRmaps(design, SimpleNamespace(max_mmu_rmap_size=0))
    slot = KvmMemorySlot(id=0, as_id=0, base_gfn=BASE, npages=0x7FF00)
    slot.alloc_rmaps()
    return rmaps, slot


@pytest.mark.parametrize("design", PTE_LIST_DESIGNS)
def test_recycle_sequence_1000_1001_1002(design: str) -> None:
    """A list never stays above 1001 entries: the add that sees 1001 zaps all 1002, itself included,
    and returns them for the caller to clear and flush."""
    assert RMAP_RECYCLE_THRESHOLD == 1000
    rmaps, slot = make(design)
    sptes = 8 * np.arange(1, 1003)
    adds = rmaps.rmap_add_batch(slot, np.full(1000, BASE + 7), PG_LEVEL_4K, sptes[:1000])
    assert (adds.counts.tolist(), adds.recycled) == (list(range(1000)), [])
    adds = rmaps.rmap_add(slot, BASE + 7, PG_LEVEL_4K, int(sptes[1000]))
    assert (adds.counts.tolist(), adds.recycled) == ([1000], [])
    assert rmaps.rmap_count(slot, BASE + 7, PG_LEVEL_4K) == 1001
    assert rmaps.vm_stat.max_mmu_rmap_size == 1000
    adds = rmaps.rmap_add(slot, BASE + 7, PG_LEVEL_4K, int(sptes[1001]))
    assert adds.counts.tolist() == [1001]
    assert [sorted(recycled.tolist()) for recycled in adds.recycled] == [sptes.tolist()]
    assert rmaps.rmap_count(slot, BASE + 7, PG_LEVEL_4K) == 0
    assert rmaps.pte_list.live_descs == 0
    assert vars(rmaps.vm_stat) == {"max_mmu_rmap_size": 1001}, "the engine flushes nothing"
    assert rmaps.rmap_add(slot, BASE + 7, PG_LEVEL_4K, 8 * 5000).counts.tolist() == [0]


@pytest.mark.parametrize("design", PTE_LIST_DESIGNS)
def test_a_batch_crossing_the_threshold_recycles_mid_batch(design: str) -> None:
    rmaps, slot = make(design)
    gfns = np.array([BASE] * 1005 + [BASE + 1] * 3)
    sptes = 8 * np.arange(1, len(gfns) + 1)
    adds = rmaps.rmap_add_batch(slot, gfns, PG_LEVEL_4K, sptes)
    assert adds.counts[:1005].tolist() == [*range(1002), 0, 1, 2]
    assert adds.counts[1005:].tolist() == [0, 1, 2]
    assert [sorted(recycled.tolist()) for recycled in adds.recycled] == [sptes[:1002].tolist()]
    assert rmaps.rmap_count(slot, BASE, PG_LEVEL_4K) == 3
    assert rmaps.vm_stat.max_mmu_rmap_size == 1001


def test_recycles_in_one_batch_come_back_in_the_order_of_their_adds() -> None:
    """Two lists pass the threshold in the same round of a batch (which goes head by head), the higher
    head first in the input."""
    rmaps, slot = make("C")
    rmaps.rmap_add_batch(slot, np.repeat([BASE, BASE + 1], 1001), PG_LEVEL_4K, 8 * np.arange(1, 2003))
    gfns = np.array([BASE + 1, BASE, BASE + 2, BASE + 2])
    adds = rmaps.rmap_add_batch(slot, gfns, PG_LEVEL_4K, 8 * np.arange(5000, 5004))
    assert adds.counts.tolist() == [1001, 1001, 0, 1]
    assert [sorted(recycled.tolist()) for recycled in adds.recycled] == [
        [*(8 * np.arange(1002, 2003)).tolist(), 8 * 5000],
        [*(8 * np.arange(1, 1002)).tolist(), 8 * 5001],
    ]


def test_max_mmu_rmap_size_is_a_peak_that_can_be_cleared() -> None:
    rmaps, slot = make("C")
    rmaps.rmap_add_batch(slot, np.full(5, BASE), PG_LEVEL_4K, 8 * np.arange(1, 6))
    assert rmaps.vm_stat.max_mmu_rmap_size == 4
    rmaps.rmap_remove_batch(slot, np.full(3, BASE), PG_LEVEL_4K, 8 * np.arange(1, 4))
    rmaps.rmap_add(slot, BASE, PG_LEVEL_4K, 8 * 100)
    assert rmaps.vm_stat.max_mmu_rmap_size == 4
    rmaps.vm_stat.max_mmu_rmap_size = 0  # echo 0 > max_mmu_rmap_size
    rmaps.rmap_add(slot, BASE, PG_LEVEL_4K, 8 * 101)
    assert rmaps.vm_stat.max_mmu_rmap_size == 3


def test_the_max_stat_inherits_the_under_estimate_of_a_fragmented_list() -> None:
    rmaps, slot = make("B")
    rmaps.rmap_add_batch(slot, np.full(42, BASE), PG_LEVEL_4K, 8 * np.arange(1, 43))
    rmaps.vm_stat.max_mmu_rmap_size = 0
    rmaps.rmap_remove(slot, BASE, PG_LEVEL_4K, 8)
    assert rmaps.rmap_add(slot, BASE, PG_LEVEL_4K, 8 * 100).counts.tolist() == [13]
    assert rmaps.vm_stat.max_mmu_rmap_size == 13


@pytest.mark.parametrize("design", PTE_LIST_DESIGNS)
def test_levels_use_their_own_arrays_and_zap_rmapp(design: str) -> None:
    rmaps, slot = make(design)
    assert rmaps.rmap_add(slot, 0x200, PG_LEVEL_2M, 8).counts.tolist() == [0]
    assert rmaps.rmap_add(slot, 0x3FF, PG_LEVEL_2M, 16).counts.tolist() == [1]  # the same 2M frame
    assert rmaps.rmap_add(slot, 0x200, PG_LEVEL_1G, 24).counts.tolist() == [0]
    assert slot.rmap is not None
    assert [np.count_nonzero(heads) for heads in slot.rmap] == [0, 1, 1]
    assert rmaps.rmap_count(slot, 0x210, PG_LEVEL_2M) == 2
    assert sorted(rmaps.zap_rmapp(slot, 0x210, PG_LEVEL_2M).tolist()) == [8, 16]
    assert rmaps.zap_rmapp(slot, 0x210, PG_LEVEL_2M).tolist() == []
    rmaps.rmap_remove(slot, 0x200, PG_LEVEL_1G, 24)
    with pytest.raises(RmapCorruption):
        rmaps.rmap_remove(slot, 0x200, PG_LEVEL_1G, 24)
    assert not any(heads.any() for heads in slot.rmap)


@pytest.mark.parametrize("design", PTE_LIST_DESIGNS)
def test_zap_gfn_range_covers_every_level_frame_the_range_touches(design: str) -> None:
    rmaps, slot = make(design)
    gfns = BASE + np.arange(0, 0x800, 0x10)
    rmaps.rmap_add_batch(slot, gfns, PG_LEVEL_4K, 8 * np.arange(1, len(gfns) + 1))
    rmaps.rmap_add_batch(slot, gfns[::32], PG_LEVEL_2M, 8 * np.arange(1000, 1000 + len(gfns[::32])))
    rmaps.rmap_add(slot, BASE, PG_LEVEL_1G, 8 * 3000)
    rmaps.rmap_add(slot, BASE, PG_LEVEL_4K, 8 * 3001)
    # [BASE + 0x10, BASE + 0x20): one 4K head (gfn BASE + 0x10), its 2M frame (gfn BASE) and its 1G frame,
    # one spte each, 4K first
    assert rmaps.zap_gfn_range(slot, BASE + 0x10, BASE + 0x20).tolist() == [8 * 2, 8 * 1000, 8 * 3000]
    assert rmaps.rmap_count(slot, BASE, PG_LEVEL_4K) == 2
    assert rmaps.zap_gfn_range(slot, 0, BASE).tolist() == []  # below the slot
    assert len(rmaps.zap_gfn_range(slot, 0, 1 << 40)) == len(gfns) + (len(gfns[::32]) - 1)
    assert slot.rmap is not None and not any(heads.any() for heads in slot.rmap)
    assert rmaps.pte_list.live_descs == 0


def test_batches_reject_gfns_outside_the_slot() -> None:
    rmaps, slot = make("C")
    with pytest.raises(IndexError):
        rmaps.rmap_add_batch(slot, np.array([BASE, BASE - 1]), PG_LEVEL_4K, np.array([8, 16]))
    assert slot.rmap is not None and not slot.rmap[0].any()
