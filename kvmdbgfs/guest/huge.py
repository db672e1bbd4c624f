"""Transparent huge pages for private anonymous memory (mm/huge_memory.c).

A fault in a THP-enabled anonymous VMA whose 2 MiB-aligned range lies wholly
inside it, where the PMD is empty, maps an order-9 page with one PMD entry
(do_huge_pmd_anonymous_page; reads too: use_zero_page is not modelled) and
deposits a PT page for a later split. fork shares the THP write-protected
(copy_huge_pmd); a write to it then reuses it if no one else maps it, else
splits the PMD into 512 PTEs (__split_huge_pmd) and copies the 4K page.
Unmapping a whole THP clears the PMD (zap_huge_pmd), a part of one splits it.
The 512 frames of a THP each count the mappings of that frame.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from kvmdbgfs.guest.allocator import HPAGE_PMD_NR, PAGE_ANON
from kvmdbgfs.guest.kctx import KernelContext
from kvmdbgfs.guest.mm import Mm
from kvmdbgfs.guest.pgtable import PAGE_TABLE, PTE_CHG_MASK, alloc_table_at, make_ptes, table_at
from kvmdbgfs.guest.pte import (
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_WRITABLE_MASK,
    make_pte,
    pt_index,
    pte_gfn,
)
from kvmdbgfs.guest.vaddr import PMD_SIZE, direct_map
from kvmdbgfs.guest.vma import PROT_WRITE, Vma

THP_MODES: Final = ("always", "madvise", "never")  # /sys/kernel/mm/transparent_hugepage/enabled


def thp_enabled(ctx: KernelContext, vma: Vma) -> bool:
    """hugepage_vma_check for anonymous memory: "always", or "madvise" and MADV_HUGEPAGE on the VMA."""
    if vma.file is not None or vma.shared:
        return False
    return ctx.thp == "always" or (ctx.thp == "madvise" and vma.hugepage)


def pmd_entry(ctx: KernelContext, pgd: int, va: int) -> tuple[int, int, int]:
    """The PD page holding ``va``'s PMD (-1 if none), the index in it and the entry (0 if none)."""
    pd = table_at(ctx, pgd, va, 2)
    index = pt_index(va, 2)
    return pd, index, ctx.memory.table(pd).item(index) if pd >= 0 else 0


def is_huge(entry: int) -> bool:
    return bool(entry & PT_PRESENT_MASK and entry & PT_PAGE_SIZE_MASK)


def huge_fault(ctx: KernelContext, mm: Mm, vma: Vma, base: int, write: bool, pmd: tuple[int, int, int]) -> bool:
    """create_huge_pmd / wp_huge_pmd for the PMD at ``base`` (``pmd``: its pmd_entry()); False when the fault
    goes on with 4K pages."""
    pd, index, entry = pmd
    if is_huge(entry):  # a write to a write-protected THP (do_huge_pmd_wp_page)
        page = pte_gfn(entry)
        if ctx.pages.exclusive_anon(np.arange(page, page + HPAGE_PMD_NR)).all():
            ctx.store(pd, index, entry | PT_WRITABLE_MASK | PT_DIRTY_MASK)
            return True
        split_huge_pmd(ctx, mm, vma, base)
        return False
    if entry or not thp_enabled(ctx, vma) or base < vma.start or base + PMD_SIZE > vma.end:
        return False
    return do_huge_pmd_anonymous_page(ctx, mm, vma, base)


def do_huge_pmd_anonymous_page(ctx: KernelContext, mm: Mm, vma: Vma, base: int) -> bool:
    """The THP, a PT page deposited for it, the THP cleared, then the PMD. No PT page to deposit is
    VM_FAULT_OOM, after the THP is released."""
    pd = alloc_table_at(ctx, mm.pgd, base, 2, PAGE_TABLE)
    page = ctx.pages.alloc_huge(PAGE_ANON)
    if page < 0:  # no free 2 MiB block: fall back to small pages
        return False
    try:
        mm.deposited[base] = ctx.alloc_table()  # pte_alloc_one + pgtable_trans_huge_deposit
    except MemoryError:
        ctx.pages.put_huge(page)
        raise
    ctx.kernel_access(direct_map(np.arange(page, page + HPAGE_PMD_NR)), write=True)  # clear_huge_page
    ctx.store(
        pd, pt_index(base, 2), make_pte(page, vma.page_prot() | PT_WRITABLE_MASK | PT_DIRTY_MASK | PT_PAGE_SIZE_MASK)
    )
    vma.anon_vma = True
    return True


def split_huge_pmd(ctx: KernelContext, mm: Mm, vma: Vma, base: int) -> None:
    """__split_huge_pmd_locked: invalidate the PMD and flush it, fill the deposited PT page with 512 PTEs
    keeping the PMD's write, dirty and young bits, then point the PMD at that PT page (pmd_populate)."""
    pd, index, entry = pmd_entry(ctx, mm.pgd, base)
    ctx.store(pd, index, entry & ~PT_PRESENT_MASK)  # pmdp_invalidate
    ctx.tlb.flush_tlb_mm_range(mm, ctx.cpu, base, base + PMD_SIZE, False, stride=PMD_SIZE)
    pt = mm.deposited.pop(base)
    page = pte_gfn(entry)
    flags = vma.page_prot() & ~PT_ACCESSED_MASK | entry & (PT_WRITABLE_MASK | PT_DIRTY_MASK | PT_ACCESSED_MASK)
    ctx.stores(pt, np.arange(HPAGE_PMD_NR), make_ptes(np.arange(page, page + HPAGE_PMD_NR), flags))
    ctx.store(pd, index, make_pte(pt, PAGE_TABLE))


def copy_huge_pmd(ctx: KernelContext, child: Mm, va: int, src_pd: int, index: int) -> None:
    """copy_huge_pmd: a PT page deposited for the child, the THP write-protected in the parent, the child's
    PMD write-protected and old."""
    entry = int(ctx.memory.table(src_pd)[index])
    dst_pd = alloc_table_at(ctx, child.pgd, va, 2, PAGE_TABLE)
    child.deposited[va] = ctx.alloc_table()
    page = pte_gfn(entry)
    ctx.pages.get(np.arange(page, page + HPAGE_PMD_NR))
    ctx.store(src_pd, index, entry & ~PT_WRITABLE_MASK)  # pmdp_set_wrprotect
    ctx.store(dst_pd, index, entry & ~(PT_WRITABLE_MASK | PT_ACCESSED_MASK))


def change_huge_pmd(ctx: KernelContext, mm: Mm, vma: Vma, va: int, pd: int, index: int) -> None:
    """change_huge_pmd (mprotect of a whole THP): invalidate and flush the PMD, then the new protection."""
    entry = int(ctx.memory.table(pd)[index])
    page = pte_gfn(entry)
    new = entry & PTE_CHG_MASK | vma.page_prot() | PT_PAGE_SIZE_MASK
    if vma.prot & PROT_WRITE and ctx.pages.exclusive_anon(np.arange(page, page + HPAGE_PMD_NR)).all():
        new |= PT_WRITABLE_MASK
    ctx.store(pd, index, entry & ~PT_PRESENT_MASK)  # pmdp_invalidate_ad
    ctx.tlb.flush_tlb_mm_range(mm, ctx.cpu, va, va + PMD_SIZE, False, stride=PMD_SIZE)
    ctx.store(pd, index, new)
