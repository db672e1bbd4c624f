"""Design D's back-pointer table: one word per spte address, kept in fixed-size chunks.

The table is indexed by ``spte >> 3`` and so covers the shadow-page id space, which grows
while the guest runs (tens of MB after a fork storm). A flat array would be copied whole
each time it grows; chunks never move: covering a higher key only lengthens the list of
chunks, and a chunk is allocated (zeroed) on the first store into it. A key never stored
reads as 0 (not in a descriptor). The modelled cost is unchanged: one 8-byte word per spte.
"""

from __future__ import annotations

from typing import Final

from collections.abc import Iterator

import numpy as np
from mypy_extensions import mypyc_attr

CHUNK_SHIFT: Final = 15  # 32768 words (256 KiB): the sptes of 64 shadow pages
CHUNK_ENTRIES: Final = 1 << CHUNK_SHIFT
CHUNK_MASK: Final = CHUNK_ENTRIES - 1


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class BackPointers:
    """``table[key]`` for every key, 0 where nothing was stored; scalar and numpy access."""

    itemsize = np.dtype(np.int64).itemsize

    def __init__(self) -> None:
        self.chunks: list[np.ndarray | None] = []

    def __getitem__(self, key: int) -> int:
        number = key >> CHUNK_SHIFT
        chunk = self.chunks[number] if number < len(self.chunks) else None
        return 0 if chunk is None else chunk.item(key & CHUNK_MASK)

    def __setitem__(self, key: int, value: int) -> None:
        number = key >> CHUNK_SHIFT
        chunk = self.chunks[number] if number < len(self.chunks) else None
        if chunk is None:
            chunk = self._chunk(number)
        chunk[key & CHUNK_MASK] = value

    def gather(self, keys: np.ndarray) -> np.ndarray:
        """``table[key]`` of every key, as int64."""
        out = np.zeros(len(keys), np.int64)
        for number, mine in self._by_chunk(keys):
            chunk = self.chunks[number] if number < len(self.chunks) else None
            if chunk is not None:
                out[mine] = chunk[keys[mine] & CHUNK_MASK]
        return out

    def scatter(self, keys: np.ndarray, values: np.ndarray) -> None:
        """``table[keys[i]] = values[i]`` for every i."""
        for number, mine in self._by_chunk(keys):
            self._chunk(number)[keys[mine] & CHUNK_MASK] = values[mine]

    def clear(self, keys: np.ndarray) -> None:
        """``table[key] = 0`` for every key (a chunk never stored into stays unallocated)."""
        for number, mine in self._by_chunk(keys):
            chunk = self.chunks[number] if number < len(self.chunks) else None
            if chunk is not None:
                chunk[keys[mine] & CHUNK_MASK] = 0

    def count_nonzero(self) -> int:
        return sum(int(np.count_nonzero(chunk)) for chunk in self.chunks if chunk is not None)

    def any(self) -> bool:
        return self.count_nonzero() > 0

    def _chunk(self, number: int) -> np.ndarray:
        """The chunk ``number``, allocated (and the list lengthened) on first use; nothing is copied."""
        if number >= len(self.chunks):
            self.chunks.extend([None] * (number + 1 - len(self.chunks)))
        chunk = self.chunks[number]
        if chunk is None:
            chunk = self.chunks[number] = np.zeros(CHUNK_ENTRIES, np.int64)
        return chunk

    @staticmethod
    def _by_chunk(keys: np.ndarray) -> Iterator[tuple[int, slice | np.ndarray]]:
        """(chunk number, which keys) for each chunk the keys fall in: their positions (see PteListDesign._split),
        or one slice when it is one chunk."""
        if not len(keys):
            return
        numbers = keys >> CHUNK_SHIFT
        low, high = int(numbers.min()), int(numbers.max())
        if low == high:
            yield low, slice(None)
            return
        present = np.flatnonzero(np.bincount(numbers - low))  # no wider than the list of chunks
        for number in (present + low).tolist():
            yield number, np.flatnonzero(numbers == number)
