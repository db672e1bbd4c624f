"""Page faults (mm/memory.c handle_mm_fault), handled one page-table page at a time.

``handle_pt_faults`` handles the faults of a sorted set of pages that lie in
one VMA and one PT page, in address order, exactly as that many faults one
after the other would (same allocations in the same order, same PTEs), and
emits the PTE stores of the PT page as one batch when the kernel batches.
``populate`` faults a range in (MADV_POPULATE / MAP_POPULATE: no user access),
``touch`` is the user program touching pages (fault, then the access retries).
"""

from __future__ import annotations

from typing import Final

from collections.abc import Callable

import numpy as np

from kvmdbgfs.guest.allocator import PAGE_ANON, distinct
from kvmdbgfs.guest.huge import huge_fault, is_huge, pmd_entry, thp_enabled
from kvmdbgfs.guest.kctx import KernelContext
from kvmdbgfs.guest.mm import Mm
from kvmdbgfs.guest.pgtable import PAGE_TABLE, alloc_table_at, make_ptes, present, ptes_gfn
from kvmdbgfs.guest.pte import (
    PAGE_SHIFT,
    PT64_ENT_PER_PAGE,
    PT_DIRTY_MASK,
    PT_PRESENT_MASK,
    PT_WRITABLE_MASK,
    make_pte,
    points_to_table,
    pte_gfn,
)
from kvmdbgfs.guest.vaddr import PAGE_SIZE, PMD_SHIFT, PMD_SIZE, direct_map, u64
from kvmdbgfs.guest.vma import PROT_WRITE, Vma

FAULT_AROUND_PAGES: Final = 16  # fault_around_bytes = 64 KiB
SCALAR_FAULTS: Final = 8  # up to this many pages, a private write fault's work costs less on Python ints than in numpy
WRITE_DIRTY: Final = u64(PT_WRITABLE_MASK | PT_DIRTY_MASK)
_PRESENT = u64(PT_PRESENT_MASK)
_PRESENT_WRITABLE = u64(PT_PRESENT_MASK | PT_WRITABLE_MASK)
# int64 operands as 0-d arrays (see vaddr.u64)
_ZERO = np.array(0, np.int64)
_PAGE_MASK = np.array(-PAGE_SIZE, np.int64)
_PAGE_SHIFT = np.array(PAGE_SHIFT, np.int64)
_PMD_SHIFT = np.array(PMD_SHIFT, np.int64)
_PTE_INDEX = np.array(PT64_ENT_PER_PAGE - 1, np.int64)


class GuestSegfault(Exception):
    """The access has no VMA or the VMA forbids it: the guest would deliver SIGSEGV."""


def fault_around_window(vma: Vma, base: int, index: int) -> tuple[int, int]:
    """do_fault_around: the PTE indices [from, to) around ``index``: its 16-aligned block, inside the VMA."""
    vma_off = (base + index * PAGE_SIZE - vma.start) // PAGE_SIZE
    first = max(index & ~(FAULT_AROUND_PAGES - 1), index - min(index, vma_off))
    last = min(first + FAULT_AROUND_PAGES, PT64_ENT_PER_PAGE, index + vma.npages - vma_off)
    return first, last


def needs_fault(ctx: KernelContext, pmd: int, indices: np.ndarray, write: bool) -> np.ndarray:
    """Which of the pages under the PMD entry ``pmd`` would fault: not present, or written through a
    read-only PTE (or THP PMD)."""
    if is_huge(pmd):
        return np.full(len(indices), write and not pmd & PT_WRITABLE_MASK)
    if not pmd & PT_PRESENT_MASK:
        return np.ones(len(indices), bool)
    needed = _PRESENT_WRITABLE if write else _PRESENT
    return (ctx.memory.table(pte_gfn(pmd))[indices] & needed) != needed


def handle_pt_faults(ctx: KernelContext, mm: Mm, vma: Vma, base: int, indices: np.ndarray, write: bool) -> None:
    """Faults on the pages base + indices * 4K (sorted) of one VMA and one PT page."""
    pmd = pmd_entry(ctx, mm.pgd, base)
    _handle_faults(ctx, mm, vma, base, indices[needs_fault(ctx, pmd[2], indices, write)], write, pmd)


def _handle_faults(
    ctx: KernelContext, mm: Mm, vma: Vma, base: int, indices: np.ndarray, write: bool, pmd: tuple[int, int, int]
) -> None:
    """handle_pt_faults() of pages known to fault, ``pmd`` being pmd_entry() of ``base``: a present PMD
    pointing at a PT page is used as it is, else the THP paths or the missing tables come first."""
    if len(indices) == 0:
        return
    if write and not vma.prot & PROT_WRITE:
        raise GuestSegfault(f"write to {vma.name or 'a read-only mapping'} at {base + int(indices[0]) * PAGE_SIZE:#x}")
    entry = pmd[2]
    if points_to_table(entry):
        pt = pte_gfn(entry)
    elif huge_fault(ctx, mm, vma, base, write, pmd):
        return
    else:
        pt = alloc_table_at(ctx, mm.pgd, base, 1, PAGE_TABLE)
    if write and not vma.shared:
        _private_write_faults(ctx, mm, vma, pt, base, indices)
    elif write:
        _shared_write_faults(ctx, vma, pt, base, indices)
    elif vma.file is None:
        # do_anonymous_page, read: the shared zero page, read-only, no anon_vma needed.
        ctx.stores(pt, indices, make_ptes(np.full(len(indices), ctx.zero_pfn), vma.page_prot()))
    else:
        _read_faults(ctx, vma, pt, base, indices)


def _private_write_faults(ctx: KernelContext, mm: Mm, vma: Vma, pt: int, base: int, indices: np.ndarray) -> None:
    """do_anonymous_page (write), do_cow_fault, and do_wp_page: wp_page_reuse or wp_page_copy.

    A fault is mostly one page: up to SCALAR_FAULTS pages are handled as Python ints, more with numpy."""
    if len(indices) <= SCALAR_FAULTS:
        _few_private_write_faults(ctx, mm, vma, pt, base, indices)
        return
    ptes = ctx.memory.table(pt)[indices]
    mapped = present(ptes)
    any_mapped = bool(np.count_nonzero(mapped))  # else (the common case) fresh memory: nothing to copy, reuse or flush
    if not any_mapped and vma.file is None:  # do_anonymous_page only: what the general path below reduces to
        _map_anonymous(ctx, vma, pt, indices, ctx.pages.alloc(len(indices), PAGE_ANON))
        return
    src = np.where(mapped, ptes_gfn(ptes), -1)
    reuse = mapped & ctx.pages.exclusive_anon(np.maximum(src, _ZERO)) if any_mapped else mapped
    fresh = ~reuse  # the faults that map a new page
    if vma.file is None:
        new = _no_frames(len(indices))
        new[fresh] = ctx.pages.alloc(int(np.count_nonzero(fresh)), PAGE_ANON)
    else:
        new = _cow_sources_in_order(ctx, vma, base, indices, src, ~mapped, fresh)
    copied = fresh & (src >= _ZERO) & (src != ctx.zero_pfn)
    if np.count_nonzero(copied):
        ctx.kernel_access(direct_map(src[copied]), write=False)  # copy_user_highpage reads the source
    ctx.kernel_access(direct_map(new[fresh]), write=True)  # ... or clear_user_highpage
    values = make_ptes(np.maximum(new, _ZERO), vma.page_prot()) | WRITE_DIRTY
    start = 0
    if any_mapped:
        values = np.where(reuse, ptes | WRITE_DIRTY, values)
        for cow in (mapped & fresh).nonzero()[0].tolist():  # wp_page_copy: ptep_clear_flush, then the new PTE
            cleared = values[start : cow + 1].copy()
            cleared[-1] = 0
            ctx.stores(pt, indices[start : cow + 1], cleared)
            ctx.tlb.flush_tlb_page(mm, ctx.cpu, base + int(indices[cow]) * PAGE_SIZE)
            start = cow
    ctx.stores(pt, indices[start:], values[start:])
    ctx.pages.put(src[copied & mapped])  # the old pages lose this mapping
    vma.anon_vma = True


def _few_private_write_faults(
    ctx: KernelContext, mm: Mm, vma: Vma, pt: int, base: int, indices: np.ndarray
) -> None:
    """_private_write_faults() of a few pages, on Python ints: the same calls with the same arguments."""
    table = ctx.memory.table(pt)
    at = indices.tolist()
    ptes = [table.item(index) for index in at]
    mapped = [bool(pte & PT_PRESENT_MASK) for pte in ptes]
    any_mapped = any(mapped)
    if not any_mapped and vma.file is None:  # do_anonymous_page, as in the general path
        _map_anonymous(ctx, vma, pt, indices, ctx.pages.alloc(len(indices), PAGE_ANON))
        return
    src = [pte_gfn(pte) if is_mapped else -1 for pte, is_mapped in zip(ptes, mapped)]
    pages = ctx.pages
    fresh = [not (is_mapped and pages.is_exclusive_anon(gfn)) for gfn, is_mapped in zip(src, mapped)]
    if vma.file is None:
        wanted = fresh.count(True)
        frames = iter([pages.alloc_page(PAGE_ANON)] if wanted == 1 else pages.alloc(wanted, PAGE_ANON).tolist())
        new = [next(frames) if needs_page else -1 for needs_page in fresh]
    else:
        new = _few_cow_sources_in_order(ctx, vma, base, at, src, [not m for m in mapped], fresh)
    zero_pfn = ctx.zero_pfn
    copied = [needs_page and gfn >= 0 and gfn != zero_pfn for gfn, needs_page in zip(src, fresh)]
    if any(copied):  # copy_user_highpage reads the source
        ctx.kernel_access(direct_map([gfn for gfn, copy in zip(src, copied) if copy]), write=False)
    ctx.kernel_access(direct_map([gfn for gfn, needs_page in zip(new, fresh) if needs_page]), write=True)
    prot, write_dirty = vma.page_prot(), PT_WRITABLE_MASK | PT_DIRTY_MASK
    values = [
        (make_pte(gfn, prot) if needs_page else pte) | write_dirty
        for gfn, pte, needs_page in zip((max(gfn, 0) for gfn in new), ptes, fresh)
    ]
    start = 0
    for cow in [j for j, (is_mapped, needs_page) in enumerate(zip(mapped, fresh)) if is_mapped and needs_page]:
        # wp_page_copy: ptep_clear_flush, then the new PTE
        ctx.stores(pt, indices[start : cow + 1], np.array([*values[start:cow], 0], np.uint64))
        ctx.tlb.flush_tlb_page(mm, ctx.cpu, base + at[cow] * PAGE_SIZE)
        start = cow
    ctx.stores(pt, indices[start:], np.array(values[start:], np.uint64))
    for gfn, copy, is_mapped in zip(src, copied, mapped):  # the old pages lose this mapping
        if copy and is_mapped:
            pages.put_page(gfn)
    vma.anon_vma = True


def _no_frames(n: int) -> np.ndarray:
    """``n`` frames not chosen yet (-1)."""
    frames = np.empty(n, np.int64)
    frames.fill(-1)
    return frames


def _map_anonymous(
    ctx: KernelContext,
    vma: Vma,
    pt: int,
    indices: np.ndarray,
    new: np.ndarray,
    before_fault: Callable[[int], None] | None = None,
) -> None:
    """do_anonymous_page (write) once its pages ``new`` are allocated: each is cleared (clear_user_highpage),
    then mapped writable and dirty at its index. Without ``before_fault`` the pages are one batch (one fault,
    or populate); with it each is a fault of its own, ``before_fault(j)`` delivering the access that raises
    fault j > 0."""
    clears, values = direct_map(new), make_ptes(new, vma.page_prot()) | WRITE_DIRTY
    vma.anon_vma = True
    if before_fault is None:
        ctx.kernel_access(clears, write=True)
        ctx.stores(pt, indices, values)
        return
    for j in range(len(new)):
        if j:
            before_fault(j)
        ctx.kernel_access(clears[j : j + 1], write=True)
        ctx.stores(pt, indices[j : j + 1], values[j : j + 1])


def _anonymous_writes(ctx: KernelContext, vma: Vma, write: bool) -> bool:
    """Whether a write fault on a missing PTE of ``vma`` is do_anonymous_page's: private anonymous memory
    without THP."""
    return write and vma.file is None and not vma.shared and bool(vma.prot & PROT_WRITE) and not thp_enabled(ctx, vma)


def _anonymous_run(ctx: KernelContext, vma: Vma, pmd: int, vas: np.ndarray, indices: np.ndarray) -> int:
    """How many of the next write faults of ``vma`` (_anonymous_writes; at ``vas``, PTE ``indices`` of the PT
    page ``pmd`` points at) are, one after the other, do_anonymous_page's: inside ``vma``, PTEs not present."""
    fresh = (vas >= vma.start) & (vas < vma.end) & ~present(ctx.memory.table(pte_gfn(pmd))[indices])
    stop = int(fresh.argmin())  # the first that is not, if any
    return stop if not fresh[stop] else len(fresh)


def _cow_sources_in_order(
    ctx: KernelContext,
    vma: Vma,
    base: int,
    indices: np.ndarray,
    src: np.ndarray,
    missing: np.ndarray,
    needs_page: np.ndarray,
) -> np.ndarray:
    """do_cow_fault's page-cache sources (filled into ``src``) and the new pages, allocated in fault order:
    a read-around happens when the fault that needs it does. Should the guest run out of memory on the way,
    the pages of the faults before (none mapped yet: the batch maps them together) are freed again."""
    file = vma.file
    assert file is not None
    new = _no_frames(len(indices))
    pgoff = vma.pgoff_at(base)
    pos = 0
    try:
        while pos < len(indices):
            lookup = (missing[pos:] & (src[pos:] < 0)).nonzero()[0] + pos
            src[lookup] = file.pages[pgoff + indices[lookup]]
            uncached = lookup[src[lookup] < 0]
            stop = int(uncached[0]) if len(uncached) else len(indices)
            run = needs_page[pos:stop].nonzero()[0] + pos
            new[run] = ctx.pages.alloc(len(run), PAGE_ANON)
            if stop < len(indices):
                src[stop] = ctx.cache.fault_page(file, pgoff + int(indices[stop]))
            pos = stop
    except MemoryError:
        ctx.pages.free(new[new >= 0])
        raise
    return new


def _few_cow_sources_in_order(
    ctx: KernelContext,
    vma: Vma,
    base: int,
    indices: list[int],
    src: list[int],
    missing: list[bool],
    needs_page: list[bool],
) -> list[int]:
    """_cow_sources_in_order() of a few pages, on Python ints."""
    file = vma.file
    assert file is not None
    new = [-1] * len(indices)
    pgoff = vma.pgoff_at(base)
    pos = 0
    try:
        while pos < len(indices):
            stop = len(indices)
            for j in range(pos, len(indices)):
                if missing[j] and src[j] < 0:
                    src[j] = file.pages.item(pgoff + indices[j])
                    if src[j] < 0 and stop == len(indices):
                        stop = j
            run = [j for j in range(pos, stop) if needs_page[j]]
            frames = [ctx.pages.alloc_page(PAGE_ANON)] if len(run) == 1 else ctx.pages.alloc(len(run), PAGE_ANON).tolist()
            for j, frame in zip(run, frames):
                new[j] = frame
            if stop < len(indices):
                src[stop] = ctx.cache.fault_page(file, pgoff + indices[stop])
            pos = stop
    except MemoryError:
        ctx.pages.free(np.array([frame for frame in new if frame >= 0], np.int64))
        raise
    return new


def _shared_write_faults(ctx: KernelContext, vma: Vma, pt: int, base: int, indices: np.ndarray) -> None:
    """do_shared_fault: the shmem (or file) page, mapped writable and dirty; no fault-around."""
    if vma.file is None:
        raise GuestSegfault("shared mapping without a file")
    gfns = np.array([ctx.cache.fault_page(vma.file, vma.pgoff_at(base) + i) for i in indices.tolist()], np.int64)
    ctx.stores(pt, indices, make_ptes(gfns, vma.page_prot() | PT_DIRTY_MASK))
    ctx.pages.get(gfns)


def _read_faults(ctx: KernelContext, vma: Vma, pt: int, base: int, indices: np.ndarray) -> None:
    """do_read_fault: do_fault_around maps the cached pages of the window, then __do_fault the page itself.

    A fault maps a few pages: they are handled as Python ints, a window's entries read as lists."""
    file = vma.file
    assert file is not None
    pgoff = vma.pgoff_at(base)  # the file page PTE 0 of the PT page would map
    ptes = ctx.memory.table(pt)
    in_file = file.nr_pages - pgoff  # the PTE indices below it map pages of the file
    mapped: dict[int, int] = {}  # PTE index -> frame, in the order the faults set them
    for index in indices.tolist():
        if index in mapped or ptes.item(index):
            continue
        first, last = fault_around_window(vma, base, index)
        last = min(last, in_file)  # the window's part inside the file
        if first < last:  # its empty PTEs whose page is cached
            window = zip(ptes[first:last].tolist(), file.pages[pgoff + first : pgoff + last].tolist())
            for at, (pte, gfn) in enumerate(window, first):
                if not pte and gfn >= 0 and at not in mapped:
                    mapped[at] = gfn
        if index not in mapped:
            if pgoff + index >= file.nr_pages:
                raise GuestSegfault(f"access beyond the end of {file.name} (SIGBUS)")
            mapped[index] = ctx.cache.fault_page(file, pgoff + index)
    prot = vma.page_prot()
    frames = list(mapped.values())
    ctx.stores(pt, np.array(list(mapped), np.int64), np.array([make_pte(gfn, prot) for gfn in frames], np.uint64))
    ctx.pages.get(frames)


def _alloc_or_none(ctx: KernelContext, n: int) -> np.ndarray | None:
    """``n`` anonymous pages, or None (nothing taken) when fewer are free: faulting one by one then finds out
    where memory runs out."""
    try:
        return ctx.pages.alloc(n, PAGE_ANON)
    except MemoryError:
        return None


def _vma_runs(mm: Mm, start: int, end: int) -> list[tuple[Vma, int, int]]:
    """[start, end) cut at VMA and PT-page boundaries: (vma, PT base, first, last) in address order."""
    runs = []
    va = start
    while va < end:
        vma = mm.vma_for_fault(va)
        if vma is None:
            raise GuestSegfault(f"no mapping at {va:#x}")
        stop = min(end, vma.end, (va // PMD_SIZE + 1) * PMD_SIZE)
        runs.append((vma, va, stop))
        va = stop
    return runs


def populate(ctx: KernelContext, mm: Mm, start: int, end: int, write: bool) -> None:
    """populate_vma_page_range / faultin_page: fault every page of [start, end) in, without user accesses."""
    for vma, lo, hi in _vma_runs(mm, start, end):
        base = lo // PMD_SIZE * PMD_SIZE
        indices = np.arange((lo - base) // PAGE_SIZE, (hi - base) // PAGE_SIZE)
        if ctx.batch:
            handle_pt_faults(ctx, mm, vma, base, indices, write)
        else:
            for index in indices:
                handle_pt_faults(ctx, mm, vma, base, indices[indices == index], write)


def touch(ctx: KernelContext, mm: Mm, gvas: np.ndarray, write: bool, user: bool = True, fetch: bool = False) -> None:
    """User code touching the pages ``gvas`` in order (``fetch``: running the code on them): each access that
    faults is handled, then retried. Without ``user`` it is the kernel touching them through their user
    addresses (copy_to_user, get_user): the same faults, but supervisor accesses, made on the kernel's pgd."""
    gvas = np.asarray(gvas, np.int64) & _PAGE_MASK
    if not len(gvas):
        return
    addresses = gvas.astype(np.uint64)  # as the hardware takes them

    def access(start: int, stop: int) -> None:
        if user:
            ctx.user_access(addresses[start:stop], write, mm.pgd, fetch)
        else:
            ctx.kernel_access(addresses[start:stop], write)

    pmd_bases = gvas >> _PMD_SHIFT
    ends = [pos + 1 for pos in (pmd_bases[1:] != pmd_bases[:-1]).nonzero()[0].tolist()] + [len(gvas)]
    all_indices = (gvas >> _PAGE_SHIFT) & _PTE_INDEX
    pending = 0
    vma: Vma | None = None
    for pos, run in zip([0, *ends[:-1]], ends):
        base = gvas.item(pos) >> PMD_SHIFT << PMD_SHIFT
        indices = all_indices[pos:run]
        pmd = pmd_entry(ctx, mm.pgd, base)
        need = needs_fault(ctx, pmd[2], indices, write).nonzero()[0]
        if not len(need):
            continue
        repeats = not distinct(indices)  # a page touched again may have been mapped by its first touch's fault
        while len(need):
            at = pos + int(need[0])
            # The accesses up to the faulting one reach the hardware; the faulting one raises the
            # guest's #PF (which KVM sees and reflects under shadow paging) and is retried after it.
            access(pending, at + 1)
            pending = at
            gva = gvas.item(at)
            if vma is None or not vma.start <= gva < vma.end:
                vma = mm.vma_for_fault(gva)
                if vma is None:
                    raise GuestSegfault(f"no mapping at {gva:#x}")
            run_length = 0
            if not repeats and points_to_table(pmd[2]) and _anonymous_writes(ctx, vma, write):
                run_length = _anonymous_run(ctx, vma, pmd[2], gvas[pos + need], indices[need])
            if run_length > 1 and (new := _alloc_or_none(ctx, run_length)) is not None:
                # As many faults of their own, their pages allocated together (the same frames, in order).
                def raise_fault(j: int, need: np.ndarray = need, pos: int = pos) -> None:
                    nonlocal pending
                    at = pos + int(need[j])
                    access(pending, at + 1)
                    pending = at

                _map_anonymous(ctx, vma, pte_gfn(pmd[2]), indices[need[:run_length]], new, raise_fault)
                need = need[run_length:]
                continue
            faulting = indices[need[:1]]
            if repeats:
                faulting = faulting[needs_fault(ctx, pmd[2], faulting, write)]
            _handle_faults(ctx, mm, vma, base, faulting, write, pmd)
            if not points_to_table(pmd[2]):  # the fault may have changed the PMD
                pmd = pmd_entry(ctx, mm.pgd, base)
            if vma.file is None and not thp_enabled(ctx, vma):  # an anonymous fault maps just its page
                need = need[1:]
            else:  # fault-around or a THP may have mapped more
                need = need[1:][needs_fault(ctx, pmd[2], indices[need[1:]], write)]
    access(pending, len(gvas))
