"""Page-table pages in guest RAM: walking them and allocating missing levels (pud_alloc, pmd_alloc, pte_alloc).

Levels are numbered as KVM numbers them: 4 = PML4 (pgd), 3 = PDPT (pud),
2 = PD (pmd), 1 = PT (pte). Vectorised entry values are uint64.
"""

from __future__ import annotations

from typing import Final

import bisect
from collections.abc import Callable, Iterator

import numpy as np

from kvmdbgfs.guest.kctx import KernelContext
from kvmdbgfs.guest.pte import (
    PAGE_SHIFT,
    PT64_NX_MASK,
    PT64_BASE_ADDR_MASK,
    PT64_ENT_PER_PAGE,
    PT64_LEVEL_BITS,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    level_span,
    make_pte,
    points_to_table,
    pt_index,
    pte_gfn,
)
from kvmdbgfs.guest.vaddr import u64

KERNEL_PGD_BOUNDARY: Final = 256  # pgd entries from here on map the kernel half
KERNPG_TABLE: Final = PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_ACCESSED_MASK | PT_DIRTY_MASK  # _KERNPG_TABLE
PAGE_TABLE: Final = KERNPG_TABLE | PT_USER_MASK  # _PAGE_TABLE: how user page tables link their children
PTE_CHG_MASK: Final = PT64_BASE_ADDR_MASK | PT_ACCESSED_MASK | PT_DIRTY_MASK  # _PAGE_CHG_MASK: what pte_modify keeps

U64: Final = np.uint64
_PAGE_SHIFT = u64(PAGE_SHIFT)
_BASE_ADDR = u64(PT64_BASE_ADDR_MASK)
_PRESENT = u64(PT_PRESENT_MASK)


def make_ptes(gfns: np.ndarray, flags: int) -> np.ndarray:
    """mk_pte() for each frame: uint64 entries."""
    return (np.asarray(gfns, np.int64).astype(U64) << _PAGE_SHIFT) | u64(flags)


def ptes_gfn(ptes: np.ndarray) -> np.ndarray:
    """pte_pfn() of each entry, as int64."""
    return ((ptes & _BASE_ADDR) >> _PAGE_SHIFT).astype(np.int64)


def present(ptes: np.ndarray) -> np.ndarray:
    """pte_present() of each entry."""
    return (ptes & _PRESENT).astype(bool)  # the present bit is bit 0


def present_indices(entries: np.ndarray, i0: int, i1: int) -> np.ndarray:
    """The indices in [i0, i1) of the present entries of a table, ascending: the ``pXd_none()`` skips of the
    page-table walks, once per table (``np.flatnonzero(present(...)) + i0`` without flatnonzero's ravel)."""
    return (entries[i0:i1] & _PRESENT).nonzero()[0] + i0


SCALAR_RANGE: Final = 8  # ranges of at most this many entries are tested one by one in Python


def present_entries(entries: np.ndarray, i0: int, i1: int) -> list[int]:
    """present_indices() as a list. A VMA's walk mostly meets one entry per upper-level table, and reading
    a few entries as Python ints costs less than one nonzero()."""
    if i1 - i0 <= SCALAR_RANGE:
        return [index for index in range(i0, i1) if entries.item(index) & PT_PRESENT_MASK]
    return present_indices(entries, i0, i1).tolist()


def entry_range(table_va: int, level: int, start: int, end: int) -> tuple[int, int]:
    """Indices [i0, i1) of the entries of the level-``level`` table mapping ``table_va`` that overlap [start, end)."""
    shift = PAGE_SHIFT + (level - 1) * PT64_LEVEL_BITS  # entries span 1 << shift bytes (level_span)
    i0 = (start - table_va) >> shift
    i1 = -((table_va - end) >> shift)  # rounded up
    return (i0 if i0 > 0 else 0), (i1 if i1 < PT64_ENT_PER_PAGE else PT64_ENT_PER_PAGE)  # not max/min: a call each


def table_at(ctx: KernelContext, pgd: int, gva: int, level: int) -> int:
    """The gfn of the level-``level`` table that maps ``gva`` (4 is the pgd itself), or -1 if there is none."""
    gfn = pgd
    for lvl in range(4, level, -1):
        entry = ctx.memory.table(gfn).item(pt_index(gva, lvl))
        if not points_to_table(entry):
            return -1
        gfn = pte_gfn(entry)
    return gfn


def alloc_table_at(
    ctx: KernelContext, pgd: int, gva: int, level: int, link_flags: int, alloc: Callable[[], int] | None = None
) -> int:
    """pud_alloc, pmd_alloc, pte_alloc down to ``level``: each missing table is allocated zeroed (by
    ``alloc``, the page allocator by default) and its entry stored into the parent (pgd_populate,
    pud_populate, pmd_populate). Returns the table's gfn."""
    gfn = pgd
    for lvl in range(4, level, -1):
        gfn = table_alloc(ctx, gfn, lvl, pt_index(gva, lvl), link_flags, alloc)
    return gfn


def table_alloc(
    ctx: KernelContext, table: int, level: int, index: int, link_flags: int, alloc: Callable[[], int] | None = None
) -> int:
    """One step of alloc_table_at(): the table entry ``index`` of the level-``level`` ``table`` points at,
    allocated and linked there if missing."""
    entry = ctx.memory.table(table).item(index)
    if entry & PT_PRESENT_MASK:
        return pte_gfn(entry)
    child = alloc() if alloc else ctx.alloc_table()
    if level == 4:
        pgd_stores(ctx, table, np.array([index]), np.array([make_pte(child, link_flags)], U64))
    else:
        ctx.store(table, index, make_pte(child, link_flags))
    return child


_KERNEL_PGD_BOUNDARY = np.array(KERNEL_PGD_BOUNDARY, np.int64)
_USER_PRESENT = u64(PT_USER_MASK | PT_PRESENT_MASK)
_NX = u64(PT64_NX_MASK)


def pgd_stores(ctx: KernelContext, pgd: int, indices: np.ndarray, values: np.ndarray) -> None:
    """native_set_p4d() (4-level paging: the pgd's own entries), several in order. Under page-table isolation
    an entry of a process pgd's user half goes into its user twin as it is, and into the kernel pgd with NX
    when it is a present user entry (__pti_set_user_pgtbl)."""
    user_pgd = ctx.pti.user_pgds.get(pgd) if ctx.pti is not None else None
    if user_pgd is None:
        ctx.stores(pgd, indices, values)
        return
    indices, values = np.asarray(indices, np.int64), np.asarray(values, U64)
    user_half = indices < _KERNEL_PGD_BOUNDARY
    nx = user_half & ((values & _USER_PRESENT) == _USER_PRESENT)
    ctx.paired_stores(user_pgd, user_half, values, pgd, indices, np.where(nx, values | _NX, values))


def walk(
    ctx: KernelContext, table: int, start: int, end: int, level: int = 4, base: int = 0
) -> Iterator[tuple[int, int, int, int]]:
    """Pre-order walk of the present non-leaf entries overlapping [start, end), levels 4 to 2.

    Yields (level, va, table gfn, index) for each entry, its subtree after it;
    a level-2 entry points at a PT page or maps a THP (PS set). See walk_ranges."""
    return walk_ranges(ctx, table, [(start, end)], level, base)


def walk_ranges(
    ctx: KernelContext, table: int, ranges: list[tuple[int, int]], level: int = 4, base: int = 0
) -> Iterator[tuple[int, int, int, int]]:
    """walk() of the entries overlapping any of ``ranges`` (sorted, disjoint [start, end) pairs): as the
    walks of each range one after the other would meet them, each entry once.

    Iterative: a stack holds one _WalkFrame per table being walked. A table's present entries are found
    when the walk enters it, and each entry is read when its turn comes, after the subtrees before it.
    """
    memory = ctx.memory
    ends = [end for _, end in ranges]
    stack = [_WalkFrame(memory.table(table), table, level, base, ranges, ends)]
    while stack:
        frame = stack[-1]
        if not frame.todo:
            stack.pop()
            continue
        index = frame.todo.pop()
        entry = frame.entries.item(index)
        level = frame.level
        if entry & PT_PAGE_SIZE_MASK and level > 2:
            continue
        va = frame.base + index * level_span(level)
        yield level, va, frame.gfn, index
        if level > 2:
            child = pte_gfn(entry)
            stack.append(_WalkFrame(memory.table(child), child, level - 1, va, ranges, ends))


def overlapping(ranges: list[tuple[int, int]], ends: list[int], start: int, end: int) -> list[tuple[int, int]]:
    """The ranges (sorted and disjoint, ``ends`` their ends) that overlap [start, end)."""
    return ranges[slice(*overlap_span(ranges, ends, start, end))]


def overlap_span(ranges: list[tuple[int, int]], ends: list[int], start: int, end: int) -> tuple[int, int]:
    """overlapping() as the positions [first, last) of those ranges."""
    first = bisect.bisect_right(ends, start)
    return first, bisect.bisect_left(ranges, (end,), first)


class _WalkFrame:
    """One table on walk()'s stack: its entries, gfn, level and va, and its present indices overlapping the
    ranges still to visit, the next one last."""

    __slots__ = ("base", "entries", "gfn", "level", "todo")

    def __init__(
        self, entries: np.ndarray, gfn: int, level: int, base: int, ranges: list[tuple[int, int]], ends: list[int]
    ) -> None:
        self.entries, self.gfn, self.level, self.base = entries, gfn, level, base
        if len(ranges) == 1:
            todo = present_entries(entries, *entry_range(base, level, *ranges[0]))
        else:
            todo = _present_overlapping(entries, level, base, ranges, ends)
        self.todo = todo[::-1]


def _present_overlapping(
    entries: np.ndarray, level: int, base: int, ranges: list[tuple[int, int]], ends: list[int]
) -> list[int]:
    """The present entries of the level-``level`` table at ``base`` that overlap any of ``ranges`` (sorted and
    disjoint, ``ends`` their ends), ascending: those between the first and the last range overlapping the
    table, less the ones that fall in a gap between ranges. A table holds few present entries, so each is
    tested (one bisect) rather than each range's entry span built and merged."""
    first, last = overlap_span(ranges, ends, base, base + level_span(level + 1))
    if first == last:
        return []
    present = present_entries(entries, *entry_range(base, level, ranges[first][0], ranges[last - 1][1]))
    if last - first == 1:
        return present
    span = level_span(level)
    kept = []
    for index in present:
        start = base + index * span
        k = bisect.bisect_right(ends, start, first, last)  # the first range ending above the entry's start
        if k < last and ranges[k][0] < start + span:
            kept.append(index)
    return kept
