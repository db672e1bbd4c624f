"""The x86-64 (4-level) virtual address map of a Linux guest (Documentation/arch/x86/x86_64/mm.rst).

Kernel regions are at their non-KASLR bases (``nokaslr`` for the memory regions);
user-space randomisation (mmap base, stack, PIE load address, brk) is applied
by the mm with the guest's random generator.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from kvmdbgfs.guest.pte import PAGE_SHIFT

PAGE_SIZE: Final = 1 << PAGE_SHIFT
PMD_SHIFT: Final = 21
PMD_SIZE: Final = 1 << PMD_SHIFT
MASK64: Final = (1 << 64) - 1

# Kernel half (PML4 entries 256..511).
PAGE_OFFSET: Final = 0xFFFF888000000000  # direct map of all physical memory
VMALLOC_START: Final = 0xFFFFC90000000000
VMALLOC_SIZE: Final = 32 << 40  # 32 TiB with 4-level paging
VMEMMAP_START: Final = 0xFFFFEA0000000000  # struct page array, 64 bytes per pfn
START_KERNEL_MAP: Final = 0xFFFFFFFF80000000  # __START_KERNEL_map: kernel image at phys + this
MODULES_VADDR: Final = 0xFFFFFFFFC0000000  # __START_KERNEL_map + KERNEL_IMAGE_SIZE (1 GiB)
STRUCT_PAGE_SIZE: Final = 64

# User half.
TASK_SIZE: Final = (1 << 47) - PAGE_SIZE
ELF_ET_DYN_BASE: Final = (TASK_SIZE // 3 * 2) & ~(PAGE_SIZE - 1)  # where PIE executables load
MMAP_RND_BITS: Final = 28  # arch_mmap_rnd: 28 bits of pages
STACK_RND_PAGES: Final = 1 << 22  # randomize_stack_top: 22 bits of pages
BRK_RND: Final = 0x02000000  # arch_randomize_brk: up to 32 MiB above the end of bss
STACK_GUARD_GAP: Final = 256 * PAGE_SIZE
STACK_RLIMIT: Final = 8 << 20


def u64(value: int) -> np.ndarray:
    """``value`` as a 0-d uint64 array: numpy combines one with an array faster than it does a scalar."""
    return np.array(value, np.uint64)


SCALAR_VAS: Final = 8  # up to this many addresses, Python ints cost less than numpy's operations


def kernel_vas(base: int, offsets: np.ndarray | list[int], scale: int = PAGE_SIZE) -> np.ndarray:
    """Kernel-half addresses base + offsets * scale (uint64: they do not fit int64)."""
    if isinstance(offsets, list):
        return np.array([base + offset * scale for offset in offsets], np.uint64)
    offsets = np.asarray(offsets)
    if offsets.ndim == 1 and len(offsets) <= SCALAR_VAS:
        return kernel_vas(base, offsets.tolist(), scale)
    return offsets.astype(np.uint64) * u64(scale) + u64(base)


def direct_map(gfns: np.ndarray | list[int] | int) -> np.ndarray:
    """__va(): the kernel's direct-map address of each frame."""
    return kernel_vas(PAGE_OFFSET, gfns if isinstance(gfns, list) else np.asarray(gfns).reshape(-1))


def vmemmap(gfns: np.ndarray) -> np.ndarray:
    """pfn_to_page(): the address of each frame's struct page."""
    return kernel_vas(VMEMMAP_START, gfns, STRUCT_PAGE_SIZE)


def page_align(size: int) -> int:
    return (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
