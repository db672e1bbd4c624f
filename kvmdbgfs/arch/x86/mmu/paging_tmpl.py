"""Reading the guest's 4-level page tables (paging_tmpl.h for a 64-bit guest, PTTYPE 64).

walk_addr() is FNAME(walk_addr): the shadow MMU's walk of one address, which sets the
accessed (and, for writes, dirty) bits in the guest PTEs it used, as KVM does through
the host mapping. Under EPT (the TDP modes) the hardware walks: walk_addr_generic() without
a walker for one address, translate_gvas() for many at once; both leave A/D bits alone,
nothing in the model reads them there.
"""

from __future__ import annotations

from typing import Final

import sys
from dataclasses import dataclass

import numpy as np

from kvmdbgfs.arch.x86.mmu.spte import (
    ACC_ALL,
    ACC_EXEC_MASK,
    ACC_USER_MASK,
    ACC_WRITE_MASK,
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PG_LEVEL_1G,
    PG_LEVEL_4K,
    PT64_ROOT_4LEVEL,
    U64,
)
from kvmdbgfs.guest.memory import GuestMemory
from kvmdbgfs.guest.pte import (
    PT64_BASE_ADDR_MASK,
    PT64_NX_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    pt_index,
)


def gpte_access(gpte: int) -> int:
    """FNAME(gpte_access)(): ACC_* bits granted by one guest PTE."""
    return (gpte & (ACC_WRITE_MASK | ACC_USER_MASK)) | (0 if gpte & PT64_NX_MASK else ACC_EXEC_MASK)


def protect_clean_gpte(access: int, gpte: int) -> int:
    """FNAME(protect_clean_gpte)(): a clean PTE grants no write, so the first write faults to set D."""
    return access if gpte & PT_DIRTY_MASK else access & ~ACC_WRITE_MASK


# The access a PTE grants depends on four of its bits: W, U and D in its low byte and NX, the top bit of its
# high byte. _ACCESS_KEY_LOW and _ACCESS_KEY_HIGH pick them out of those bytes into one byte, the key of a
# 256-entry table of gpte_access() (and of protect_clean_gpte() over it) made from the functions above.
_ACCESS_KEY_LOW = PT_WRITABLE_MASK | PT_USER_MASK | PT_DIRTY_MASK
_ACCESS_KEY_HIGH = PT64_NX_MASK >> 56
_LOW_BYTE, _HIGH_BYTE = (0, 7) if sys.byteorder == "little" else (7, 0)


def _access_table(protect_clean: bool) -> np.ndarray:
    table = np.zeros(256, np.uint8)
    for key in range(256):
        gpte = (key & _ACCESS_KEY_LOW) | (key & _ACCESS_KEY_HIGH) << 56
        table[key] = protect_clean_gpte(gpte_access(gpte), gpte) if protect_clean else gpte_access(gpte)
    return table


_ACCESS_TABLES = {False: _access_table(False), True: _access_table(True)}


def gptes_access(gptes: np.ndarray, protect_clean: bool) -> np.ndarray:
    """gpte_access() of several PTEs (a contiguous uint64 array) as uint8; with ``protect_clean``,
    FNAME(protect_clean_gpte) too. A sync asks it of a whole guest table, so it makes three passes over the
    PTEs' two bytes that matter (each a strided view of them, no copy) and a table lookup, not a dozen passes
    over the uint64s."""
    octets = gptes.view(np.uint8)
    key = octets[_LOW_BYTE::8] & _ACCESS_KEY_LOW
    key |= octets[_HIGH_BYTE::8] & _ACCESS_KEY_HIGH
    return _ACCESS_TABLES[protect_clean].take(key)


def gpte_valid_for_prefetch(gpte: int) -> bool:
    """Not FNAME(prefetch_invalid_gpte)(): present and accessed (only accessed entries are prefetched)."""
    return gpte & (PT_PRESENT_MASK | PT_ACCESSED_MASK) == PT_PRESENT_MASK | PT_ACCESSED_MASK


def read_gptes(memory: GuestMemory, gfn: int, indices: np.ndarray) -> np.ndarray:
    """Entries of guest page ``gfn`` as uint64 (a page the guest never wrote reads as zeros)."""
    if not memory.holds_table(gfn):
        return np.zeros(len(indices), np.uint64)
    return memory.table(gfn)[indices]


@dataclass(slots=True)
class GuestWalker:
    """struct guest_walker: per level (index level - 1) the table gfn, the PTE and the access above it."""

    level: int
    gfn: int
    pte_access: int
    table_gfn: list[int]
    ptes: list[int]
    pt_access: list[int]


PT_ACCESSED_SHIFT: Final = PT_ACCESSED_MASK.bit_length() - 1
PT_DIRTY_SHIFT: Final = PT_DIRTY_MASK.bit_length() - 1


def walk_addr(memory: GuestMemory, root_gfn: int, gva: int, write: bool, user: bool) -> GuestWalker | None:
    """FNAME(walk_addr)(): the shadow MMU's walk, recorded in a GuestWalker; None when the guest must get a #PF
    (not present, or a permission fault)."""
    walker = GuestWalker(PT64_ROOT_4LEVEL, 0, 0, [0, 0, 0, root_gfn], [0, 0, 0, 0], [ACC_ALL] * PT64_ROOT_4LEVEL)
    return walker if walk_addr_generic(memory, root_gfn, gva, write, user, walker) >= 0 else None


def walk_addr_generic(
    memory: GuestMemory, root_gfn: int, gva: int, write: bool, user: bool, walker: GuestWalker | None = None
) -> int:
    """FNAME(walk_addr_generic)(): the gfn of the 4K page ``gva`` is in, or -1 when the guest must get a #PF.

    With a ``walker`` (walk_addr, the shadow MMU's walk) the walk is recorded in it, and A/D bits are set in
    the guest PTEs as KVM does through the host mapping: only when a PTE walked lacks A or a write's leaf
    lacks D. Without one it is the CPU's walk under EPT (see translate_gvas), which only translates: W and U
    are checked on the AND of the PTEs walked, and nothing else is computed. Both walk every guest access, so
    the loop sticks to local names and Python ints: read_pte(), pt_index(), gpte_access(), the last-level
    test, pte_gfn() and protect_clean_gpte() are written out in it."""
    if walker is not None:
        table_gfns, ptes, pt_access = walker.table_gfn, walker.ptes, walker.pt_access
    table_of = memory.words().get
    entries = table_of(root_gfn)
    every = -1  # AND of the PTEs walked: W, U and A where all have them
    access = ACC_ALL  # recorded walks only
    level = PT64_ROOT_4LEVEL
    shift = PAGE_SHIFT + (PT64_ROOT_4LEVEL - 1) * 9
    while True:
        if entries is None:  # a page the guest never wrote reads as zeros: not present
            return -1
        gpte = entries[(gva >> shift) & 511]
        if not gpte & PT_PRESENT_MASK:
            return -1
        every &= gpte
        if walker is not None:
            ptes[level - 1] = gpte
            access &= (gpte & (ACC_WRITE_MASK | ACC_USER_MASK)) | (0 if gpte & PT64_NX_MASK else ACC_EXEC_MASK)
        if gpte & PT_PAGE_SIZE_MASK and level <= PG_LEVEL_1G or level == PG_LEVEL_4K:
            break
        table_gfn = (gpte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
        entries = table_of(table_gfn)
        level -= 1
        shift -= 9
        if walker is not None:
            table_gfns[level - 1] = table_gfn
            pt_access[level - 1] = access
    if (write and not every & ACC_WRITE_MASK) or (user and not every & ACC_USER_MASK):
        return -1
    gfn = (gpte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
    if level > PG_LEVEL_4K:  # the 4K page within the huge one
        pages = KVM_PAGES_PER_HPAGE(level)
        gfn = (gfn & -pages) + ((gva >> PAGE_SHIFT) & (pages - 1))
    if walker is not None:
        walker.level = level
        walker.gfn = gfn
        walker.pte_access = access if write or gpte & PT_DIRTY_MASK else access & ~ACC_WRITE_MASK  # protect_clean
        accessed_dirty = every & PT_ACCESSED_MASK
        if write:  # fold the leaf's D into A
            accessed_dirty &= gpte >> (PT_DIRTY_SHIFT - PT_ACCESSED_SHIFT)
        if not accessed_dirty:
            _update_accessed_dirty_bits(memory, walker, gva, write)
    return gfn


def _update_accessed_dirty_bits(memory: GuestMemory, walker: GuestWalker, gva: int, write: bool) -> None:
    """FNAME(update_accessed_dirty_bits)(): A on every PTE walked, D on the leaf of a write."""
    ptes = walker.ptes
    for level in range(PT64_ROOT_4LEVEL, walker.level - 1, -1):
        pte = ptes[level - 1]
        new = pte | PT_ACCESSED_MASK
        if level == walker.level and write:
            new |= PT_DIRTY_MASK
        if new != pte:
            memory.store_pte(walker.table_gfn[level - 1], pt_index(gva, level), new)
            ptes[level - 1] = new


def _gather(memory: GuestMemory, tables: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Entry ``indices[i]`` of guest page ``tables[i]`` for every i, as uint64."""
    out = np.zeros(len(tables), np.uint64)
    unique, inverse = np.unique(tables, return_inverse=True)
    for position, gfn in enumerate(unique.tolist()):
        if memory.holds_table(gfn):
            mine = inverse == position
            out[mine] = memory.table(gfn)[indices[mine]]
    return out


def translate_gvas(memory: GuestMemory, root_gfn: int, gvas: np.ndarray, write: bool, user: bool) -> np.ndarray:
    """The hardware walk of many addresses: each one's 4K gfn, -1 where the guest takes a #PF."""
    gvas = np.asarray(gvas, np.uint64)
    gfns = np.full(len(gvas), -1, np.int64)
    alive = np.arange(len(gvas))
    tables = np.full(len(gvas), root_gfn, np.int64)
    access = np.full(len(gvas), ACC_ALL, np.uint8)
    for level in range(PT64_ROOT_4LEVEL, 0, -1):
        index = ((gvas[alive] >> U64(PAGE_SHIFT + 9 * (level - 1))) & U64(511)).astype(np.int64)
        gptes = _gather(memory, tables[alive], index)
        present = (gptes & U64(PT_PRESENT_MASK)) != 0
        alive, gptes = alive[present], gptes[present]
        access[alive] &= gptes_access(gptes, protect_clean=False)
        frames = ((gptes & U64(PT64_BASE_ADDR_MASK)) >> U64(PAGE_SHIFT)).astype(np.int64)
        last = (gptes & U64(PT_PAGE_SIZE_MASK)) != 0 if level <= PG_LEVEL_1G else np.zeros(len(alive), bool)
        if level == PG_LEVEL_4K:
            last[:] = True
        pages = KVM_PAGES_PER_HPAGE(level)
        done = alive[last]
        gfns[done] = (frames[last] & -pages) + ((gvas[done] >> U64(PAGE_SHIFT)).astype(np.int64) & (pages - 1))
        tables[alive[~last]] = frames[~last]
        alive = alive[~last]
    denied = np.zeros(len(gvas), bool)
    if write:
        denied |= (access & ACC_WRITE_MASK) == 0
    if user:
        denied |= (access & ACC_USER_MASK) == 0
    gfns[denied] = -1
    return gfns
