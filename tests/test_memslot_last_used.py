"""MmuMemslots.lookup's last_used_slot hint: it may only save the search, never change its answer."""

import pickle

from hypothesis import given
from hypothesis import strategies as st

from kvmdbgfs.arch.x86.mmu.memslot import KvmMemorySlot
from kvmdbgfs.arch.x86.mmu.mmu_memslots import MmuMemslots
from kvmdbgfs.kvm.stats import StatBlock, counters

SLOTS = [
    KvmMemorySlot(id=0, as_id=0, base_gfn=0, npages=0xA0),
    KvmMemorySlot(id=1, as_id=0, base_gfn=0x100, npages=0xBFF00),
    KvmMemorySlot(id=2, as_id=0, base_gfn=0x100000, npages=0x80000),
]


def slot_by_scan(slots: list[KvmMemorySlot], gfn: int) -> KvmMemorySlot | None:
    return next((slot for slot in slots if slot.contains(gfn)), None)


@given(st.lists(st.tuples(st.integers(0, 0x190000), st.booleans()), max_size=60))
def test_lookup_answers_as_a_scan_whatever_was_looked_up_before(steps: list[tuple[int, bool]]) -> None:
    memslots = MmuMemslots(host_max_level=3)
    present = list(SLOTS)
    memslots.update(present)
    for gfn, delete_hinted in steps:
        if delete_hinted and memslots.last_used_slot is not None and len(present) > 1:
            present.remove(memslots.last_used_slot.slot)  # the hinted slot goes away (a memslot delete)
            memslots.update(present)
        found = memslots.lookup(gfn)
        assert (found.slot if found else None) is slot_by_scan(present, gfn)


def test_hint_survives_pickling_as_one_of_the_slots() -> None:
    memslots = MmuMemslots(host_max_level=3)
    memslots.update(SLOTS)
    memslots.lookup(0x100000)
    restored = pickle.loads(pickle.dumps(memslots))
    assert restored.last_used_slot is restored.slots[2]
    assert restored.lookup(0x100) is restored.slots[1]


def test_account_pages_counts_each_level_and_lpages() -> None:
    stat = StatBlock(counters("pages_4k", "pages_2m", "pages_1g", "lpages"))
    for level, delta in [(1, 5), (2, 3), (3, 2), (1, -1), (2, -1)]:
        stat.account_pages(level, delta)
    assert (stat.pages_4k, stat.pages_2m, stat.pages_1g, stat.lpages) == (4, 2, 2, 4)
