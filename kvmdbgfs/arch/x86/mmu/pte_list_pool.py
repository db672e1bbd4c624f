"""The pte_list_desc slab (``mmu_pte_list_desc_cache``) as a numpy structure of arrays, and the work counters."""

from __future__ import annotations

from typing import Final

from dataclasses import asdict, dataclass, fields

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.instance_state import set_attributes
from kvmdbgfs.zero_extend import zero_extended

# Descriptor ids are int32 (the ``more`` field stores one); id 0 is reserved as NULL.
DESC_ID_MAX: Final = np.iinfo(np.int32).max


@dataclass
class RmapCosts:
    """Work done by one rmap design instance (one VM), in kernel terms.

    desc_visits: pte_list_desc structures touched that existed before the operation
      (a freshly allocated descriptor counts as an alloc, not a visit).
    slot_reads / slot_writes: spte slots read (scanned, compared, moved) and written in
      descriptors; design D also counts its back-pointer stores as slot writes.
    allocs / frees: descriptors taken from and returned to the slab.
    """

    desc_visits: int = 0
    slot_reads: int = 0
    slot_writes: int = 0
    allocs: int = 0
    frees: int = 0

    def reset(self) -> None:
        for field in fields(self):
            setattr(self, field.name, 0)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class DescPool:
    """Descriptors of one VM: ``sptes[id, 0:ext]`` plus int32 metadata arrays named by ``meta``.

    ``meta`` is a subset of ("more", "spte_count", "tail_count"); each becomes an attribute.
    ``hints`` names further int32 arrays, one entry per descriptor, that a design keeps for the
    emulation's own speed (no kernel memory: they are left out of ``nbytes``). Descriptor 0 is
    never handed out, so a zero ``more`` is the NULL pointer. Free ids sit on an int32 stack;
    when it runs dry every array doubles (geometric growth). An allocated descriptor is all
    zeros, hints included, like an object from the kernel's zeroing memory cache: the pool
    clears descriptors when they are freed (new ones are zeros), so that the common scalar
    allocation is one pop.
    """

    more: np.ndarray
    spte_count: np.ndarray
    tail_count: np.ndarray
    room: np.ndarray  # hints of the tail designs (pte_list_tail.py)
    room_depth: np.ndarray
    # memoryviews of the arrays above for the scalar paths (see _bind)
    sptes_view: memoryview
    free_ids_view: memoryview
    more_view: memoryview
    spte_count_view: memoryview
    tail_count_view: memoryview
    room_view: memoryview
    room_depth_view: memoryview

    def __init__(
        self, ext: int, meta: tuple[str, ...], costs: RmapCosts, capacity: int = 64, hints: tuple[str, ...] = ()
    ) -> None:
        self.ext = ext
        self.meta = meta
        self.zeroed = meta + hints  # the int32 arrays cleared on free and grown with the pool
        self.costs = costs
        self.sptes = np.zeros((capacity, ext), np.int64)
        for name in self.zeroed:
            setattr(self, name, np.zeros(capacity, np.int32))
        self.free_ids = np.arange(capacity - 1, 0, -1, dtype=np.int32)
        self.nfree = capacity - 1
        self._bind()

    def _bind(self) -> None:
        """Views of the arrays, made again whenever they are replaced (as SptPool._bind). The designs' scalar
        paths (one descriptor at a time: every fault's rmap_add, most removals) read and store single entries
        through them: indexing a memoryview costs a fraction of ndarray.item or of an ndarray element store.
        ``sptes_view``: ``sptes`` as one flat run of int64 (slot ``slot`` of descriptor ``desc`` at
        ``desc * ext + slot``); ``<name>_view`` of each int32 array (``meta``, ``hints``, ``free_ids``)."""
        self.sptes_view = self.sptes.data.cast("B").cast("q")
        self.free_ids_view = self.free_ids.data
        for name in self.zeroed:
            setattr(self, f"{name}_view", getattr(self, name).data)

    def __getstate__(self) -> dict[str, object]:
        """Pickled (boot snapshots) and deep-copied without the views, which are made again after. The
        attributes are named, not taken from ``__dict__``: a class compiled by mypyc has none."""
        names = ("ext", "meta", "zeroed", "costs", "sptes", *self.zeroed, "free_ids", "nfree")
        return {name: getattr(self, name) for name in names}

    def __setstate__(self, state: dict[str, object]) -> None:
        set_attributes(self, state)
        self._bind()

    @property
    def capacity(self) -> int:
        return len(self.sptes)

    @property
    def live(self) -> int:
        """Descriptors currently allocated."""
        return self.capacity - 1 - self.nfree

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool: descriptor arrays and the free stack."""
        return (
            self.sptes.nbytes + self.free_ids.nbytes + sum(getattr(self, name).nbytes for name in self.meta)
        )

    @property
    def bytes_per_desc(self) -> float:
        return self.nbytes / self.capacity

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The spte slots of descriptors ``ids``, one row each (np.take: faster than fancy row indexing)."""
        return np.take(self.sptes, ids, axis=0)

    def alloc(self, k: int) -> np.ndarray:
        """Take ``k`` zeroed descriptors (mmu_alloc_pte_list_desc, k times); returns their ids."""
        if k > self.nfree:
            self._grow(k)
        ids = self.free_ids[self.nfree - k : self.nfree][::-1].astype(np.int64)
        self.nfree -= k
        self.costs.allocs += k
        return ids

    def alloc_one(self) -> int:
        """alloc(1) with a scalar read: the id it would return."""
        if not self.nfree:
            self._grow(1)
        self.nfree -= 1
        self.costs.allocs += 1
        return self.free_ids_view[self.nfree]

    def free(self, ids: np.ndarray | list[int]) -> None:
        """Return descriptors to the slab (mmu_free_pte_list_desc), cleared for their next allocation."""
        self.sptes[ids] = 0
        for name in self.zeroed:
            getattr(self, name)[ids] = 0
        self.free_ids[self.nfree : self.nfree + len(ids)] = ids
        self.nfree += len(ids)
        self.costs.frees += len(ids)

    def _grow(self, k: int) -> None:
        old = self.capacity
        new = 2 * old
        while new - old + self.nfree < k:
            new *= 2
        if new - 1 > DESC_ID_MAX:
            raise MemoryError(f"pte_list_desc pool cannot exceed {DESC_ID_MAX} descriptors")
        self.sptes = zero_extended(self.sptes, new)
        for name in self.zeroed:
            setattr(self, name, zero_extended(getattr(self, name), new))
        free_ids = np.empty(new - 1, np.int32)
        free_ids[: new - old] = np.arange(new - 1, old - 1, -1)
        free_ids[new - old : new - old + self.nfree] = self.free_ids[: self.nfree]
        self.free_ids = free_ids
        self.nfree += new - old
        self._bind()
