"""mmu_rmaps_stat: bucket functions, the histogram over all slots and levels, the exact text (reference §3.1)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kvmdbgfs.arch.x86.mmu.memslot import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, KvmMemorySlot
from kvmdbgfs.arch.x86.mmu.pte_list import PTE_LIST_DESIGNS
from kvmdbgfs.arch.x86.mmu.rmap import KvmRmaps
from kvmdbgfs.arch.x86.mmu.rmaps_stat import (
    RMAP_LOG_SIZE,
    format_mmu_rmaps_stat,
    mmu_rmaps_stat_show,
    rmap_bucket_ffs,
    rmap_bucket_fls,
    rmaps_histogram,
)

HEADER = "Rmap_Count:\t0\t1\t2-3\t4-7\t8-15\t16-31\t32-63\t64-127\t128-255\t256-511\t512-1023\t\n"


def test_buckets_for_every_count_up_to_2048() -> None:
    counts = np.arange(2049)
    expected_fls = [min(int(c).bit_length(), RMAP_LOG_SIZE - 1) for c in counts]
    expected_ffs = [min((int(c) & -int(c)).bit_length(), RMAP_LOG_SIZE - 1) for c in counts]
    assert rmap_bucket_fls(counts).tolist() == expected_fls
    assert rmap_bucket_ffs(counts).tolist() == expected_ffs


@pytest.mark.parametrize(
    ("count", "ffs", "fls"),
    [
        (0, 0, 0),
        (1, 1, 1),
        (2, 2, 2),
        (3, 1, 2),
        (5, 1, 3),
        (7, 1, 3),
        (4, 3, 3),
        (6, 2, 3),
        (8, 4, 4),
        (12, 3, 4),
        (1000, 4, 10),
        (1001, 1, 10),
        (1023, 1, 10),
        (1024, 10, 10),
        (2048, 10, 10),
    ],
)
def test_the_reference_bucket_table(count: int, ffs: int, fls: int) -> None:
    assert (rmap_bucket_ffs(np.array([count]))[0], rmap_bucket_fls(np.array([count]))[0]) == (ffs, fls)


def test_golden_text() -> None:
    hist = np.array(
        [[3086676, 53045, 12330, 1272, 502, 121, 76, 2, 0, 0, 0], [5947, 231] + [0] * 9, [32] + [0] * 10]
    )
    assert format_mmu_rmaps_stat(hist) == (
        HEADER
        + "Level=4K:\t3086676\t53045\t12330\t1272\t502\t121\t76\t2\t0\t0\t0\t\n"
        + "Level=2M:\t5947\t231\t0\t0\t0\t0\t0\t0\t0\t0\t0\t\n"
        + "Level=1G:\t32\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t\n"
    )


def two_address_spaces() -> list[KvmMemorySlot]:
    """A 1 GiB guest below 4 GiB plus an SMM address space mirroring it with its own slots."""
    slots = [
        KvmMemorySlot(id=i, as_id=as_id, base_gfn=base, npages=npages)
        for as_id in (0, 1)
        for i, (base, npages) in enumerate([(0, 0xA0), (0x100, 0x3FF00)])
    ]
    for slot in slots:
        slot.alloc_rmaps()
    return slots


def populate(design: str, slots: list[KvmMemorySlot]) -> KvmRmaps:
    rmaps = KvmRmaps(design, SimpleNamespace(max_mmu_rmap_size=0))
    rng = np.random.default_rng(7)
    big = slots[1]
    gfns = np.concatenate(
        [rng.integers(0x100, 0x40000, 3000), np.repeat([0x100, 0x2345], [40, 520]), [0x200] * 6]
    )
    rmaps.rmap_add_batch(big, gfns, PG_LEVEL_4K, 8 * np.arange(1, len(gfns) + 1))
    rmaps.rmap_add_batch(big, np.array([0x200, 0x400, 0x400]), PG_LEVEL_2M, 8 * np.arange(10_000, 10_003))
    rmaps.rmap_add(big, 0x100, PG_LEVEL_1G, 8 * 20_000)
    rmaps.rmap_add(slots[3], 0x30000, PG_LEVEL_4K, 8 * 20_001)  # SMM address space
    return rmaps


def brute_force_histogram(slots: list[KvmMemorySlot], rmaps: KvmRmaps, bucket) -> np.ndarray:
    hist = np.zeros((3, RMAP_LOG_SIZE), np.int64)
    for slot in slots:
        for level in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G):
            heads = slot.rmap[level - 1]
            counts = [rmaps.pte_list.count(heads, i) for i in np.flatnonzero(heads).tolist()]
            np.add.at(hist[level - 1], bucket(np.array(counts, np.int64)), 1)
            hist[level - 1, 0] += len(heads) - len(counts)
    return hist


@pytest.mark.parametrize("design", PTE_LIST_DESIGNS)
@pytest.mark.parametrize("bucket", ["fls", "ffs"])
def test_histogram_over_all_slots_levels_and_address_spaces(design: str, bucket: str) -> None:
    slots = two_address_spaces()
    rmaps = populate(design, slots)
    hist = rmaps_histogram(slots, rmaps.pte_list, bucket)
    function = rmap_bucket_fls if bucket == "fls" else rmap_bucket_ffs
    np.testing.assert_array_equal(hist, brute_force_histogram(slots, rmaps, function))
    assert hist.sum(axis=1).tolist() == [2 * (0xA0 + 0x3FF00), 2 * (1 + 512), 2 * (1 + 1)]
    text = mmu_rmaps_stat_show(slots, rmaps.pte_list, bucket)
    assert text.startswith(HEADER) and text.count("\t\n") == 4 and text == format_mmu_rmaps_stat(hist)


def test_the_histogram_does_not_depend_on_the_design() -> None:
    hists = set()
    for design in PTE_LIST_DESIGNS:
        slots = two_address_spaces()
        hists.add(rmaps_histogram(slots, populate(design, slots).pte_list).tobytes())
    assert len(hists) == 1


def test_no_rmaps_means_an_empty_file() -> None:
    slots = [KvmMemorySlot(id=0, as_id=0, base_gfn=0, npages=0x1000)]
    rmaps = KvmRmaps("C", SimpleNamespace(max_mmu_rmap_size=0))
    assert mmu_rmaps_stat_show(slots, rmaps.pte_list, "ffs") == ""
    assert mmu_rmaps_stat_show([], rmaps.pte_list) == ""
    slots[0].alloc_rmaps()
    assert mmu_rmaps_stat_show(slots, rmaps.pte_list) == (
        HEADER
        + "Level=4K:\t4096\t"
        + "0\t" * 10
        + "\nLevel=2M:\t8\t"
        + "0\t" * 10
        + "\nLevel=1G:\t1\t"
        + "0\t" * 10
        + "\n"
    )
