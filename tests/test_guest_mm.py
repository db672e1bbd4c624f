"""Address-space system calls: layout, mmap/munmap of shared memory, mprotect, brk and stack growth."""

from __future__ import annotations

import pytest
from test_guest_helpers import TEST_VA, MiB, bare_process, hw, small_kernel, user_pte

from kvmdbgfs.guest.allocator import PAGE_FREE
from kvmdbgfs.guest.fault import GuestSegfault
from kvmdbgfs.guest.pte import PT_DIRTY_MASK, PT_WRITABLE_MASK, pte_gfn
from kvmdbgfs.guest.vaddr import ELF_ET_DYN_BASE, STACK_RLIMIT, TASK_SIZE
from kvmdbgfs.guest.vma import PROT_READ, PROT_WRITE

PAGE = 4096


def test_randomised_layout_and_top_down_mmap() -> None:
    kernel = small_kernel()
    task = bare_process(kernel)
    mm = task.mm
    assert mm is not None
    assert TASK_SIZE - (1 << 40) - (20 << 30) < mm.mmap_base < TASK_SIZE - (16 << 30)
    assert TASK_SIZE - (16 << 30) <= mm.stack_top <= TASK_SIZE
    assert ELF_ET_DYN_BASE <= mm.load_bias < ELF_ET_DYN_BASE + (1 << 40)
    first, second = task.mmap(3 * PAGE), task.mmap(PAGE)
    assert first.end <= mm.mmap_base and second.end <= first.start  # each below the previous
    assert bare_process(kernel).mm.mmap_base != mm.mmap_base  # type: ignore[union-attr]


def test_shared_memory_lives_until_its_last_mapping_goes() -> None:
    kernel = small_kernel()
    parent = bare_process(kernel)
    shm = parent.mmap(8 * PAGE, shared=True, addr=TEST_VA)
    parent.touch(shm.start, shm.end, write=True)
    pages = shm.file.pages.copy()  # type: ignore[union-attr]
    child = kernel.fork(parent)
    parent.munmap(TEST_VA, 4 * PAGE)  # splits the VMA: the other half still maps the object
    kernel.exit(parent)
    assert (kernel.ctx.pages.kind[pages] != PAGE_FREE).all()
    child.touch(TEST_VA, TEST_VA + 8 * PAGE, write=False)  # the child refaults the same pages
    assert [pte_gfn(user_pte(kernel, child, TEST_VA + i * PAGE)) for i in range(8)] == pages.tolist()
    child.munmap(TEST_VA, 2 * PAGE)
    child.munmap(TEST_VA + 2 * PAGE, 6 * PAGE)
    assert (kernel.ctx.pages.kind[pages] == PAGE_FREE).all()


def test_mprotect_rewrites_each_present_pte_and_flushes_the_range() -> None:
    kernel = small_kernel()
    task = bare_process(kernel)
    task.mmap(16 * PAGE, addr=TEST_VA)
    task.touch(TEST_VA, TEST_VA + 4 * PAGE, write=True)
    start = len(hw(kernel).events)
    task.mprotect(TEST_VA, 16 * PAGE, PROT_READ)
    events = hw(kernel).events[start:]
    assert [e.op for e in events] == ["store"] * 8 + ["invlpg"] * 16
    assert [e.value == 0 for e in events[:8]] == [True, False] * 4  # ptep_modify_prot_start / commit
    assert not user_pte(kernel, task, TEST_VA) & PT_WRITABLE_MASK and user_pte(kernel, task, TEST_VA) & PT_DIRTY_MASK
    with pytest.raises(GuestSegfault):
        task.touch(TEST_VA, TEST_VA + PAGE, write=True)
    task.mprotect(TEST_VA, 16 * PAGE, PROT_READ | PROT_WRITE)
    assert user_pte(kernel, task, TEST_VA) & PT_WRITABLE_MASK  # exclusive anonymous page: writable again


def test_brk_grows_and_shrinks_the_heap() -> None:
    kernel = small_kernel()
    task = bare_process(kernel)
    mm = task.mm
    assert mm is not None
    task.brk(mm.brk_start + 10 * PAGE)
    task.touch(mm.brk_start, mm.brk_start + 10 * PAGE, write=True)
    heap = mm.find_vma(mm.brk_start)
    assert heap is not None and heap.name == "[heap]" and heap.npages == 10
    task.brk(mm.brk_start + 3 * PAGE)
    assert heap.npages == 3 and not user_pte(kernel, task, mm.brk_start + 5 * PAGE)


def test_the_stack_grows_down_on_a_fault_up_to_its_limit() -> None:
    kernel = small_kernel()
    task = bare_process(kernel)
    mm = task.mm
    assert mm is not None
    low = mm.stack_top - MiB
    task.touch(low, low + PAGE, write=True)
    assert mm.find_vma(low).start == low  # type: ignore[union-attr]
    with pytest.raises(GuestSegfault):
        task.touch(mm.stack_top - STACK_RLIMIT - PAGE, mm.stack_top - STACK_RLIMIT, write=True)


def test_threads_share_the_mm_and_flushes_reach_every_vcpu_running_it() -> None:
    kernel = small_kernel()
    main = bare_process(kernel)
    thread = kernel.clone_thread(main)
    assert thread.mm is main.mm and thread.stack != main.stack and main.mm.users == 2  # type: ignore[union-attr]
    kernel.run(main, 0)
    kernel.run(thread, 1)
    thread.mmap(64 * PAGE, addr=TEST_VA)
    thread.touch(TEST_VA, TEST_VA + 64 * PAGE, write=True)
    start = len(hw(kernel).events)
    thread.munmap(TEST_VA, 64 * PAGE)
    flushes = [(e.op, e.cpu) for e in hw(kernel).events[start:] if e.op == "flush"]
    assert flushes == [("flush", 1), ("flush", 0)]  # the local vCPU first, then the IPI to the other
    kernel.exit_thread(thread)
    assert main.mm is not None and main.mm.users == 1 and kernel.ctx.memory.holds_table(main.mm.pgd)
    pgd = main.mm.pgd
    kernel.clone_thread(main)
    kernel.exit(main)  # exit_group: both threads go, then the mm
    assert not kernel.ctx.memory.holds_table(pgd) and not [t for t in kernel.tasks.values() if t.mm is not None]
