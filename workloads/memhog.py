"""memhog: one process maps a large anonymous region with MADV_HUGEPAGE and writes all of it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kvmdbgfs.guest.distro import Program
from kvmdbgfs.workloads.base import Param, Progress, Workload
from kvmdbgfs.workloads.guest import booted_guest, require_booted
from kvmdbgfs.workloads.teardown import Started

if TYPE_CHECKING:
    from kvmdbgfs.vmm.qemu import QemuProcess

MEMHOG = Program("memhog", "memhog", ("libc.so.6",), heap_kib=64, text_frac=0.1)
CHUNK = 64 << 20


class Memhog(Workload):
    name = "memhog"
    description = "touch a large anonymous region backed by transparent huge pages, then free it"
    params = (
        Param("size", 1 << 30, 2 << 20, 64 << 30, "bytes to map and write", size=True),
        Param("keep", 0, 0, 1, "1: the process stays alive holding the memory"),
    )
    check_vm = staticmethod(require_booted)

    def run(self, vm: QemuProcess, settings: dict[str, int], rng: np.random.Generator, progress: Progress) -> dict[str, Any]:
        system = booted_guest(vm)
        free_bytes = system.kernel.stats()["pages_free"] * 4096
        if settings["size"] > free_bytes:
            raise ValueError(f"memhog: size {settings['size']} exceeds the guest's free memory ({free_bytes})")
        with Started(system.kernel) as started:
            task = started.spawn(MEMHOG, system.session[-1])
            region = task.mmap(settings["size"], name="memhog")
            task.madvise_hugepage(region.start, settings["size"])
            chunks = -(-settings["size"] // CHUNK)
            for done, start in enumerate(range(region.start, region.end, CHUNK), start=1):
                task.touch(start, min(start + CHUNK, region.end), write=True)
                progress(done, chunks)
            resident = task.resident_pages()
            if not settings["keep"]:
                started.exit(task)
        return {"resident_pages": resident, "pages_2m": vm.kvm.stat.pages_2m, "pages_4k": vm.kvm.stat.pages_4k}
