"""A task and the memory system calls of a process: mmap, munmap, mprotect, brk, and touching memory.

Every call runs on the vCPU the task is running on (the kernel switches to the
task first if it is not running), so the hardware sees the stores and accesses
from the right vCPU and through the task's CR3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kvmdbgfs.guest import fault, teardown
from kvmdbgfs.guest.allocator import HPAGE_PMD_NR
from kvmdbgfs.guest.distro import Elf
from kvmdbgfs.guest.huge import change_huge_pmd, is_huge, pmd_entry, split_huge_pmd
from kvmdbgfs.guest.kctx import KernelContext
from kvmdbgfs.guest.mm import Mm
from kvmdbgfs.guest.pagecache import File
from kvmdbgfs.guest.pgtable import PTE_CHG_MASK, U64, entry_range, present, present_indices, ptes_gfn, walk
from kvmdbgfs.guest.pte import PT_DIRTY_MASK, PT_WRITABLE_MASK, pte_gfn
from kvmdbgfs.guest.vaddr import PAGE_SIZE, PMD_SIZE, page_align
from kvmdbgfs.guest.vma import PROT_READ, PROT_WRITE, Vma

if TYPE_CHECKING:
    from kvmdbgfs.guest.kernel import GuestKernel


class LoadedElf:
    """An ELF object mapped into a process: its VMAs by segment name."""

    def __init__(self, elf: Elf, base: int, vmas: dict[str, Vma]) -> None:
        self.elf = elf
        self.base = base
        self.vmas = vmas

    def pages(self, segment: str) -> np.ndarray:
        vma = self.vmas.get(segment)
        if vma is None:
            return np.zeros(0, np.int64)
        return np.arange(vma.start, vma.end, PAGE_SIZE, dtype=np.int64)


@dataclass(eq=False)
class Task:
    """A task: a thread of a process (tasks sharing an mm are one process), or a kernel thread (mm None).
    ``stack`` is its kernel stack's address."""

    kernel: GuestKernel = field(repr=False)
    pid: int
    comm: str
    mm: Mm | None
    stack: int
    cpu: int
    parent: Task | None = field(default=None, repr=False)
    program: str = ""
    objects: list[LoadedElf] = field(default_factory=list, repr=False)  # executable, ld.so, libraries
    thread_stack_top: int = 0  # a thread's user stack (0: the main thread, whose stack is mm.stack_top)

    @property
    def user_stack_top(self) -> int:
        assert self.mm is not None
        return self.thread_stack_top or self.mm.stack_top

    @property
    def is_kthread(self) -> bool:
        return self.mm is None

    def _enter(self) -> tuple[KernelContext, Mm]:
        ctx = self.kernel.enter(self)
        if self.mm is None:
            raise ValueError(f"{self.comm} is a kernel thread: it has no address space")
        return ctx, self.mm

    # -- mappings ---------------------------------------------------------------
    def mmap(
        self,
        length: int,
        prot: int = PROT_READ | PROT_WRITE,
        *,
        shared: bool = False,
        file: File | None = None,
        pgoff: int = 0,
        name: str = "",
        addr: int | None = None,
        populate: bool = False,
    ) -> Vma:
        """do_mmap: anonymous, file-backed or (shared and no file) shmem; at ``addr`` (MAP_FIXED) or top-down."""
        ctx, mm = self._enter()
        length = page_align(length)
        if addr is None:
            addr = mm.get_unmapped_area(length)
        else:
            self._unmap(ctx, mm, addr, addr + length)
        if file is None:
            pgoff = 0  # do_mmap: anonymous mappings have no file offset
        if shared and file is None:
            file = File(
                f"/dev/zero (deleted) {self.pid}:{addr:#x}", length // PAGE_SIZE, shmem=True
            )  # shmem_zero_setup
        if file is not None:
            file.mappings += 1
        vma = Vma(addr, addr + length, prot, shared, file, pgoff, name)
        mm.insert(vma)
        if populate:  # populate_vma_page_range: FOLL_WRITE only for private writable mappings
            fault.populate(ctx, mm, vma.start, vma.end, bool(prot & PROT_WRITE) and not shared)
        return vma

    def munmap(self, start: int, length: int) -> None:
        ctx, mm = self._enter()
        self._unmap(ctx, mm, start, start + page_align(length))

    @staticmethod
    def _split(ctx: KernelContext, mm: Mm, start: int, end: int) -> list[Vma]:
        """The VMAs covering [start, end), split there; a THP across a split point is split first
        (vma_adjust_trans_huge)."""
        for at in (start, end):
            if at % PMD_SIZE and is_huge(pmd_entry(ctx, mm.pgd, at)[2]):
                vma = mm.find_vma(at)
                assert vma is not None
                split_huge_pmd(ctx, mm, vma, at // PMD_SIZE * PMD_SIZE)
        return mm.split(start, end)

    @staticmethod
    def _unmap(ctx: KernelContext, mm: Mm, start: int, end: int) -> None:
        """do_vmi_munmap: split, detach, unmap_region with the neighbours as floor and ceiling."""
        vmas = Task._split(ctx, mm, start, end)
        if not vmas:
            return
        mm.remove(vmas)
        floor, ceiling = mm.neighbours(start, end)
        teardown.unmap_region(ctx, mm, vmas, start, end, floor, ceiling, fullmm=False)

    def mprotect(self, start: int, length: int, prot: int) -> None:
        """mprotect_fixup + change_protection: each present PTE is cleared and rewritten with the new
        protection (ptep_modify_prot_start/commit); write access is kept only where it need not fault."""
        ctx, mm = self._enter()
        for vma in self._split(ctx, mm, start, start + page_align(length)):
            vma.prot = prot
            changed = False
            for level, va, table, index in walk(ctx, mm.pgd, vma.start, vma.end):
                entry = int(ctx.memory.table(table)[index])
                if level == 2 and is_huge(entry):
                    change_huge_pmd(ctx, mm, vma, va, table, index)
                    changed = True
                elif level == 2:
                    changed |= self._change_pte_range(ctx, vma, pte_gfn(entry), va)
            if changed:  # flush_tlb_range(vma, start, end)
                ctx.tlb.flush_tlb_mm_range(mm, ctx.cpu, vma.start, vma.end, False)

    @staticmethod
    def _change_pte_range(ctx: KernelContext, vma: Vma, pt: int, va: int) -> bool:
        i0, i1 = entry_range(va, 1, vma.start, vma.end)
        entries = ctx.memory.table(pt)
        indices = present_indices(entries, i0, i1)
        old = entries[indices]
        new = (old & U64(PTE_CHG_MASK)) | (U64(vma.page_prot()) & ~U64(PTE_CHG_MASK))
        if vma.prot & PROT_WRITE:  # can_change_pte_writable
            anon_exclusive = ctx.pages.exclusive_anon(ptes_gfn(old))
            writable = ((old & U64(PT_DIRTY_MASK)) != 0) if vma.shared else anon_exclusive
            new = np.where(writable, new | U64(PT_WRITABLE_MASK), new)
        ctx.stores(pt, np.repeat(indices, 2), np.column_stack([np.zeros_like(new), new]).ravel())
        return len(indices) > 0

    def madvise_hugepage(self, start: int, length: int) -> None:
        """madvise(MADV_HUGEPAGE): later faults in [start, start + length) may map transparent huge pages."""
        ctx, mm = self._enter()
        for vma in self._split(ctx, mm, start, start + page_align(length)):
            vma.hugepage = True

    def brk(self, new_brk: int) -> int:
        """sys_brk: grow the heap VMA (creating it at start_brk) or unmap its tail."""
        ctx, mm = self._enter()
        new_end, old_end = page_align(new_brk), page_align(mm.brk)
        if new_end < old_end:
            self._unmap(ctx, mm, new_end, old_end)
        elif new_end > old_end:
            heap = mm.find_vma(mm.brk_start)
            if heap is not None and heap.name == "[heap]":
                heap.end = new_end
            else:
                mm.insert(Vma(mm.brk_start, new_end, PROT_READ | PROT_WRITE, name="[heap]"))
        mm.brk = new_brk
        return new_brk

    # -- using memory ---------------------------------------------------------------
    def touch(self, start: int, end: int, write: bool, step: int = 1) -> None:
        """The program touches every ``step``-th page of [start, end), faulting where it has to."""
        ctx, mm = self._enter()
        fault.touch(ctx, mm, np.arange(start, end, step * PAGE_SIZE, dtype=np.int64), write)

    def touch_pages(self, gvas: np.ndarray, write: bool, fetch: bool = False) -> None:
        """The program touches the pages of ``gvas``, in that order (``fetch``: runs the code on them)."""
        ctx, mm = self._enter()
        fault.touch(ctx, mm, gvas, write, fetch=fetch)

    def access_user(self, start: int, end: int, write: bool) -> None:
        """The kernel reads or writes [start, end) of the task's memory through its user addresses, on the
        task's behalf (copy_from_user / copy_to_user / put_user of a system call)."""
        ctx, mm = self._enter()
        fault.touch(ctx, mm, np.arange(start, end, PAGE_SIZE, dtype=np.int64), write, user=False)

    def populate(self, start: int, end: int, write: bool) -> None:
        """madvise(MADV_POPULATE_READ/WRITE): fault [start, end) in without touching it."""
        ctx, mm = self._enter()
        fault.populate(ctx, mm, start, end, write)

    def resident_pages(self) -> int:
        """Present user PTEs (the process's RSS in pages, zero page included)."""
        ctx, mm = self.kernel.ctx, self.mm
        assert mm is not None
        total = 0
        for level, va, table, index in walk(ctx, mm.pgd, 0, 1 << 47):
            entry = int(ctx.memory.table(table)[index])
            if level == 2:
                total += HPAGE_PMD_NR if is_huge(entry) else int(present(ctx.memory.table(pte_gfn(entry))).sum())
        return total
