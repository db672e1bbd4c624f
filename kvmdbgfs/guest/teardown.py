"""Tearing mappings down: the mmu_gather, zap_pte_range (unmap_vmas) and free_pgtables.

exit_mmap and munmap both zap the PTEs of the VMAs (each present PTE is
cleared, its page gathered), then free the page tables the range no longer
needs (each freed table's entry in its parent cleared), then finish the
gather: flush the TLB, free the gathered pages, the page-table pages and the
gather's own batch pages.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from kvmdbgfs.guest.allocator import PAGE_KERNEL
from kvmdbgfs.guest.huge import is_huge
from kvmdbgfs.guest.kctx import KernelContext
from kvmdbgfs.guest.mm import Mm
from kvmdbgfs.guest.pgtable import (
    entry_range,
    overlapping,
    pgd_stores,
    present_entries,
    walk_ranges,
)
from kvmdbgfs.guest.pte import PT_PAGE_SIZE_MASK, PT_PRESENT_MASK, level_span, pte_gfn
from kvmdbgfs.guest.tlb import TLB_FLUSH_ALL
from kvmdbgfs.guest.vaddr import MASK64, PAGE_SIZE, PMD_SIZE
from kvmdbgfs.guest.vma import Vma

MMU_GATHER_BUNDLE: Final = 8  # pages in the mmu_gather's own local batch
MAX_GATHER_BATCH: Final = 510  # pages per batch page
MAX_GATHER_BATCH_COUNT: Final = 10000 // MAX_GATHER_BATCH
GATHER_CAPACITY: Final = MMU_GATHER_BUNDLE + MAX_GATHER_BATCH_COUNT * MAX_GATHER_BATCH
FIRST_USER_ADDRESS: Final = 0
USER_PGTABLES_CEILING: Final = 0  # 0: no ceiling


class MmuGather:
    """struct mmu_gather: pages and tables waiting for the TLB flush (tlb_gather_mmu .. tlb_finish_mmu)."""

    def __init__(self, ctx: KernelContext, mm: Mm, fullmm: bool) -> None:
        self.ctx = ctx
        self.mm = mm
        self.fullmm = fullmm
        self.pages: list[np.ndarray | int] = []  # small pages, or a THP's first frame
        self.nr = 0
        self.batch_pages: list[int] = []  # tlb_next_batch's pages, kept until tlb_finish_mmu
        self.tables: list[int] = []
        self.start, self.end = 1 << 64, 0
        self.freed_tables = False
        self.cleared_ptes = False  # else only PMDs were cleared: flush with a 2 MiB stride

    def room(self) -> int:
        return GATHER_CAPACITY - self.nr

    def adjust_range(self, start: int, end: int, ptes: bool = True) -> None:
        self.start, self.end = min(self.start, start), max(self.end, end)
        self.cleared_ptes |= ptes

    def remove_pages(self, gfns: np.ndarray | int) -> None:
        """__tlb_remove_page for each small page (or tlb_remove_page_size for a THP, one entry): a new
        batch page each time the current batch fills up. When none can be had (tlb_next_batch's GFP_NOWAIT
        allocation fails: the guest is out of memory) the gather is flushed at once (force_flush), so
        tearing a process down never needs memory it cannot get."""
        self.pages.append(gfns)
        self.nr += 1 if isinstance(gfns, int) else len(gfns)
        needed = max(0, -(-(self.nr - MMU_GATHER_BUNDLE + 1) // MAX_GATHER_BATCH))
        needed = min(needed, MAX_GATHER_BATCH_COUNT)
        try:
            while len(self.batch_pages) < needed:
                self.batch_pages.append(int(self.ctx.alloc(1, PAGE_KERNEL, zero=False)[0]))
        except MemoryError:
            self.flush_mmu()

    def remove_table(self, gfn: int, va: int) -> None:
        """pte_free_tlb / pmd_free_tlb / pud_free_tlb."""
        self.tables.append(gfn)
        self.freed_tables = True
        self.adjust_range(va, va + PAGE_SIZE)

    def flush_mmu(self) -> None:
        """tlb_flush_mmu: flush the TLB for what was cleared, then free the gathered pages."""
        if self.end > self.start:
            end = TLB_FLUSH_ALL if self.fullmm else self.end
            stride = PAGE_SIZE if self.cleared_ptes or self.freed_tables else PMD_SIZE
            self.ctx.tlb.flush_tlb_mm_range(
                self.mm, self.ctx.cpu, self.start, end, self.freed_tables or self.fullmm, stride
            )
        self.start, self.end, self.cleared_ptes = 1 << 64, 0, False
        small: list[np.ndarray] = []  # consecutive small-page batches: one put() of them all drops them in order
        for pages in self.pages:
            if isinstance(pages, int):
                self._put(small)
                small = []
                self.ctx.pages.put_huge(pages)
            else:
                small.append(pages)
        self._put(small)
        self.pages, self.nr = [], 0

    def _put(self, batches: list[np.ndarray]) -> None:
        if batches:
            self.ctx.pages.put(batches[0] if len(batches) == 1 else np.concatenate(batches))

    def finish(self) -> None:
        """tlb_finish_mmu: the last flush, then the batch pages and (after RCU) the page-table pages."""
        self.flush_mmu()
        self.ctx.pages.free(np.array(self.batch_pages, np.int64))
        self.ctx.free_tables(self.tables)


def zap_vmas(ctx: KernelContext, tlb: MmuGather, mm: Mm, vmas: list[Vma], start: int, end: int) -> None:
    """unmap_vmas: unmap_page_range of each VMA's part of [start, end), the VMAs in address order.

    One walk of the tables serves them all: it meets each PT page once, and zaps there the part of each
    VMA it holds, VMA after VMA, as walking the VMAs one after the other would."""
    ranges = [(max(start, vma.start), min(end, vma.end)) for vma in vmas]
    ranges = [(lo, hi) for lo, hi in ranges if lo < hi]
    ends = [hi for _, hi in ranges]
    for level, va, table, index in walk_ranges(ctx, mm.pgd, ranges):
        if level == 2:
            zap_pmd(ctx, tlb, mm, va, table, index, overlapping(ranges, ends, va, va + PMD_SIZE))


def zap_pmd(
    ctx: KernelContext, tlb: MmuGather, mm: Mm, va: int, pd: int, index: int, parts: list[tuple[int, int]]
) -> None:
    """zap_pmd_range / zap_pte_range for one PMD (at ``va``, entry ``index`` of ``pd``), for each VMA's part
    [start, end) of it in turn (``parts``, in address order): clear every present PTE, gathering its page,
    or the THP it maps (a THP lies inside one VMA: the first part zaps it, the others then find no PMD).

    When the gather is full the PT page is finished up to that PTE, the TLB flushed
    and the pages freed (force_flush), then the rest of the PT page is zapped."""
    entry = ctx.memory.table(pd).item(index)
    if not entry & PT_PRESENT_MASK:  # a THP an earlier call zapped (when the caller zaps VMA by VMA)
        return
    if is_huge(entry):
        zap_huge_pmd(ctx, tlb, mm, va, pd, index)
        return
    pt = pte_gfn(entry)
    ptes = ctx.memory.table(pt)
    for start, end in parts:
        present = present_entries(ptes, *entry_range(va, 1, start, end))
        if present:
            _zap_ptes(ctx, tlb, va, pt, ptes, present)


def _zap_ptes(ctx: KernelContext, tlb: MmuGather, va: int, pt: int, ptes: np.ndarray, indices: list[int]) -> None:
    """zap_pte_range's loop over the present PTEs ``indices`` of PT page ``pt`` (at ``va``). A PT page mostly
    holds a few of them, so the loop runs on Python ints: one store batch and one gather call per cut."""
    gfns = [pte_gfn(pte) for pte in ptes[indices].tolist()]
    while indices:
        cut, pages = _gather_cut(gfns, ctx.zero_pfn, tlb.room())
        ctx.stores(pt, np.array(indices[:cut], np.int64), np.zeros(cut, np.uint64))
        tlb.adjust_range(va + indices[0] * PAGE_SIZE, va + (indices[cut - 1] + 1) * PAGE_SIZE)
        tlb.remove_pages(np.array(pages, np.int64))
        if tlb.room() == 0:
            tlb.flush_mmu()
        indices, gfns = indices[cut:], gfns[cut:]


def _gather_cut(gfns: list[int], zero_pfn: int, room: int) -> tuple[int, list[int]]:
    """How many of the PTEs left (mapping ``gfns``) are zapped before the gather is full, and the pages they
    gather (vm_normal_page: the zero page is not gathered): all of them unless their pages fill the ``room``
    left, else up to the PTE whose page fills it."""
    pages = []
    for n, gfn in enumerate(gfns):
        if gfn != zero_pfn:
            pages.append(gfn)
            if len(pages) == room:
                return n + 1, pages
    return len(gfns), pages


def zap_huge_pmd(ctx: KernelContext, tlb: MmuGather, mm: Mm, va: int, pd: int, index: int) -> None:
    """zap_huge_pmd: clear the PMD, free the deposited PT page at once (zap_deposited_table), gather the THP.
    (VMA splits have already split any THP that [start, end) covers in part.)"""
    entry = int(ctx.memory.table(pd)[index])
    ctx.store(pd, index, 0)
    tlb.adjust_range(va, va + PMD_SIZE, ptes=False)
    ctx.free_tables([mm.deposited.pop(va)])
    tlb.remove_pages(pte_gfn(entry))
    if tlb.room() == 0:
        tlb.flush_mmu()


def _may_free(start: int, end: int, span: int, floor: int, ceiling: int) -> bool:
    """The floor/ceiling test of free_pmd_range & co: may the table covering ``span`` around [start, end) go?"""
    start &= ~(span - 1)
    if start < floor:
        return False
    if ceiling:
        ceiling &= ~(span - 1)
        if not ceiling:
            return False
    return end - 1 <= (ceiling - 1) & MASK64


def _free_below(
    ctx: KernelContext, tlb: MmuGather, table: int, level: int, base: int, addr: int, end: int, floor: int, ceiling: int
) -> None:
    """free_pud_range / free_pmd_range / free_pte_range for the entries of ``table`` in [addr, end):
    free each child table that may go and clear its entry (one store batch for this table)."""
    entries = ctx.memory.table(table)
    i0, i1 = entry_range(base, level, addr, end)
    span = level_span(level)
    cleared = []
    for index in present_entries(entries, i0, i1):
        entry = entries.item(index)
        if entry & PT_PAGE_SIZE_MASK:
            continue
        lo, hi = max(addr, base + index * span), min(end, base + (index + 1) * span)
        if level > 2:
            _free_below(ctx, tlb, pte_gfn(entry), level - 1, base + index * span, lo, hi, floor, ceiling)
            if not _may_free(lo, hi, span, floor, ceiling):
                continue
        cleared.append(index)
        tlb.remove_table(pte_gfn(entry), lo if level == 2 else lo & ~(span - 1))
    if not cleared:
        return
    indices, zeros = np.array(cleared, np.int64), np.zeros(len(cleared), np.uint64)
    if level == 4:
        pgd_stores(ctx, table, indices, zeros)  # pgd_clear: a PTI user twin is cleared too
    else:
        ctx.stores(table, indices, zeros)


def free_pgd_range(ctx: KernelContext, tlb: MmuGather, mm: Mm, addr: int, end: int, floor: int, ceiling: int) -> None:
    """free_pgd_range: the tables wholly inside [floor, ceiling) that [addr, end) used."""
    addr &= ~(PMD_SIZE - 1)
    if addr < floor:
        addr += PMD_SIZE
    if ceiling:
        ceiling &= ~(PMD_SIZE - 1)
        if not ceiling:
            return
    if end - 1 > (ceiling - 1) & MASK64:
        end -= PMD_SIZE
    if addr > end - 1:
        return
    _free_below(ctx, tlb, mm.pgd, 4, 0, addr, end, floor, ceiling)


def free_pgtables(ctx: KernelContext, tlb: MmuGather, mm: Mm, vmas: list[Vma], floor: int, ceiling: int) -> None:
    """free_pgtables: VMAs closer than a PMD apart are freed in one call; ``ceiling`` limits the last."""
    i = 0
    while i < len(vmas):
        first = vmas[i]
        while i + 1 < len(vmas) and vmas[i + 1].start <= vmas[i].end + PMD_SIZE:
            i += 1
        upper = vmas[i + 1].start if i + 1 < len(vmas) else ceiling
        free_pgd_range(ctx, tlb, mm, first.start, vmas[i].end, floor, upper)
        i += 1


def unmap_region(
    ctx: KernelContext, mm: Mm, vmas: list[Vma], start: int, end: int, floor: int, ceiling: int, fullmm: bool
) -> None:
    """unmap_region / exit_mmap: zap [start, end) of ``vmas``, free their page tables, flush, free."""
    tlb = MmuGather(ctx, mm, fullmm)
    zap_vmas(ctx, tlb, mm, vmas, start, end)
    free_pgtables(ctx, tlb, mm, vmas, floor, ceiling)
    tlb.finish()
    for vma in vmas:
        release_vma_file(ctx, vma)


def release_vma_file(ctx: KernelContext, vma: Vma) -> None:
    """fput on the VMA's file: a shmem object goes with its last mapping."""
    if vma.file is not None:
        vma.file.mappings -= 1
        if vma.file.shmem and vma.file.mappings == 0:
            ctx.cache.release(vma.file)
