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
- 4K mappings created later in vmalloc and module space (map_pages).
Early tables come from memblock; later ones from the page allocator.
"""

from __future__ import annotations

import numpy as np

from kvmdbgfs.guest.kctx import KernelContext
from kvmdbgfs.guest.pgtable import KERNPG_TABLE, alloc_table_at, make_ptes, table_at
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
)

KERNEL_PGD_BOUNDARY = 256
PAGE_KERNEL = PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_ACCESSED_MASK | PT_DIRTY_MASK | PT_GLOBAL_MASK | PT64_NX_MASK
PAGE_KERNEL_LARGE = PAGE_KERNEL | PT_PAGE_SIZE_MASK
PAGE_KERNEL_ROX_LARGE = PT_PRESENT_MASK | PT_ACCESSED_MASK | PT_DIRTY_MASK | PT_GLOBAL_MASK | PT_PAGE_SIZE_MASK
PAGE_KERNEL_RO_LARGE = PAGE_KERNEL_ROX_LARGE | PT64_NX_MASK
PAGES_2M = 512
PAGES_1G = 512 * 512
# Statically allocated tables in the image's .data (head_64.S), as page offsets from its end.
STATIC_TABLES = ("init_top_pgt", "level3_kernel_pgt", "level2_kernel_pgt", "level2_fixmap_pgt")


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


class KernelPageTables:
    """init_mm's page tables; the entries 256..511 of its pgd are what pgd_alloc copies into every process."""

    def __init__(
        self, ctx: KernelContext, boot: BootMemory, text_pages: int, rodata_pages: int, gbpages: bool = True
    ) -> None:
        self.ctx = ctx
        self.boot = boot
        image_start, image_end = boot.kernel_image
        static = {name: image_end - len(STATIC_TABLES) + i for i, name in enumerate(STATIC_TABLES)}
        self.pgd = static["init_top_pgt"]
        self.static_tables = static
        self._link(self.pgd, START_KERNEL_MAP, 4, static["level3_kernel_pgt"])
        self._link(static["level3_kernel_pgt"], START_KERNEL_MAP, 3, static["level2_kernel_pgt"])
        self._link(static["level3_kernel_pgt"], 0xFFFFFFFFC0000000, 3, static["level2_fixmap_pgt"])
        self._map_direct(gbpages)
        self._map_image(image_start, image_end, text_pages, rodata_pages)
        self._map_vmemmap()

    def _link(self, table: int, va: int, level: int, child: int) -> None:
        self.ctx.store(table, pt_index(va, level), make_pte(child, KERNPG_TABLE))

    def _memblock_table(self) -> int:
        """alloc_low_pages: an early page-table page from memblock."""
        return self.boot.memblock.alloc(1)

    def _early_table(self, va: int, level: int) -> int:
        return alloc_table_at(self.ctx, self.pgd, va, level, KERNPG_TABLE, self._memblock_table)

    def _map_large(self, va: int, pfns: np.ndarray, level: int, flags: int) -> None:
        """Leaf entries at ``level`` (1, 2 or 3) mapping consecutive virtual pages of that size to ``pfns``."""
        span = level_span(level)
        leaf = flags if level > 1 else flags & ~PT_PAGE_SIZE_MASK
        per_table = 512 * span
        done = 0
        while done < len(pfns):
            cur = va + done * span
            n = min(len(pfns) - done, (per_table - cur % per_table) // span)
            table = self._early_table(cur, level)
            first = pt_index(cur, level)
            self.ctx.stores(table, np.arange(first, first + n), make_ptes(pfns[done : done + n], leaf))
            done += n

    def _map_direct(self, gbpages: bool) -> None:
        """init_mem_mapping: the ISA range, then every RAM range above 1 MiB."""
        ranges = [(0, ISA_END_PFN)] + [(max(s, ISA_END_PFN), e) for s, e in self.boot.ram if e > ISA_END_PFN]
        for start, end in ranges:
            for s, e, level in split_mem_range(start, end, gbpages):
                step = 512 ** (level - 1)
                self._map_large(PAGE_OFFSET + s * PAGE_SIZE, np.arange(s, e, step), level, PAGE_KERNEL_LARGE)

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
            va = VMEMMAP_START + section * SECTION_PAGES * STRUCT_PAGE_SIZE
            self._map_large(va, np.array([base]), 2, PAGE_KERNEL_LARGE)

    def preallocate_vmalloc(self) -> None:
        """preallocate_vmalloc_pages: a PUD page for every PML4 entry of the vmalloc area (page allocator)."""
        for va in range(VMALLOC_START, VMALLOC_START + VMALLOC_SIZE, level_span(4)):
            alloc_table_at(self.ctx, self.pgd, va, 3, KERNPG_TABLE)

    def kernel_entries(self) -> np.ndarray:
        """clone_pgd_range source: entries KERNEL_PGD_BOUNDARY..511 of the kernel pgd."""
        return self.ctx.memory.table(self.pgd)[KERNEL_PGD_BOUNDARY:].copy()

    def map_pages(self, va: int, gfns: np.ndarray) -> None:
        """vmap_pages_range: 4K PAGE_KERNEL mappings at ``va``, PT pages allocated on demand, one store batch per PT."""
        done = 0
        while done < len(gfns):
            cur = va + done * PAGE_SIZE
            n = min(len(gfns) - done, 512 - pt_index(cur, 1))
            table = alloc_table_at(self.ctx, self.pgd, cur, 1, KERNPG_TABLE)
            first = pt_index(cur, 1)
            self.ctx.stores(table, np.arange(first, first + n), make_ptes(gfns[done : done + n], PAGE_KERNEL))
            done += n

    def unmap_pages(self, va: int, npages: int) -> None:
        """vunmap_range_noflush: clear the 4K entries (the PT pages stay, as on x86)."""
        done = 0
        while done < npages:
            cur = va + done * PAGE_SIZE
            n = min(npages - done, 512 - pt_index(cur, 1))
            first = pt_index(cur, 1)
            self.ctx.stores(table_at(self.ctx, self.pgd, cur, 1), np.arange(first, first + n), np.zeros(n, np.uint64))
            done += n
