"""Page faults, checked entry by entry and event by event on a small guest."""

from __future__ import annotations

import numpy as np
import pytest
from test_guest_helpers import TEST_VA, MiB, bare_process, hw, next_frames, pte_table, small_kernel, user_pte

from kvmdbgfs.guest import allocator
from kvmdbgfs.guest import pte as x86
from kvmdbgfs.guest.fault import GuestSegfault
from kvmdbgfs.guest.pagecache import File
from kvmdbgfs.guest.pgtable import PAGE_TABLE
from kvmdbgfs.guest.recording import Event
from kvmdbgfs.guest.vaddr import direct_map
from kvmdbgfs.guest.vma import PROT_EXEC, PROT_READ, PROT_WRITE

PAGE = 4096
USER_RO = x86.PT_PRESENT_MASK | x86.PT_USER_MASK | x86.PT_ACCESSED_MASK | x86.PT64_NX_MASK
USER_RW_DIRTY = USER_RO | x86.PT_WRITABLE_MASK | x86.PT_DIRTY_MASK


def brief(events: list[Event]) -> list[tuple[object, ...]]:
    return [
        (e.op, e.gfn, e.index, e.value) if e.op == "store" else (e.op, e.gfn, e.gva, e.write, e.user) for e in events
    ]


def dm(gfn: int) -> int:
    return int(direct_map(gfn)[0])


def test_anonymous_write_fault_builds_the_tables_then_maps_a_zeroed_page() -> None:
    kernel = small_kernel()
    task = bare_process(kernel)
    task.mmap(MiB, addr=TEST_VA, name="anon")
    pud, pmd, pt = next_frames(kernel, 3, allocator.PAGE_TABLE)
    (page,) = next_frames(kernel, 1, allocator.PAGE_ANON)
    start = len(hw(kernel).events)
    task.touch(TEST_VA + 3 * PAGE, TEST_VA + 4 * PAGE, write=True)
    pgd, va = task.mm.pgd, TEST_VA + 3 * PAGE
    assert brief(hw(kernel).events[start:]) == [
        ("access", -1, va, True, True),  # the user access that raises the guest's #PF
        ("access", pud, dm(pud), True, False),
        ("store", pgd, 0, x86.make_pte(pud, PAGE_TABLE)),
        ("access", pmd, dm(pmd), True, False),
        ("store", pud, 0, x86.make_pte(pmd, PAGE_TABLE)),
        ("access", pt, dm(pt), True, False),
        ("store", pmd, 128, x86.make_pte(pt, PAGE_TABLE)),
        ("access", page, dm(page), True, False),
        ("store", pt, 3, x86.make_pte(page, USER_RW_DIRTY)),
        ("access", page, va, True, True),
    ]
    assert task.mm.find_vma(va).anon_vma


def test_touching_fresh_anonymous_pages_is_one_fault_each_in_order() -> None:
    """A run of write faults on fresh anonymous pages (their pages allocated together) gives, page by page,
    the accesses up to the faulting one, the clear and the PTE store; a page touched twice faults once."""
    kernel = small_kernel()
    task = bare_process(kernel)
    task.mmap(MiB, addr=TEST_VA, name="anon")
    task.touch(TEST_VA, TEST_VA + PAGE, write=True)  # the tables
    pt = pte_table(kernel, task, TEST_VA)
    vas = [TEST_VA + i * PAGE for i in (1, 2, 5, 3, 2)]
    pages = next_frames(kernel, 3, allocator.PAGE_ANON)
    start = len(hw(kernel).events)
    task.touch_pages(np.array(vas[:3]), write=True)
    expected: list[tuple[object, ...]] = []
    for n, (va, page) in enumerate(zip(vas[:3], pages)):
        expected += [("access", -1 if i == n else pages[i], vas[i], True, True) for i in range(max(n - 1, 0), n + 1)]
        index = (va - TEST_VA) // PAGE
        expected += [("access", page, dm(page), True, False), ("store", pt, index, x86.make_pte(page, USER_RW_DIRTY))]
    expected.append(("access", pages[2], vas[2], True, True))
    assert brief(hw(kernel).events[start:]) == expected
    (page3,) = next_frames(kernel, 1, allocator.PAGE_ANON)
    start = len(hw(kernel).events)
    task.touch_pages(np.array(vas[3:] + vas[3:4]), write=True)  # 3, 2 (mapped), 3 again
    assert brief(hw(kernel).events[start:]) == [
        ("access", -1, vas[3], True, True),
        ("access", page3, dm(page3), True, False),
        ("store", pt, 3, x86.make_pte(page3, USER_RW_DIRTY)),
        ("access", page3, vas[3], True, True),
        ("access", pages[1], vas[4], True, True),
        ("access", page3, vas[3], True, True),  # the access its (empty) fault was taken for
        ("access", page3, vas[3], True, True),
    ]


def test_read_fault_maps_the_zero_page_and_a_write_then_copies_it() -> None:
    kernel = small_kernel()
    task = bare_process(kernel)
    task.mmap(MiB, addr=TEST_VA)
    task.touch(TEST_VA, TEST_VA + PAGE, write=True)  # the tables exist from here on
    zero = kernel.ctx.zero_pfn
    va = TEST_VA + 4 * PAGE
    start = len(hw(kernel).events)
    task.touch(va, va + PAGE, write=False)
    assert user_pte(kernel, task, va) == x86.make_pte(zero, USER_RO)
    (new,) = next_frames(kernel, 1, allocator.PAGE_ANON)
    task.touch(va, va + PAGE, write=True)
    pt = hw(kernel).events[start + 1].gfn
    assert brief(hw(kernel).events[start:]) == [
        ("access", -1, va, False, True),  # the read raises the guest's #PF
        ("store", pt, 4, x86.make_pte(zero, USER_RO)),
        ("access", zero, va, False, True),
        ("access", zero, va, True, True),  # the write raises a protection #PF
        ("access", new, dm(new), True, False),  # wp_page_copy from the zero page: a cleared page
        ("store", pt, 4, 0),
        ("invlpg", -1, va, False, False),
        ("store", pt, 4, x86.make_pte(new, USER_RW_DIRTY)),
        ("access", new, va, True, True),
    ]
    assert kernel.ctx.pages.refcount[zero] == 1  # the zero page is never counted


def test_file_read_faults_read_around_then_fault_around() -> None:
    kernel = small_kernel()
    task = bare_process(kernel)
    data = File("data.bin", 64)
    base = TEST_VA + 2 * MiB
    task.mmap(64 * PAGE, PROT_READ, file=data, addr=base)
    task.touch(base + 5 * PAGE, base + 6 * PAGE, write=False)
    assert (data.pages[:32] >= 0).all() and (data.pages[32:] < 0).all()  # read-around: 32 pages from 0
    assert [bool(user_pte(kernel, task, base + i * PAGE)) for i in range(16)] == [i == 5 for i in range(16)]
    calls = hw(kernel).calls["store_ptes"]
    task.touch(base + 6 * PAGE, base + 7 * PAGE, write=False)
    assert hw(kernel).calls["store_ptes"] == calls + 1  # the window is one batch
    mapped = [user_pte(kernel, task, base + i * PAGE) for i in range(40)]
    assert mapped[:16] == [x86.make_pte(int(data.pages[i]), USER_RO) for i in range(16)]
    assert not any(mapped[16:])
    assert kernel.ctx.pages.refcount[data.pages[:16]].tolist() == [2] * 16  # page cache + mapping
    task.touch(base + 20 * PAGE, base + 21 * PAGE, write=False)
    assert all(user_pte(kernel, task, base + i * PAGE) for i in range(16, 32))


def test_fault_around_stays_inside_the_vma_and_text_is_executable() -> None:
    kernel = small_kernel()
    task = bare_process(kernel)
    lib = File("lib.so", 8)
    base = TEST_VA + 2 * MiB + 3 * PAGE
    task.mmap(8 * PAGE, PROT_READ | PROT_EXEC, file=lib, addr=base)
    task.touch(base + 2 * PAGE, base + 3 * PAGE, write=False)
    task.touch(base + PAGE, base + 2 * PAGE, write=False)
    assert [bool(user_pte(kernel, task, base + i * PAGE)) for i in range(-1, 9)] == [False] + [True] * 8 + [False]
    assert user_pte(kernel, task, base) == x86.make_pte(int(lib.pages[0]), USER_RO & ~x86.PT64_NX_MASK)


def test_private_file_write_copies_and_shared_anonymous_memory_is_shmem() -> None:
    kernel = small_kernel()
    task = bare_process(kernel)
    data = File("data.bin", 4)
    vma = task.mmap(4 * PAGE, PROT_READ | PROT_WRITE, file=data, addr=TEST_VA)
    task.touch(TEST_VA, TEST_VA + PAGE, write=True)  # do_cow_fault
    copy = x86.pte_gfn(user_pte(kernel, task, TEST_VA))
    assert copy != data.pages[0] and kernel.ctx.pages.refcount[data.pages[0]] == 1 and vma.anon_vma
    assert user_pte(kernel, task, TEST_VA) == x86.make_pte(copy, USER_RW_DIRTY)
    shm = task.mmap(4 * PAGE, shared=True, addr=TEST_VA + MiB)
    task.touch(shm.start, shm.start + PAGE, write=False)
    task.touch(shm.start + PAGE, shm.start + 2 * PAGE, write=True)
    shmem = shm.file
    assert shmem is not None and shmem.shmem and not shm.anon_vma
    assert user_pte(kernel, task, shm.start) == x86.make_pte(int(shmem.pages[0]), USER_RO | x86.PT_WRITABLE_MASK)
    assert user_pte(kernel, task, shm.start + PAGE) == x86.make_pte(int(shmem.pages[1]), USER_RW_DIRTY)
    task.touch(shm.start + 2 * PAGE, shm.start + 3 * PAGE, write=False)  # fault-around: 0, 1 mapped, 3 absent
    assert (shmem.pages >= 0).tolist() == [True, True, True, False]


def test_populate_faults_in_without_user_accesses_and_segfaults() -> None:
    kernel = small_kernel()
    task = bare_process(kernel)
    task.mmap(64 * PAGE, addr=TEST_VA)
    start = len(hw(kernel).events)
    task.populate(TEST_VA, TEST_VA + 64 * PAGE, write=True)
    assert not [e for e in hw(kernel).events[start:] if e.user]
    assert all(user_pte(kernel, task, TEST_VA + i * PAGE) & x86.PT_WRITABLE_MASK for i in range(64))
    task.mmap(PAGE, PROT_READ, addr=TEST_VA + MiB)
    with pytest.raises(GuestSegfault):
        task.touch(TEST_VA + MiB, TEST_VA + MiB + PAGE, write=True)
    with pytest.raises(GuestSegfault):
        task.touch(TEST_VA + 2 * MiB, TEST_VA + 2 * MiB + PAGE, write=False)
    assert np.all(kernel.ctx.pages.refcount >= 0)


def test_writing_a_private_file_mapping_copies_mapped_and_missing_pages_alike() -> None:
    kernel = small_kernel()
    task = bare_process(kernel)
    data = File("data.bin", 64)
    base = TEST_VA + 2 * MiB
    task.mmap(64 * PAGE, PROT_READ | PROT_WRITE, file=data, addr=base)
    task.touch(base, base + PAGE, write=False)
    task.touch(base + PAGE, base + 2 * PAGE, write=False)  # fault-around maps 0..15 read-only
    task.touch(base + 20 * PAGE, base + 21 * PAGE, write=False)  # and 16..31
    assert kernel.ctx.pages.refcount[data.pages[0]] == 2
    task.populate(base, base + 40 * PAGE, write=True)  # 0..31 by wp_page_copy, 32..39 by do_cow_fault
    ptes = [user_pte(kernel, task, base + i * PAGE) for i in range(40)]
    assert all(p & x86.PT_WRITABLE_MASK and x86.pte_gfn(p) not in data.pages for p in ptes)
    assert kernel.ctx.pages.refcount[data.pages[:40]].tolist() == [1] * 40  # only the page cache's
