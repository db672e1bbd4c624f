"""Memslot sizing and gfn -> rmap head (reference §2)."""

import numpy as np
import pytest

from kvmdbgfs.arch.x86.mmu.memslot import (
    KVM_HPAGE_GFN_SHIFT,
    KVM_NR_PAGE_SIZES,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    KvmMemorySlot,
    gfn_to_index,
    kvm_mmu_slot_lpages,
)


def test_levels_and_shifts() -> None:
    assert (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G, KVM_NR_PAGE_SIZES) == (1, 2, 3, 3)
    assert [KVM_HPAGE_GFN_SHIFT(level) for level in (1, 2, 3)] == [0, 9, 18]


def test_reference_example_1mib_to_2gib() -> None:
    # Reference §2 prints 523 008 4K heads for this slot, but also says the 4K count is exactly
    # npages, and 0x7FF00 == 524 032 (523 008 is 0x7FB00): the printed figure is a slip.
    slot = KvmMemorySlot(id=0, as_id=0, base_gfn=0x100, npages=0x7FF00)
    assert [kvm_mmu_slot_lpages(slot, level) for level in (1, 2, 3)] == [524032, 1024, 2]


@pytest.mark.parametrize(
    ("base_gfn", "npages", "expected"),
    [
        (0, 1, [1, 1, 1]),
        (511, 2, [2, 2, 1]),  # straddles a 2M boundary
        (0x3FFFF, 2, [2, 2, 2]),  # straddles a 1G boundary
        (0x100000, 0x340000, [0x340000, 0x1A00, 13]),  # 13 GiB at 4 GiB
    ],
)
def test_slot_lpages_count_partial_frames(base_gfn: int, npages: int, expected: list[int]) -> None:
    slot = KvmMemorySlot(id=1, as_id=0, base_gfn=base_gfn, npages=npages)
    assert [kvm_mmu_slot_lpages(slot, level) for level in (1, 2, 3)] == expected


def test_gfn_to_index_is_relative_to_the_aligned_frame() -> None:
    assert gfn_to_index(0x100, 0x100, PG_LEVEL_4K) == 0
    assert gfn_to_index(0x1FF, 0x100, PG_LEVEL_2M) == 0
    assert gfn_to_index(0x200, 0x100, PG_LEVEL_2M) == 1
    assert gfn_to_index(0x40000, 0x100, PG_LEVEL_1G) == 1
    gfns = np.array([0x100, 0x1FF, 0x200, 0x40000])
    assert gfn_to_index(gfns, 0x100, PG_LEVEL_2M).tolist() == [0, 0, 1, 0x200]


def test_rmaps_are_allocated_on_demand_zeroed_and_freed() -> None:
    slot = KvmMemorySlot(id=3, as_id=1, base_gfn=0x100, npages=0x7FF00)
    assert (slot.id, slot.as_id, slot.base_gfn, slot.npages, slot.rmap) == (3, 1, 0x100, 0x7FF00, None)
    slot.alloc_rmaps()
    assert slot.rmap is not None
    assert [(len(heads), heads.dtype, int(heads.any())) for heads in slot.rmap] == [
        (524032, np.int64, 0),
        (1024, np.int64, 0),
        (2, np.int64, 0),
    ]
    slot.rmap[0][5] = 8
    slot.alloc_rmaps()  # already there: kept
    assert slot.rmap[0][5] == 8
    slot.free_rmaps()
    assert slot.rmap is None


def test_gfn_to_rmap_and_contains() -> None:
    slot = KvmMemorySlot(id=0, as_id=0, base_gfn=0x100, npages=0x7FF00)
    with pytest.raises(ValueError, match="no rmaps"):
        slot.gfn_to_rmap(0x100, PG_LEVEL_4K)
    slot.alloc_rmaps()
    assert slot.rmap is not None
    heads, index = slot.gfn_to_rmap(0x300, PG_LEVEL_2M)
    assert heads is slot.rmap[1] and index == 1
    heads, indices = slot.gfn_to_rmap(np.array([0x100, 0x7FFFF]), PG_LEVEL_4K)
    assert heads is slot.rmap[0] and indices.tolist() == [0, 0x7FEFF]
    assert slot.contains(0x100) and slot.contains(0x7FFFF)
    assert not slot.contains(0xFF) and not slot.contains(0x80000)
    for outside in (0xFF, np.array([0x100, 0x80000])):
        with pytest.raises(IndexError):
            slot.gfn_to_rmap(outside, PG_LEVEL_4K)
