"""What every rmap list design shares: the head encoding, batching, and the descriptor-chain walks.

A head is one int64 (``struct kvm_rmap_head``): 0 = empty; even and non-zero = the
address of the only spte; odd = ``(descriptor id << 1) | 1`` (bit 0 is KVM_RMAP_MANY).
sptes are positive multiples of 8. The designs (pte_list_tail.py, pte_list_head.py)
supply the descriptor-form paths; the empty and single forms are handled here.

Every operation is written once, vectorised over *distinct* heads (``*_unique`` and
``gather``/``zap_heads``). Scalar calls are those with one head; batches with repeated
heads run in rounds in which each head occurs once, in input order, so a batch leaves
the lists, the pool occupancy and the cost counters exactly as the same calls one by one
would (descriptor ids may differ, as slab addresses would).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar, Final, NamedTuple

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.arch.x86.mmu.pte_list_pool import DescPool, RmapCosts


class RmapCorruption(Exception):
    """The list is not in a state the operation allows: the kernel BUG()s (KVM_BUG_ON_DATA_CORRUPTION)."""


def desc_head(descs: np.ndarray) -> np.ndarray:
    """Head values pointing at descriptors (``(unsigned long)desc | KVM_RMAP_MANY``)."""
    return (descs.astype(np.int64) << 1) | 1


SCAN_CHUNK: Final = 1 << 18  # heads per chunk of scan_heads: 2 MiB, read once from memory
SCALAR_WALK_ROWS: Final = 8  # chain walks with at most this many chains left go on in Python
DENSE_SPAN: Final = 8  # occurrence_rounds counts per head when the heads span at most this many times their number


def scan_heads(heads: np.ndarray) -> tuple[int, np.ndarray]:
    """One pass over head values: (non-empty heads, positions of the heads in descriptor form).

    Each chunk is counted and, while still in cache, bit 0 of its heads goes into a bitmap
    (empty chunks are skipped). Only the non-zero 64-bit words of the bitmap are decoded,
    lowest set bit first: numpy's nonzero costs far more per hit on large arrays. The
    positions come in no particular order.
    """
    bitmap = np.zeros(-(-len(heads) // 64) * 8, np.uint8)
    low = np.empty(min(len(heads), SCAN_CHUNK), np.uint8)
    nonempty = 0
    for start in range(0, len(heads), SCAN_CHUNK):
        chunk = heads[start : start + SCAN_CHUNK]
        count = int(np.count_nonzero(chunk))
        if count:
            nonempty += count
            bits = low[: len(chunk)]
            np.copyto(bits, chunk, casting="unsafe")
            np.bitwise_and(bits, 1, out=bits)
            packed = np.packbits(bits.view(np.bool_), bitorder="little")
            bitmap[start // 8 : start // 8 + len(packed)] = packed
    if not nonempty:
        return 0, np.zeros(0, np.int64)
    words = bitmap.view("<u8")
    base = np.flatnonzero(words)
    words = words[base]
    base *= 64
    found = [np.zeros(0, np.int64)]
    while len(words):
        lowest = words & (~words + np.uint64(1))
        found.append(base + np.frexp(lowest.astype(np.float64))[1] - 1)
        words ^= lowest
        more = words != 0
        words, base = words[more], base[more]
    return nonempty, np.concatenate(found)


def list_heads(heads: np.ndarray) -> np.ndarray:
    """Positions, in no particular order, of the heads in descriptor form (bit 0 set)."""
    return scan_heads(heads)[1]


def occurrence_rounds(indices: np.ndarray) -> list[np.ndarray]:
    """Positions of a batch split into rounds: round r holds the r-th occurrence of every head, in input order
    (one round, when the heads are distinct: every position, in order). Distinct heads
    (the bulk case) are recognised by a count per head when they lie within DENSE_SPAN times their number of
    each other (a sort of 100k heads took 6 of add_batch's 15 ms)."""
    n = len(indices)
    if n <= 1:
        return [np.arange(n)]
    low = int(indices.min())
    if int(indices.max()) - low < DENSE_SPAN * n and int(np.bincount(indices - low).max()) == 1:
        return [np.arange(n)]
    order = np.argsort(indices, kind="stable")
    ranked = indices[order]
    starts = np.flatnonzero(np.concatenate(([True], ranked[1:] != ranked[:-1])))
    if len(starts) == n:
        return [np.arange(n)]
    rank = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    by_rank = np.argsort(rank, kind="stable")
    return np.split(order[by_rank], np.cumsum(np.bincount(rank))[:-1])


def by_row(rows: list[np.ndarray], sptes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate (row, spte) pieces and order them by row, keeping each row's order."""
    all_rows, all_sptes = np.concatenate(rows), np.concatenate(sptes)
    order = np.argsort(all_rows, kind="stable")
    return all_rows[order], all_sptes[order]


class Hit(NamedTuple):
    """Where __pte_list_remove's search found an spte, and the work the search took."""

    desc: int
    slot: int
    prev: int  # the descriptor before ``desc`` in its chain, 0 if ``desc`` is the first
    used: int  # entries in ``desc``
    depth: int  # position of ``desc`` in its chain, counted from 1
    visits: int  # descriptors visited
    reads: int  # slots read


def _one(value: int) -> np.ndarray:
    return np.array([value], np.int64)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class PteListDesign(ABC):
    """One rmap list design (the pte_list_* functions of one kernel version) with its own pool and counters.

    Defaults here are those of the counter designs (B, C, D); A overrides the NULL-scan parts.
    """

    name: ClassVar[str]
    PTE_LIST_EXT: ClassVar[int]
    DESC_BYTES: ClassVar[int]  # sizeof(struct pte_list_desc) in the kernel version mirrored
    POOL_META: ClassVar[tuple[str, ...]]
    POOL_HINTS: ClassVar[tuple[str, ...]] = ()  # per-descriptor arrays the emulation keeps for speed

    def __init__(self) -> None:
        self.costs = RmapCosts()
        self.pool = DescPool(self.PTE_LIST_EXT, self.POOL_META, self.costs, hints=self.POOL_HINTS)

    @property
    def live_descs(self) -> int:
        return self.pool.live

    # -- scalar API: one head ------------------------------------------------------------

    def add(self, heads: np.ndarray, index: int, spte: int) -> int:
        """pte_list_add: returns the count this design computes before the insert.

        One add is the common case (every fault's __rmap_add), so it runs on Python ints: numpy's
        fixed cost per call is larger than the work of one add."""
        value = heads.item(index)
        if not value:
            heads[index] = spte
            return 0
        if not value & 1:
            self._make_pair(heads, index, value, spte)
            return 1
        return self._add_to_list(heads, index, value >> 1, spte)

    def remove(self, heads: np.ndarray, index: int, spte: int) -> None:
        """__pte_list_remove: raises RmapCorruption when ``spte`` is not in the list."""
        if not self._remove_few(heads, [index], [spte]):
            self._remove_rows(heads, _one(index), _one(spte))

    def count(self, heads: np.ndarray, index: int) -> int:
        """pte_list_count."""
        return int(self.count_heads(heads[index : index + 1])[0])

    def zap(self, heads: np.ndarray, index: int) -> np.ndarray:
        """Zap the whole list (kvm_zap_rmap); returns the removed sptes in removal order. An empty or
        single-entry head is read and cleared as a Python int."""
        value = heads.item(index)
        if value & 1:
            return self.zap_heads(heads, _one(index))
        heads[index] = 0
        return np.array([value] if value else [], np.int64)

    def iterate(self, heads: np.ndarray, index: int) -> Iterator[int]:
        """for_each_rmap_spte."""
        return iter(self.gather(heads, _one(index))[1].tolist())

    # -- batch API -------------------------------------------------------------------------

    def add_batch(self, heads: np.ndarray, indices: np.ndarray, sptes: np.ndarray) -> np.ndarray:
        """pte_list_add for each (index, spte) in order; returns the pre-insert counts in input order."""
        indices, sptes = np.asarray(indices, np.int64), np.asarray(sptes, np.int64)
        rounds = occurrence_rounds(indices)
        if len(rounds) == 1:  # distinct heads: the round is the batch as it is
            return self.add_unique(heads, indices, sptes)
        counts = np.empty(len(indices), np.int64)
        for pos in rounds:
            counts[pos] = self.add_unique(heads, indices[pos], sptes[pos])
        return counts

    def remove_batch(self, heads: np.ndarray, indices: np.ndarray, sptes: np.ndarray) -> None:
        """__pte_list_remove for each (index, spte) in order."""
        indices, sptes = np.asarray(indices, np.int64), np.asarray(sptes, np.int64)
        if len(indices) <= SCALAR_WALK_ROWS:  # the usual batch: a few distinct heads, one round
            few = indices.tolist()
            if len(set(few)) == len(few) and self._remove_few(heads, few, sptes.tolist()):
                return
        rounds = occurrence_rounds(indices)
        if len(rounds) == 1:
            self.remove_unique(heads, indices, sptes)
            return
        for pos in rounds:
            self.remove_unique(heads, indices[pos], sptes[pos])

    def count_batch(self, heads: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return self.count_heads(heads[np.asarray(indices, np.int64)])

    def zap_batch(self, heads: np.ndarray, indices: np.ndarray) -> int:
        """Zap every listed head (repeats zap an already empty list); returns the number of sptes removed."""
        return len(self.zap_heads(heads, np.unique(np.asarray(indices, np.int64))))

    def count_all(self, heads: np.ndarray) -> np.ndarray:
        """pte_list_count of every head of an rmap array."""
        return self.count_heads(heads)

    # -- the operations, vectorised over distinct heads --------------------------------------

    def add_unique(self, heads: np.ndarray, indices: np.ndarray, sptes: np.ndarray) -> np.ndarray:
        """pte_list_add on distinct heads."""
        if len(indices) == 1:
            return self._add_one(heads, indices, sptes)
        values = heads[indices]
        counts = (values != 0).astype(np.int64)  # 0 empty, 1 single; lists get theirs below
        empty = np.flatnonzero(values == 0)
        single, many = self._split(values)
        heads[indices[empty]] = sptes[empty]
        if len(single):
            self._make_pairs(heads, indices[single], values[single], sptes[single])
        if len(many):
            counts[many] = self._add_many(heads, indices[many], values[many] >> 1, sptes[many])
        return counts

    def _add_one(self, heads: np.ndarray, indices: np.ndarray, sptes: np.ndarray) -> np.ndarray:
        """add_unique() of one head: add()."""
        return _one(self.add(heads, indices.item(0), sptes.item(0)))

    def remove_unique(self, heads: np.ndarray, indices: np.ndarray, sptes: np.ndarray) -> None:
        """__pte_list_remove on distinct heads; nothing changes if any spte is missing."""
        if len(indices) > SCALAR_WALK_ROWS or not self._remove_few(heads, indices.tolist(), sptes.tolist()):
            self._remove_rows(heads, indices, sptes)

    def _remove_rows(self, heads: np.ndarray, indices: np.ndarray, sptes: np.ndarray) -> None:
        """remove_unique() with numpy over the rows; the path that raises RmapCorruption."""
        values = heads[indices]
        many = (values & 1) == 1
        if ((values == 0) | (sptes <= 0) | (~many & (values != sptes))).any():
            raise RmapCorruption("__pte_list_remove: spte not in its rmap")
        if many.any():
            self._remove_many(heads, indices[many], values[many] >> 1, sptes[many])
        heads[indices[~many]] = 0

    def _remove_few(self, heads: np.ndarray, indices: list[int], sptes: list[int]) -> bool:
        """remove_unique() of a few distinct heads with Python ints: every spte is searched for first
        (_locate), then each is removed in turn (_remove_at), with the work _remove_rows would count.
        Returns False, having changed and counted nothing, when an spte is missing: _remove_rows then
        raises as it counts."""
        found = []
        for index, spte in zip(indices, sptes):
            value = heads.item(index)
            if not value or spte <= 0 or (not value & 1 and value != spte):
                return False
            hit = self._locate(value >> 1, spte) if value & 1 else None
            if value & 1 and hit is None:
                return False
            found.append((index, value >> 1, spte, hit))
        for index, first, spte, hit in found:
            if hit is None:
                heads[index] = 0
            else:
                self._remove_at(heads, index, first, spte, hit)
        return True

    def count_heads(self, values: np.ndarray) -> np.ndarray:
        """pte_list_count for an array of head values."""
        counts = (values != 0).astype(np.int64)
        many = list_heads(values)
        counts[many] = self.count_lists(values[many])
        return counts

    def count_lists(self, values: np.ndarray) -> np.ndarray:
        """pte_list_count for head values that are all in descriptor form."""
        return self._count_many(values >> 1) if len(values) else np.zeros(0, np.int64)

    def gather(self, heads: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """for_each_rmap_spte over distinct heads: (position in ``indices``, spte) in iteration order.

        rmap_get_next stops at a NULL slot in every version, so each descriptor costs a NULL scan.
        """
        values = heads[indices]
        if len(values) == 1 and values.item(0) & 1:  # one list of descriptors: nothing to merge
            return self._gather_many(values >> 1)
        single, many = self._split(values)
        entry_rows, sptes = self._gather_many(values[many] >> 1)
        return by_row([single, many[entry_rows]], [values[single], sptes])

    def _gather_many(self, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """gather() of lists in descriptor form: (row of each spte, sptes), row by row in chain order."""
        rows, descs = self._walk_chains(first)
        entry_rows, sptes, used = self._entries(rows, descs)
        self.costs.slot_reads += self._null_scan_reads(used)
        return entry_rows, sptes

    def zap_heads(self, heads: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Empty distinct heads; returns the removed sptes, head by head in removal order."""
        values = heads[indices]
        single, many = self._split(values)
        heads[indices[single]] = 0
        rows, sptes = self._zap_many(heads, indices[many], values[many] >> 1)
        return by_row([single, many[rows]], [values[single], sptes])[1]

    # -- shared building blocks --------------------------------------------------------------

    @staticmethod
    def _split(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of single-form and descriptor-form heads. Positions, not masks: indexing a large array
        with a boolean mask costs several times flatnonzero() and a take when the mask is irregular."""
        many = (values & 1) == 1
        return np.flatnonzero(~many & (values != 0)), np.flatnonzero(many)

    def _make_pairs(self, heads: np.ndarray, indices: np.ndarray, old: np.ndarray, new: np.ndarray) -> None:
        """The single -> many step of pte_list_add: a fresh descriptor holding [old, new]."""
        descs = self.pool.alloc(len(indices))
        self.pool.sptes[descs, 0] = old
        self.pool.sptes[descs, 1] = new
        self._set_used(descs, np.full(len(descs), 2))
        self.costs.slot_writes += 2 * len(descs)
        self._placed(old, descs, np.zeros(len(descs), np.int64))
        self._placed(new, descs, np.ones(len(descs), np.int64))
        heads[indices] = desc_head(descs)

    def _make_pair(self, heads: np.ndarray, index: int, old: int, new: int) -> None:
        """_make_pairs() of one head, with Python ints."""
        pool = self.pool
        desc = pool.alloc_one()
        pool.sptes_view[desc * pool.ext] = old
        pool.sptes_view[desc * pool.ext + 1] = new
        self._set_used_one(desc, 2)
        self.costs.slot_writes += 2
        self._placed_one(old, desc, 0)
        self._placed_one(new, desc, 1)
        heads[index] = (desc << 1) | 1

    def _walk_chains(self, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Follow ``more`` from each first descriptor, one chain depth per step.

        Returns (row, desc) pairs, depth by depth; every descriptor counts as a visit.
        """
        if len(first) == 1:  # one chain: its descriptors in order, read in Python
            chain = np.array(self._chain(first.item(0)), np.int64)
            self.costs.desc_visits += len(chain)
            return np.zeros(len(chain), np.int64), chain
        rows, descs = [np.arange(len(first))], [first]
        while len(descs[-1]):
            if len(descs[-1]) <= SCALAR_WALK_ROWS:
                self._walk_chains_few(rows, descs)
                break
            nxt = self.pool.more[descs[-1]]
            keep = nxt != 0
            rows.append(rows[-1][keep])
            descs.append(nxt[keep])
        all_descs = np.concatenate(descs)
        self.costs.desc_visits += len(all_descs)
        return np.concatenate(rows), all_descs

    def _walk_chains_few(self, rows: list[np.ndarray], descs: list[np.ndarray]) -> None:
        """The rest of _walk_chains once few chains are left, followed one at a time in Python (scalar reads
        of ``more`` instead of numpy calls on tiny arrays); appends the deeper (row, desc) pairs in the
        order the numpy loop gives them, depth by depth and by row within a depth."""
        found: list[tuple[int, int, int]] = []
        for row, desc in zip(rows[-1].tolist(), descs[-1].tolist()):
            found.extend((depth, row, deeper) for depth, deeper in enumerate(self._chain(desc)[1:], start=1))
        found.sort()
        rows.append(np.array([row for _, row, _ in found], rows[-1].dtype))
        descs.append(np.array([desc for _, _, desc in found], self.pool.more.dtype))

    def _chain(self, desc: int) -> list[int]:
        """Descriptor ``desc`` and those its ``more`` pointers lead to, in chain order (scalar reads)."""
        more = self.pool.more_view
        chain = []
        while desc:
            chain.append(desc)
            desc = more[desc]
        return chain

    def _entries(self, rows: np.ndarray, descs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sptes held by (row, desc) pairs: (row of each spte, sptes, entries per desc), by row then chain."""
        order = np.argsort(rows, kind="stable")
        rows, descs = rows[order], descs[order]
        used = self._used(descs)
        held = np.arange(self.PTE_LIST_EXT) < used[:, None]
        return np.repeat(rows, used), self.pool.rows(descs)[held], used

    def _find(self, first: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
        """The search loop of __pte_list_remove: walk each chain until its target is found.

        Returns (desc, slot, previous desc or 0, entries in desc, position of desc in its chain
        counted from 1) of each hit; raises RmapCorruption, before anything changes, when a chain
        ends without it. Slots past a descriptor's entries are always 0, and sptes never are, so
        whole rows compare.
        """
        n = len(first)
        hits = hit_desc, hit_slot, hit_prev, hit_used, hit_depth = tuple(np.zeros(n, np.int64) for _ in range(5))
        rows, descs, prev, wanted = (np.arange(n), first, np.zeros(n, np.int64), targets[:, None])
        depth = 1
        while len(rows):
            if len(rows) <= SCALAR_WALK_ROWS and self._find_few(rows, descs, prev, wanted[:, 0], depth, hits):
                break
            self.costs.desc_visits += len(rows)
            used = self._used(descs)
            match = self.pool.rows(descs) == wanted
            hit = match.any(axis=1)
            if hit.any():
                slot = match[hit].argmax(axis=1)
                found = rows[hit]
                hit_desc[found], hit_slot[found], hit_prev[found], hit_used[found], hit_depth[found] = (
                    descs[hit],
                    slot,
                    prev[hit],
                    used[hit],
                    depth,
                )
                self.costs.slot_reads += int(slot.sum()) + len(slot)
                miss = ~hit
                rows, descs, used, wanted = (rows[miss], descs[miss], used[miss], wanted[miss])
            self.costs.slot_reads += self._miss_reads(used)
            prev, descs = descs, self.pool.more[descs]
            depth += 1
            if not descs.all():
                raise RmapCorruption("__pte_list_remove: spte not in its rmap")
        return hits

    def _find_few(
        self,
        rows: np.ndarray,
        descs: np.ndarray,
        prev: np.ndarray,
        targets: np.ndarray,
        depth: int,
        hits: tuple[np.ndarray, ...],
    ) -> bool:
        """The rest of _find's search once few chains are left (``descs`` at chain position ``depth``), one
        chain at a time with _search; records the same hits and counts the same visits and reads. Returns
        False, having changed nothing, when a chain ends without its target: the numpy loop then raises as it
        counts."""
        found = []
        for row, desc, before, target in zip(rows.tolist(), descs.tolist(), prev.tolist(), targets.tolist()):
            hit = self._search(desc, before, depth, target)
            if hit is None:
                return False
            found.append((row, *hit))
        found_rows, *columns, visits, reads = (np.array(column, np.int64) for column in zip(*found))
        for hit_column, column in zip(hits, columns):
            hit_column[found_rows] = column
        self.costs.desc_visits += int(visits.sum())
        self.costs.slot_reads += int(reads.sum())
        return True

    def _search(self, desc: int, prev: int, depth: int, target: int) -> Hit | None:
        """__pte_list_remove's search along one chain with scalar reads, from ``desc`` (after ``prev``, at chain
        position ``depth``) to the first slot holding ``target``; None if the chain ends first. Counts nothing:
        the hit carries the descriptors visited and slots read."""
        table, more, ext = self.pool.sptes_view, self.pool.more_view, self.PTE_LIST_EXT
        visits = reads = 0
        while desc:
            visits += 1
            slots = table[desc * ext : desc * ext + ext].tolist()
            used = ext - slots.count(0)  # entries are a prefix of non-zero sptes
            if target in slots:
                slot = slots.index(target)
                return Hit(desc, slot, prev, used, depth, visits, reads + slot + 1)
            reads += self._miss_reads_one(used)
            prev, desc, depth = desc, more[desc], depth + 1
        return None

    def _locate(self, first: int, spte: int) -> Hit | None:
        """Where __pte_list_remove finds ``spte`` in the list starting at descriptor ``first``: its search."""
        return self._search(first, 0, 1, spte)

    def _null_scan_reads(self, used: np.ndarray) -> int:
        """Slots read by a scan that stops at the first NULL or the end of the array."""
        return int(np.minimum(used + 1, self.PTE_LIST_EXT).sum())

    def _count_many(self, first: np.ndarray) -> np.ndarray:
        """pte_list_count of lists in descriptor form: the sum along each chain (A, B; C and D override)."""
        rows, descs = self._walk_chains(first)
        used = self._used(descs)
        self.costs.slot_reads += self._occupancy_reads(used)
        return np.bincount(rows, weights=used, minlength=len(first)).astype(np.int64)

    def _zap_many(
        self, heads: np.ndarray, indices: np.ndarray, first: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """kvm_zap_all_rmap_sptes: one pass over every descriptor, freeing each; returns (row, spte)."""
        rows, descs = self._walk_chains(first)
        entry_rows, sptes, used = self._entries(rows, descs)
        self.costs.slot_reads += int(used.sum())
        self.pool.free(descs)
        heads[indices] = 0
        self._dropped(sptes)
        return entry_rows, sptes

    # -- per-design hooks (defaults: a descriptor with a spte_count) ----------------------------

    def _used(self, descs: np.ndarray) -> np.ndarray:
        """Entries held by each descriptor."""
        return self.pool.spte_count[descs].astype(np.int64)

    def _set_used(self, descs: np.ndarray, used: np.ndarray) -> None:
        self.pool.spte_count[descs] = used

    def _used_one(self, desc: int) -> int:
        """_used() of one descriptor, as a Python int."""
        return self.pool.spte_count_view[desc]

    def _set_used_one(self, desc: int, used: int) -> None:
        self.pool.spte_count_view[desc] = used

    def _occupancy_reads(self, used: np.ndarray) -> int:
        """Slots read to learn how many entries descriptors hold (none: the counter says)."""
        return 0

    def _miss_reads(self, used: np.ndarray) -> int:
        """Slots compared in descriptors searched without a hit (``i < spte_count``)."""
        return int(used.sum())

    def _miss_reads_one(self, used: int) -> int:
        """_miss_reads() of one descriptor."""
        return used

    def _placed(self, sptes: np.ndarray, descs: np.ndarray, slots: np.ndarray) -> None:
        """sptes were stored at (desc, slot); only D keeps track."""

    def _placed_one(self, spte: int, desc: int, slot: int) -> None:
        """_placed() of one spte."""

    def _dropped(self, sptes: np.ndarray) -> None:
        """sptes left their descriptors; only D keeps track."""

    @abstractmethod
    def _add_many(
        self, heads: np.ndarray, indices: np.ndarray, first: np.ndarray, sptes: np.ndarray
    ) -> np.ndarray:
        """pte_list_add on lists in descriptor form; returns the pre-insert counts."""

    @abstractmethod
    def _add_to_list(self, heads: np.ndarray, index: int, first: int, spte: int) -> int:
        """_add_many() of one list, with Python ints."""

    @abstractmethod
    def _remove_at(self, heads: np.ndarray, index: int, first: int, spte: int, hit: Hit) -> None:
        """_remove_many() of one list, with Python ints: ``spte`` was found at ``hit`` (_locate)."""

    @abstractmethod
    def _remove_many(
        self, heads: np.ndarray, indices: np.ndarray, first: np.ndarray, sptes: np.ndarray
    ) -> None:
        """__pte_list_remove on lists in descriptor form."""
