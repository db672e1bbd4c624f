"""The kernel half of the address space: direct map, kernel image, memmap, vmalloc; shared by every process."""

from __future__ import annotations

import numpy as np
from test_guest_helpers import bare_process, hw, small_kernel

from kvmdbgfs.guest.kpgtable import KERNEL_PGD_BOUNDARY, split_mem_range
from kvmdbgfs.guest.pte import PT_PAGE_SIZE_MASK, PT_WRITABLE_MASK, pt_index, pte_gfn
from kvmdbgfs.guest.recording import translate
from kvmdbgfs.guest.vaddr import PAGE_OFFSET, START_KERNEL_MAP, VMALLOC_START, direct_map, vmemmap

GiB = 1 << 30


def test_split_mem_range_uses_the_largest_pages_that_fit() -> None:
    assert split_mem_range(0x100, 0x7FFDC, gbpages=True) == [
        (0x100, 0x200, 1),
        (0x200, 0x40000, 2),
        (0x40000, 0x7FE00, 2),
        (0x7FE00, 0x7FFDC, 1),
    ]
    assert split_mem_range(0x100000, 0x200000, gbpages=True) == [(0x100000, 0x200000, 3)]
    assert split_mem_range(0x100000, 0x140000, gbpages=False) == [(0x100000, 0x140000, 2)]


def test_direct_map_covers_all_ram_and_only_ram() -> None:
    kernel = small_kernel(memory=6 * GiB)
    memory, pgd = hw(kernel).memory, kernel.kpt.pgd
    ram = kernel.boot_memory.ram
    pfns = np.concatenate([np.r_[s:e:97, e - 1] for s, e in ram] + [np.arange(0, 0x100)])
    assert all(translate(memory, pgd, int(va))[0] == pfn for pfn, va in zip(pfns.tolist(), direct_map(pfns).tolist()))
    for hole in (0x7FFFF, 0x90000, 0xFFFFF):  # firmware-reserved and the PCI hole: not mapped
        assert translate(memory, pgd, PAGE_OFFSET + hole * 4096)[0] == -1
    pud = pte_gfn(memory.read_pte(pgd, pt_index(PAGE_OFFSET, 4)))
    entries = [memory.read_pte(pud, i) for i in range(8)]
    assert [bool(e & PT_PAGE_SIZE_MASK) for e in entries] == [False, False, False, False, True, True, True, True]
    assert [pte_gfn(e) for e in entries[4:]] == [0x100000, 0x140000, 0x180000, 0x1C0000]  # gbpages above 4 GiB


def test_kernel_image_memmap_and_vmalloc_mappings() -> None:
    kernel = small_kernel()
    memory, pgd = hw(kernel).memory, kernel.kpt.pgd
    text = START_KERNEL_MAP + 0x1000000
    gfn, path = translate(memory, pgd, text + 5 * 4096)
    assert gfn == 0x1000 + 5 and len(path) == 3  # a 2M page: PML4, PDPT, PD
    assert not memory.read_pte(path[-1], pt_index(text, 2)) & PT_WRITABLE_MASK
    assert (
        translate(memory, pgd, int(vmemmap(np.array([0x1234]))[0]))[0]
        == kernel.boot_memory.memmap_sections[0] + 0x1234 // 64
    )
    vmalloc_pgd = [memory.read_pte(pgd, pt_index(VMALLOC_START, 4) + i) for i in range(64)]
    assert all(vmalloc_pgd)  # preallocate_vmalloc_pages


def test_every_process_shares_the_kernel_tables() -> None:
    kernel = small_kernel()
    memory = hw(kernel).memory
    first = bare_process(kernel)
    second = kernel.fork(first)
    third = kernel.spawn("sh", second)
    kernel_half = memory.table(kernel.kpt.pgd)[KERNEL_PGD_BOUNDARY:]
    for task in (first, second, third):
        assert task.mm is not None and task.mm.pgd != kernel.kpt.pgd
        assert (memory.table(task.mm.pgd)[KERNEL_PGD_BOUNDARY:] == kernel_half).all()
    assert np.count_nonzero(kernel_half) == 1 + 64 + 1 + 1  # direct map, vmalloc, vmemmap, kernel image


def test_kernel_stacks_are_vmalloc_4k_mappings_and_cached_per_cpu() -> None:
    kernel = small_kernel()
    memory, pgd = hw(kernel).memory, kernel.kpt.pgd
    parent = bare_process(kernel)
    children = [kernel.fork(parent) for _ in range(3)]
    for child in children:
        assert [translate(memory, pgd, child.stack + i * 4096)[0] for i in range(4)] == kernel.stacks.pages[
            child.stack
        ].tolist()
    cpu = parent.cpu
    for child in children:
        kernel.run(child, cpu)
        kernel.exit(child)
    assert sorted(va for va in kernel.stacks.cache[cpu] if va is not None) == sorted(c.stack for c in children[:2])
    assert translate(memory, pgd, children[2].stack)[0] == -1  # the third was vfree'd
    assert kernel.fork(parent).stack in (children[0].stack, children[1].stack)
