"""The kernel half of the address space: init_top_pgt and everything hanging below PML4 entries 256..511.

Built as x86-64 Linux builds it at boot:
- the direct map of all RAM at PAGE_OFFSET (init_memory_mapping: the ISA
  range with 4K pages, each E820 RAM range split by split_mem_range into 4K
  head, 2M, 1G (gbpages), 2M and 4K tail pieces);
- the kernel image at __START_KERNEL_map + phys with 2M pages
  (level2_kernel_pgt, after cleanup_highmap);
- the memmap at VMEMMAP_START with 2M pages (vmemmap_populate);
- the vmalloc PUD pages preallocated (preallocate_vmalloc_pages), so that
  the PML4 entries every process copies never change after boot;
- 4K mappings created later in vmalloc and module space (map_pages);
- hot-added memory: the direct map and the memmap of the new range
  (arch_add_memory), removed again by arch_remove_memory.
Early tables come from memblock; later ones from the page allocator.
"""

from __future__ import annotations

from typing import Final

from collections.abc import Iterator

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.guest import allocator
from kvmdbgfs.guest.kctx import KernelContext
from kvmdbgfs.guest.pgtable import KERNEL_PGD_BOUNDARY, KERNPG_TABLE, alloc_table_at, make_ptes, table_at
from kvmdbgfs.guest.physmem import ISA_END_PFN, SECTION_PAGES, BootMemory
from kvmdbgfs.guest.pte import (
    PT64_NX_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_GLOBAL_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_WRITABLE_MASK,
    level_span,
    make_pte,
    pt_index,
)
from kvmdbgfs.guest.vaddr import (
    PAGE_OFFSET,
    PAGE_SIZE,
    START_KERNEL_MAP,
    STRUCT_PAGE_SIZE,
    VMALLOC_SIZE,
    VMALLOC_START,
    VMEMMAP_START,
    direct_map,
)

PAGE_KERNEL: Final = PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_ACCESSED_MASK | PT_DIRTY_MASK | PT_GLOBAL_MASK | PT64_NX_MASK
PAGE_KERNEL_LARGE: Final = PAGE_KERNEL | PT_PAGE_SIZE_MASK
PAGE_KERNEL_ROX_LARGE: Final = PT_PRESENT_MASK | PT_ACCESSED_MASK | PT_DIRTY_MASK | PT_GLOBAL_MASK | PT_PAGE_SIZE_MASK
PAGE_KERNEL_RO_LARGE: Final = PAGE_KERNEL_ROX_LARGE | PT64_NX_MASK
PAGES_2M: Final = 512
PAGES_1G: Final = 512 * 512
# Statically allocated tables in the image's .data (head_64.S), as page offsets from its end.
STATIC_TABLES: Final = ("init_top_pgt", "level3_kernel_pgt", "level2_kernel_pgt", "level2_fixmap_pgt")


def split_mem_range(start: int, end: int, gbpages: bool) -> list[tuple[int, int, int]]:
    """split_mem_range: (start pfn, end pfn, level) pieces mapping [start, end) with the largest pages that fit."""
    pieces = []
    big = PAGES_1G if gbpages else PAGES_2M

    def take(upto: int, level: int) -> None:
        nonlocal start
        if upto > start:
            pieces.append((start, upto, level))
            start = upto

    take(min(end, -(-start // PAGES_2M) * PAGES_2M), 1)
    take(min(end // PAGES_2M * PAGES_2M, -(-start // big) * big), 2)
    if gbpages:
        take(end // PAGES_1G * PAGES_1G, 3)
    take(end // PAGES_2M * PAGES_2M, 2)
    take(end, 1)
    return pieces


def table_chunks(va: int, n: int, level: int) -> Iterator[tuple[int, int, int, int]]:
    """``n`` consecutive entries at ``level`` from ``va``, cut where a page-table page ends:
    (entries done before, address, first index, count) per table."""
    span = level_span(level)
    done = 0
    while done < n:
        cur = va + done * span
        count = min(n - done, (512 * span - cur % (512 * span)) // span)
        yield done, cur, pt_index(cur, level), count
        done += count


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class KernelPageTables:
    """init_mm's page tables; the entries 256..511 of its pgd are what pgd_alloc copies into every process."""

    def __init__(
        self, ctx: KernelContext, boot: BootMemory, text_pages: int, rodata_pages: int, gbpages: bool = True
    ) -> None:
        self.ctx = ctx
        self.boot = boot
        self.gbpages = gbpages
        self.after_bootmem = False  # set once memblock has handed memory to the page allocator
        self.hotplug_memmap: dict[int, int] = {}  # hot-added section -> first frame of its 2 MiB memmap block
        image_start, image_end = boot.kernel_image
        static = {name: image_end - len(STATIC_TABLES) + i for i, name in enumerate(STATIC_TABLES)}
        self.pgd = static["init_top_pgt"]
        self.static_tables = static
        self._link(self.pgd, START_KERNEL_MAP, 4, static["level3_kernel_pgt"])
        self._link(static["level3_kernel_pgt"], START_KERNEL_MAP, 3, static["level2_kernel_pgt"])
        self._link(static["level3_kernel_pgt"], 0xFFFFFFFFC0000000, 3, static["level2_fixmap_pgt"])
        self._map_direct()
        self._map_image(image_start, image_end, text_pages, rodata_pages)
        self._map_vmemmap()

    def _link(self, table: int, va: int, level: int, child: int) -> None:
        self.ctx.store(table, pt_index(va, level), make_pte(child, KERNPG_TABLE))

    def _memblock_table(self) -> int:
        """alloc_low_pages: an early page-table page from memblock."""
        return self.boot.memblock.alloc(1)

    def _kernel_table(self, va: int, level: int) -> int:
        """The table at ``level`` for ``va``, missing ones from alloc_low_pages: memblock during boot, the
        page allocator after it (after_bootmem)."""
        alloc = None if self.after_bootmem else self._memblock_table
        return alloc_table_at(self.ctx, self.pgd, va, level, KERNPG_TABLE, alloc)

    def _map_large(self, va: int, pfns: np.ndarray, level: int, flags: int) -> None:
        """Leaf entries at ``level`` (1, 2 or 3) mapping consecutive virtual pages of that size to ``pfns``."""
        leaf = flags if level > 1 else flags & ~PT_PAGE_SIZE_MASK
        for done, cur, first, n in table_chunks(va, len(pfns), level):
            table = self._kernel_table(cur, level)
            self.ctx.stores(table, np.arange(first, first + n), make_ptes(pfns[done : done + n], leaf))

    def _map_direct(self) -> None:
        """init_mem_mapping: the ISA range, then every RAM range above 1 MiB."""
        ranges = [(0, ISA_END_PFN)] + [(max(s, ISA_END_PFN), e) for s, e in self.boot.ram if e > ISA_END_PFN]
        for start, end in ranges:
            self.init_memory_mapping(start, end)

    def init_memory_mapping(self, start: int, end: int) -> None:
        """init_memory_mapping / kernel_physical_mapping_init: the direct map of [start, end), with the
        largest pages split_mem_range allows."""
        for s, e, level in split_mem_range(start, end, self.gbpages):
            self._map_large(PAGE_OFFSET + s * PAGE_SIZE, np.arange(s, e, 512 ** (level - 1)), level, PAGE_KERNEL_LARGE)

    def _map_image(self, start: int, end: int, text_pages: int, rodata_pages: int) -> None:
        """level2_kernel_pgt: 2M pages over the image, text ROX, rodata RO, the rest RW NX."""
        first, last = start // PAGES_2M * PAGES_2M, -(-end // PAGES_2M) * PAGES_2M
        pfns = np.arange(first, last, PAGES_2M)
        text_end, rodata_end = start + text_pages, start + text_pages + rodata_pages
        flags = np.where(
            pfns < text_end, PAGE_KERNEL_ROX_LARGE, np.where(pfns < rodata_end, PAGE_KERNEL_RO_LARGE, PAGE_KERNEL_LARGE)
        ).astype(np.uint64)
        table = self.static_tables["level2_kernel_pgt"]
        indices = pt_index(START_KERNEL_MAP, 2) + pfns // PAGES_2M
        self.ctx.stores(table, indices, make_ptes(pfns, 0) | flags)
        self.image_va = START_KERNEL_MAP + start * PAGE_SIZE

    def _map_vmemmap(self) -> None:
        """vmemmap_populate: each present section's struct pages, 2 MiB mapped by one PMD."""
        for section, base in sorted(self.boot.memmap_sections.items()):
            self._map_large(memmap_va(section), np.array([base]), 2, PAGE_KERNEL_LARGE)

    def preallocate_vmalloc(self) -> None:
        """preallocate_vmalloc_pages: a PUD page for every PML4 entry of the vmalloc area (page allocator)."""
        for va in range(VMALLOC_START, VMALLOC_START + VMALLOC_SIZE, level_span(4)):
            alloc_table_at(self.ctx, self.pgd, va, 3, KERNPG_TABLE)

    def kernel_entries(self) -> np.ndarray:
        """clone_pgd_range source: entries KERNEL_PGD_BOUNDARY..511 of the kernel pgd."""
        return self.ctx.memory.table(self.pgd)[KERNEL_PGD_BOUNDARY:].copy()

    def map_pages(self, va: int, gfns: np.ndarray) -> None:
        """vmap_pages_range: 4K PAGE_KERNEL mappings at ``va``, PT pages allocated on demand, one store batch per PT."""
        for done, cur, first, n in table_chunks(va, len(gfns), 1):
            table = alloc_table_at(self.ctx, self.pgd, cur, 1, KERNPG_TABLE)
            self.ctx.stores(table, np.arange(first, first + n), make_ptes(gfns[done : done + n], PAGE_KERNEL))

    def unmap_pages(self, va: int, npages: int) -> None:
        """vunmap_range_noflush: clear the 4K entries (the PT pages stay, as on x86)."""
        self._clear(va, npages, 1, free_empty=False)

    def _clear(self, va: int, n: int, level: int, free_empty: bool) -> None:
        """Clear ``n`` leaf entries at ``level`` from ``va``, one store batch per table. With ``free_empty``
        (remove_pagetable) a PT or PMD page left empty is freed and its parent entry cleared
        (free_pte_table, free_pmd_table); PUD pages stay."""
        for _, cur, first, count in table_chunks(va, n, level):
            table = table_at(self.ctx, self.pgd, cur, level)
            self.ctx.stores(table, np.arange(first, first + count), np.zeros(count, np.uint64))
            for lvl in range(level, 3 if free_empty else level):
                if self.ctx.memory.table(table).any():
                    break
                parent = table_at(self.ctx, self.pgd, cur, lvl + 1)
                self.ctx.store(parent, pt_index(cur, lvl + 1), 0)
                self.ctx.free_tables([table])
                table = parent

    # -- memory hotplug ---------------------------------------------------------------
    def arch_add_memory(self, start: int, end: int) -> None:
        """arch_add_memory for [start, end): init_memory_mapping (tables from the page allocator), then
        vmemmap_populate of each new section: a zeroed 2 MiB block from the page allocator
        (vmemmap_alloc_block), mapped by one PMD. When no block is left, what was added is removed again
        before the MemoryError goes on (Linux's __add_pages leaves the sections it added, with a warning;
        the model leaves nothing, so that the range can be plugged again)."""
        self.init_memory_mapping(start, end)
        try:
            for section in range(start // SECTION_PAGES, -(-end // SECTION_PAGES)):
                block = self.ctx.pages.alloc_huge(allocator.PAGE_KERNEL)  # the page kind, not this module's flags
                if block < 0:
                    raise MemoryError("vmemmap_populate: no free 2 MiB block for the memmap")
                zeroed = np.arange(block, block + allocator.HPAGE_PMD_NR)  # __GFP_ZERO
                self.ctx.kernel_access(direct_map(zeroed), write=True)
                self._map_large(memmap_va(section), np.array([block]), 2, PAGE_KERNEL_LARGE)
                self.hotplug_memmap[section] = block
        except MemoryError:
            self.arch_remove_memory(start, end)
            raise

    def arch_remove_memory(self, start: int, end: int) -> None:
        """arch_remove_memory for [start, end): vmemmap_free of its sections that have a memmap (all of them
        but after a failed arch_add_memory; each block freed, its PMD cleared), then
        kernel_physical_mapping_remove of the direct map; each remove_pagetable ends with flush_tlb_all."""
        for section in range(start // SECTION_PAGES, -(-end // SECTION_PAGES)):
            if section not in self.hotplug_memmap:
                continue
            self.ctx.pages.put_huge(self.hotplug_memmap.pop(section))
            self._clear(memmap_va(section), 1, 2, free_empty=True)
        self.ctx.tlb.flush_tlb_all()
        for s, e, level in split_mem_range(start, end, self.gbpages):
            self._clear(PAGE_OFFSET + s * PAGE_SIZE, (e - s) // 512 ** (level - 1), level, free_empty=True)
        self.ctx.tlb.flush_tlb_all()


def memmap_va(section: int) -> int:
    """The address of a section's struct pages in the vmemmap (2 MiB per 128 MiB section)."""
    return VMEMMAP_START + section * SECTION_PAGES * STRUCT_PAGE_SIZE
