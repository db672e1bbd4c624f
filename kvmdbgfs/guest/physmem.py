"""Guest-physical memory at boot: the E820 RAM ranges of a q35 guest, memblock and what it reserves.

Linux keeps the first 1 MiB for itself (reserve_real_mode / "reserve the first
1M"), loads the kernel image at 16 MiB (CONFIG_PHYSICAL_START), and early
allocations (memmap, early page tables) come from memblock, top-down from
the end of RAM. What is left is given to the buddy allocator zone by zone.
"""

from __future__ import annotations

from typing import Final

from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from kvmdbgfs.vmm.layout import HIGH_MEMORY_START, PAGE_SHIFT, MiB, q35_memslots

ISA_END_PFN: Final = (1 * MiB) >> PAGE_SHIFT
DMA_END_PFN: Final = (16 * MiB) >> PAGE_SHIFT  # MAX_DMA_PFN: ZONE_DMA below 16 MiB
DMA32_END_PFN: Final = HIGH_MEMORY_START >> PAGE_SHIFT
KERNEL_LOAD_PFN: Final = (16 * MiB) >> PAGE_SHIFT  # CONFIG_PHYSICAL_START
FIRMWARE_TOP_PAGES: Final = 36  # SeaBIOS keeps the top 144 KiB of low RAM (ACPI tables) as E820 reserved
EBDA_PAGES: Final = 1  # 0x9fc00-0x9ffff, the extended BIOS data area
SECTION_PAGES: Final = (128 * MiB) >> PAGE_SHIFT  # SPARSEMEM section
STRUCT_PAGES_PER_PAGE: Final = 64  # 4096 / sizeof(struct page)


def e820_ram(memory: int) -> list[tuple[int, int]]:
    """The usable RAM ranges (pfn start, end) SeaBIOS reports for a q35 guest with ``memory`` bytes."""
    runs = []
    for region in q35_memslots(memory):
        if region.as_id != 0 or not region.ram:
            continue
        start, end = region.base_gfn, region.base_gfn + region.npages
        if start == 0:
            end -= EBDA_PAGES
        elif start == ISA_END_PFN:
            end -= FIRMWARE_TOP_PAGES
        runs.append((start, end))
    return runs


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class Memblock:
    """memblock: early boot allocations, top-down from the end of RAM; all of them stay reserved."""

    def __init__(self, ram: list[tuple[int, int]]) -> None:
        self.ram = ram
        self.reserved: list[tuple[int, int]] = []
        self._limit = ram[-1][1]

    def reserve(self, start: int, end: int) -> None:
        self.reserved.append((start, end))

    def alloc(self, npages: int, align: int = 1) -> int:
        """memblock_alloc: the first frame of ``npages`` reserved frames, the highest free block that fits."""
        for start, end in reversed(self.ram):
            top = min(end, self._limit)
            base = (top - npages) // align * align
            if base >= start:
                self._limit = base
                self.reserve(base, base + npages)
                return base
        raise MemoryError("memblock: no room for an early allocation")

    def free_runs(self) -> list[tuple[int, int]]:
        """What memblock_free_all hands to the buddy allocator, ZONE_NORMAL then DMA32 then DMA, each ascending."""
        free: list[tuple[int, int]] = []
        for start, end in self.ram:
            cuts = sorted((s, e) for s, e in self.reserved if s < end and e > start)
            cursor = start
            for s, e in cuts:
                if s > cursor:
                    free.append((cursor, s))
                cursor = max(cursor, e)
            if cursor < end:
                free.append((cursor, end))
        zones = ((DMA32_END_PFN, 1 << 62), (DMA_END_PFN, DMA32_END_PFN), (0, DMA_END_PFN))
        return [(max(s, lo), min(e, hi)) for lo, hi in zones for s, e in free if max(s, lo) < min(e, hi)]


@dataclass(frozen=True)
class BootMemory:
    """Where boot put things: RAM ranges, the kernel image and the memmap (struct page array)."""

    max_pfn: int
    ram: list[tuple[int, int]]
    kernel_image: tuple[int, int]
    memmap_sections: dict[int, int]  # section number -> first frame of its 2 MiB of struct pages
    memblock: Memblock


def setup_memory(memory: int, kernel_image_pages: int) -> BootMemory:
    """setup_arch + sparse_init: reserve the low 1 MiB, the kernel image, and allocate the memmap."""
    ram = e820_ram(memory)
    memblock = Memblock(ram)
    memblock.reserve(0, ISA_END_PFN)
    image = (KERNEL_LOAD_PFN, KERNEL_LOAD_PFN + kernel_image_pages)
    memblock.reserve(*image)
    sections = sorted(
        {pfn // SECTION_PAGES for start, end in ram for pfn in range(start, end, SECTION_PAGES)}
        | {(end - 1) // SECTION_PAGES for _, end in ram}
    )
    map_pages = SECTION_PAGES // STRUCT_PAGES_PER_PAGE  # 512 pages = 2 MiB per section
    # sparse_buffer_init: one block for the whole node, mapped section by section.
    base = memblock.alloc(map_pages * len(sections), align=map_pages)
    memmap = {section: base + i * map_pages for i, section in enumerate(sections)}
    return BootMemory(ram[-1][1], ram, image, memmap, memblock)
