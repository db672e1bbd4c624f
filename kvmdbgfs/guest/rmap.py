"""The guest's reverse map: which user PTEs map a range of frames (mm/rmap.c's rmap_walk).

Linux finds the mappings of a page through its anon_vma or its file's i_mmap
tree and page_vma_mapped_walk; the model has no such links, so one walk over
every address space's user page tables finds all of them at once, which is
what rmap_walk on every page of the range would find.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kvmdbgfs.guest.allocator import HPAGE_PMD_NR
from kvmdbgfs.guest.huge import is_huge
from kvmdbgfs.guest.mm import Mm
from kvmdbgfs.guest.pgtable import present_indices, ptes_gfn, walk
from kvmdbgfs.guest.pte import pte_gfn
from kvmdbgfs.guest.vaddr import TASK_SIZE

if TYPE_CHECKING:
    from kvmdbgfs.guest.kernel import GuestKernel


@dataclass(frozen=True)
class PteMappings:
    """The PTEs of one PT page of ``mm`` that map frames in the range: their indices and frames."""

    mm: Mm
    pt: int
    indices: np.ndarray
    gfns: np.ndarray


def address_spaces(kernel: GuestKernel) -> list[Mm]:
    """Every user address space, in pid order of its first task."""
    return list({id(task.mm): task.mm for task in kernel.tasks.values() if task.mm is not None}.values())


def rmap_walk_range(kernel: GuestKernel, start: int, end: int) -> list[PteMappings]:
    """rmap_walk of every frame in [start, end): the present user PTEs mapping one, PT page by PT page.
    A THP (PMD mapping) in the range is refused: migration here moves small pages only."""
    ctx = kernel.ctx
    found = []
    for mm in address_spaces(kernel):
        for level, va, table, index in walk(ctx, mm.pgd, 0, TASK_SIZE):
            if level != 2:
                continue
            entry = int(ctx.memory.table(table)[index])
            if is_huge(entry):
                if start < pte_gfn(entry) + HPAGE_PMD_NR and pte_gfn(entry) < end:
                    raise ValueError(f"a THP at {va:#x} maps frames of {start:#x}-{end:#x}")
                continue
            ptes = ctx.memory.table(pte_gfn(entry))
            indices = present_indices(ptes, 0, len(ptes))
            gfns = ptes_gfn(ptes[indices])
            inside = (gfns >= start) & (gfns < end)
            if inside.any():
                found.append(PteMappings(mm, pte_gfn(entry), indices[inside], gfns[inside]))
    return found
