"""The page allocator and the boot-time physical layout."""

from __future__ import annotations

import numpy as np
import pytest

from kvmdbgfs.guest.allocator import (
    MAX_ORDER_NR_PAGES,
    MIGRATE_MOVABLE,
    MIGRATE_UNMOVABLE,
    PAGE_ANON,
    PAGE_CACHE,
    PAGE_FREE,
    PAGE_HOLE,
    PAGE_KERNEL,
    PAGE_TABLE,
    PageAllocator,
)
from kvmdbgfs.guest.physmem import e820_ram, setup_memory

GiB = 1 << 30


def allocator() -> PageAllocator:
    # Frames 0..99 are RAM; 90..99 reserved; "ZONE_NORMAL" 50..90 is used before 0..50.
    return PageAllocator(100, [(0, 100)], [(50, 90), (0, 50)])


def test_fresh_memory_comes_in_zone_order_lowest_first() -> None:
    pages = allocator()
    assert pages.alloc(3, PAGE_ANON).tolist() == [50, 51, 52]
    assert pages.alloc(40, PAGE_ANON)[-4:].tolist() == [89, 0, 1, 2]
    assert pages.nr_free == 90 - 43
    assert pages.count_by_kind()["reserved"] == 10


def test_freed_pages_come_back_last_in_first_out() -> None:
    pages = allocator()
    a, b, c = pages.alloc(3, PAGE_TABLE).tolist()
    pages.free(np.array([a, c]))
    assert pages.alloc(3, PAGE_KERNEL).tolist() == [c, a, 53]
    assert pages.kind[b] == PAGE_TABLE and pages.kind[c] == PAGE_KERNEL


def test_user_and_kernel_pages_never_share_a_max_order_block() -> None:
    """Movable and unmovable allocations each take whole fresh MAX_ORDER blocks, lowest first, and a
    freed page goes back to the list of its block's type."""
    block = MAX_ORDER_NR_PAGES
    pages = PageAllocator(3 * block, [(0, 3 * block)], [(block, 3 * block), (0, block)])
    anon = pages.alloc(2, PAGE_ANON).tolist()
    table = pages.alloc(1, PAGE_TABLE).tolist()
    cache = pages.alloc(1, PAGE_CACHE).tolist()
    assert anon == [block, block + 1] and table == [2 * block] and cache == [block + 2]
    assert pages.pageblock_mt[[2, 4]].tolist() == [MIGRATE_MOVABLE, MIGRATE_UNMOVABLE]  # pageblocks of 512
    pages.free(np.array([table[0], anon[0]]))
    assert pages.alloc(1, PAGE_ANON).tolist() == [anon[0]]
    assert pages.alloc(1, PAGE_TABLE).tolist() == table
    assert pages.alloc(block, PAGE_TABLE)[-1] == 0  # the unmovable block ran out: the next fresh one
    assert pages.nr_free == 3 * block - 4 - block


def test_a_type_out_of_fresh_memory_falls_back_to_the_other_types_free_pages() -> None:
    block = MAX_ORDER_NR_PAGES
    pages = PageAllocator(block, [(0, block)], [(0, block)])
    everything = pages.alloc(block, PAGE_ANON)
    pages.free(everything[:2])
    assert pages.alloc(2, PAGE_TABLE).tolist() == [1, 0]
    with pytest.raises(MemoryError):
        pages.alloc(1, PAGE_TABLE)


def test_put_frees_at_the_last_reference_in_order() -> None:
    pages = allocator()
    x, y, z = pages.alloc(3, PAGE_ANON).tolist()
    pages.get(np.array([x, x, y]))
    assert pages.put(np.array([z, y, x, x])).tolist() == [z]
    assert pages.put(np.array([x, y])).tolist() == [x, y]
    assert pages.kind[[x, y, z]].tolist() == [PAGE_FREE] * 3
    assert pages.alloc(1, PAGE_ANON).tolist() == [y]
    with pytest.raises(ValueError):
        pages.put(np.array([x]))
    with pytest.raises(ValueError):
        pages.free(np.array([z]))


def test_out_of_memory() -> None:
    with pytest.raises(MemoryError):
        allocator().alloc(91, PAGE_ANON)


def test_q35_e820_and_boot_reservations_6g() -> None:
    assert e820_ram(6 * GiB) == [(0, 0x9F), (0x100, 0x80000 - 36), (0x100000, 0x200000)]
    boot = setup_memory(6 * GiB, kernel_image_pages=9216)
    assert len(boot.memmap_sections) == 48  # 2 GiB low + 4 GiB high in 128 MiB sections
    assert boot.kernel_image == (0x1000, 0x1000 + 9216)
    runs = boot.memblock.free_runs()
    assert runs[0][0] == 0x100000  # ZONE_NORMAL first, from its lowest frame
    assert runs[-1][1] <= 0x1000  # ZONE_DMA last
    ram = sum(e - s for s, e in boot.ram)
    free = sum(e - s for s, e in runs)
    assert 0.015 < 1 - free / ram < 0.03  # the image, the memmap (1.56%), the first MiB
    top = max(boot.memmap_sections.values())
    assert top + 512 == 0x200000  # memblock allocates the memmap from the top of RAM


def test_movable_zone_serves_movable_allocations_first_and_takes_its_pages_back() -> None:
    pages = allocator()
    pages.online_movable(200, 210)  # hot-added frames beyond the boot memory map
    assert pages.managed_pages == 100 and pages.nr_free == 100
    assert pages.alloc(3, PAGE_ANON).tolist() == [200, 201, 202]
    assert pages.alloc(1, PAGE_TABLE).tolist() == [50]  # kernel allocations never use ZONE_MOVABLE
    assert pages.alloc(9, PAGE_CACHE).tolist() == [203, 204, 205, 206, 207, 208, 209, 51, 52]
    pages.free(np.array([51, 201]))  # each page back to its own zone
    assert pages.alloc(1, PAGE_ANON).tolist() == [201]
    assert pages.alloc(1, PAGE_TABLE).tolist() == [51]
    assert pages.movable is not None
    pages.movable.isolated = True  # being offlined: no longer handed out
    assert pages.alloc(1, PAGE_ANON).tolist() == [53]
    with pytest.raises(ValueError, match=r"page 0xc8 is still in use"):
        pages.offline_movable()
    pages.move_references(np.arange(200, 210), pages.alloc(10, PAGE_ANON))
    pages.offline_movable()
    assert pages.movable is None and pages.managed_pages == 90
    assert (pages.kind[200:210] == PAGE_HOLE).all() and pages.count_by_kind()["free"] == 90 - 14


def test_kernel_allocations_run_out_of_memory_with_the_movable_zone_still_free() -> None:
    pages = allocator()
    pages.online_movable(200, 210)
    pages.alloc(90, PAGE_TABLE)
    with pytest.raises(MemoryError, match="10 free for them"):
        pages.alloc(11, PAGE_ANON)
    with pytest.raises(MemoryError, match="0 free for them"):
        pages.alloc(1, PAGE_TABLE)
    assert pages.alloc(10, PAGE_ANON).tolist() == list(range(200, 210))


def test_onlining_refuses_ram_and_a_second_movable_zone() -> None:
    pages = allocator()
    with pytest.raises(ValueError, match="already RAM"):
        pages.online_movable(90, 110)
    pages.online_movable(100, 110)
    with pytest.raises(ValueError, match="already online"):
        pages.online_movable(120, 130)
