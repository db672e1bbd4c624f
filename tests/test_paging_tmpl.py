"""The guest page-table walks of paging_tmpl.py on random tables: the CPU's walk under EPT (walk_addr_generic
without a walker), the shadow MMU's walk_addr and the numpy translate_gvas must agree on every address; only
walk_addr writes, and only the A/D bits its walk needs. gptes_access() grants what gpte_access() grants.

Settings are explicit (examples, no deadline) so the run time stays bounded in CI.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmdbgfs.arch.x86.mmu.paging_tmpl import (
    gpte_access,
    gptes_access,
    protect_clean_gpte,
    translate_gvas,
    walk_addr,
    walk_addr_generic,
)
from kvmdbgfs.arch.x86.mmu.spte import ACC_ALL, ACC_WRITE_MASK
from kvmdbgfs.guest.memory import GuestMemory
from kvmdbgfs.guest.pte import (
    PT64_NX_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    make_pte,
    pt_index,
    pte_gfn,
)

WALK_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROOT = 1
LEVEL_TABLES = {4: (ROOT,), 3: (2, 3), 2: (4, 5), 1: (6, 7)}  # the tables of each level, by gfn
UNWRITTEN = 8  # a table never written: it reads as zeros
INDICES = (0, 1, 511)
FLAGS = (PT_PRESENT_MASK, PT_WRITABLE_MASK, PT_USER_MASK, PT_ACCESSED_MASK, PT_DIRTY_MASK, PT_PAGE_SIZE_MASK)
USABLE = PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_USER_MASK | PT_ACCESSED_MASK

# Mostly entries a walk goes through (so that most walks reach a leaf), else any mix of flags (0: empty).
flag_sets = st.one_of(
    st.just(USABLE),
    st.just(USABLE | PT_DIRTY_MASK),
    st.just(USABLE | PT_PAGE_SIZE_MASK),
    st.sets(st.sampled_from(FLAGS)).map(sum),
)


def entry(level: int) -> st.SearchStrategy[int]:
    """An entry of a table at ``level`` (now and then empty): the next level's tables (or a page for a leaf);
    a huge leaf has frame bits below its size that its walk must mask (or, in a 1G leaf, keep)."""
    frames = st.sampled_from(LEVEL_TABLES[level - 1] + (UNWRITTEN,)) if level > 1 else st.integers(0x100, 0x1FF)
    huge_frames = st.sampled_from([0x1FF << 9, 0x3FFFF << 18, (0x3FFFF << 18) | 0x1FF])
    return st.builds(
        lambda gfn, huge_gfn, flags, nx: make_pte(
            huge_gfn if flags & PT_PAGE_SIZE_MASK and level in (2, 3) else gfn, flags | (PT64_NX_MASK if nx else 0)
        ),
        frames,
        huge_frames,
        flag_sets,
        st.booleans(),
    )


tables = st.fixed_dictionaries(
    {(gfn, index): entry(level) for level, gfns in LEVEL_TABLES.items() for gfn in gfns for index in INDICES}
)
addresses = st.builds(
    lambda idx, offset: sum(index << (12 + 9 * level) for level, index in enumerate(idx)) | offset,
    st.lists(st.sampled_from(INDICES), min_size=4, max_size=4),
    st.integers(0, 4095),
)


def guest_memory(table_entries: dict[tuple[int, int], int]) -> GuestMemory:
    memory = GuestMemory()
    for (gfn, index), value in table_entries.items():
        memory.store_pte(gfn, index, value)
    return memory


def contents(memory: GuestMemory) -> dict[int, bytes]:
    return {gfn: entries.tobytes() for gfn, entries in memory.tables().items()}


@WALK_SETTINGS
@given(tables, st.lists(addresses, min_size=1, max_size=12), st.booleans(), st.booleans())
def test_the_walks_agree_and_only_walk_addr_writes(table_entries, gvas, write, user):  # type: ignore[no-untyped-def]
    memory = guest_memory(table_entries)
    before = contents(memory)
    hardware = [walk_addr_generic(memory, ROOT, gva, write, user) for gva in gvas]
    assert contents(memory) == before  # the CPU's walk under EPT leaves A/D alone
    assert translate_gvas(memory, ROOT, np.array(gvas, np.uint64), write, user).tolist() == hardware
    for gva, gfn in zip(gvas, hardware):
        walker = walk_addr(memory, ROOT, gva, write, user)
        assert (walker.gfn if walker is not None else -1) == gfn
        if walker is not None:
            check_walker(memory, walker, gva, write)


def check_walker(memory: GuestMemory, walker, gva: int, write: bool) -> None:  # type: ignore[no-untyped-def]
    """The walk recorded: each level's table and PTE (now with A, and D on a write's leaf), the access above
    each level and the leaf's access with FNAME(protect_clean_gpte)."""
    access = ACC_ALL
    table = ROOT
    for level in range(4, walker.level - 1, -1):
        assert walker.table_gfn[level - 1] == table
        assert walker.pt_access[level - 1] == access
        pte = memory.read_pte(table, pt_index(gva, level))
        assert walker.ptes[level - 1] == pte
        assert pte & PT_ACCESSED_MASK
        assert not (write and level == walker.level) or pte & PT_DIRTY_MASK
        access &= gpte_access(pte)
        table = pte_gfn(pte)
    leaf = walker.ptes[walker.level - 1]
    assert walker.pte_access == (access if write else protect_clean_gpte(access, leaf))
    assert not write or walker.pte_access & ACC_WRITE_MASK


def test_a_walk_sets_only_missing_bits() -> None:
    """A/D are stored only where missing: a second walk of the same write changes nothing."""
    memory = GuestMemory()
    gva = (3 << 39) | (5 << 30) | (7 << 21) | (9 << 12)
    table_flags = PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_USER_MASK
    memory.store_pte(ROOT, 3, make_pte(2, table_flags | PT_ACCESSED_MASK))
    memory.store_pte(2, 5, make_pte(3, table_flags))
    memory.store_pte(3, 7, make_pte(4, table_flags | PT_ACCESSED_MASK))
    memory.store_pte(4, 9, make_pte(0x1234, table_flags))
    walker = walk_addr(memory, ROOT, gva, True, True)
    assert walker is not None and walker.gfn == 0x1234
    assert memory.read_pte(2, 5) & PT_ACCESSED_MASK
    assert memory.read_pte(4, 9) & (PT_ACCESSED_MASK | PT_DIRTY_MASK) == PT_ACCESSED_MASK | PT_DIRTY_MASK
    after = contents(memory)
    walk_addr(memory, ROOT, gva, True, True)
    assert contents(memory) == after


def test_a_write_sets_d_where_only_d_is_missing() -> None:
    memory = GuestMemory()
    gva = 9 << 12
    flags = PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_ACCESSED_MASK
    for level, table in ((4, ROOT), (3, 2), (2, 3)):
        memory.store_pte(table, 0, make_pte(table + 1, flags))
    memory.store_pte(4, 9, make_pte(0x1234, flags))
    assert walk_addr(memory, ROOT, gva, False, False) is not None
    assert not memory.read_pte(4, 9) & PT_DIRTY_MASK  # a read leaves D alone
    assert walk_addr(memory, ROOT, gva, True, False) is not None
    assert memory.read_pte(4, 9) & PT_DIRTY_MASK


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=600), st.booleans())
def test_gptes_access_is_gpte_access_of_each(gptes: list[int], protect_clean: bool) -> None:
    """The numpy gptes_access() grants what the scalar gpte_access() (and protect_clean_gpte()) grant."""
    wanted = [protect_clean_gpte(gpte_access(g), g) if protect_clean else gpte_access(g) for g in gptes]
    got = gptes_access(np.array(gptes, np.uint64), protect_clean)
    assert got.dtype == np.uint8
    assert got.tolist() == wanted
