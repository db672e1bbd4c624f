"""fork's address-space copy: dup_mmap and copy_page_range (mm/memory.c), one PT page at a time."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kvmdbgfs.guest.huge import copy_huge_pmd, is_huge
from kvmdbgfs.guest.kctx import KernelContext
from kvmdbgfs.guest.mm import Mm
from kvmdbgfs.guest.pgtable import (
    PAGE_TABLE,
    entry_range,
    overlap_span,
    present_entries,
    ptes_gfn,
    table_alloc,
    walk_ranges,
)
from kvmdbgfs.guest.pte import PT_ACCESSED_MASK, PT_DIRTY_MASK, PT_WRITABLE_MASK, level_span, pte_gfn
from kvmdbgfs.guest.vaddr import MASK64, u64
from kvmdbgfs.guest.vma import Vma

_WRITABLE = u64(PT_WRITABLE_MASK)
_WRPROTECT = u64(MASK64 ^ PT_WRITABLE_MASK)
_CHILD_PRIVATE = u64(MASK64 ^ (PT_WRITABLE_MASK | PT_ACCESSED_MASK))  # write-protected and old
_CHILD_SHARED = u64(MASK64 ^ (PT_ACCESSED_MASK | PT_DIRTY_MASK))  # old and clean


def vma_needs_copy(vma: Vma) -> bool:
    """vma_needs_copy: only mappings with anonymous pages are copied; the rest refault in the child."""
    return vma.anon_vma


def copy_pte_range(ctx: KernelContext, vma: Vma, src_pt: int, dst_pt: int, va: int) -> None:
    """copy_present_pte for each present PTE: in a COW mapping a writable PTE is write-protected in the
    parent and the child; the child's copy is old (and clean if shared); the page gains a reference."""
    src = ctx.memory.table(src_pt)
    present = present_entries(src, *entry_range(va, 1, vma.start, vma.end))
    if not present:  # nothing to store nor to reference
        return
    indices = np.array(present, np.int64)
    ptes = src[indices]
    if vma.shared:
        wrprotect, child = np.zeros(len(ptes), bool), ptes & _CHILD_SHARED
    else:  # the child's copy of a writable PTE is write-protected as the parent's is
        wrprotect, child = (ptes & _WRITABLE).astype(bool), ptes & _CHILD_PRIVATE
    ctx.paired_stores(src_pt, wrprotect, ptes & _WRPROTECT, dst_pt, indices, child)
    gfns = ptes_gfn(ptes)
    ctx.pages.get(gfns[gfns != ctx.zero_pfn])


def copy_page_ranges(
    ctx: KernelContext, parent: Mm, child: Mm, vmas: list[Vma], before: Callable[[int], None]
) -> None:
    """copy_page_range (copy_p4d_range .. copy_pte_range) of each of ``vmas`` (in address order): for each
    present parent entry the child gets the table below it (pud_alloc, pmd_alloc, pte_alloc), then the PTEs
    are copied. ``before(k)`` is called before anything is done for ``vmas[k]``.

    One walk of the parent's tables serves them all: it meets each entry once, where the walk of the first
    VMA it overlaps would, and copies there each VMA's part of a PT page, VMA after VMA, as walking the
    VMAs one after the other would (those walks find the tables the earlier ones allocated)."""
    ranges = [(vma.start, vma.end) for vma in vmas]
    ends = [end for _, end in ranges]
    dst_tables = {4: child.pgd}  # the child's table at each level on the walk's path
    for level, va, table, index in walk_ranges(ctx, parent.pgd, ranges):
        first, last = overlap_span(ranges, ends, va, va + level_span(level))
        before(first)
        entry = ctx.memory.table(table).item(index)
        if level == 2 and is_huge(entry):  # a THP lies inside one VMA
            copy_huge_pmd(ctx, child, va, table, index)
            continue
        dst = dst_tables[level - 1] = table_alloc(ctx, dst_tables[level], level, index, PAGE_TABLE)
        if level == 2:
            for k in range(first, last):
                before(k)
                copy_pte_range(ctx, vmas[k], pte_gfn(entry), dst, va)


def dup_mmap(ctx: KernelContext, parent: Mm, child: Mm) -> None:
    """dup_mmap: the child gets a copy of every VMA, page tables only where needed; then flush_tlb_mm(parent),
    also when the guest runs out of memory on the way (the parent's PTEs copied so far are write-protected,
    and the child has the VMAs up to the one being copied)."""
    child.copy_layout(parent)
    copied = [at for at, vma in enumerate(parent.vmas) if vma_needs_copy(vma)]
    added = 0  # the parent's VMAs the child has a copy of

    def dup_through(stop: int) -> None:
        """vm_area_dup of the parent's VMAs up to position ``stop`` (excluded)."""
        nonlocal added
        if stop <= added:  # the usual call: the walk is still in the VMA it last copied
            return
        for vma in parent.vmas[added:stop]:
            dup = vma.dup()
            if dup.file is not None:
                dup.file.mappings += 1
            child.append(dup)
        added = stop

    try:
        if copied:
            vmas = [parent.vmas[at] for at in copied]
            copy_page_ranges(ctx, parent, child, vmas, lambda k: dup_through(copied[k] + 1))
        dup_through(len(parent.vmas))
    finally:
        ctx.tlb.flush_tlb_mm(parent, ctx.cpu)
