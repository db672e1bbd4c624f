"""struct mm_struct: a process address space's VMAs, its randomised layout and its pgd.

Only bookkeeping lives here (find_vma, get_unmapped_area, VMA splits); what
mappings do to page tables is in fault.py, fork.py and teardown.py.
"""

from __future__ import annotations

from typing import Final

import bisect

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.guest.allocator import PAGE_TABLE
from kvmdbgfs.guest.kctx import KernelContext
from kvmdbgfs.guest.pgtable import KERNEL_PGD_BOUNDARY
from kvmdbgfs.guest.vaddr import (
    BRK_RND,
    ELF_ET_DYN_BASE,
    MMAP_RND_BITS,
    PAGE_SIZE,
    STACK_GUARD_GAP,
    STACK_RLIMIT,
    STACK_RND_PAGES,
    TASK_SIZE,
)
from kvmdbgfs.guest.vma import Vma

MMAP_MIN_ADDR: Final = 0x10000


def pgd_alloc(ctx: KernelContext, kernel_entries: np.ndarray) -> int:
    """pgd_alloc: a zeroed page, then pgd_ctor's clone_pgd_range of the kernel half (the same kernel tables);
    under page-table isolation two pages in one allocation (PGD_ALLOCATION_ORDER 1), the second the user twin."""
    pgds = ctx.alloc(1 if ctx.pti is None else 2, PAGE_TABLE, zero=True).tolist()
    ctx.stores(pgds[0], np.arange(KERNEL_PGD_BOUNDARY, 2 * KERNEL_PGD_BOUNDARY), kernel_entries)
    if ctx.pti is not None:
        ctx.pti.pgd_ctor(ctx, *pgds)
    return pgds[0]


def pgd_free(ctx: KernelContext, pgd: int) -> None:
    """pgd_free: the pgd page (and its user twin under page-table isolation) goes back to the allocator."""
    ctx.free_tables([pgd, *(ctx.pti.pgd_free(pgd) if ctx.pti is not None else ())])


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class Mm:
    """One address space. ``tlb_gen`` counts flushes (x86 mm->context.tlb_gen)."""

    def __init__(self, pgd: int) -> None:
        self.pgd = pgd
        self.tlb_gen = 0
        self.users = 1  # mm_users: the threads sharing it
        self.deposited: dict[int, int] = {}  # PT pages deposited for THPs, by the THP's address
        self.vmas: list[Vma] = []
        self._starts: list[int] = []
        self.mmap_base = self.stack_top = self.load_bias = self.brk_rnd = 0
        self.brk_start = self.brk = 0

    def randomize(self, rng: np.random.Generator) -> None:
        """arch_pick_mmap_layout, randomize_stack_top, the PIE load bias and arch_randomize_brk (ASLR)."""
        stack_rnd = int(rng.integers(STACK_RND_PAGES)) * PAGE_SIZE
        gap = STACK_RLIMIT + STACK_GUARD_GAP + (STACK_RND_PAGES - 1) * PAGE_SIZE
        self.mmap_base = TASK_SIZE - gap - int(rng.integers(1 << MMAP_RND_BITS)) * PAGE_SIZE
        self.stack_top = TASK_SIZE - stack_rnd
        self.load_bias = ELF_ET_DYN_BASE + int(rng.integers(1 << MMAP_RND_BITS)) * PAGE_SIZE
        self.brk_rnd = int(rng.integers(BRK_RND // PAGE_SIZE)) * PAGE_SIZE

    def copy_layout(self, parent: Mm) -> None:
        """fork: the child's address space is laid out like the parent's."""
        for name in ("mmap_base", "stack_top", "load_bias", "brk_rnd", "brk_start", "brk"):
            setattr(self, name, getattr(parent, name))

    def _reindex(self) -> None:
        self.vmas.sort(key=lambda vma: vma.start)
        self._starts = [vma.start for vma in self.vmas]

    def find_vma(self, va: int) -> Vma | None:
        """find_vma: the first VMA ending above ``va`` (it may start above it too)."""
        i = bisect.bisect_right(self._starts, va) - 1
        if i >= 0 and self.vmas[i].end > va:
            return self.vmas[i]
        return self.vmas[i + 1] if i + 1 < len(self.vmas) else None

    def vma_for_fault(self, va: int) -> Vma | None:
        """The VMA a fault at ``va`` belongs to; a fault just below the stack grows it (expand_stack)."""
        vma = self.find_vma(va)
        if vma is None or vma.start <= va:
            return vma
        if vma.grows_down and vma.end - va <= STACK_RLIMIT:
            vma.start = va & ~(PAGE_SIZE - 1)
            self._reindex()
            return vma
        return None

    def insert(self, vma: Vma) -> None:
        self.vmas.append(vma)
        self._reindex()

    def append(self, vma: Vma) -> None:
        """insert() of a VMA above all the others (dup_mmap copies them in address order): no re-sort."""
        assert not self.vmas or self.vmas[-1].end <= vma.start
        self.vmas.append(vma)
        self._starts.append(vma.start)

    def remove(self, vmas: list[Vma]) -> None:
        gone = {id(vma) for vma in vmas}
        self.vmas = [vma for vma in self.vmas if id(vma) not in gone]
        self._reindex()

    def split(self, start: int, end: int) -> list[Vma]:
        """The VMAs covering [start, end), split at ``start`` and ``end`` first (__split_vma)."""
        for at in (start, end):
            vma = self.find_vma(at)
            if vma is not None and vma.start < at < vma.end:
                self.insert(vma.split(at))
        return [vma for vma in self.vmas if vma.start < end and vma.end > start]

    def neighbours(self, start: int, end: int) -> tuple[int, int]:
        """The floor and ceiling free_pgtables may free up to: the end of the VMA below, the start of the one above."""
        below = [vma.end for vma in self.vmas if vma.end <= start]
        above = [vma.start for vma in self.vmas if vma.start >= end]
        return (max(below) if below else 0), (min(above) if above else 0)

    def get_unmapped_area(self, length: int) -> int:
        """arch_get_unmapped_area_topdown: the highest gap below mmap_base that fits (stack guard gap kept)."""
        high = self.mmap_base
        for i in range(len(self.vmas), -1, -1):
            top = self.vmas[i].start if i < len(self.vmas) else TASK_SIZE
            if i < len(self.vmas) and self.vmas[i].grows_down:
                top -= STACK_GUARD_GAP
            bottom = self.vmas[i - 1].end if i > 0 else MMAP_MIN_ADDR
            top = min(top, high)
            if top - bottom >= length:
                return top - length
        raise MemoryError("no room in the address space")
