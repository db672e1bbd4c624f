"""Guest RAM as far as paging needs it: the contents of the pages that hold page tables.

Data pages have no content in the model (nothing reads them); a page-table
page is 512 u64 entries in a numpy array, created zeroed on first use, as
a freshly allocated and cleared page would be.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kvmdbgfs.guest.pte import PT64_ENT_PER_PAGE


class GuestMemory:
    """The page-table pages of one guest, by gfn.

    ``_words`` holds a memoryview of every page's array (the same memory, so a store through either is seen by
    both): the page walks read one entry per level per access, and indexing a memoryview costs a fraction of
    ndarray.item. It is rebuilt after unpickling (boot snapshots), as memoryviews do not pickle."""

    def __init__(self) -> None:
        self._tables: dict[int, np.ndarray] = {}
        self._words: dict[int, memoryview] = {}

    def __getstate__(self) -> dict[str, object]:
        return {"_tables": self._tables}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._words = {gfn: memoryview(entries) for gfn, entries in self._tables.items()}

    def table(self, gfn: int) -> np.ndarray:
        """The 512 entries stored in page ``gfn`` (zeroed when first used)."""
        entries = self._tables.get(gfn)
        if entries is None:
            entries = self._tables[gfn] = np.zeros(PT64_ENT_PER_PAGE, dtype=np.uint64)
            self._words[gfn] = memoryview(entries)
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
        """The guest freed a page-table page: its content no longer matters."""
        self._tables.pop(gfn, None)
        self._words.pop(gfn, None)

    def holds_table(self, gfn: int) -> bool:
        return gfn in self._tables
