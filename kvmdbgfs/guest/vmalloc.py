"""4K kernel mappings made after boot: kernel stacks in vmalloc space (CONFIG_VMAP_STACK) and modules.

A task's 16 KiB stack is vmalloc'ed (plus a guard page, 16 KiB aligned); each
CPU caches up to two freed stacks (NR_CACHED_STACKS) and reuses them after a
memset. Other stacks are vfree'd: the PTEs are cleared at once, the pages
freed, the address range only reused after a lazy purge, which flushes the
kernel range on every CPU once lazy_max_pages are pending.
"""

from __future__ import annotations

from typing import Final

import heapq

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.guest.allocator import PAGE_KERNEL
from kvmdbgfs.guest.kctx import KernelContext
from kvmdbgfs.guest.kpgtable import KernelPageTables
from kvmdbgfs.guest.vaddr import MODULES_VADDR, PAGE_SIZE, VMALLOC_START, kernel_vas

THREAD_SIZE_PAGES: Final = 4
STACK_SLOT: Final = 32 * 1024  # 16 KiB + guard page, rounded to THREAD_ALIGN
NR_CACHED_STACKS: Final = 2
LAZY_MAX_PAGES_PER_FLS: Final = (32 << 20) // PAGE_SIZE
STACK_TOUCH_PAGES: Final = 2  # the top of the stack a running task writes to


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class KernelStacks:
    """alloc_thread_stack_node / free_thread_stack over the vmalloc area."""

    def __init__(self, ctx: KernelContext, kpt: KernelPageTables, nr_cpus: int, base: int = VMALLOC_START) -> None:
        self.ctx = ctx
        self.kpt = kpt
        self.base = base
        self.cache: list[list[int | None]] = [[None] * NR_CACHED_STACKS for _ in range(nr_cpus)]
        self.pages: dict[int, np.ndarray] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._lazy: list[int] = []
        self.lazy_max_pages = LAZY_MAX_PAGES_PER_FLS * nr_cpus.bit_length()

    def alloc(self) -> int:
        """A zeroed stack: a cached one (memset) or a fresh vmalloc area (zeroed pages, then mapped). When
        no page is left for a page table of the mapping, the pages and the area go back (__vmalloc_area_node
        fails)."""
        cached = self.cache[self.ctx.cpu]
        for i, va in enumerate(cached):
            if va is not None:
                cached[i] = None
                self.ctx.kernel_access(self.gvas(va), write=True)
                return va
        pages = self.ctx.alloc(THREAD_SIZE_PAGES, PAGE_KERNEL, zero=True)
        slot = heapq.heappop(self._free_slots) if self._free_slots else self._take_slot()
        va = self.base + slot * STACK_SLOT
        try:
            self.kpt.map_pages(va, pages)
        except MemoryError:
            self.ctx.pages.put(pages)
            heapq.heappush(self._free_slots, slot)
            raise
        self.pages[va] = pages
        return va

    def _take_slot(self) -> int:
        self._next_slot += 1
        return self._next_slot - 1

    def free(self, va: int) -> None:
        """Into this CPU's cache if there is room, else vfree: unmap, free the pages, purge lazily."""
        cached = self.cache[self.ctx.cpu]
        if None in cached:
            cached[cached.index(None)] = va
            return
        self.kpt.unmap_pages(va, THREAD_SIZE_PAGES)
        self.ctx.pages.put(self.pages.pop(va))
        self._lazy.append(va)
        if len(self._lazy) * STACK_SLOT // PAGE_SIZE > self.lazy_max_pages:
            self.ctx.tlb.flush_tlb_kernel_range(min(self._lazy), max(self._lazy) + STACK_SLOT)
            for lazy in self._lazy:
                heapq.heappush(self._free_slots, (lazy - self.base) // STACK_SLOT)
            self._lazy = []

    @staticmethod
    def gvas(va: int, npages: int = THREAD_SIZE_PAGES) -> np.ndarray:
        """The addresses of the top ``npages`` pages of the stack at ``va``."""
        return kernel_vas(va, np.arange(THREAD_SIZE_PAGES - npages, THREAD_SIZE_PAGES))


def load_modules(ctx: KernelContext, kpt: KernelPageTables, sizes_pages: list[int], offset_pages: int) -> list[int]:
    """module_alloc + load: each module's pages mapped 4K one after the other in module space, written
    as the module is copied in. Returns each module's address."""
    addresses = []
    va = MODULES_VADDR + offset_pages * PAGE_SIZE
    for npages in sizes_pages:
        gfns = ctx.alloc(npages, PAGE_KERNEL, zero=False)
        kpt.map_pages(va, gfns)
        ctx.kernel_access(kernel_vas(va, np.arange(npages)), write=True)
        addresses.append(va)
        va += (npages + 1) * PAGE_SIZE  # vmalloc's guard page
    return addresses
