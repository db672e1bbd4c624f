"""GuestMemory: the memoryviews the walks read (words()) show every store, whether made through store_pte or
into the arrays table() returns, follow freed pages, and are made anew over a copy's arrays (pickle: the boot
snapshots; deepcopy)."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

from kvmdbgfs.guest.memory import GuestMemory

NX_ENTRY = (1 << 63) | (0x1234 << 12) | 0x67


def test_words_see_every_store() -> None:
    memory = GuestMemory()
    memory.store_pte(5, 3, NX_ENTRY)
    memory.table(5)[[7, 8]] = np.array([1, 2], np.uint64)
    memory.table(9)[511] = 42
    words = memory.words()
    assert (words[5][3], words[5][7], words[5][8], words[9][511]) == (NX_ENTRY, 1, 2, 42)
    assert memory.read_pte(5, 3) == NX_ENTRY and memory.read_pte(6, 0) == 0
    assert sorted(words) == sorted(memory.tables()) == [5, 9]


def test_a_freed_page_reads_zeros_when_used_again() -> None:
    memory = GuestMemory()
    memory.store_pte(5, 3, NX_ENTRY)
    memory.free_table(5)
    assert 5 not in memory.words() and memory.read_pte(5, 3) == 0
    memory.store_pte(5, 4, 1)
    assert memory.read_pte(5, 3) == 0 and memory.words()[5][4] == 1


@pytest.mark.parametrize("clone", [lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy])
def test_a_copy_has_its_own_views(clone) -> None:  # type: ignore[no-untyped-def]
    memory = GuestMemory()
    memory.store_pte(5, 3, NX_ENTRY)
    copied = clone(memory)
    copied.table(5)[3] = 9
    copied.store_pte(6, 0, 1)
    assert copied.words()[5][3] == 9 and copied.read_pte(6, 0) == 1
    assert memory.read_pte(5, 3) == NX_ENTRY and 6 not in memory.words()
