"""Property tests: every design against a multiset-per-head model, and batches against one-by-one calls.

Settings are explicit (examples, steps, no deadline) so the run time stays bounded in CI.
"""

from __future__ import annotations

import copy
import functools
import pickle
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmdbgfs.arch.x86.mmu.memslot import PG_LEVEL_2M, PG_LEVEL_4K, KvmMemorySlot, gfn_to_index
from kvmdbgfs.arch.x86.mmu.pte_list import PTE_LIST_DESIGNS, PteListDesign, RmapCorruption, make_pte_list
from kvmdbgfs.arch.x86.mmu.pte_list_backptr import CHUNK_ENTRIES
from kvmdbgfs.arch.x86.mmu.rmap import RMAP_RECYCLE_THRESHOLD, KvmRmaps

NHEADS = 4
MACHINE_SETTINGS = settings(
    max_examples=30, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
EQUIVALENCE_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_heads(design: PteListDesign, heads: np.ndarray, model: list[Counter]) -> list[int]:
    """One head array against the model; returns the descriptors its chains hold."""
    pool, reachable = design.pool, []
    assert design.count_all(heads).tolist() == [sum(m.values()) for m in model]
    assert design.count_batch(heads, np.arange(len(heads))).tolist() == [sum(m.values()) for m in model]
    for index in sorted({*np.flatnonzero(heads).tolist(), *(i for i, m in enumerate(model) if m)}):
        head = int(heads[index])
        assert design.count(heads, index) == sum(model[index].values())
        assert Counter(design.iterate(heads, index)) == model[index]
        if head & 1:
            chain = []
            desc = head >> 1
            while desc:
                chain.append(desc)
                desc = int(pool.more[desc])
            reachable += chain
            used = [np.count_nonzero(pool.sptes[d]) for d in chain]
            assert all(used) and all(not pool.sptes[d, u:].any() for d, u in zip(chain, used)), (
                "entries are a prefix"
            )
            if "spte_count" in pool.meta:
                assert [int(pool.spte_count[d]) for d in chain] == used
            if "room" in pool.zeroed and pool.room_depth[chain[0]]:
                depth = int(pool.room_depth[chain[0]])
                assert chain[depth - 1] == pool.room[chain[0]], "the hint names a descriptor of its list"
                assert all(u == design.PTE_LIST_EXT for u in used[: depth - 1]), "all before the hint are full"
            if "tail_count" in pool.meta:
                assert all(u == design.PTE_LIST_EXT for u in used[1:]), "non-head descriptors are full"
                assert [int(pool.tail_count[d]) for d in chain] == [
                    sum(used[k + 1 :]) for k in range(len(chain))
                ]
    return reachable


def check_lists(design: PteListDesign, arrays: list[tuple[np.ndarray, list[Counter]]]) -> None:
    """Counts, iteration contents, chain shape and pool accounting of all head arrays against the model."""
    pool, reachable = design.pool, []
    for heads, model in arrays:
        reachable += check_heads(design, heads, model)
    assert len(set(reachable)) == len(reachable) == design.live_descs
    assert design.costs.allocs - design.costs.frees == design.live_descs
    free = set(pool.free_ids[: pool.nfree].tolist())
    assert free.isdisjoint(reachable) and len(free) + len(reachable) == pool.capacity - 1
    idle = sorted(free | {0})
    assert not pool.sptes[idle].any() and not any(getattr(pool, name)[idle].any() for name in pool.zeroed), (
        "free descriptors are zeroed, hints included"
    )
    if design.name == "D":
        in_descs = {int(s): (d, k) for d in reachable for k, s in enumerate(pool.sptes[d]) if s}
        assert design.rmap_pos.count_nonzero() == len(in_descs)
        assert all(design.rmap_pos[s >> 3] == d * 16 + k for s, (d, k) in in_descs.items())


def forget_hints(design: PteListDesign) -> None:
    """Drop every hint the design keeps for speed (0 = no hint), so its next call works from the heads."""
    for name in design.POOL_HINTS:
        getattr(design.pool, name)[:] = 0


def numpy_only(design: PteListDesign) -> PteListDesign:
    """``design`` with its Python-int paths for one list routed to the numpy paths they stand for."""

    def add_to_list(heads: np.ndarray, index: int, first: int, spte: int) -> int:
        return int(design._add_many(heads, np.array([index]), np.array([first]), np.array([spte]))[0])

    design._add_to_list = add_to_list  # type: ignore[method-assign]
    design._remove_few = lambda heads, indices, sptes: False  # type: ignore[method-assign]
    design.zap = lambda heads, index: design.zap_heads(heads, np.array([index]))  # type: ignore[method-assign]
    return design


class PteListMachine(RuleBasedStateMachine):
    """Random add / remove / zap, scalar and batch, on a few heads of one design; every call is also made on
    a twin that takes the numpy paths only and has its hints dropped before each call, and must give the same
    result, lists (descriptor ids included) and counted work."""

    design_name = "C"

    def __init__(self) -> None:
        super().__init__()
        self.design = make_pte_list(self.design_name)
        self.heads = np.zeros(NHEADS, np.int64)
        self.twin = numpy_only(make_pte_list(self.design_name))
        self.twin_heads = np.zeros(NHEADS, np.int64)
        self.model = [Counter() for _ in range(NHEADS)]
        self.next_spte = 1
        self.gone: list[int] = []

    def both(self, call: Callable[[PteListDesign, np.ndarray], Any]) -> Any:
        """``call(design, heads)`` on the design and on its twin: the same outcome (a result, or RmapCorruption,
        re-raised), the same heads (descriptor ids included) and the same work counted."""
        forget_hints(self.twin)
        outcomes, work = [], []
        for design, heads in ((self.design, self.heads), (self.twin, self.twin_heads)):
            before = design.costs.as_dict()
            try:
                result = call(design, heads)
                outcomes.append(result.tolist() if isinstance(result, np.ndarray) else result)
            except RmapCorruption:
                outcomes.append(RmapCorruption)
            work.append(({name: n - before[name] for name, n in design.costs.as_dict().items()}, design.live_descs))
        assert outcomes[0] == outcomes[1]
        assert self.heads.tolist() == self.twin_heads.tolist()
        assert work[0] == work[1]
        if outcomes[0] is RmapCorruption:
            raise RmapCorruption("as the twin")
        return result

    def fresh(self, n: int) -> np.ndarray:
        self.next_spte += n
        return 8 * np.arange(self.next_spte - n, self.next_spte)

    @rule(chunks=st.integers(1, 3), before=st.integers(1, 40))
    def skip_ahead(self, chunks: int, before: int) -> None:
        """The next sptes start ``before`` short of a chunk boundary of D's back-pointer table, ``chunks``
        chunks on (so batches straddle a boundary and chunks in between stay unallocated); never back."""
        self.next_spte = ((self.next_spte + before) // CHUNK_ENTRIES + chunks) * CHUNK_ENTRIES - before

    def entries(self) -> list[tuple[int, int]]:
        return [(index, spte) for index, m in enumerate(self.model) for spte in m]

    def check_count(self, index: int, count: int) -> None:
        """C and D count exactly; A and B may under-estimate (never over-)."""
        size = sum(self.model[index].values())
        assert count == size if self.design_name in "CD" else count <= size

    @rule(index=st.integers(0, NHEADS - 1))
    def add(self, index: int) -> None:
        spte = int(self.fresh(1)[0])
        self.check_count(index, self.both(lambda design, heads: design.add(heads, index, spte)))
        self.model[index][spte] += 1

    @rule(indices=st.lists(st.integers(0, NHEADS - 1), min_size=1, max_size=48))
    def add_batch(self, indices: list[int]) -> None:
        sptes = self.fresh(len(indices))
        counts = self.both(lambda design, heads: design.add_batch(heads, np.array(indices), sptes))
        for index, spte, count in zip(indices, sptes.tolist(), counts.tolist()):
            self.check_count(index, count)
            self.model[index][spte] += 1

    @rule(index=st.integers(0, NHEADS - 1), n=st.integers(2, 64))
    def grow(self, index: int, n: int) -> None:
        """Many adds to one head in one batch: chains of several descriptors."""
        self.add_batch([index] * n)

    @precondition(lambda self: any(self.model))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        index, spte = data.draw(st.sampled_from(self.entries()))
        self.both(lambda design, heads: design.remove(heads, index, spte))
        self.model[index][spte] -= 1
        self.model[index] += Counter()  # drop zero counts
        self.gone.append(spte)

    @precondition(lambda self: any(self.model))
    @rule(data=st.data())
    def remove_batch(self, data: st.DataObject) -> None:
        picked = data.draw(st.lists(st.sampled_from(self.entries()), min_size=1, max_size=40, unique=True))
        picked = data.draw(st.permutations(picked))
        self.both(
            lambda design, heads: design.remove_batch(
                heads, np.array([i for i, _ in picked]), np.array([s for _, s in picked])
            )
        )
        for index, spte in picked:
            self.model[index][spte] -= 1
            self.gone.append(spte)
        self.model = [m + Counter() for m in self.model]

    @rule(index=st.integers(0, NHEADS - 1), data=st.data())
    def remove_absent(self, index: int, data: st.DataObject) -> None:
        spte = data.draw(st.sampled_from([*self.gone, int(self.fresh(1)[0])]))
        with pytest.raises(RmapCorruption):
            self.both(lambda design, heads: design.remove(heads, index, spte))

    @rule(index=st.integers(0, NHEADS - 1))
    def zap(self, index: int) -> None:
        assert Counter(self.both(lambda design, heads: design.zap(heads, index))) == self.model[index]
        self.gone += list(self.model[index])
        self.model[index] = Counter()

    @rule(indices=st.lists(st.integers(0, NHEADS - 1), max_size=8))
    def zap_batch(self, indices: list[int]) -> None:
        assert self.both(lambda design, heads: design.zap_batch(heads, np.array(indices, np.int64))) == sum(
            sum(self.model[i].values()) for i in set(indices)
        )
        for index in set(indices):
            self.gone += list(self.model[index])
            self.model[index] = Counter()

    @rule()
    def pickle_and_restore(self) -> None:
        """The boot cache pickles VMs: a restored design (hints included) goes on as the original would."""
        self.design = pickle.loads(pickle.dumps(self.design))

    @invariant()
    def lists_agree_with_the_model(self) -> None:
        check_lists(self.design, [(self.heads, self.model)])

    def teardown(self) -> None:
        self.design.zap_batch(self.heads, np.arange(NHEADS))
        assert self.design.live_descs == 0 and not self.heads.any()


SLOT_BASE, SLOT_PAGES = 0x1000, 1024
# Both hot gfns hold RMAP_RECYCLE_THRESHOLD - 10 sptes when an example starts.
HOT_GFNS = (SLOT_BASE + 3, SLOT_BASE + 700)


@functools.cache
def near_threshold(design: str) -> tuple[KvmRmaps, KvmMemorySlot]:
    """Built once per design (A's adds are O(n)); every example starts from a deep copy."""
    rmaps = KvmRmaps(design, SimpleNamespace(max_mmu_rmap_size=0))
    slot = KvmMemorySlot(id=0, as_id=0, base_gfn=SLOT_BASE, npages=SLOT_PAGES)
    slot.alloc_rmaps()
    n = RMAP_RECYCLE_THRESHOLD - 10
    rmaps.rmap_add_batch(slot, np.repeat(HOT_GFNS, n), PG_LEVEL_4K, 8 * np.arange(1, 2 * n + 1))
    return rmaps, slot


def start(design: str) -> tuple[KvmRmaps, KvmMemorySlot]:
    rmaps, slot = copy.deepcopy(near_threshold(design))
    rmaps.vm_stat.max_mmu_rmap_size = 0  # cleared, as by writing 0 to the file
    return rmaps, slot


def head_gfn(index: int, level: int) -> int:
    """A gfn whose rmap head at ``level`` is ``index``."""
    shift = 9 * (level - 1)
    return max(SLOT_BASE, ((SLOT_BASE >> shift) + index) << shift)


gfn_choice = st.one_of(st.sampled_from(HOT_GFNS), st.integers(SLOT_BASE, SLOT_BASE + SLOT_PAGES - 1))


class RmapsMachine(RuleBasedStateMachine):
    """KvmRmaps around the recycle threshold: max_mmu_rmap_size, recycles and the zapped sptes returned,
    against a model."""

    design_name = "C"

    @initialize()
    def setup(self) -> None:
        self.rmaps, self.slot = start(self.design_name)
        self.zapped: Counter = Counter()  # every spte the engine returned as removed (recycles and zaps)
        self.expected_zapped: Counter = Counter()
        n = RMAP_RECYCLE_THRESHOLD - 10
        self.model = {
            (PG_LEVEL_4K, gfn - SLOT_BASE): list(range(8 + 8 * n * k, 8 + 8 * n * (k + 1), 8))
            for k, gfn in enumerate(HOT_GFNS)
        }
        self.next_spte = 2 * n + 1
        self.max_stat = self.recycles = self.recycled_lists = 0

    @rule(
        gfns=st.lists(gfn_choice, min_size=1, max_size=40), level=st.sampled_from([PG_LEVEL_4K, PG_LEVEL_2M])
    )
    def add_batch(self, gfns: list[int], level: int) -> None:
        sptes = 8 * np.arange(self.next_spte, self.next_spte + len(gfns))
        self.next_spte += len(gfns)
        if len(gfns) == 1:
            adds = self.rmaps.rmap_add(self.slot, gfns[0], level, int(sptes[0]))
        else:
            adds = self.rmaps.rmap_add_batch(self.slot, np.array(gfns), level, sptes)
        self.recycled_lists += len(adds.recycled)
        for recycled in adds.recycled:
            self.zapped.update(recycled.tolist())
        for gfn, spte, count in zip(gfns, sptes.tolist(), adds.counts.tolist()):
            entries = self.model.setdefault((level, int(gfn_to_index(gfn, SLOT_BASE, level))), [])
            assert count == len(entries) if self.design_name in "CD" else count <= len(entries)
            entries.append(spte)
            self.max_stat = max(self.max_stat, count)
            if count > RMAP_RECYCLE_THRESHOLD:
                self.expected_zapped.update(entries)
                entries.clear()
                self.recycles += 1

    @rule(gfn=st.sampled_from(HOT_GFNS), n=st.integers(1, 30))
    def flood(self, gfn: int, n: int) -> None:
        """Push a hot list towards and past RMAP_RECYCLE_THRESHOLD."""
        self.add_batch([gfn] * n, PG_LEVEL_4K)

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data())
    def remove_batch(self, data: st.DataObject) -> None:
        present = [(key, spte) for key, entries in self.model.items() for spte in entries]
        picked = data.draw(st.lists(st.sampled_from(present), min_size=1, max_size=30, unique=True))
        for level in (PG_LEVEL_4K, PG_LEVEL_2M):
            mine = [(index, spte) for (lvl, index), spte in picked if lvl == level]
            gfns = np.array([head_gfn(index, level) for index, _ in mine], np.int64)
            self.rmaps.rmap_remove_batch(self.slot, gfns, level, np.array([s for _, s in mine], np.int64))
        for key, spte in picked:
            self.model[key].remove(spte)

    @rule(start_gfn=st.integers(SLOT_BASE - 4, SLOT_BASE + SLOT_PAGES), length=st.integers(0, 600))
    def zap_gfn_range(self, start_gfn: int, length: int) -> None:
        end_gfn = start_gfn + length
        lo, hi = max(start_gfn, SLOT_BASE), min(end_gfn, SLOT_BASE + SLOT_PAGES)
        expected = 0
        for (level, index), entries in self.model.items():
            first, last = (gfn_to_index(g, SLOT_BASE, level) for g in (lo, hi - 1))
            if lo < hi and first <= index <= last:
                expected += len(entries)
                self.expected_zapped.update(entries)
                entries.clear()
        zapped = self.rmaps.zap_gfn_range(self.slot, start_gfn, end_gfn)
        assert len(zapped) == expected
        self.zapped.update(zapped.tolist())

    @invariant()
    def agrees_with_the_model(self) -> None:
        pte_list = self.rmaps.pte_list
        assert self.rmaps.vm_stat.max_mmu_rmap_size == self.max_stat
        assert self.recycled_lists == self.recycles, "one array per recycled list, for one flush each"
        assert self.zapped == self.expected_zapped
        arrays = []
        for level, heads in enumerate(self.slot.rmap, start=1):
            model = [Counter(self.model.get((level, i), [])) for i in range(len(heads))]
            arrays.append((heads, model))
        check_lists(pte_list, arrays)

    def teardown(self) -> None:
        if hasattr(self, "rmaps"):
            self.rmaps.zap_gfn_range(self.slot, 0, 1 << 40)
            assert self.rmaps.pte_list.live_descs == 0


for _name in PTE_LIST_DESIGNS:
    for _machine in (PteListMachine, RmapsMachine):
        _case = type(f"{_machine.__name__}{_name}", (_machine,), {"design_name": _name}).TestCase
        _case.settings = MACHINE_SETTINGS
        globals()[f"Test{_machine.__name__}{_name}"] = _case
del _name, _machine, _case


def state(rmaps: KvmRmaps, slot: KvmMemorySlot) -> tuple:
    """What a batch must reproduce: stats, costs, pool occupancy, then every list in iteration order."""
    before = (vars(rmaps.vm_stat).copy(), rmaps.pte_list.costs.as_dict(), rmaps.pte_list.live_descs)
    lists = [[list(rmaps.pte_list.iterate(heads, i)) for i in np.flatnonzero(heads).tolist()] for heads in slot.rmap]
    return before, lists


def contents(rmaps: KvmRmaps, slot: KvmMemorySlot, level: int) -> list[tuple[int, int]]:
    heads = slot.rmap[level - 1]
    return [(int(i), s) for i in np.flatnonzero(heads) for s in rmaps.pte_list.iterate(heads, int(i))]


Vm = tuple[KvmRmaps, KvmMemorySlot]


def add_both(batch: Vm, one_by_one: Vm, data: st.DataObject, level: int, first_spte: int) -> int:
    """The same adds, with a flood of one hot gfn mixed in, as one batch and one by one: the same counts and
    the same recycled sptes, list by list in the same order."""
    flood = [data.draw(st.sampled_from(HOT_GFNS))] * data.draw(st.integers(0, 25))
    others = data.draw(st.lists(gfn_choice, min_size=1, max_size=30))
    gfns = data.draw(st.permutations(others + flood))
    sptes = 8 * np.arange(first_spte, first_spte + len(gfns))
    adds = batch[0].rmap_add_batch(batch[1], np.array(gfns), level, sptes)
    singles = [one_by_one[0].rmap_add(one_by_one[1], g, level, int(s)) for g, s in zip(gfns, sptes)]
    assert adds.counts.tolist() == [count for one in singles for count in one.counts.tolist()]
    assert [r.tolist() for r in adds.recycled] == [r.tolist() for one in singles for r in one.recycled]
    return len(gfns)


def remove_both(batch: Vm, one_by_one: Vm, data: st.DataObject, level: int) -> None:
    """The same removals as one batch and one by one (listing both costs the same on both sides)."""
    present = contents(*batch, level)
    assert present == contents(*one_by_one, level)
    if present:
        picked = data.draw(st.lists(st.sampled_from(present), min_size=1, max_size=30, unique=True))
        gfns = np.array([head_gfn(i, level) for i, _ in picked])
        sptes = np.array([s for _, s in picked])
        batch[0].rmap_remove_batch(batch[1], gfns, level, sptes)
        for gfn, spte in zip(gfns.tolist(), sptes.tolist()):
            one_by_one[0].rmap_remove(one_by_one[1], gfn, level, spte)


@given(design=st.sampled_from(PTE_LIST_DESIGNS), data=st.data())
@EQUIVALENCE_SETTINGS
def test_a_batch_leaves_the_state_of_the_same_calls_one_by_one(design: str, data: st.DataObject) -> None:
    batch, one_by_one = start(design), start(design)
    next_spte = 10_000
    for _ in range(data.draw(st.integers(1, 6))):
        level = data.draw(st.sampled_from([PG_LEVEL_4K, PG_LEVEL_2M]))
        if data.draw(st.booleans()):
            next_spte += add_both(batch, one_by_one, data, level, next_spte)
        else:
            remove_both(batch, one_by_one, data, level)
    assert state(*batch) == state(*one_by_one)
