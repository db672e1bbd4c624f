"""Guest RAM as far as paging needs it: the contents of the pages that hold page tables.

Data pages have no content in the model (nothing reads them); a page-table
page is 512 u64 entries in a numpy array, created zeroed on first use, as
a freshly allocated and cleared page would be.
"""

from __future__ import annotations

from typing import Final

from collections.abc import Mapping

import numpy as np

from kvmdbgfs.guest.pte import PT64_ENT_PER_PAGE
from kvmdbgfs.instance_state import set_attributes


TABLE_CHUNK: Final = 1024  # pages per chunk of table arrays: 4 MiB, the size from which numpy asks for huge pages


class GuestMemory:
    """The page-table pages of one guest, by gfn.

    ``_words`` holds a memoryview of every page's array (the same memory, so a store through either is seen by
    both): the page walks read one entry per level per access, and indexing a memoryview costs a fraction of
    ndarray.item. It is rebuilt after unpickling (boot snapshots), as memoryviews do not pickle.

    A page's array is a row of a chunk of TABLE_CHUNK rows, and the rows of freed pages (``_spare``, with their
    views) are used again first: fork and exit allocate and free thousands of tables, and a 4 KiB array of its
    own costs the host a page fault on first use, where a chunk's rows share a few huge pages and a spare row
    costs a memset. Nobody keeps a page's array past free_table()."""

    def __init__(self) -> None:
        self._tables: dict[int, np.ndarray] = {}
        self._words: dict[int, memoryview] = {}
        self._spare: list[tuple[np.ndarray, memoryview]] = []
        self._chunk = np.zeros((0, PT64_ENT_PER_PAGE), np.uint64)  # the rows not handed out yet are zero
        self._chunk_used = 0

    def __getstate__(self) -> dict[str, object]:
        return {"_tables": self._tables}

    def __setstate__(self, state: dict[str, object]) -> None:
        set_attributes(self, state)
        self._words = {gfn: entries.data for gfn, entries in self._tables.items()}
        self._spare = []
        self._chunk, self._chunk_used = np.zeros((0, PT64_ENT_PER_PAGE), np.uint64), 0

    def table(self, gfn: int) -> np.ndarray:
        """The 512 entries stored in page ``gfn`` (zeroed when first used)."""
        entries = self._tables.get(gfn)
        if entries is None:
            entries = self._first_use(gfn)
        return entries

    def _first_use(self, gfn: int) -> np.ndarray:
        """Page ``gfn`` starts holding entries, all zero: a spare row cleared, else the chunk's next row."""
        if self._spare:
            entries, words = self._spare.pop()
            entries.fill(0)
        else:
            if self._chunk_used == len(self._chunk):
                self._chunk, self._chunk_used = np.zeros((TABLE_CHUNK, PT64_ENT_PER_PAGE), np.uint64), 0
            entries = self._chunk[self._chunk_used]
            self._chunk_used += 1
            words = entries.data
        self._tables[gfn], self._words[gfn] = entries, words
        return entries

    def tables(self) -> Mapping[int, np.ndarray]:
        """Every page that holds entries, by gfn, for a reader (a page not in it reads as zeros); not a copy."""
        return self._tables

    def words(self) -> Mapping[int, memoryview]:
        """tables() as memoryviews of the same entries (Python ints when indexed), for scalar readers."""
        return self._words

    def read_pte(self, gfn: int, index: int) -> int:
        entries = self._words.get(gfn)
        return 0 if entries is None else entries[index]

    def store_pte(self, gfn: int, index: int, value: int) -> None:
        """A raw store, as memory sees it; who intercepts guest stores is the hardware's business."""
        self.table(gfn)[index] = value

    def free_table(self, gfn: int) -> None:
        """The guest freed a page-table page: its content no longer matters (its array becomes a spare)."""
        entries = self._tables.pop(gfn, None)
        if entries is not None:
            self._spare.append((entries, self._words.pop(gfn)))

    def holds_table(self, gfn: int) -> bool:
        return gfn in self._tables
