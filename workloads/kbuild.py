"""kbuild: a build in the guest: make runs many short-lived compiler processes that exec and exit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kvmdbgfs.guest.distro import Program
from kvmdbgfs.workloads.base import Param, Progress, Workload
from kvmdbgfs.workloads.guest import booted_guest, require_booted

if TYPE_CHECKING:
    from kvmdbgfs.vmm.qemu import QemuProcess

MAKE = Program("make", "make", ("libc.so.6",), heap_kib=4096, text_frac=0.3)
# Each compile is gcc (the driver) exec'ing cc1, then as; objects are linked at the end.
STEPS = (
    Program("gcc", "gcc", ("libc.so.6",), heap_kib=256, text_frac=0.1),
    Program("cc1", "cc1", ("libc.so.6", "libm.so.6", "libz.so.1"), heap_kib=2048, anon_kib=1024, text_frac=0.03),
    Program("as", "as", ("libc.so.6", "libz.so.1"), heap_kib=512, text_frac=0.1),
)
LINK = Program("ld", "ld", ("libc.so.6", "libz.so.1"), heap_kib=4096, anon_kib=1024, text_frac=0.1)


class Kbuild(Workload):
    name = "kbuild"
    description = "make -jN: many short-lived gcc/cc1/as processes exec'ing and exiting, then a link"
    params = (
        Param("files", 40, 1, 100000, "source files to compile"),
        Param("jobs", 4, 1, 64, "compiles running at once (make -j)"),
    )
    check_vm = staticmethod(require_booted)

    def run(self, vm: QemuProcess, settings: dict[str, int], rng: np.random.Generator, progress: Progress) -> dict[str, Any]:
        system = booted_guest(vm)
        kernel = system.kernel
        make = kernel.spawn(MAKE, system.session[-1])
        running: list = []
        processes = 0
        for done in range(settings["files"]):
            if len(running) == settings["jobs"]:
                kernel.exit(running.pop(int(rng.integers(len(running)))))
            task = kernel.spawn(STEPS[0], make)
            for step in STEPS[1:]:
                kernel.exec(task, step)
            processes += 1
            running.append(task)
            progress(done + 1, settings["files"] + 1)
        for task in running:
            kernel.exit(task)
        kernel.exit(kernel.spawn(LINK, make))
        kernel.exit(make)
        progress(settings["files"] + 1, settings["files"] + 1)
        return {"compiles": processes, "processes": processes + 2}
