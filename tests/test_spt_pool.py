"""SptPool: ``revoke_seq`` moves on every store that may take a translation away; ``get`` (ndarray.item bound
to the live spt array) reads the live sptes after growth, pickling (boot snapshots) and deep copies."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmdbgfs.arch.x86.mmu.spt_pool import INITIAL_PAGES, SptPool
from kvmdbgfs.arch.x86.mmu.spte import (
    PAGE_SHIFT,
    PT64_NX_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    SPTE_MMU_PRESENT_MASK,
    make_nonleaf_spte,
)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda pool: pickle.loads(pickle.dumps(pool))])
def test_get_reads_the_live_sptes_of_a_grown_and_cloned_pool(clone) -> None:
    pool = SptPool()
    ids = [pool.alloc(1) for _ in range(INITIAL_PAGES + 1)]  # past the initial rows: the arrays doubled
    pool.set(ids[-1], 3, 0x1234)
    assert pool.get(ids[-1], 3) == 0x1234
    twin = clone(pool)
    twin.set(ids[-1], 4, 0x99)
    pool.set(ids[-1], 5, 0x77)
    assert (twin.get(ids[-1], 3), twin.get(ids[-1], 4), twin.get(ids[-1], 5)) == (0x1234, 0x99, 0)
    assert (pool.get(ids[-1], 4), pool.get(ids[-1], 5)) == (0, 0x77)


PRESENT = SPTE_MMU_PRESENT_MASK | PT_PRESENT_MASK


@pytest.mark.parametrize(
    "old, new, revoked",
    [
        (PRESENT | PT_WRITABLE_MASK | 0x5000, PRESENT | 0x5000, True),  # loses W
        (PRESENT | PT_USER_MASK | 0x5000, PRESENT | 0x5000, True),  # loses U
        (PRESENT | 0x5000, 0, True),  # cleared
        (PRESENT | 0x5000, PRESENT | PT64_NX_MASK | 0x5000, True),  # gains NX
        (PRESENT | 0x5000, PRESENT | 0x6000, True),  # another frame (or child page)
        (PRESENT | 0x5000, PRESENT | PT_PAGE_SIZE_MASK | 0x5000, True),  # another page size
        (PRESENT | 0x5000, PRESENT | PT_WRITABLE_MASK | PT_USER_MASK | 0x5000, False),  # gains W and U
        (PRESENT | PT64_NX_MASK | 0x5000, PRESENT | 0x5000, False),  # loses NX
        (0, PRESENT | PT64_NX_MASK | 0x5000, False),  # a new translation
    ],
)
def test_revoke_seq_moves_when_a_translation_may_go(old: int, new: int, revoked: bool) -> None:
    """A batch of accesses rechecks what it found usable only when revoke_seq moved: every store that may
    take a translation away must move it, through set() and store_many() alike."""
    for store in ("set", "store_many"):
        pool = SptPool()
        sp_id = pool.alloc(1)
        pool.set(sp_id, 7, old)
        before = pool.revoke_seq
        if store == "set":
            pool.set(sp_id, 7, new)
        else:
            pool.store_many(sp_id, np.array([7]), np.array([new], np.uint64))
        assert (pool.revoke_seq != before) == revoked, store


def test_a_freed_page_moves_revoke_seq() -> None:
    """A freed page's id comes back first (LIFO), possibly as a new root of the same id: translations found
    through the old page must be checked again."""
    pool = SptPool()
    root = pool.alloc(4)
    before = pool.revoke_seq
    pool.free(root)
    assert pool.revoke_seq != before and pool.alloc(4) == root


# -- leaf_spte()'s memory of its walks --------------------------------------------------------------------

WALK_INDICES = (0, 1, 511)  # few indices per level, so that walks meet the same pages again
WALK_ADDRS = [
    high | (i4 << 39) | (i3 << 30) | (i2 << 21) | (i1 << 12) | 0x123
    for i4 in WALK_INDICES[:2]
    for i3 in WALK_INDICES[:2]
    for i2 in WALK_INDICES
    for i1 in WALK_INDICES
    for high in (0, 0xFFFF << 48)  # the kernel half's sign extension: the same walk, remembered apart
]
WALK_OPS = st.lists(
    st.tuples(
        st.sampled_from(["link", "relink", "leaf", "huge", "clear", "free", "grant", "clone"]),
        st.integers(0, 63),
        st.sampled_from(WALK_INDICES),
        st.integers(1, 1 << 20),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops=WALK_OPS)
def test_leaf_spte_remembers_walks_only_while_they_hold(ops: list[tuple[str, int, int, int]]) -> None:
    """After any mix of stores (links made, moved and cleared, leaves and huge leaves set, bits granted), pages
    freed and reallocated, and pickling, leaf_spte() answers what the numpy walk leaf_sptes() does, for every
    address, each asked twice in a row (the second from its memory of the first)."""
    pool = SptPool()
    root = pool.alloc(4)
    pages = [root]  # live pages; each op picks one by number
    for page in pages:  # every address starts mapped by a 4K leaf of its own
        level = int(pool.level[page])
        for index in WALK_INDICES:
            if level == 1:
                pool.set(page, index, PRESENT | (page * 512 + index) << PAGE_SHIFT)
            elif index in WALK_INDICES[: 2 if level > 2 else 3]:
                child = pool.alloc(level - 1)
                pages.append(child)
                pool.set(page, index, make_nonleaf_spte(child))
    for op, pick, index, frame in ops:
        page = pages[pick % len(pages)]
        level = int(pool.level[page])
        spte = pool.get(page, index)
        if op in ("link", "relink") and level > 1:
            child = pool.alloc(level - 1) if op == "link" else pages[frame % len(pages)]
            if op == "link":
                pages.append(child)
            if int(pool.level[child]) == level - 1:
                pool.set(page, index, make_nonleaf_spte(child))
        elif (op == "leaf" and level == 1) or (op == "huge" and level in (2, 3)):
            huge = PT_PAGE_SIZE_MASK if op == "huge" else 0
            pool.set(page, index, PRESENT | huge | (frame << PAGE_SHIFT))
        elif op == "grant" and spte & SPTE_MMU_PRESENT_MASK:
            pool.set(page, index, spte | PT_WRITABLE_MASK | PT_USER_MASK)
        elif op == "clear":
            pool.set(page, index, 0)
        elif op == "free" and page != root:
            for parent in pages:  # unlinked from every page first, as the MMU does before freeing
                for at in WALK_INDICES:
                    if int(pool.level[parent]) > 1 and pool.get(parent, at) == make_nonleaf_spte(page):
                        pool.set(parent, at, 0)
            pages.remove(page)
            pool.free(page)
        elif op == "clone":
            pool = pickle.loads(pickle.dumps(pool))
        expected = pool.leaf_sptes(root, np.array(WALK_ADDRS, np.uint64)).tolist()
        assert [pool.leaf_spte(root, addr) for addr in WALK_ADDRS] == expected, op
        assert [pool.leaf_spte(root, addr) for addr in WALK_ADDRS] == expected, op
