"""Memory hotplug in the guest (mm/memory_hotplug.c) for an ACPI pc-dimm, as the kernel's hotplug worker runs it.

Plug: the ACPI memory device's _CRS gives the range; add_memory maps it
(arch_add_memory: direct map with large pages, memmap) and the memory blocks
are onlined at once by the auto-online policy. The model uses
``memhp_default_state=online_movable`` (what distributions with udev or
kernel auto-online of hot-plugged memory as ZONE_MOVABLE do, so that it can
be unplugged again): online_pages initialises the struct pages
(move_pfn_range_to_zone) and gives the frames to ZONE_MOVABLE, which only
movable allocations (user anonymous and page-cache pages) use, and prefer.

Unplug: offline_pages isolates the range, migrates every page in use out of
it and takes the frames out of the allocator; remove_memory then tears down
the memmap and the direct map (arch_remove_memory). Only then does the
guest eject the device (_EJ0) and QEMU delete the memslots.
"""

from __future__ import annotations

from typing import Final, TYPE_CHECKING

import numpy as np

from kvmdbgfs.guest.allocator import PAGE_FREE
from kvmdbgfs.guest.kctx import KernelContext
from kvmdbgfs.guest.migrate import MigrationResult, migrate_pages
from kvmdbgfs.guest.physmem import SECTION_PAGES
from kvmdbgfs.guest.vaddr import PAGE_SIZE, STRUCT_PAGE_SIZE, vmemmap

if TYPE_CHECKING:
    from kvmdbgfs.guest.kernel import GuestKernel

MEMORY_BLOCK_PAGES: Final = SECTION_PAGES  # memory_block_size_bytes(): 128 MiB on x86-64 guests below 64 GiB
HOTPLUG_WORKER: Final = "kworker/u"  # kacpi_hotplug_wq is an unbound workqueue


def _hotplug_worker(kernel: GuestKernel) -> KernelContext:
    """The ACPI hotplug work runs on an unbound kworker: switch to it (lazy TLB)."""
    worker = next(task for task in kernel.tasks.values() if task.comm.startswith(HOTPLUG_WORKER))
    return kernel.run(worker)


def check_hotplug_memory_range(start: int, end: int) -> None:
    """check_hotplug_memory_range: a non-empty range of whole memory blocks."""
    if start >= end or start % MEMORY_BLOCK_PAGES or end % MEMORY_BLOCK_PAGES:
        size = MEMORY_BLOCK_PAGES * PAGE_SIZE >> 20
        raise ValueError(f"hotplug range {start:#x}-{end:#x} is not whole {size} MiB memory blocks")


def add_memory(kernel: GuestKernel, start: int, end: int) -> None:
    """add_memory of frames [start, end), then online_pages of its blocks into ZONE_MOVABLE."""
    check_hotplug_memory_range(start, end)
    ctx = _hotplug_worker(kernel)
    kernel.kpt.arch_add_memory(start, end)
    per_page = PAGE_SIZE // STRUCT_PAGE_SIZE
    ctx.kernel_access(vmemmap(np.arange(start, end, per_page)), write=True)  # memmap_init_range
    ctx.pages.online_movable(start, end)


def offline_and_remove_memory(kernel: GuestKernel, start: int, end: int) -> MigrationResult:
    """offline_pages of [start, end) (isolate, migrate what is in use, take the frames out of the
    allocator), then remove_memory (arch_remove_memory). A failed migration undoes the isolation."""
    ctx = _hotplug_worker(kernel)
    zone = ctx.pages.movable
    if zone is None or (zone.start, zone.end) != (start, end):
        raise ValueError(f"frames {start:#x}-{end:#x} are not an online movable range")
    zone.isolated = True  # start_isolate_page_range
    in_use = start + np.flatnonzero(ctx.pages.kind[start:end] != PAGE_FREE)
    try:
        result = migrate_pages(kernel, in_use, start, end)
    except MemoryError:
        zone.isolated = False  # undo_isolate_page_range
        raise
    ctx.pages.offline_movable()
    kernel.kpt.arch_remove_memory(start, end)
    return result
