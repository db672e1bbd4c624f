"""What every part of the guest kernel works with: the vCPU it runs on, RAM and the page allocator.

All hardware traffic of the guest goes through here. ``batch`` selects how
PTE stores reach the hardware: one ``store_ptes`` per page-table page and
step (batch paths), or one ``store_pte`` per entry in the order Linux writes
them (one-by-one). Both give the same memory and the same per-page sequence
of events; tests hold them to that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.guest.allocator import PAGE_TABLE, PageAllocator
from kvmdbgfs.guest.hardware import GuestHardware
from kvmdbgfs.guest.vaddr import direct_map

if TYPE_CHECKING:
    from kvmdbgfs.guest.pagecache import PageCache
    from kvmdbgfs.guest.pti import PageTableIsolation
    from kvmdbgfs.guest.tlb import Tlb


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class KernelContext:
    """The running guest kernel's view of the machine."""

    def __init__(self, hardware: GuestHardware, batch: bool, init_on_alloc: bool, thp: str) -> None:
        self.hw = hardware
        self.memory = hardware.memory
        self.batch = batch
        self.init_on_alloc = init_on_alloc
        self.thp = thp  # transparent_hugepage/enabled: "always", "madvise" or "never"
        self.cpu = 0  # the vCPU the kernel code being modelled runs on
        self.pti: PageTableIsolation | None = None  # page-table isolation (set by the kernel when booted with it)
        # Set up by the kernel at boot:
        self.pages: PageAllocator  # once memblock hands memory over
        self.tlb: Tlb
        self.cache: PageCache
        self.zero_pfn: int  # empty_zero_page, mapped read-only by anonymous read faults

    # -- memory -------------------------------------------------------------
    def alloc(self, n: int, kind: int, zero: bool) -> np.ndarray:
        """alloc_pages(); __GFP_ZERO (or init_on_alloc) clears each page through the direct map."""
        gfns = self.pages.alloc(n, kind)
        if zero or self.init_on_alloc:
            self.kernel_access(direct_map(gfns), write=True)
        return gfns

    def alloc_table(self) -> int:
        """A zeroed page-table page (GFP_PGTABLE_USER / GFP_PGTABLE_KERNEL): alloc() of one page, on Python ints
        (fork allocates thousands, one at a time)."""
        gfn = self.pages.alloc_page(PAGE_TABLE)
        self.kernel_access(direct_map([gfn]), write=True)
        return gfn

    def free_tables(self, gfns: list[int] | np.ndarray) -> None:
        """pte_free / pmd_free / pud_free / pgd_free: the pages go back to the allocator."""
        for gfn in gfns:
            self.memory.free_table(int(gfn))
        self.pages.free(np.asarray(gfns, np.int64))

    # -- stores ---------------------------------------------------------------
    def kernel_mode(self) -> None:
        """What the kernel does on this vCPU runs on a kernel pgd: under PTI, the entry's CR3 switch."""
        pti = self.pti
        if pti is not None and self.cpu in pti.on_user:  # else the vCPU is on a kernel pgd already
            pti.to_kernel(self.cpu)

    def store(self, gfn: int, index: int, value: int) -> None:
        self.kernel_mode()
        self.hw.store_pte(self.cpu, gfn, index, value)

    def stores(self, gfn: int, indices: np.ndarray, values: np.ndarray) -> None:
        """Stores into one page-table page, in order: one store_ptes, or one store_pte each."""
        if len(indices) == 0:
            return
        self.kernel_mode()
        if self.batch:
            self.hw.store_ptes(self.cpu, gfn, indices, values)
        else:
            for index, value in zip(indices.tolist(), np.asarray(values, np.uint64).tolist()):
                self.hw.store_pte(self.cpu, gfn, index, value)

    def paired_stores(
        self,
        first: int,
        first_mask: np.ndarray,
        first_values: np.ndarray,
        second: int,
        indices: np.ndarray,
        second_values: np.ndarray,
    ) -> None:
        """For each entry i in order: a store into ``first`` (where ``first_mask``), then one into ``second``.

        Batched as one store_ptes per page (stores to different pages commute)."""
        self.kernel_mode()
        if self.batch:
            self.stores(first, indices[first_mask], first_values[first_mask])
            self.stores(second, indices, second_values)
            return
        for i, index in enumerate(indices.tolist()):
            if first_mask[i]:
                self.hw.store_pte(self.cpu, first, index, int(first_values[i]))
            self.hw.store_pte(self.cpu, second, index, int(second_values[i]))

    # -- accesses and TLB ----------------------------------------------------------
    def user_access(self, gvas: np.ndarray, write: bool, pgd: int, fetch: bool = False) -> None:
        """User code of the process whose pgd is ``pgd`` (loaded on this vCPU) touches ``gvas`` (``fetch``:
        executes them)."""
        if len(gvas):
            if self.pti is not None:
                self.pti.to_user(self.cpu, pgd)
            self.hw.access(self.cpu, np.asarray(gvas, np.uint64), write, True, fetch)

    def kernel_access(self, gvas: np.ndarray, write: bool, fetch: bool = False) -> None:
        if len(gvas):
            self.kernel_mode()
            self.hw.access(self.cpu, np.asarray(gvas, np.uint64), write, False, fetch)

    def invlpg(self, gva: int) -> None:
        self.kernel_mode()
        self.hw.invlpg(self.cpu, gva)
