"""Transparent huge pages: THP faults, fork, COW by splitting, zap, mprotect, and the allocator's blocks."""

from __future__ import annotations

from test_guest_helpers import TEST_VA, MiB, bare_process, hw, small_kernel

from kvmdbgfs.guest import pte as x86
from kvmdbgfs.guest.allocator import HPAGE_PMD_NR, PAGE_FREE
from kvmdbgfs.guest.huge import is_huge, pmd_entry
from kvmdbgfs.guest.kernel import GuestKernel, KernelConfig
from kvmdbgfs.guest.pgtable import PAGE_TABLE
from kvmdbgfs.guest.process import Task
from kvmdbgfs.guest.vma import PROT_READ

PAGE = 4096
THP_VA = TEST_VA + 16 * MiB  # 2 MiB aligned


def thp_process(kernel: GuestKernel, size: int = 4 * MiB) -> Task:
    task = bare_process(kernel)
    task.mmap(size, addr=THP_VA)
    task.madvise_hugepage(THP_VA, size)
    return task


def pmd(kernel: GuestKernel, task: Task, va: int) -> int:
    assert task.mm is not None
    return pmd_entry(kernel.ctx, task.mm.pgd, va)[2]


def test_a_fault_maps_a_whole_thp_with_one_pmd() -> None:
    kernel = small_kernel()
    task = thp_process(kernel)
    start = len(hw(kernel).events)
    task.touch(THP_VA + 5 * PAGE, THP_VA + 6 * PAGE, write=True)
    entry = pmd(kernel, task, THP_VA)
    assert is_huge(entry) and entry & x86.PT_WRITABLE_MASK and entry & x86.PT_DIRTY_MASK
    page = x86.pte_gfn(entry)
    assert page % HPAGE_PMD_NR == 0 and task.resident_pages() > HPAGE_PMD_NR
    clears = [e for e in hw(kernel).events[start:] if e.op == "access" and not e.user and e.write]
    assert [e.gfn for e in clears[-HPAGE_PMD_NR:]] == list(range(page, page + HPAGE_PMD_NR))
    assert task.mm is not None and list(task.mm.deposited) == [THP_VA]
    assert not is_huge(pmd(kernel, task, THP_VA + 4 * MiB))  # outside the VMA: nothing


def test_no_thp_without_madvise_and_thp_always_without() -> None:
    kernel = small_kernel()
    task = bare_process(kernel)
    task.mmap(4 * MiB, addr=THP_VA)
    task.touch(THP_VA, THP_VA + PAGE, write=True)
    assert not is_huge(pmd(kernel, task, THP_VA))
    always = GuestKernel(256 * MiB, type(hw(kernel))(), kernel.rng, 2, config=KernelConfig(thp="always"))
    task = bare_process(always)
    task.mmap(4 * MiB, addr=THP_VA)
    task.touch(THP_VA, THP_VA + PAGE, write=False)  # use_zero_page is not modelled: a read gets a THP too
    assert is_huge(pmd(always, task, THP_VA))


def test_fork_shares_the_thp_and_a_write_splits_then_copies() -> None:
    kernel = small_kernel()
    parent = thp_process(kernel)
    parent.touch(THP_VA, THP_VA + PAGE, write=True)
    before = pmd(kernel, parent, THP_VA)
    page = x86.pte_gfn(before)
    child = kernel.fork(parent)
    assert pmd(kernel, parent, THP_VA) == before & ~x86.PT_WRITABLE_MASK
    assert pmd(kernel, child, THP_VA) == before & ~(x86.PT_WRITABLE_MASK | x86.PT_ACCESSED_MASK)
    assert (kernel.ctx.pages.refcount[page : page + HPAGE_PMD_NR] == 2).all()
    pd = pmd_entry(kernel.ctx, child.mm.pgd, THP_VA)[0]  # type: ignore[union-attr]
    deposit = child.mm.deposited[THP_VA]  # type: ignore[union-attr]
    kernel.run(child)
    start = len(hw(kernel).events)
    child.touch(THP_VA + 3 * PAGE, THP_VA + 4 * PAGE, write=True)
    ops = [(e.op, e.gfn) for e in hw(kernel).events[start:] if e.op != "access"]
    split = [("store", pd), ("invlpg", -1)] + [("store", deposit)] * HPAGE_PMD_NR + [("store", pd)]
    assert ops[: len(split)] == split
    assert ops[len(split) :] == [("store", deposit), ("invlpg", -1), ("store", deposit)]  # wp_page_copy
    assert pmd(kernel, child, THP_VA) == x86.make_pte(deposit, PAGE_TABLE)
    assert kernel.ctx.pages.refcount[page + 3] == 1 and kernel.ctx.pages.refcount[page + 4] == 2
    parent.touch(THP_VA + 3 * PAGE, THP_VA + 4 * PAGE, write=True)  # the parent's THP is split too ...
    assert not is_huge(pmd(kernel, parent, THP_VA))
    assert kernel.ctx.pages.refcount[page + 3] == 1  # ... and page 3 is its own now: reused, not copied


def test_exit_frees_the_thp_as_a_block_and_munmap_of_a_part_splits_it() -> None:
    kernel = small_kernel()
    task = thp_process(kernel)
    task.touch(THP_VA, THP_VA + 4 * MiB, write=True)
    pages = [x86.pte_gfn(pmd(kernel, task, THP_VA + i * 2 * MiB)) for i in range(2)]
    task.munmap(THP_VA + 2 * MiB + 100 * PAGE, 4 * PAGE)
    second = pmd(kernel, task, THP_VA + 2 * MiB)
    assert second & x86.PT_PRESENT_MASK and not second & x86.PT_PAGE_SIZE_MASK
    assert (kernel.ctx.pages.kind[pages[1] + 100 : pages[1] + 104] == PAGE_FREE).all()
    start = len(hw(kernel).events)
    task.munmap(THP_VA, 2 * MiB)
    assert [e.op for e in hw(kernel).events[start:]] == ["store", "invlpg"]  # one PMD, one 2 MiB INVLPG
    assert (kernel.ctx.pages.kind[pages[0] : pages[0] + HPAGE_PMD_NR] == PAGE_FREE).all()
    assert kernel.ctx.pages.alloc_huge(0) == pages[0]  # a freed THP is the next THP handed out


def test_mprotect_of_a_whole_thp_keeps_it_huge() -> None:
    kernel = small_kernel()
    task = thp_process(kernel)
    task.touch(THP_VA, THP_VA + PAGE, write=True)
    start = len(hw(kernel).events)
    task.mprotect(THP_VA, 2 * MiB, PROT_READ)
    entry = pmd(kernel, task, THP_VA)
    assert is_huge(entry) and not entry & x86.PT_WRITABLE_MASK and entry & x86.PT_DIRTY_MASK
    assert [e.op for e in hw(kernel).events[start:]] == ["store", "invlpg", "store", "flush"]  # range: 4K stride
