"""Tearing down: exit_mmap and munmap zap every present PTE, free the page tables, flush, free the pages."""

from __future__ import annotations

from test_guest_helpers import TEST_VA, MiB, bare_process, hw, pte_table, small_kernel

from kvmdbgfs.guest.allocator import PAGE_FREE
from kvmdbgfs.guest.pgtable import walk
from kvmdbgfs.guest.pte import pte_gfn
from kvmdbgfs.guest.teardown import GATHER_CAPACITY, MAX_GATHER_BATCH_COUNT

PAGE = 4096


def user_tables(kernel, task) -> dict[int, int]:  # type: ignore[no-untyped-def]
    """Every page-table page of the task's user half and its level, the pgd first."""
    tables = {task.mm.pgd: 4}
    for level, _, table, index in walk(kernel.ctx, task.mm.pgd, 0, 1 << 47):
        tables[pte_gfn(int(kernel.ctx.memory.table(table)[index]))] = level - 1
    return tables


def test_exit_zaps_every_pte_frees_every_table_and_balances_the_allocator() -> None:
    kernel = small_kernel()
    parent = bare_process(kernel)
    before = kernel.stats()
    child = kernel.spawn("sh", parent)
    tables, pgd = user_tables(kernel, child), child.mm.pgd
    resident = child.resident_pages()
    pgd_entries = int((kernel.ctx.memory.table(child.mm.pgd)[:256] != 0).sum())
    cpu, start = child.cpu, len(hw(kernel).events)
    kernel.exit(child)
    events = hw(kernel).events[start:]
    zeroed = [e for e in events if e.op == "store" and e.value == 0]
    pt_and_pmd = {table for table, level in tables.items() if level <= 2}
    assert sum(e.gfn in pt_and_pmd for e in zeroed) >= resident  # each present PTE (and the PMDs) cleared
    assert sum(e.gfn == pgd for e in zeroed) == pgd_entries
    cr3 = [e for e in events if e.op == "cr3"]
    assert [(e.cpu, e.gfn) for e in cr3] == [(cpu, kernel.kpt.pgd)]  # the lazy vCPU leaves for init_mm
    assert all(not kernel.ctx.memory.holds_table(t) and kernel.ctx.pages.kind[t] == PAGE_FREE for t in tables)
    after = kernel.stats()
    assert after["pages_anon"] == before["pages_anon"]
    assert after["pages_pagetable"] == before["pages_pagetable"]
    grown = after["pages_pagecache"] - before["pages_pagecache"] + after["pages_kernel"] - before["pages_kernel"]
    assert after["pages_allocated"] - before["pages_allocated"] == grown
    assert after["pages_kernel"] - before["pages_kernel"] == 4  # the child's kernel stack, now cached


def test_many_forks_and_exits_leave_nothing_behind() -> None:
    kernel = small_kernel()
    parent = bare_process(kernel)

    def fork_exec_exit() -> None:
        middle = kernel.fork(parent)
        kernel.exit(kernel.spawn("sh", middle))
        kernel.exit(middle)

    for _ in range(4):  # warm the page cache and both vCPUs' kernel-stack caches
        fork_exec_exit()
    before = kernel.stats()
    for _ in range(10):
        fork_exec_exit()
    assert kernel.stats() == before


def test_munmap_flushes_per_page_or_fully_and_frees_only_unshared_tables() -> None:
    kernel = small_kernel()
    task = bare_process(kernel)
    low = task.mmap(64 * PAGE, addr=TEST_VA)
    high = task.mmap(64 * PAGE, addr=TEST_VA + MiB)
    task.populate(low.start, low.end, write=True)
    task.populate(high.start, high.end, write=True)
    pt = pte_table(kernel, task, TEST_VA)
    start = len(hw(kernel).events)
    task.munmap(TEST_VA + 10 * PAGE, 2 * PAGE)
    ops = [e.op for e in hw(kernel).events[start:]]
    assert ops == ["store", "store", "invlpg", "invlpg"]
    start = len(hw(kernel).events)
    task.munmap(TEST_VA, 64 * PAGE)
    ops = [e.op for e in hw(kernel).events[start:]]
    assert ops.count("flush") == 1 and ops.count("invlpg") == 0  # 62 pages: more than the ceiling of 33
    assert kernel.ctx.memory.holds_table(pt)  # still used by the other mapping
    task.munmap(TEST_VA + MiB, 64 * PAGE)
    assert kernel.ctx.pages.kind[pt] == PAGE_FREE  # free_pgtables: nothing left below that PMD ... and above
    assert kernel.ctx.memory.read_pte(task.mm.pgd, 0) == 0


def test_a_full_mmu_gather_flushes_in_the_middle_of_the_zap() -> None:
    kernel = small_kernel()
    task = bare_process(kernel)
    big = task.mmap(40 * MiB, addr=TEST_VA)
    task.populate(big.start, big.end, write=True)
    free_before = kernel.ctx.pages.nr_free
    start = len(hw(kernel).events)
    task.munmap(big.start, 40 * MiB)
    events = hw(kernel).events[start:]
    flushes = [i for i, e in enumerate(events) if e.op == "flush"]
    assert len(flushes) == 2
    stores_before_first = sum(e.op == "store" and e.value == 0 for e in events[: flushes[0]])
    assert stores_before_first == GATHER_CAPACITY
    batch_pages = [e for e in events if e.op == "access" and not e.user]  # init_on_alloc clears them
    assert len(batch_pages) == MAX_GATHER_BATCH_COUNT
    assert kernel.ctx.pages.nr_free == free_before + 40 * MiB // PAGE + 20 + 2  # data, 20 PTs, the PD and PUD
