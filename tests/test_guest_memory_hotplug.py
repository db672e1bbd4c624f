"""Memory hotplug in the guest on bare metal: add_memory + online_movable, use, offline (migration) + remove."""

from __future__ import annotations

import numpy as np
import pytest
from test_guest_helpers import TEST_VA, bare_process, hw, small_kernel, user_pte

from kvmdbgfs.guest.allocator import PAGE_ANON, PAGE_CACHE, PAGE_HOLE
from kvmdbgfs.guest.kpgtable import memmap_va
from kvmdbgfs.guest.memory_hotplug import add_memory, offline_and_remove_memory
from kvmdbgfs.guest.pgtable import table_at
from kvmdbgfs.guest.physmem import SECTION_PAGES
from kvmdbgfs.guest.pte import PT_PAGE_SIZE_MASK, pt_index, pte_gfn
from kvmdbgfs.guest.recording import translate
from kvmdbgfs.guest.vaddr import PAGE_OFFSET, PAGE_SIZE, direct_map, vmemmap

DIMM = (4 << 30) >> 12  # the first frame QEMU gives a DIMM on a small q35 guest
NPAGES = SECTION_PAGES  # one 128 MiB memory block
ANON_PAGES, SHM_PAGES = 300, 40


def in_dimm(gfns: np.ndarray | list[int]) -> np.ndarray:
    gfns = np.asarray(gfns)
    return (gfns >= DIMM) & (gfns < DIMM + NPAGES)


def ptes(kernel, task, start: int, npages: int) -> list[int]:
    return [user_pte(kernel, task, start + i * PAGE_SIZE) for i in range(npages)]


@pytest.fixture(scope="module")
def plugged():
    """A guest with a 128 MiB DIMM onlined, a process and its fork mapping private and shared memory on it."""
    kernel = small_kernel()
    kernel.kthread("kworker/u4:0")  # the hotplug worker
    parent = bare_process(kernel)
    add_memory(kernel, DIMM, DIMM + NPAGES)
    anon = parent.mmap(ANON_PAGES * PAGE_SIZE, addr=TEST_VA)
    parent.touch(anon.start, anon.end, write=True)
    shm = parent.mmap(SHM_PAGES * PAGE_SIZE, shared=True, addr=TEST_VA + (4 << 20))
    parent.touch(shm.start, shm.end, write=True)
    child = kernel.fork(parent)
    child.touch(shm.start, shm.end, write=False)
    child.touch(anon.start, anon.start + 10 * PAGE_SIZE, write=False)  # COW-shared with the parent since fork
    return kernel, parent, child, anon, shm


def test_plugged_memory_is_direct_mapped_with_large_pages_and_has_a_memmap(plugged) -> None:
    kernel, *_ = plugged
    memory, pgd = hw(kernel).memory, kernel.kpt.pgd
    pfns = np.arange(DIMM, DIMM + NPAGES, 997)
    assert [translate(memory, pgd, int(va))[0] for va in direct_map(pfns)] == pfns.tolist()
    pd = table_at(kernel.ctx, pgd, PAGE_OFFSET + DIMM * PAGE_SIZE, 2)
    assert all(memory.read_pte(pd, i) & PT_PAGE_SIZE_MASK for i in range(NPAGES // 512))  # 2M pages
    block = kernel.kpt.hotplug_memmap[DIMM // SECTION_PAGES]
    assert translate(memory, pgd, int(vmemmap(np.array([DIMM + 64]))[0]))[0] == block + 1
    assert kernel.ctx.pages.kind[block] != PAGE_HOLE and not in_dimm([block])[0]  # memmap in normal memory


def test_movable_user_pages_land_on_the_dimm_page_tables_do_not(plugged) -> None:
    kernel, parent, child, anon, shm = plugged
    anon_gfns = [pte_gfn(e) for e in ptes(kernel, parent, anon.start, ANON_PAGES)]
    shm_gfns = [pte_gfn(e) for e in ptes(kernel, parent, shm.start, SHM_PAGES)]
    assert in_dimm(anon_gfns).all() and in_dimm(shm_gfns).all()
    assert (kernel.ctx.pages.kind[shm_gfns] == PAGE_CACHE).all()
    pt = table_at(kernel.ctx, parent.mm.pgd, anon.start, 1)
    assert not in_dimm([pt, parent.mm.pgd, child.mm.pgd]).any()


def test_offline_migrates_every_page_and_keeps_what_processes_map(plugged) -> None:
    kernel, parent, child, anon, shm = plugged
    pages = kernel.ctx.pages
    managed = pages.managed_pages

    def mapped() -> tuple[list[int], ...]:
        return tuple(
            [pte_gfn(e) for e in ptes(kernel, task, vma.start, n)]
            for task, vma, n in (
                (parent, anon, ANON_PAGES),
                (child, anon, 10),
                (parent, shm, SHM_PAGES),
                (child, shm, SHM_PAGES),
            )
        )

    before = mapped()
    resident = [parent.resident_pages(), child.resident_pages()]
    refcounts = [pages.refcount[gfns].tolist() for gfns in before]
    in_use = int((pages.kind[DIMM : DIMM + NPAGES] != 0).sum())
    result = offline_and_remove_memory(kernel, DIMM, DIMM + NPAGES)
    after = mapped()
    assert result.pages == in_use == ANON_PAGES + SHM_PAGES
    assert result.ptes == 2 * (ANON_PAGES + SHM_PAGES)  # fork copied the private PTEs, the child faulted the shared
    assert not any(in_dimm(gfns).any() for gfns in after)
    moves = {(old, new) for olds, news in zip(before, after) for old, new in zip(olds, news)}
    assert len(moves) == len({old for old, _ in moves}) == len({new for _, new in moves}) == in_use  # one frame each
    assert after[1] == after[0][:10]  # still one COW-shared frame per page
    assert after[2] == after[3] == list(shm.file.pages)  # shmem pages moved in the page cache too
    assert [pages.refcount[gfns].tolist() for gfns in after] == refcounts
    assert (pages.kind[after[0]] == PAGE_ANON).all() and (pages.kind[after[2]] == PAGE_CACHE).all()
    assert [parent.resident_pages(), child.resident_pages()] == resident
    # The frames left the allocator; the direct map and the memmap are gone with their tables.
    assert (pages.kind[DIMM : DIMM + NPAGES] == PAGE_HOLE).all() and pages.managed_pages == managed - NPAGES
    memory, pgd = hw(kernel).memory, kernel.kpt.pgd
    assert translate(memory, pgd, int(direct_map(DIMM)[0]))[0] == -1
    assert table_at(kernel.ctx, pgd, PAGE_OFFSET + DIMM * PAGE_SIZE, 2) == -1  # the PMD page was freed
    vmemmap_pd = table_at(kernel.ctx, pgd, memmap_va(DIMM // SECTION_PAGES), 2)
    assert memory.read_pte(vmemmap_pd, pt_index(memmap_va(DIMM // SECTION_PAGES), 2)) == 0
    assert kernel.kpt.hotplug_memmap == {}


def test_offline_refuses_a_range_that_is_not_online() -> None:
    kernel = small_kernel()
    kernel.kthread("kworker/u4:0")
    with pytest.raises(ValueError, match="not an online movable range"):
        offline_and_remove_memory(kernel, DIMM, DIMM + NPAGES)
    with pytest.raises(ValueError, match="not whole 128 MiB memory blocks"):
        add_memory(kernel, DIMM, DIMM + 100)
