"""Designs A (<= v5.14) and B (v5.15 - v6.3): append at the tail, fill a hole from the same descriptor."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.arch.x86.mmu.pte_list_base import SCALAR_WALK_ROWS, Hit, PteListDesign, desc_head


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class TailAppendDesign(PteListDesign):
    """pte_list_add walks from the head while descriptors are full and appends to the first
    non-full one (a fresh tail descriptor if none), so its count stops there and can
    under-estimate a fragmented list; __pte_list_remove fills the hole with the last entry
    of the same descriptor and frees the descriptor when it empties.

    The add walk is what a fork costs on these designs (lists of hundreds of descriptors), and
    the emulation need not repeat it: each list keeps, indexed by its first descriptor, where
    its last walk ended (``room``) and that descriptor's position in the chain counted from 1
    (``room_depth``, 0 = no hint). Every descriptor before that point is full, so the walk from
    there ends where the walk from the head would, and the full descriptors it skips are counted
    as visited (and, in A, read) as the kernel visits them. Adds only fill descriptors and append
    tails, so a hint stays true; a removal at or before it moves it back to the descriptor that
    now has room (to the one before, if that descriptor emptied and left the chain). A freshly
    allocated descriptor has no hint, so a list whose first descriptor changes starts without one.
    """

    POOL_HINTS = ("room", "room_depth")
    FULL_TEST_READS: ClassVar[int] = 0  # slots the add walk reads to test a descriptor (none: the counter says)

    def _fullness(self) -> tuple[memoryview, int, int, int]:
        """What the add walk's loop tests, as (a pool view, stride, offset, least): a descriptor ``desc`` is
        full when ``view[desc * stride + offset] >= least`` (here ``spte_count == PTE_LIST_EXT``)."""
        return self.pool.spte_count_view, 1, 0, self.PTE_LIST_EXT

    def _is_full(self, descs: np.ndarray) -> np.ndarray:
        """The add walk's loop condition, for many descriptors (_fullness() over the view as an array)."""
        view, stride, offset, least = self._fullness()
        return np.asarray(view)[offset::stride][descs] >= least

    def _walk_from(self, desc: int, visited: int) -> tuple[int, int, bool]:
        """The add walk's loop, with scalar reads, from ``desc`` at chain position ``visited``: (where it
        stops, its position, whether it has room). Two reads a descriptor."""
        column, stride, offset, least = self._fullness()
        more = self.pool.more_view
        while column[desc * stride + offset] >= least:
            nxt = more[desc]
            if not nxt:
                return desc, visited, False
            desc, visited = nxt, visited + 1
        return desc, visited, True

    def _last_slot_reads(self, last: np.ndarray) -> int:
        """Slots read to find each descriptor's last entry (the counter gives it: one read to move it)."""
        return len(last)

    def _last_slot_reads_one(self, last: int) -> int:
        """_last_slot_reads() of one descriptor."""
        return 1

    def _add_many(
        self, heads: np.ndarray, indices: np.ndarray, first: np.ndarray, sptes: np.ndarray
    ) -> np.ndarray:
        """pte_list_add, descriptor form, each walk resumed from its list's hint: the count is PTE_LIST_EXT per
        full descriptor walked."""
        ext, pool = self.PTE_LIST_EXT, self.pool
        n = len(first)
        end_desc, end_depth, room = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool)
        hinted = pool.room_depth[first].astype(np.int64)
        descs, depth = np.where(hinted > 0, pool.room[first], first), np.maximum(hinted, 1)
        skipped = int(depth.sum()) - n
        self.costs.desc_visits += skipped
        self.costs.slot_reads += skipped * self.FULL_TEST_READS
        rows = np.arange(n)
        while len(rows):
            if len(rows) <= SCALAR_WALK_ROWS:
                self._add_walk_few(rows, descs, depth, end_desc, end_depth, room)
                break
            self.costs.desc_visits += len(rows)
            self.costs.slot_reads += len(rows) * self.FULL_TEST_READS
            full = self._is_full(descs)
            nxt = pool.more[descs]
            on = full & (nxt != 0)  # the walk goes on to the next descriptor
            done, going = np.flatnonzero(~on), np.flatnonzero(on)  # positions, not masks (see PteListDesign._split)
            ended = rows[done]
            end_desc[ended], end_depth[ended], room[ended] = descs[done], depth[done], ~full[done]
            rows, descs, depth = rows[going], nxt[going], depth[going] + 1
        pool.room[first], pool.room_depth[first] = end_desc, end_depth
        counts = (end_depth - room) * ext
        roomy = np.flatnonzero(room)
        stop = end_desc[roomy]
        used = self._used(stop)
        self.costs.slot_reads += self._occupancy_reads(used)
        counts[roomy] += used
        pool.sptes[stop, used] = sptes[roomy]
        self._set_used(stop, used + 1)
        grown = np.flatnonzero(~room)
        if len(grown):
            new = pool.alloc(len(grown))
            pool.more[end_desc[grown]] = new
            pool.sptes[new, 0] = sptes[grown]
            self._set_used(new, np.ones(len(new), np.int64))
        self.costs.slot_writes += n
        return counts

    def _add_walk_few(
        self,
        rows: np.ndarray,
        descs: np.ndarray,
        depth: np.ndarray,
        end_desc: np.ndarray,
        end_depth: np.ndarray,
        room: np.ndarray,
    ) -> None:
        """The rest of _add_many's walks for its last few lists, one list at a time with scalar reads (from
        ``descs``, at chain positions ``depth``); records where each ends and counts the same visits and
        reads as the numpy loop."""
        visits = 0
        for row, desc, start in zip(rows.tolist(), descs.tolist(), depth.tolist()):
            end_desc[row], end_depth[row], room[row] = found = self._walk_from(desc, start)
            visits += found[1] - start + 1
        self.costs.desc_visits += visits
        self.costs.slot_reads += visits * self.FULL_TEST_READS

    def _add_to_list(self, heads: np.ndarray, index: int, first: int, spte: int) -> int:
        """_add_many() of one list: the walk, resumed from the list's hint (left where it stops), stops at the
        first non-full descriptor, or grows the tail."""
        ext, costs, pool = self.PTE_LIST_EXT, self.costs, self.pool
        hinted = pool.room_depth_view[first]
        desc, visited, room = self._walk_from(pool.room_view[first] if hinted else first, hinted or 1)
        pool.room_view[first] = desc
        pool.room_depth_view[first] = visited
        costs.desc_visits += visited
        costs.slot_reads += visited * self.FULL_TEST_READS
        costs.slot_writes += 1
        if room:
            used = self._used_one(desc)
            costs.slot_reads += self._occupancy_reads_one(used)
            pool.sptes_view[desc * ext + used] = spte
            self._set_used_one(desc, used + 1)
            return (visited - 1) * ext + used
        new = pool.alloc_one()
        pool.more_view[desc] = new
        pool.sptes_view[new * ext] = spte
        self._set_used_one(new, 1)
        return visited * ext

    def _occupancy_reads_one(self, used: int) -> int:
        """_occupancy_reads() of one descriptor."""
        return 0

    def _remove_many(
        self, heads: np.ndarray, indices: np.ndarray, first: np.ndarray, sptes: np.ndarray
    ) -> None:
        """__pte_list_remove + pte_list_desc_remove_entry, descriptor form."""
        descs, slots, prev, used, depth = self._find(first, sptes)
        last = used - 1
        table = self.pool.sptes
        table[descs, slots] = table[descs, last]
        table[descs, last] = 0
        self._set_used(descs, last)
        self.costs.slot_reads += self._last_slot_reads(last)
        self.costs.slot_writes += 2 * len(descs)
        emptied = last == 0
        self._room_after_remove(first, descs, prev, depth, emptied)
        if emptied.any():
            self._unlink(heads, indices[emptied], descs[emptied], prev[emptied])

    def _remove_at(self, heads: np.ndarray, index: int, first: int, spte: int, hit: Hit) -> None:
        """_remove_many() of one list, with Python ints."""
        pool, costs = self.pool, self.costs
        table, desc, last = pool.sptes_view, hit.desc, hit.used - 1
        row = desc * self.PTE_LIST_EXT
        table[row + hit.slot] = table[row + last]
        table[row + last] = 0
        self._set_used_one(desc, last)
        costs.desc_visits += hit.visits
        costs.slot_reads += hit.reads + self._last_slot_reads_one(last)
        costs.slot_writes += 2
        if hit.depth <= pool.room_depth_view[first]:  # as _room_after_remove
            pool.room_view[first] = desc if last else hit.prev
            pool.room_depth_view[first] = hit.depth if last else hit.depth - 1
        if not last:  # as _unlink
            nxt = pool.more_view[desc]
            if hit.prev:
                pool.more_view[hit.prev] = nxt
            else:
                heads[index] = (nxt << 1) | 1 if nxt else 0
            pool.free([desc])

    def _room_after_remove(
        self, first: np.ndarray, descs: np.ndarray, prev: np.ndarray, depth: np.ndarray, emptied: np.ndarray
    ) -> None:
        """Keep the hints true after removals from ``descs`` (at chain positions ``depth``, after ``prev``): one
        at or before a list's hint moves it back to that descriptor, or to the one before it if it emptied
        (no hint if that was the first descriptor)."""
        back = depth <= self.pool.room_depth[first]
        if back.any():
            lists, emptied = first[back], emptied[back]
            self.pool.room[lists] = np.where(emptied, prev[back], descs[back])
            self.pool.room_depth[lists] = depth[back] - emptied

    def _unlink(self, heads: np.ndarray, indices: np.ndarray, descs: np.ndarray, prev: np.ndarray) -> None:
        """Free emptied descriptors, splicing them out of their chains (head or ``prev->more``)."""
        nxt = self.pool.more[descs]
        linked = prev != 0
        self.pool.more[prev[linked]] = nxt[linked]
        first = ~linked
        heads[indices[first]] = np.where(nxt[first] != 0, desc_head(nxt[first]), 0)
        self.pool.free(descs)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class DesignA(TailAppendDesign):
    """Version A (up to v5.14): ``sptes[3]`` + ``more`` = 32 bytes, no counter.

    Occupancy is found by scanning for the first NULL slot; the list is zapped the way
    kvm_zap_rmapp did it, by removing the first entry until the list is empty. Pool:
    24 bytes of slots + 4 (int32 ``more``) + 4 (free stack) = 32 bytes a descriptor.
    """

    name = "A"
    PTE_LIST_EXT = 3
    DESC_BYTES = 32
    POOL_META = ("more",)
    FULL_TEST_READS = 1

    def _used(self, descs: np.ndarray) -> np.ndarray:
        """Non-NULL slots, summed column by column (numpy reduces a 3-wide axis slowly)."""
        held = self.pool.rows(descs) != 0
        used = held[:, 0].astype(np.int64)
        for slot in range(1, self.PTE_LIST_EXT):
            used += held[:, slot]
        return used

    def _set_used(self, descs: np.ndarray, used: np.ndarray) -> None:
        """No counter to keep: the NULL slots are the count."""

    def _used_one(self, desc: int) -> int:
        ext = self.PTE_LIST_EXT
        return ext - self.pool.sptes_view[desc * ext : desc * ext + ext].tolist().count(0)

    def _set_used_one(self, desc: int, used: int) -> None:
        """No counter to keep."""

    def _fullness(self) -> tuple[memoryview, int, int, int]:
        """``desc->sptes[PTE_LIST_EXT-1]`` is non-NULL (sptes are positive)."""
        return self.pool.sptes_view, self.PTE_LIST_EXT, self.PTE_LIST_EXT - 1, 1

    def _occupancy_reads(self, used: np.ndarray) -> int:
        return self._null_scan_reads(used)

    def _occupancy_reads_one(self, used: int) -> int:
        return min(used + 1, self.PTE_LIST_EXT)

    def _miss_reads(self, used: np.ndarray) -> int:
        return self._null_scan_reads(used)

    def _miss_reads_one(self, used: int) -> int:
        return min(used + 1, self.PTE_LIST_EXT)

    def _last_slot_reads(self, last: np.ndarray) -> int:
        """The backward scan from slot PTE_LIST_EXT-1 down to the last non-NULL slot."""
        return int((self.PTE_LIST_EXT - last).sum())

    def _last_slot_reads_one(self, last: int) -> int:
        return self.PTE_LIST_EXT - last

    def _zap_many(
        self, heads: np.ndarray, indices: np.ndarray, first: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """kvm_zap_rmapp: ``while ((sptep = rmap_get_first(...))) pte_list_remove(...)``."""
        rows_out, sptes_out = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        rows, descs = np.arange(len(first)), first
        while len(rows):
            firsts = self.pool.sptes[descs, 0]
            self.costs.slot_reads += len(rows)
            self._remove_many(heads, indices[rows], descs, firsts)
            rows_out.append(rows)
            sptes_out.append(firsts)
            values = heads[indices[rows]]
            rows, descs = rows[values != 0], values[values != 0] >> 1
        return np.concatenate(rows_out), np.concatenate(sptes_out)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class DesignB(TailAppendDesign):
    """Version B (v5.15 - v6.3, Peter Xu): ``more``, ``spte_count``, ``sptes[14]`` = 128 bytes.

    The add walk reads only the counters; pte_list_count sums them over the chain; the
    list is zapped in one pass (kvm_zap_all_rmap_sptes). Pool: 112 bytes of slots + 4
    (``more``) + 4 (``spte_count``) + 4 (free stack) = 124 bytes a descriptor.
    """

    name = "B"
    PTE_LIST_EXT = 14
    DESC_BYTES = 128
    POOL_META = ("more", "spte_count")
