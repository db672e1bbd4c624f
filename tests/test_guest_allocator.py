"""The page allocator and the boot-time physical layout."""

from __future__ import annotations

import numpy as np
import pytest

from kvmdbgfs.guest.allocator import PAGE_ANON, PAGE_FREE, PAGE_TABLE, PageAllocator
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
    assert pages.alloc(3, PAGE_ANON).tolist() == [c, a, 53]
    assert pages.kind[b] == PAGE_TABLE and pages.kind[c] == PAGE_ANON


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
