"""walk_ranges and zap_vmas: one walk over many ranges meets what the walks of each range would, in order."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_guest_helpers import TEST_VA, MiB, bare_process, hw, small_kernel

from kvmdbgfs.guest import teardown
from kvmdbgfs.guest.pgtable import walk, walk_ranges

PAGE = 4096
GiB = 1024 * MiB


def one_range_at_a_time(ctx, pgd, ranges):  # type: ignore[no-untyped-def]
    """The walks of each range one after the other, an entry met again dropped."""
    seen, order = set(), []
    for start, end in ranges:
        for entry in walk(ctx, pgd, start, end):
            if entry not in seen:
                seen.add(entry)
                order.append(entry)
    return order


# Areas around 2 MiB and 1 GiB boundaries, some touched: (offset from TEST_VA, pages, touched).
AREAS = st.lists(
    st.tuples(st.sampled_from([0, 2 * MiB - 3 * PAGE, 2 * MiB, 5 * MiB, GiB - PAGE, GiB + 4 * MiB]), st.integers(1, 600), st.booleans()),
    min_size=1,
    max_size=6,
)


def _mapped(areas):  # type: ignore[no-untyped-def]
    """A process with the areas that do not overlap mapped (and the touched ones touched), their ranges sorted."""
    kernel = small_kernel(memory=512 * MiB)
    task = bare_process(kernel)
    ranges: list[tuple[int, int]] = []
    for offset, pages, touched in areas:
        start, end = TEST_VA + offset, TEST_VA + offset + pages * PAGE
        if any(start < e and s < end for s, e in ranges):
            continue
        task.mmap(pages * PAGE, addr=start, name="area")
        if touched:
            task.touch(start, end, write=True, step=3)
        ranges.append((start, end))
    return kernel, task, sorted(ranges)


@settings(max_examples=25, deadline=None)
@given(AREAS)
def test_walk_ranges_meets_each_entry_once_in_the_order_of_the_single_walks(areas) -> None:  # type: ignore[no-untyped-def]
    kernel, task, ranges = _mapped(areas)
    assert list(walk_ranges(kernel.ctx, task.mm.pgd, ranges)) == one_range_at_a_time(kernel.ctx, task.mm.pgd, ranges)


@settings(max_examples=15, deadline=None)
@given(AREAS)
def test_zap_vmas_gives_the_events_of_zapping_each_vma_in_turn(areas) -> None:  # type: ignore[no-untyped-def]
    """The same stores, flushes and frees as unmap_page_range of each VMA in turn (zap_pmd over single walks)."""
    runs = []
    for together in (True, False):
        kernel, task, _ = _mapped(areas)
        mm, ctx = task.mm, kernel.ctx
        start = len(hw(kernel).events)
        tlb = teardown.MmuGather(ctx, mm, fullmm=False)
        if together:
            teardown.zap_vmas(ctx, tlb, mm, list(mm.vmas), 0, 1 << 47)
        else:
            for vma in mm.vmas:
                for level, va, table, index in walk(ctx, mm.pgd, vma.start, vma.end):
                    if level == 2:
                        teardown.zap_pmd(ctx, tlb, mm, va, table, index, [(vma.start, vma.end)])
        tlb.finish()
        runs.append((hw(kernel).events[start:], ctx.pages.refcount.copy(), ctx.pages.nr_free))
    (events, refcount, nr_free), (single_events, single_refcount, single_nr_free) = runs
    assert events == single_events
    assert np.array_equal(refcount, single_refcount) and nr_free == single_nr_free
