"""The guest's page allocator: the buddy allocator as order-0 users see it, plus struct page counts.

Fresh memory is handed out the way a freshly booted Linux hands it out:
ZONE_NORMAL first (memory above 4 GiB), then ZONE_DMA32, then ZONE_DMA, each
from its lowest frame upwards (__free_pages_core queues boot memory at the
tail of the free lists, rmqueue_bulk splits blocks from their low end).

Pages are grouped by mobility, as the buddy allocator does: user memory
(anonymous and page-cache pages, GFP_HIGHUSER_MOVABLE) is MIGRATE_MOVABLE,
everything the kernel allocates for itself (page tables, slab, stacks) is
MIGRATE_UNMOVABLE. Each type is served from its own free list; when one runs
dry it takes the next whole MAX_ORDER block of fresh memory
(__rmqueue_fallback steals the largest free block and, as that is at least a
pageblock, claims all of it: change_pageblock_range). So page tables never
share a 2 MiB pageblock with user pages, which decides where KVM may map the
guest's direct map with 2M sptes.

Freed pages go on top of their pageblock type's per-cpu-pages style LIFO list
(free_unref_page_commit adds at the head), so the page freed last is the next
one of its type allocated and page-table and data pages get recycled as in
Linux. Every operation is O(1) per page and the batch forms are numpy slices.
Transparent huge pages are order-9 blocks: freed ones are kept on their own
LIFO list (the per-cpu lists hold THPs too), new ones are carved from fresh
memory at the lowest aligned pageblock, as the buddy allocator would split them.
Hot-plugged memory onlined as ZONE_MOVABLE has a list of its own, used first
by movable order-0 allocations (THPs are never placed there in this model).

``refcount`` is struct page's _refcount (a mapping, the page cache or the
kernel each hold one); ``kind`` says what a page is used for.
"""

from __future__ import annotations

from typing import Final

from collections.abc import Sequence

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.zero_extend import zero_extended

PAGE_FREE, PAGE_RESERVED, PAGE_KERNEL, PAGE_TABLE, PAGE_ANON, PAGE_CACHE, PAGE_HOLE = range(7)
HPAGE_PMD_NR: Final = 512
SCALAR_REFS: Final = 8  # up to this many frames, get() counts the references one by one on Python ints
SCALAR_DISTINCT: Final = 64  # up to this many frames, a Python set tells repeats apart faster than a sort
PAGEBLOCK_ORDER: Final = 9
MAX_ORDER_NR_PAGES: Final = 1 << 10  # MAX_PAGE_ORDER 10: a 4 MiB block
MIGRATE_UNMOVABLE, MIGRATE_MOVABLE = 0, 1
KIND_NAMES: Final = ("free", "reserved", "kernel", "pagetable", "anon", "pagecache")  # PAGE_HOLE: not RAM
MOVABLE_KINDS: Final = (PAGE_ANON, PAGE_CACHE)  # __GFP_MOVABLE order-0 allocations: user anonymous and page-cache pages
# Operands of the struct page arrays' dtypes, as 0-d arrays (numpy combines those with an array faster than scalars)
_KIND_FREE, _KIND_ANON = np.array(PAGE_FREE, np.uint8), np.array(PAGE_ANON, np.uint8)
_NO_REFS, _ONE_REF = np.array(0, np.int32), np.array(1, np.int32)
_PAGEBLOCK_ORDER = np.array(PAGEBLOCK_ORDER, np.int64)
_MT_MOVABLE = np.array(MIGRATE_MOVABLE, np.int8)


def gfp_migratetype(kind: int) -> int:
    """gfp_migratetype(): user pages are movable, the kernel's own allocations are not."""
    return MIGRATE_MOVABLE if kind in MOVABLE_KINDS else MIGRATE_UNMOVABLE


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class FreeList:
    """One migratetype's free pages as a LIFO stack: the top is the next page handed out."""

    def __init__(self, capacity: int) -> None:
        self.stack = np.zeros(capacity, np.int64)
        self.top = 0

    def push(self, gfns: np.ndarray) -> None:
        """Free ``gfns`` in order: the last one comes back first."""
        self.stack[self.top : self.top + len(gfns)] = gfns
        self.top += len(gfns)

    def pop(self, n: int) -> np.ndarray:
        """The next ``n`` pages (at most as many as there are), in the order they are handed out."""
        n = min(n, self.top)
        gfns = self.stack[self.top - n : self.top][::-1].copy()
        self.top -= n
        return gfns

    def pop_one(self) -> int:
        """pop(1) as an int (the list must not be empty)."""
        self.top -= 1
        gfn: int = self.stack.item(self.top)
        return gfn

    def peek(self, n: int) -> np.ndarray:
        """What pop(n) would return, leaving the list as it is."""
        return self.stack[max(self.top - n, 0) : self.top][::-1].copy()


def distinct(gfns: np.ndarray) -> bool:
    """Whether no frame occurs twice in ``gfns``."""
    if len(gfns) <= SCALAR_DISTINCT:
        return len(set(gfns.tolist())) == len(gfns)
    ordered = np.sort(gfns)
    return bool((ordered[1:] != ordered[:-1]).all())


def max_order_blocks(free_runs: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """The fresh frames grouped by MAX_ORDER-aligned block (a block's frames in allocation order), the
    blocks in the order their first frame is handed out. Each run is cut at block boundaries and the
    pieces gathered per block, so the work goes with the number of blocks, not of frames."""
    pieces: dict[int, list[np.ndarray]] = {}  # by block, in the order of first hand-out
    for start, end in free_runs:
        while start < end:
            stop = min(end, (start // MAX_ORDER_NR_PAGES + 1) * MAX_ORDER_NR_PAGES)
            pieces.setdefault(start // MAX_ORDER_NR_PAGES, []).append(np.arange(start, stop, dtype=np.int64))
            start = stop
    return [parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in pieces.values()]


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class MovableZone:
    """ZONE_MOVABLE of onlined hot-plugged memory [start, end): only movable allocations (user anonymous
    and page-cache pages) come from it, and they prefer it (GFP_HIGHUSER_MOVABLE's zonelist starts there).
    ``isolated`` (start_isolate_page_range) stops it handing out pages while it is being offlined."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.free = FreeList(end - start)
        self.free.push(np.arange(end - 1, start - 1, -1, dtype=np.int64))  # the lowest frame on top
        self.isolated = False

    def holds(self, gfns: np.ndarray) -> np.ndarray:
        return (gfns >= self.start) & (gfns < self.end)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class PageAllocator:
    """Order-0 page allocation over the frames listed in ``free_runs`` (gfn ranges, in allocation order);
    the rest of ``ram`` is reserved. Memory onlined later forms a ``movable`` zone."""

    def __init__(self, max_pfn: int, ram: Sequence[tuple[int, int]], free_runs: Sequence[tuple[int, int]]) -> None:
        self.refcount = np.zeros(max_pfn, np.int32)
        self.kind = np.full(max_pfn, PAGE_HOLE, np.uint8)
        for start, end in ram:
            self.kind[start:end] = PAGE_RESERVED
        self._fresh = max_order_blocks(free_runs)[::-1]  # blocks never handed out, the next one last
        fresh = self._fresh_pages = sum(len(block) for block in self._fresh)
        for block in self._fresh:
            self.kind[block] = PAGE_FREE
        self.managed_pages = fresh
        self.pageblock_mt = np.full((max_pfn >> PAGEBLOCK_ORDER) + 1, MIGRATE_MOVABLE, np.int8)
        self._lists = [FreeList(fresh), FreeList(fresh)]
        self._huge: list[int] = []  # free order-9 blocks, last freed on top
        self.movable: MovableZone | None = None

    @property
    def nr_free(self) -> int:
        lists = self._lists[0].top + self._lists[1].top + (self.movable.free.top if self.movable else 0)
        return lists + self._fresh_pages + HPAGE_PMD_NR * len(self._huge)

    def _claim(self, migratetype: int, block: np.ndarray) -> None:
        """Fresh or whole free memory becomes ``migratetype``'s: its pageblocks change type, its pages
        join the free list, lowest on top."""
        self.pageblock_mt[np.unique(block >> PAGEBLOCK_ORDER)] = migratetype
        self._lists[migratetype].push(block[::-1])

    def _refill(self, migratetype: int) -> None:
        """The type's free list is empty: the next fresh block, else a free THP block broken up, else
        __rmqueue_fallback takes the other type's most recently freed page."""
        if self._fresh:
            block = self._fresh.pop()
            self._fresh_pages -= len(block)
            self._claim(migratetype, block)
        elif self._huge:
            base = self._huge.pop()
            self._claim(migratetype, np.arange(base, base + HPAGE_PMD_NR, dtype=np.int64))
        else:
            self._lists[migratetype].push(self._lists[1 - migratetype].pop(1))

    def alloc(self, n: int, kind: int) -> np.ndarray:
        """alloc_pages() ``n`` times: the frames, in allocation order, each with one reference.
        Movable kinds come from the movable zone while it has free pages, then from the others."""
        migratetype, zone = gfp_migratetype(kind), self.movable
        own = self._lists[migratetype]
        if zone is None and n <= own.top:  # the common case: the type's free list has them all
            gfns = own.pop(n)
        else:
            gfns = self._take(n, migratetype, zone)
        self.refcount[gfns] = 1
        self.kind[gfns] = kind
        return gfns

    def alloc_page(self, kind: int) -> int:
        """alloc() of one frame, as an int: the top of the type's free list when it has one."""
        own = self._lists[gfp_migratetype(kind)]
        if self.movable is not None or not own.top:
            return int(self.alloc(1, kind)[0])
        gfn = own.pop_one()
        self.refcount[gfn] = 1
        self.kind[gfn] = kind
        return gfn

    def _take(self, n: int, migratetype: int, zone: MovableZone | None) -> np.ndarray:
        """alloc()'s frames when they come from several lists, or there are too few of them."""
        zone_free = zone.free.top if zone is not None else 0
        usable = zone is not None and migratetype == MIGRATE_MOVABLE and not zone.isolated
        available = self.nr_free - zone_free * (not usable)
        if n > available:
            raise MemoryError(f"guest out of memory: {n} pages wanted, {available} free for them")
        parts = [zone.free.pop(n)] if zone is not None and usable else []
        got = len(parts[0]) if parts else 0
        while got < n:
            if not self._lists[migratetype].top:
                self._refill(migratetype)
            parts.append(self._lists[migratetype].pop(n - got))
            got += len(parts[-1])
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def peek(self, n: int, kind: int) -> np.ndarray:
        """The frames the next alloc(n, kind) hands out, as long as its free list and fresh memory suffice."""
        head = self._lists[gfp_migratetype(kind)].peek(n)
        upcoming = [head, *self._fresh[::-1]]
        return np.concatenate(upcoming)[:n]

    def free(self, gfns: np.ndarray) -> None:
        """__free_pages() of pages whose last reference is gone, in the order given (the last is reused first)."""
        gfns = np.asarray(gfns, np.int64)
        if len(gfns) == 0:
            return
        if np.count_nonzero(self.kind[gfns] == _KIND_FREE) or np.count_nonzero(self.refcount[gfns] > _ONE_REF):
            raise ValueError("freeing a free page or a page still referenced")
        self.refcount[gfns] = 0
        self.kind[gfns] = PAGE_FREE
        if self.movable is not None:  # a page goes back to its own zone's list
            in_zone = self.movable.holds(gfns)
            self.movable.free.push(gfns[in_zone])
            gfns = gfns[~in_zone]
        movable = self.pageblock_mt[gfns >> _PAGEBLOCK_ORDER] == _MT_MOVABLE
        self._lists[MIGRATE_MOVABLE].push(gfns[movable])
        self._lists[MIGRATE_UNMOVABLE].push(gfns[~movable])

    def alloc_huge(self, kind: int) -> int:
        """alloc_pages(order 9) for a THP: its first frame (each of its 512 frames with one reference),
        or -1 when no aligned block is free (the fault then falls back to small pages)."""
        if self._huge:
            base = self._huge.pop()
        else:
            base = self._carve_pageblock()
            if base < 0:
                return -1
            self.pageblock_mt[base >> PAGEBLOCK_ORDER] = MIGRATE_MOVABLE
        self.refcount[base : base + HPAGE_PMD_NR] = 1
        self.kind[base : base + HPAGE_PMD_NR] = kind
        return base

    def _carve_pageblock(self) -> int:
        """The lowest whole pageblock of fresh memory, taken out of its block (-1 if there is none)."""
        for i in range(len(self._fresh) - 1, -1, -1):
            block = self._fresh[i]
            starts = np.flatnonzero(block[: max(len(block) - HPAGE_PMD_NR + 1, 0)] % HPAGE_PMD_NR == 0)
            whole = starts[block[starts + HPAGE_PMD_NR - 1] == block[starts] + HPAGE_PMD_NR - 1]
            if len(whole):
                at = int(whole[0])
                self._fresh_pages -= HPAGE_PMD_NR
                rest = np.concatenate([block[:at], block[at + HPAGE_PMD_NR :]])
                if len(rest):
                    self._fresh[i] = rest
                else:
                    del self._fresh[i]
                return int(block[at])
        return -1

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
            self.refcount = zero_extended(self.refcount, end)
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

    def get(self, gfns: np.ndarray | list[int]) -> None:
        """get_page() on each frame (repeats count)."""
        if len(gfns) <= SCALAR_REFS:
            refcount = self.refcount
            for gfn in gfns if isinstance(gfns, list) else gfns.tolist():
                refcount[gfn] = refcount.item(gfn) + 1
            return
        gfns = np.asarray(gfns, np.int64)
        if distinct(gfns):
            self.refcount[gfns] += _ONE_REF
        else:
            np.add.at(self.refcount, gfns, 1)

    def put(self, gfns: np.ndarray) -> np.ndarray:
        """put_page() on each frame in order; frees, in order, those whose count reached zero. Returns them."""
        gfns = np.asarray(gfns, np.int64)
        if len(gfns) == 0:
            return gfns
        counts = self.refcount[gfns]
        if np.minimum.reduce(counts) <= 0:
            raise ValueError("put_page on a page without references")
        if distinct(gfns):
            counts -= _ONE_REF
            self.refcount[gfns] = counts
            freed = gfns[counts == _NO_REFS]
        else:  # a page dropped several times is freed at its last drop
            np.subtract.at(self.refcount, gfns, 1)
            _, first_from_end = np.unique(gfns[::-1], return_index=True)
            last = np.sort(len(gfns) - 1 - first_from_end)
            freed = gfns[last][self.refcount[gfns[last]] == 0]
        self.free(freed)
        return freed

    def put_page(self, gfn: int) -> None:
        """put() of one frame."""
        count = self.refcount.item(gfn)
        if count <= 0:
            raise ValueError("put_page on a page without references")
        self.refcount[gfn] = count - 1
        if count == 1:
            self.free(np.array([gfn], np.int64))

    def is_exclusive_anon(self, gfn: int) -> bool:
        """exclusive_anon() of one frame."""
        return self.kind.item(gfn) == PAGE_ANON and self.refcount.item(gfn) == 1

    def exclusive_anon(self, gfns: np.ndarray) -> np.ndarray:
        """Anonymous pages mapped once (PageAnonExclusive): a write may reuse them instead of copying."""
        return (self.kind[gfns] == _KIND_ANON) & (self.refcount[gfns] == _ONE_REF)

    def count_by_kind(self) -> dict[str, int]:
        """Pages by kind. One count_nonzero pass per kind over the uint8 array: np.bincount would first
        widen all of it (a struct page per frame) to intp."""
        return {name: int(np.count_nonzero(self.kind == kind)) for kind, name in enumerate(KIND_NAMES)}
