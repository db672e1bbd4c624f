"""rmap_fork: the seed series' benchmark (xzpeter/clibs rmap_fork.c), run inside the guest.

The parent maps a shared anonymous area and touches every page, forks N
children that sleep, then kills and reaps them all. A MAP_SHARED anonymous
area has no anon_vma, so fork does not copy its PTEs: per-child rmap growth
comes from what each child maps and touches that others share (COW-shared
private pages, library text) and from KVM's prefetch around its faults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kvmdbgfs.guest.distro import Program
from kvmdbgfs.workloads.base import Param, Progress, Workload
from kvmdbgfs.workloads.guest import booted_guest, require_booted
from kvmdbgfs.workloads.teardown import Started

if TYPE_CHECKING:
    from kvmdbgfs.vmm.qemu import QemuProcess

RMAP_FORK = Program("rmap_fork", "rmap_fork", ("libc.so.6",), heap_kib=132, stack_kib=16, text_frac=0.05)
SLEEP_STACK_PAGES = 2  # the child's first return to user space: sleep() writes its stack
SLEEP_LIBC_TEXT = 0.015  # of libc's hot-code windows (6 pages): fork's return path, sleep(), signals


class RmapFork(Workload):
    name = "rmap_fork"
    description = "fork N sleeping children of a process with a touched shared area, then kill and reap them"
    params = (
        Param("children", 500, 10, 1000, "children to fork (rmap_fork.c accepts 10..1000)"),
        Param("size", 1 << 20, 4096, 1 << 30, "the shared anonymous area", size=True),
    )
    check_vm = staticmethod(require_booted)

    def run(self, vm: QemuProcess, settings: dict[str, int], rng: np.random.Generator, progress: Progress) -> dict[str, Any]:
        system = booted_guest(vm)
        kernel = system.kernel
        total = 2 * settings["children"] + 2
        before = vm.kvm.stat.max_mmu_rmap_size
        with Started(kernel) as started:
            parent = started.spawn(RMAP_FORK, system.session[-1])
            area = parent.mmap(settings["size"], shared=True, name="rmap_fork area")
            parent.touch(area.start, area.end, write=True)
            progress(1, total)
            libc = next(obj for obj in parent.objects if obj.elf.name == "libc.so.6")
            libc_text = kernel.hot_pages(libc, "text", SLEEP_LIBC_TEXT)
            children = []
            for _ in range(settings["children"]):
                child = started.fork(parent)
                top = child.user_stack_top
                child.touch(top - SLEEP_STACK_PAGES * 4096, top, write=True)
                child.touch_pages(libc_text, write=False)
                child.access_user(top - 4096, top, write=False)  # nanosleep() reads its timespec (copy_from_user)
                children.append(child)
                progress(1 + len(children), total)
            for done, child in enumerate(children, start=len(children) + 2):
                started.exit(child)  # SIGKILL, then the parent's wait() reaps it
                progress(done, total)
            started.exit(parent)
            progress(total, total)
        return {"max_mmu_rmap_size_before": before, "max_mmu_rmap_size": vm.kvm.stat.max_mmu_rmap_size}
