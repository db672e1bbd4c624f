"""Page migration (mm/migrate.c): in-use pages moved to other frames, as memory offlining needs.

migrate_pages works in batches of NR_MAX_BATCHED_MIGRATION pages
(migrate_pages_batch): it allocates the new pages, unmaps the old ones
(try_to_migrate: every PTE mapping one becomes a migration entry, the TLB
flush deferred and done once for the batch, try_to_unmap_flush), copies each
page through the direct map (folio_copy), moves the page-cache slot and the
references (folio_migrate_mapping), writes PTEs to the new frames
(remove_migration_ptes: from non-present to present, no flush) and frees the
old pages. Only small pages are migrated; the caller's allocator context
decides where the new pages come from (offlining isolates the old range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TYPE_CHECKING

import numpy as np

from kvmdbgfs.guest.allocator import PAGE_ANON
from kvmdbgfs.guest.mm import Mm
from kvmdbgfs.guest.pgtable import U64
from kvmdbgfs.guest.pte import PAGE_SHIFT, PT64_BASE_ADDR_MASK, PT_PRESENT_MASK
from kvmdbgfs.guest.rmap import PteMappings, rmap_walk_range
from kvmdbgfs.guest.tlb import TLB_FLUSH_ALL
from kvmdbgfs.guest.vaddr import direct_map

if TYPE_CHECKING:
    from kvmdbgfs.guest.kernel import GuestKernel

NR_MAX_BATCHED_MIGRATION: Final = 512  # HPAGE_PMD_NR


@dataclass(frozen=True)
class MigrationResult:
    """What migrate_pages did: pages moved, and user PTEs rewritten to their new frames."""

    pages: int
    ptes: int


def migrate_pages(kernel: GuestKernel, gfns: np.ndarray, start: int, end: int) -> MigrationResult:
    """migrate_pages of the in-use pages ``gfns`` (ascending, all inside [start, end)) to new frames."""
    ctx = kernel.ctx
    mappings = rmap_walk_range(kernel, start, end)
    ptes = 0
    for first in range(0, len(gfns), NR_MAX_BATCHED_MIGRATION):
        src = gfns[first : first + NR_MAX_BATCHED_MIGRATION]
        dst = ctx.alloc(len(src), PAGE_ANON, zero=False)  # alloc_migration_target; kinds move below
        batch = [_select(m, src) for m in mappings]
        batch = [m for m in batch if len(m.indices)]
        old = [ctx.memory.table(m.pt)[m.indices].copy() for m in batch]
        for m, entries in zip(batch, old):  # try_to_migrate: migration entries
            ctx.stores(m.pt, m.indices, entries & ~U64(PT_PRESENT_MASK))
        for mm in _unique_mms(batch):  # try_to_unmap_flush
            ctx.tlb.flush_tlb_mm_range(mm, ctx.cpu, 0, TLB_FLUSH_ALL, False)
        ctx.kernel_access(direct_map(src), write=False)  # folio_copy
        ctx.kernel_access(direct_map(dst), write=True)
        for file, indices, cached in ctx.cache.owners(src):  # folio_migrate_mapping: the xarray slot
            file.pages[indices] = dst[np.searchsorted(src, cached)]
        for m, entries in zip(batch, old):  # remove_migration_ptes
            new = dst[np.searchsorted(src, m.gfns)].astype(U64) << U64(PAGE_SHIFT)
            ctx.stores(m.pt, m.indices, (entries & ~U64(PT64_BASE_ADDR_MASK)) | new)
            ptes += len(m.indices)
        ctx.pages.move_references(src, dst)
    return MigrationResult(len(gfns), ptes)


def _select(mappings: PteMappings, src: np.ndarray) -> PteMappings:
    """The PTEs of ``mappings`` that map a page of ``src``."""
    keep = np.isin(mappings.gfns, src)
    return PteMappings(mappings.mm, mappings.pt, mappings.indices[keep], mappings.gfns[keep])


def _unique_mms(batch: list[PteMappings]) -> list[Mm]:
    return list({id(m.mm): m.mm for m in batch}.values())
