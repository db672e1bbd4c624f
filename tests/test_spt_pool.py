"""SptPool's ``get`` (ndarray.item bound to the live spt array) reads the live sptes after growth, pickling
(boot snapshots) and deep copies."""

from __future__ import annotations

import copy
import pickle

import pytest

from kvmdbgfs.arch.x86.mmu.spt_pool import INITIAL_PAGES, SptPool


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
