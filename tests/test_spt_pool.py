"""SptPool: ``revoke_seq`` moves on every store that may take a translation away; ``get`` (ndarray.item bound
to the live spt array) reads the live sptes after growth, pickling (boot snapshots) and deep copies."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from kvmdbgfs.arch.x86.mmu.spt_pool import INITIAL_PAGES, SptPool
from kvmdbgfs.arch.x86.mmu.spte import (
    PT64_NX_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    SPTE_MMU_PRESENT_MASK,
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
