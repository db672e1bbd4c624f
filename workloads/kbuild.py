"""kbuild: a build in the guest: make runs many short-lived compiler processes that exec and exit.

Each compile is the gcc driver exec'ing cc1, then as; the objects are linked at the end. Their CPU times
are those of a Linux kernel build (about 3,000 objects for 20 minutes of one core: cc1 takes about 0.35 s
an object, as a few tens of ms). make -jN keeps N compiles running; the guest spreads them over its vCPUs,
so each step of the workload is one wave of compiles, one on each vCPU.
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

MAKE = Program("make", "make", ("libc.so.6",), heap_kib=4096, text_frac=0.3, cpu_ms=2)
STEPS = (
    Program("gcc", "gcc", ("libc.so.6",), heap_kib=256, text_frac=0.1, cpu_ms=3),
    Program("cc1", "cc1", ("libc.so.6", "libm.so.6", "libz.so.1"), heap_kib=2048, anon_kib=1024, text_frac=0.03,
            cpu_ms=350),
    Program("as", "as", ("libc.so.6", "libz.so.1"), heap_kib=512, text_frac=0.1, cpu_ms=25),
)
LINK = Program("ld", "ld", ("libc.so.6", "libz.so.1"), heap_kib=4096, anon_kib=1024, text_frac=0.1, cpu_ms=300)


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
        files = settings["files"]
        wave = min(settings["jobs"], kernel.nr_vcpus)
        with Started(kernel) as started:
            make = started.spawn(MAKE, system.session[-1])
            kernel.compute(make, MAKE.cpu_ms)
            running: list = []
            for done in range(files):
                if len(running) == settings["jobs"]:
                    started.exit(running.pop(int(rng.integers(len(running)))))
                task = started.spawn(STEPS[0], make)
                kernel.compute(task, STEPS[0].cpu_ms)
                for step in STEPS[1:]:
                    kernel.exec(task, step)
                    kernel.compute(task, step.cpu_ms)
                running.append(task)
                if (done + 1) % wave == 0 or done + 1 == files:
                    progress(done + 1, files + 1)
            for task in running:
                started.exit(task)
            link = started.spawn(LINK, make)
            kernel.compute(link, LINK.cpu_ms)
            started.exit(link)
            started.exit(make)
            progress(files + 1, files + 1)
        return {"compiles": files, "processes": files + 2}
