"""The kernel's documented corner cases of each rmap list design (reference §1, cost table §1.4)."""

from __future__ import annotations

import numpy as np
import pytest

from kvmdbgfs.arch.x86.mmu.pte_list import PTE_LIST_DESIGNS, PteListDesign, RmapCorruption, make_pte_list

ALL = PTE_LIST_DESIGNS


def sptes(n: int, start: int = 1) -> list[int]:
    return [8 * k for k in range(start, start + n)]


def filled(name: str, n: int, index: int = 0, nheads: int = 2) -> tuple[PteListDesign, np.ndarray, list[int]]:
    """A design with ``n`` sptes added one by one to head ``index``."""
    design, heads = make_pte_list(name), np.zeros(nheads, np.int64)
    added = sptes(n)
    for spte in added:
        design.add(heads, index, spte)
    return design, heads, added


def chain(design: PteListDesign, head: int) -> list[list[int]]:
    """The descriptors of a list in chain order, as the sptes each holds."""
    descs, desc = [], int(head) >> 1
    while desc:
        descs.append([int(s) for s in design.pool.sptes[desc] if s])
        desc = int(design.pool.more[desc])
    return descs


def cost_of(design: PteListDesign, operation) -> dict[str, int]:
    design.costs.reset()
    operation()
    return design.costs.as_dict()


def test_registry_and_layouts() -> None:
    assert PTE_LIST_DESIGNS == ("A", "B", "C", "D")
    layouts = {name: (make_pte_list(name).PTE_LIST_EXT, make_pte_list(name).DESC_BYTES) for name in ALL}
    assert layouts == {"A": (3, 32), "B": (14, 128), "C": (14, 128), "D": (14, 128)}
    assert all(make_pte_list(name).name == name for name in ALL)
    with pytest.raises(ValueError, match="unknown rmap design"):
        make_pte_list("E")


@pytest.mark.parametrize("name", ALL)
def test_head_encoding_and_no_collapse(name: str) -> None:
    design, heads = make_pte_list(name), np.zeros(1, np.int64)
    assert design.add(heads, 0, 8) == 0 and heads[0] == 8
    assert design.add(heads, 0, 16) == 1 and heads[0] & 1 == 1
    design.remove(heads, 0, 8)
    assert heads[0] & 1 == 1, "a one-entry descriptor stays a descriptor"
    assert design.count(heads, 0) == 1 and list(design.iterate(heads, 0)) == [16] and design.live_descs == 1
    design.remove(heads, 0, 16)
    assert heads[0] == 0 and design.live_descs == 0
    assert design.costs.allocs == design.costs.frees == 1


@pytest.mark.parametrize("name", ALL)
def test_add_returns_the_exact_pre_insert_count_on_a_compact_list(name: str) -> None:
    design, heads = make_pte_list(name), np.zeros(1, np.int64)
    assert [design.add(heads, 0, spte) for spte in sptes(100)] == list(range(100))
    assert design.count(heads, 0) == 100


@pytest.mark.parametrize(
    ("name", "n", "expected"), [("A", 9, 2), ("B", 42, 13), ("C", 42, 41), ("D", 42, 41)]
)
def test_under_estimate_on_a_fragmented_chain(name: str, n: int, expected: int) -> None:
    """A/B stop at the first non-full descriptor: a hole near the head hides everything after it."""
    design, heads, added = filled(name, n)
    design.remove(heads, 0, added[-1] if name in "CD" else added[0])
    assert design.count(heads, 0) == n - 1
    assert design.add(heads, 0, 8 * 1000) == expected
    assert design.count(heads, 0) == n


def test_a_under_estimate_from_a_hole_mid_chain() -> None:
    design, heads, added = filled("A", 9)
    design.remove(heads, 0, added[4])  # second descriptor: [s3, s5]
    assert chain(design, heads[0]) == [added[0:3], [added[3], added[5]], added[6:9]]
    assert design.add(heads, 0, 8 * 1000) == 5
    assert chain(design, heads[0])[1] == [added[3], added[5], 8 * 1000]


@pytest.mark.parametrize("name", ["A", "B"])
def test_tail_designs_fill_a_hole_from_the_same_descriptor(name: str) -> None:
    ext = make_pte_list(name).PTE_LIST_EXT
    design, heads, added = filled(name, 2 * ext + 1)
    design.remove(heads, 0, added[ext])  # first slot of the second descriptor
    assert chain(design, heads[0]) == [
        added[:ext],
        [added[2 * ext - 1], *added[ext + 1 : 2 * ext - 1]],
        added[2 * ext :],
    ]


@pytest.mark.parametrize("name", ["C", "D"])
def test_head_designs_insert_at_the_head_and_fill_holes_from_it(name: str) -> None:
    design, heads, added = filled(name, 30)
    assert chain(design, heads[0]) == [added[28:], added[14:28], added[:14]]
    assert list(design.iterate(heads, 0)) == added[28:] + added[14:28] + added[:14]
    design.remove(heads, 0, added[0])  # oldest: the tail; the head's last entry fills it
    assert chain(design, heads[0]) == [added[28:29], added[14:28], [added[29], *added[1:14]]]
    design.remove(heads, 0, added[28])  # the head empties and is freed
    assert chain(design, heads[0]) == [added[14:28], [added[29], *added[1:14]]]
    assert design.live_descs == 2


@pytest.mark.parametrize("name", ["A", "B"])
def test_tail_designs_iterate_in_insertion_order(name: str) -> None:
    design, heads, added = filled(name, 31)
    assert list(design.iterate(heads, 0)) == added


@pytest.mark.parametrize(
    ("name", "n", "visits", "allocs"),
    [
        ("A", 1, 0, 1),
        ("A", 7, 3, 0),
        ("A", 9, 3, 1),
        ("B", 27, 2, 0),
        ("B", 28, 2, 1),
        ("B", 30, 3, 0),
        ("C", 2, 1, 0),
        ("C", 28, 1, 1),
        ("C", 500, 1, 0),
        ("D", 28, 1, 1),
    ],
)
def test_add_costs(name: str, n: int, visits: int, allocs: int) -> None:
    """Reference §1.4: A/B visit every descriptor of a compact list, C/D only the head."""
    design, heads, _ = filled(name, n)
    costs = cost_of(design, lambda: design.add(heads, 0, 8 * 10_000))
    assert (costs["desc_visits"], costs["allocs"]) == (visits, allocs)


@pytest.mark.parametrize(
    ("name", "position", "visits"), [("A", 0, 1), ("A", 7, 3), ("B", 20, 2), ("B", 29, 3)]
)
def test_tail_remove_costs_grow_with_the_position_from_the_oldest(
    name: str, position: int, visits: int
) -> None:
    design, heads, added = filled(name, 30)
    costs = cost_of(design, lambda: design.remove(heads, 0, added[position]))
    assert costs["desc_visits"] == visits


@pytest.mark.parametrize(("name", "newest", "oldest"), [("C", 1, 4), ("D", 1, 2)])
def test_c_remove_costs_grow_with_the_distance_from_the_newest_and_d_does_not(
    name: str, newest: int, oldest: int
) -> None:
    design, heads, added = filled(name, 30)
    assert cost_of(design, lambda: design.remove(heads, 0, added[-1]))["desc_visits"] == newest
    assert cost_of(design, lambda: design.remove(heads, 0, added[0]))["desc_visits"] == oldest


@pytest.mark.parametrize(("name", "visits", "reads"), [("A", 10, 30), ("B", 3, 0), ("C", 1, 0), ("D", 1, 0)])
def test_count_costs(name: str, visits: int, reads: int) -> None:
    design, heads, _ = filled(name, 30)
    costs = cost_of(design, lambda: design.count(heads, 0))
    assert (costs["desc_visits"], costs["slot_reads"]) == (visits, reads)


def test_a_zaps_by_removing_the_first_entry_until_empty() -> None:
    design, heads, added = filled("A", 7)
    costs = cost_of(
        design,
        lambda: np.testing.assert_array_equal(
            design.zap(heads, 0), [added[i] for i in (0, 2, 1, 3, 5, 4, 6)]
        ),
    )
    assert (costs["desc_visits"], costs["frees"]) == (7, 3)
    assert heads[0] == 0 and design.live_descs == 0


@pytest.mark.parametrize("name", ["B", "C", "D"])
def test_counter_designs_zap_in_one_pass(name: str) -> None:
    design, heads, added = filled(name, 30)
    order = list(design.iterate(heads, 0))
    costs = cost_of(design, lambda: np.testing.assert_array_equal(design.zap(heads, 0), order))
    assert (costs["desc_visits"], costs["slot_reads"], costs["frees"]) == (3, 30, 3)
    assert heads[0] == 0 and design.live_descs == 0 and sorted(order) == added


@pytest.mark.parametrize("name", ALL)
def test_removing_an_absent_spte_is_corruption_and_changes_nothing(name: str) -> None:
    design, heads, added = filled(name, 20, index=1, nheads=3)
    heads[2] = 8 * 5000
    before = (heads.copy(), design.live_descs, list(design.iterate(heads, 1)))
    for index, spte in ((0, 8), (2, 8), (1, 8 * 6000), (1, 8 * 1_000_000)):
        with pytest.raises(RmapCorruption):
            design.remove(heads, index, spte)
    for index in (0, 2):  # one round: checked before anything changes
        with pytest.raises(RmapCorruption):
            design.remove_batch(heads, np.array([1, index]), np.array([added[0], 8]))
    assert (heads.tolist(), design.live_descs, list(design.iterate(heads, 1))) == (
        before[0].tolist(),
        before[1],
        before[2],
    )
    with pytest.raises(RmapCorruption):  # same head twice: the first removal happened, as one by one
        design.remove_batch(heads, np.array([1, 1]), np.array([added[0], 8 * 6000]))
    assert design.count(heads, 1) == 19 and added[0] not in design.iterate(heads, 1)


@pytest.mark.parametrize("name", ALL)
def test_batches_with_repeated_heads(name: str) -> None:
    design, heads = make_pte_list(name), np.zeros(3, np.int64)
    counts = design.add_batch(heads, np.array([0, 1, 0, 0, 1, 2]), np.array(sptes(6)))
    assert counts.tolist() == [0, 0, 1, 2, 1, 0]
    assert design.count_batch(heads, np.array([2, 0, 0])).tolist() == [1, 3, 3]
    assert design.count_all(heads).tolist() == [3, 2, 1]
    design.remove_batch(heads, np.array([0, 0, 1]), np.array([8, 32, 16]))
    assert [list(design.iterate(heads, i)) for i in range(3)] == [[24], [40], [48]]
    assert design.zap_batch(heads, np.array([0, 2, 0, 1])) == 3
    assert heads.tolist() == [0, 0, 0] and design.live_descs == 0


@pytest.mark.parametrize("name", ALL)
def test_pool_grows_geometrically_and_reuses_freed_descriptors(name: str) -> None:
    design, heads = make_pte_list(name), np.zeros(200, np.int64)
    indices = np.repeat(np.arange(200), 20)
    design.add_batch(heads, indices, 8 * np.arange(1, len(indices) + 1))
    capacity, live = design.pool.capacity, design.live_descs
    assert live == design.costs.allocs - design.costs.frees and capacity >= live + 1
    assert capacity & (capacity - 1) == 0, "capacity doubles from 64"
    assert design.zap_batch(heads, np.arange(200)) == len(indices) and design.live_descs == 0
    design.add_batch(heads, indices, 8 * np.arange(1, len(indices) + 1))
    assert design.pool.capacity == capacity and design.live_descs == live


@pytest.mark.parametrize("name", ALL)
def test_descriptor_memory_matches_the_kernel(name: str) -> None:
    design = make_pte_list(name)
    assert abs(design.pool.bytes_per_desc - design.DESC_BYTES) <= 0.1 * design.DESC_BYTES


def test_d_back_pointers_follow_every_move_and_are_cleared() -> None:
    design, heads, added = filled("D", 30)
    design.remove(heads, 0, added[0])
    for desc, row in enumerate(design.pool.sptes):
        for slot, spte in enumerate(row[: design.pool.spte_count[desc]].tolist()):
            assert design.rmap_pos[spte >> 3] == desc * 16 + slot
    design.zap(heads, 0)
    assert not design.rmap_pos.any()
    with pytest.raises(RmapCorruption):
        design.remove(heads, 0, added[1])


def test_costs_reset_and_as_dict() -> None:
    design, _, _ = filled("B", 20)
    assert set(design.costs.as_dict()) == {"desc_visits", "slot_reads", "slot_writes", "allocs", "frees"}
    design.costs.reset()
    assert not any(design.costs.as_dict().values())
