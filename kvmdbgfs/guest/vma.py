"""struct vm_area_struct: a mapping, its protection and what backs it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvmdbgfs.guest.pagecache import File
from kvmdbgfs.guest.pte import PT64_NX_MASK, PT_ACCESSED_MASK, PT_PRESENT_MASK, PT_USER_MASK, PT_WRITABLE_MASK
from kvmdbgfs.guest.vaddr import PAGE_SIZE

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4


@dataclass(eq=False)
class Vma:
    """One mapping [start, end). ``file`` None is anonymous memory; shared anonymous memory is a shmem file.

    ``anon_vma`` is set once the mapping holds anonymous pages (anon_vma_prepare):
    that is what makes fork copy its page tables (vma_needs_copy).
    """

    start: int
    end: int
    prot: int
    shared: bool = False
    file: File | None = None
    pgoff: int = 0
    name: str = ""
    anon_vma: bool = False
    grows_down: bool = False
    hugepage: bool = False  # MADV_HUGEPAGE

    def dup(self) -> Vma:
        """vm_area_dup: a shallow copy, without copy.copy's dispatch (fork copies every VMA), field by field (a
        Vma compiled by mypyc has no __dict__ to copy; tests/test_guest_vma_dup.py keeps the list complete)."""
        return Vma(
            self.start, self.end, self.prot, self.shared, self.file, self.pgoff, self.name, self.anon_vma,
            self.grows_down, self.hugepage,
        )

    @property
    def npages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE

    def page_prot(self) -> int:
        """vm_get_page_prot: x86's protection_map. Private writable mappings are mapped read-only (COW)."""
        flags = PT_PRESENT_MASK | PT_USER_MASK | PT_ACCESSED_MASK
        if self.shared and self.prot & PROT_WRITE:
            flags |= PT_WRITABLE_MASK
        if not self.prot & PROT_EXEC:
            flags |= PT64_NX_MASK
        return flags

    def pgoff_at(self, va: int) -> int:
        return self.pgoff + (va - self.start) // PAGE_SIZE

    def split(self, at: int) -> Vma:
        """__split_vma: shrink this one to [start, at) and return [at, end)."""
        tail = replace(self, start=at, pgoff=self.pgoff_at(at) if self.file else 0)
        if tail.file is not None:
            tail.file.mappings += 1
        self.end = at
        return tail
