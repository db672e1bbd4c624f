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
Hot-plugged memory onlined as ZONE_MOVABLE has a list of its own, used first
by movable order-0 allocations (THPs are never placed there in this model).

``refcount`` is struct page's _refcount (a mapping, the page cache or the
kernel each hold one); ``kind`` says what a page is used for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAGE_FREE, PAGE_RESERVED, PAGE_KERNEL, PAGE_TABLE, PAGE_ANON, PAGE_CACHE, PAGE_HOLE = range(7)
MOVABLE_KINDS = (PAGE_ANON, PAGE_CACHE)  # __GFP_MOVABLE order-0 allocations: user anonymous and page-cache pages
HPAGE_PMD_NR = 512
KIND_NAMES = ("free", "reserved", "kernel", "pagetable", "anon", "pagecache")  # PAGE_HOLE: not RAM


class FreeList:
    """The free pages of a zone (or of zones used one after the other) as order-0 allocations see them.

    A LIFO stack: pages freed last are on top and handed out first; below them the
    fresh pages, never allocated yet, handed out from the lowest frame upwards."""

    def __init__(self, fresh: np.ndarray) -> None:
        self.stack = fresh[::-1].copy()  # the top of the stack is the next page handed out
        self.top = len(fresh)
        self.fresh = len(fresh)  # the bottom of the stack never allocated yet, ascending from its top

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` pages, in allocation order (the caller checked there are that many)."""
        gfns = self.stack[self.top - n : self.top][::-1].copy()
        self.top -= n
        self.fresh = min(self.fresh, self.top)
        return gfns

    def push(self, gfns: np.ndarray) -> None:
        self.stack[self.top : self.top + len(gfns)] = gfns
        self.top += len(gfns)

    def carve_huge(self) -> int:
        """The lowest 2 MiB-aligned block wholly in fresh memory, taken off the list; -1 if there is none."""
        ascending = self.stack[self.fresh - 1 :: -1] if self.fresh else self.stack[:0]
        starts = np.flatnonzero(ascending[: len(ascending) - HPAGE_PMD_NR + 1] % HPAGE_PMD_NR == 0)
        whole = starts[ascending[starts + HPAGE_PMD_NR - 1] == ascending[starts] + HPAGE_PMD_NR - 1]
        if not len(whole):
            return -1
        base = int(ascending[whole[0]])
        low = self.fresh - int(whole[0]) - HPAGE_PMD_NR  # the block's place in the stack
        self.stack[low : self.top - HPAGE_PMD_NR] = self.stack[low + HPAGE_PMD_NR : self.top].copy()
        self.top -= HPAGE_PMD_NR
        self.fresh -= HPAGE_PMD_NR
        return base


class MovableZone:
    """ZONE_MOVABLE of onlined hot-plugged memory [start, end): only movable allocations (user anonymous
    and page-cache pages) come from it, and they prefer it (GFP_HIGHUSER_MOVABLE's zonelist starts there).
    ``isolated`` (start_isolate_page_range) stops it handing out pages while it is being offlined."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.free = FreeList(np.arange(start, end, dtype=np.int64))
        self.isolated = False

    def holds(self, gfns: np.ndarray) -> np.ndarray:
        return (gfns >= self.start) & (gfns < self.end)


class PageAllocator:
    """Order-0 page allocation over the frames listed in ``free_runs`` (gfn ranges, in allocation order);
    the rest of ``ram`` is reserved. Memory onlined later forms a ``movable`` zone."""

    def __init__(self, max_pfn: int, ram: Sequence[tuple[int, int]], free_runs: Sequence[tuple[int, int]]) -> None:
        fresh = np.concatenate([np.arange(start, end, dtype=np.int64) for start, end in free_runs])
        self.refcount = np.zeros(max_pfn, np.int32)
        self.kind = np.full(max_pfn, PAGE_HOLE, np.uint8)
        for start, end in ram:
            self.kind[start:end] = PAGE_RESERVED
        self.kind[fresh] = PAGE_FREE
        self.managed_pages = len(fresh)
        self._free = FreeList(fresh)
        self._huge: list[int] = []  # free order-9 blocks, last freed on top
        self.movable: MovableZone | None = None

    @property
    def nr_free(self) -> int:
        movable = self.movable.free.top if self.movable else 0
        return self._free.top + HPAGE_PMD_NR * len(self._huge) + movable

    def alloc(self, n: int, kind: int) -> np.ndarray:
        """alloc_pages() ``n`` times: the frames, in allocation order, each with one reference.
        Movable kinds come from the movable zone while it has free pages, then from the others."""
        movable = self.movable
        if kind in MOVABLE_KINDS and movable is not None and not movable.isolated and movable.free.top:
            first = movable.free.take(min(n, movable.free.top))
            gfns = np.concatenate([first, self._alloc_normal(n - len(first))])
        else:
            gfns = self._alloc_normal(n)
        self.refcount[gfns] = 1
        self.kind[gfns] = kind
        return gfns

    def _alloc_normal(self, n: int) -> np.ndarray:
        while n > self._free.top and self._huge:  # no small page left: break up a free THP block
            base = self._huge.pop()
            self._free.push(np.arange(base + HPAGE_PMD_NR - 1, base - 1, -1))
        if n > self._free.top:
            raise MemoryError(f"guest out of memory: {n} pages wanted, {self._free.top} free")
        return self._free.take(n)

    def free(self, gfns: np.ndarray) -> None:
        """__free_pages() of pages whose last reference is gone, in the order given (the last is reused first).
        A page goes back to its own zone's list."""
        gfns = np.asarray(gfns, np.int64)
        if len(gfns) == 0:
            return
        if (self.kind[gfns] == PAGE_FREE).any() or (self.refcount[gfns] > 1).any():
            raise ValueError("freeing a free page or a page still referenced")
        self.refcount[gfns] = 0
        self.kind[gfns] = PAGE_FREE
        if self.movable is None:
            self._free.push(gfns)
            return
        movable = self.movable.holds(gfns)
        self._free.push(gfns[~movable])
        self.movable.free.push(gfns[movable])

    def alloc_huge(self, kind: int) -> int:
        """alloc_pages(order 9) for a THP: its first frame (each of its 512 frames with one reference),
        or -1 when no aligned block is free (the fault then falls back to small pages)."""
        base = self._huge.pop() if self._huge else self._free.carve_huge()
        if base < 0:
            return -1
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

    def online_movable(self, start: int, end: int) -> None:
        """online_pages into ZONE_MOVABLE: the frames [start, end) join the zone (move_pfn_range_to_zone) and
        are freed into it (generic_online_page), counted as managed (adjust_managed_page_count)."""
        if self.movable is not None:
            raise ValueError("a movable zone is already online (the model keeps one)")
        if end > len(self.kind):  # the struct page arrays reach the new frames
            self.refcount = np.concatenate([self.refcount, np.zeros(end - len(self.kind), np.int32)])
            self.kind = np.concatenate([self.kind, np.full(end - len(self.kind), PAGE_HOLE, np.uint8)])
        if (self.kind[start:end] != PAGE_HOLE).any():
            raise ValueError(f"frames {start:#x}-{end:#x} are already RAM")
        self.kind[start:end] = PAGE_FREE
        self.movable = MovableZone(start, end)
        self.managed_pages += end - start

    def offline_movable(self) -> None:
        """The end of offline_pages: every page of the isolated movable zone is free (migrated away), the
        frames leave the allocator (__offline_isolated_pages) and the managed count."""
        zone = self.movable
        if zone is None or not zone.isolated:
            raise ValueError("no isolated movable zone to offline")
        busy = np.flatnonzero(self.kind[zone.start : zone.end] != PAGE_FREE)
        if len(busy):
            raise ValueError(f"page {zone.start + int(busy[0]):#x} is still in use (offline_pages: -EBUSY)")
        self.kind[zone.start : zone.end] = PAGE_HOLE
        self.managed_pages -= zone.end - zone.start
        self.movable = None

    def move_references(self, src: np.ndarray, dst: np.ndarray) -> None:
        """folio_migrate_mapping / migrate_folio_done: the references and the use of each ``src`` page (its
        mappings, the page cache) now belong to the matching ``dst`` page; the ``src`` pages are freed."""
        self.refcount[dst] = self.refcount[src]
        self.kind[dst] = self.kind[src]
        self.refcount[src] = 1
        self.free(src)

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
