"""The guest's page allocator: the buddy allocator as order-0 users see it, plus struct page counts.

Fresh memory is handed out the way a freshly booted Linux hands it out:
ZONE_NORMAL first (memory above 4 GiB), then ZONE_DMA32, then ZONE_DMA, each
from its lowest frame upwards (__free_pages_core queues boot memory at the
tail of the free lists, rmqueue_bulk splits blocks from their low end).
Freed pages go on top of a single per-cpu-pages style LIFO list
(free_unref_page_commit adds at the head), so the page freed last is the
next one allocated and page-table and data pages get recycled as in Linux.
Every operation is O(1) per page and the batch forms are numpy slices.
Transparent huge pages are order-9 blocks: freed ones are kept on their own
LIFO list (the per-cpu lists hold THPs too), new ones are carved from fresh
memory at the lowest aligned block, as the buddy allocator would split them.

``refcount`` is struct page's _refcount (a mapping, the page cache or the
kernel each hold one); ``kind`` says what a page is used for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAGE_FREE, PAGE_RESERVED, PAGE_KERNEL, PAGE_TABLE, PAGE_ANON, PAGE_CACHE, PAGE_HOLE = range(7)
HPAGE_PMD_NR = 512
KIND_NAMES = ("free", "reserved", "kernel", "pagetable", "anon", "pagecache")  # PAGE_HOLE: not RAM


class PageAllocator:
    """Order-0 page allocation over the frames listed in ``free_runs`` (gfn ranges, in allocation order);
    the rest of ``ram`` is reserved."""

    def __init__(self, max_pfn: int, ram: Sequence[tuple[int, int]], free_runs: Sequence[tuple[int, int]]) -> None:
        fresh = np.concatenate([np.arange(start, end, dtype=np.int64) for start, end in free_runs])
        self.refcount = np.zeros(max_pfn, np.int32)
        self.kind = np.full(max_pfn, PAGE_HOLE, np.uint8)
        for start, end in ram:
            self.kind[start:end] = PAGE_RESERVED
        self.kind[fresh] = PAGE_FREE
        self.managed_pages = len(fresh)
        self._stack = fresh[::-1].copy()  # the top of the stack is the next page handed out
        self._top = len(fresh)
        self._fresh = len(fresh)  # the bottom of the stack never allocated yet, ascending from its top
        self._huge: list[int] = []  # free order-9 blocks, last freed on top

    @property
    def nr_free(self) -> int:
        return self._top + HPAGE_PMD_NR * len(self._huge)

    def alloc(self, n: int, kind: int) -> np.ndarray:
        """alloc_pages() ``n`` times: the frames, in allocation order, each with one reference."""
        while n > self._top and self._huge:  # no small page left: break up a free THP block
            base = self._huge.pop()
            self._push(np.arange(base + HPAGE_PMD_NR - 1, base - 1, -1))
        if n > self._top:
            raise MemoryError(f"guest out of memory: {n} pages wanted, {self._top} free")
        gfns = self._stack[self._top - n : self._top][::-1].copy()
        self._top -= n
        self._fresh = min(self._fresh, self._top)
        self.refcount[gfns] = 1
        self.kind[gfns] = kind
        return gfns

    def free(self, gfns: np.ndarray) -> None:
        """__free_pages() of pages whose last reference is gone, in the order given (the last is reused first)."""
        gfns = np.asarray(gfns, np.int64)
        if len(gfns) == 0:
            return
        if (self.kind[gfns] == PAGE_FREE).any() or (self.refcount[gfns] > 1).any():
            raise ValueError("freeing a free page or a page still referenced")
        self.refcount[gfns] = 0
        self.kind[gfns] = PAGE_FREE
        self._push(gfns)

    def _push(self, gfns: np.ndarray) -> None:
        self._stack[self._top : self._top + len(gfns)] = gfns
        self._top += len(gfns)

    def alloc_huge(self, kind: int) -> int:
        """alloc_pages(order 9) for a THP: its first frame (each of its 512 frames with one reference),
        or -1 when no aligned block is free (the fault then falls back to small pages)."""
        if self._huge:
            base = self._huge.pop()
        else:
            ascending = self._stack[self._fresh - 1 :: -1] if self._fresh else self._stack[:0]
            starts = np.flatnonzero(ascending[: len(ascending) - HPAGE_PMD_NR + 1] % HPAGE_PMD_NR == 0)
            whole = starts[ascending[starts + HPAGE_PMD_NR - 1] == ascending[starts] + HPAGE_PMD_NR - 1]
            if not len(whole):
                return -1
            base = int(ascending[whole[0]])
            low = self._fresh - int(whole[0]) - HPAGE_PMD_NR  # the block's place in the stack
            self._stack[low : self._top - HPAGE_PMD_NR] = self._stack[low + HPAGE_PMD_NR : self._top].copy()
            self._top -= HPAGE_PMD_NR
            self._fresh -= HPAGE_PMD_NR
        self.refcount[base : base + HPAGE_PMD_NR] = 1
        self.kind[base : base + HPAGE_PMD_NR] = kind
        return base

    def put_huge(self, base: int) -> None:
        """Drop the references a PMD mapping held on a THP's frames; a wholly unused block is freed as one."""
        block = np.arange(base, base + HPAGE_PMD_NR)
        if (self.refcount[block] == 1).all():
            self.refcount[block] = 0
            self.kind[block] = PAGE_FREE
            self._huge.append(base)
        else:
            self.put(block)

    def get(self, gfns: np.ndarray) -> None:
        """get_page() on each frame (repeats count)."""
        np.add.at(self.refcount, np.asarray(gfns, np.int64), 1)

    def put(self, gfns: np.ndarray) -> np.ndarray:
        """put_page() on each frame in order; frees, in order, those whose count reached zero. Returns them."""
        gfns = np.asarray(gfns, np.int64)
        if len(gfns) == 0:
            return gfns
        if (self.refcount[gfns] <= 0).any():
            raise ValueError("put_page on a page without references")
        np.subtract.at(self.refcount, gfns, 1)
        unique, first_from_end = np.unique(gfns[::-1], return_index=True)
        if len(unique) == len(gfns):
            freed = gfns[self.refcount[gfns] == 0]
        else:  # a page dropped several times is freed at its last drop
            last = np.sort(len(gfns) - 1 - first_from_end)
            freed = gfns[last][self.refcount[gfns[last]] == 0]
        self.free(freed)
        return freed

    def exclusive_anon(self, gfns: np.ndarray) -> np.ndarray:
        """Anonymous pages mapped once (PageAnonExclusive): a write may reuse them instead of copying."""
        return (self.kind[gfns] == PAGE_ANON) & (self.refcount[gfns] == 1)

    def count_by_kind(self) -> dict[str, int]:
        counts = np.bincount(self.kind, minlength=PAGE_HOLE + 1)
        return {name: int(counts[i]) for i, name in enumerate(KIND_NAMES)}
