"""The kernel's slab caches as the hypervisor sees them: pages written through the direct map.

task_struct, mm_struct, VMAs, files, credentials, dentries and inodes live in
slab pages. A pool of them is allocated and written at boot (the caches fill
up while the system starts); creating a task or an address space writes a few
of those pages again (kmem_cache_alloc, kfree).
"""

from __future__ import annotations

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.guest.allocator import PAGE_KERNEL
from kvmdbgfs.guest.kctx import KernelContext
from kvmdbgfs.guest.vaddr import direct_map


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class Slab:
    def __init__(self, ctx: KernelContext, rng: np.random.Generator, npages: int) -> None:
        self.ctx = ctx
        self.rng = rng
        self.pages = ctx.pages.alloc(npages, PAGE_KERNEL)
        ctx.kernel_access(direct_map(self.pages), write=True)

    def touch(self, objects: int) -> None:
        """Allocate (or free) ``objects`` objects: each writes one of the pool's pages."""
        if len(self.pages):
            picks = sorted(set(self.rng.integers(len(self.pages), size=objects).tolist()))  # np.unique, cheaper
            self.ctx.kernel_access(direct_map(self.pages[picks]), write=True)
