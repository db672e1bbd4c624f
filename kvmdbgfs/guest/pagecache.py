"""The page cache: files' pages in RAM, shared by every process mapping them, and shmem objects.

A regular file's pages come in by read-around on a mapped fault
(do_sync_mmap_readahead: ra_pages = 32 pages centred on the fault) or by
readahead on read(); they stay cached (no reclaim: an idle guest has plenty
of memory). A shmem file (MAP_SHARED|MAP_ANONYMOUS) gets a zeroed page per
index on first fault and gives its pages back when its last mapping goes.
The cache holds one reference on each of its pages.
"""

from __future__ import annotations

from typing import Final

from dataclasses import dataclass, field

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.guest.allocator import PAGE_CACHE
from kvmdbgfs.guest.kctx import KernelContext
from kvmdbgfs.guest.vaddr import direct_map

RA_PAGES: Final = 32  # VM_READAHEAD_PAGES: 128 KiB
READ_INIT_RA_PAGES: Final = 4  # get_init_ra_size for a one-page read()


@dataclass(eq=False)
class File:
    """An inode's page cache: ``pages[index]`` is the gfn caching that index, or -1."""

    name: str
    nr_pages: int
    shmem: bool = False
    mappings: int = 0  # VMAs mapping it (i_mmap); a shmem object dies with its last one
    pages: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.pages = np.full(self.nr_pages, -1, np.int64)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class PageCache:
    def __init__(self, ctx: KernelContext) -> None:
        self.ctx = ctx
        self.nr_pages = 0
        self.inodes: dict[File, None] = {}  # the files with pages in the cache, in the order they got one

    def owners(self, gfns: np.ndarray) -> list[tuple[File, np.ndarray, np.ndarray]]:
        """page->mapping and page->index of the page-cache pages among ``gfns``: (file, indices, frames)
        for each file holding some of them."""
        found = []
        for file in self.inodes:
            indices = np.flatnonzero(np.isin(file.pages, gfns))
            if len(indices):
                found.append((file, indices, file.pages[indices]))
        return found

    def _fill(self, file: File, start: int, end: int) -> None:
        """page_cache_ra_unbounded: allocate the missing pages of [start, end) in index order (I/O is DMA)."""
        window = np.arange(max(start, 0), min(end, file.nr_pages))
        missing = window[file.pages[window] < 0]
        if len(missing):
            file.pages[missing] = self.ctx.alloc(len(missing), PAGE_CACHE, zero=file.shmem)
            self.nr_pages += len(missing)
            self.inodes[file] = None

    def fault_page(self, file: File, index: int) -> int:
        """filemap_fault / shmem_fault: the page for ``index``, read around it (or allocated zeroed for shmem)."""
        if file.pages[index] < 0:
            if file.shmem:
                self._fill(file, index, index + 1)
            else:
                start = max(0, index - RA_PAGES // 2)
                self._fill(file, start, start + RA_PAGES)
        return int(file.pages[index])

    def read(self, file: File, index: int) -> int:
        """kernel_read of one page (an ELF header): readahead, then copy_to_user reads it through the direct map."""
        if file.pages[index] < 0:
            self._fill(file, index, index + READ_INIT_RA_PAGES)
        gfn = int(file.pages[index])
        self.ctx.kernel_access(direct_map(gfn), write=False)
        return gfn

    def release(self, file: File) -> None:
        """The last mapping of a shmem object went away: its pages are freed (shmem_evict_inode)."""
        cached = file.pages[file.pages >= 0]
        file.pages[:] = -1
        self.nr_pages -= len(cached)
        self.inodes.pop(file, None)
        self.ctx.pages.put(cached)
