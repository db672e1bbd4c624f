"""idle: boot to an idle multi-user system, then let its daemons wake on their timers for a while.

The system is an Ubuntu-like server (systemd, journald, udevd, networkd,
sshd, cron, ... and a login session, over a hundred kernel threads) that
also serves web pages: an apache2 parent with a pre-sized pool of prefork
workers (StartServers = MinSpareServers = the pool), forked without exec, so
they share its pages and libraries. Each worker has served its own share of
the traffic so far, and so has run its own share of the code paths of
apache2 and its libraries. Three users are logged in over SSH. With the
defaults that is about 80 user processes, 190 in all.

The booted system is the VM's guest from then on, not something the workload
takes back. The boot has no safe point: cancelling it (or destroying the VM)
takes effect once the system is up, at the first safe point of the uptime
phase, and leaves the system running. A web server that runs the guest out of
memory while it starts is stopped again; a boot that runs out of memory is a
guest that panicked (see workloads/guest.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kvmdbgfs.guest.irq import NSEC_PER_SEC
from kvmdbgfs.guest.userspace import serve, wake
from kvmdbgfs.workloads.base import Param, Progress, Workload
from kvmdbgfs.workloads.guest import boot_guest
from kvmdbgfs.workloads.teardown import Started

if TYPE_CHECKING:
    from kvmdbgfs.vmm.qemu import QemuProcess

SECONDS_PER_STEP = 5
WORKER_PERIOD = 10.0  # seconds between a prefork worker's wake-ups (keepalive checks, scoreboard)
WORKER_SHARE = (0.1, 1.0)  # the share of apache2's code paths a worker has run, drawn uniformly
PTI_DEFAULT = 1  # guests of 2021 on Meltdown-affected Intel hosts boot with KPTI (see the README)


class Idle(Workload):
    name = "idle"
    description = "boot the guest to an idle multi-user system; its daemons then wake periodically"
    params = (
        Param("uptime", 60, 0, 3600, "seconds of idle time after boot"),
        Param("workers", 40, 0, 1000, "apache2 prefork workers (0: no web server)"),
        Param("logins", 3, 1, 100, "users logged in over SSH (each: two sshd, systemd --user, a shell)"),
        Param("pti", PTI_DEFAULT, 0, 1, "page-table isolation in the guest kernel (1: pti=on, 0: pti=off)"),
    )

    def check_vm(self, vm: QemuProcess) -> None:
        if vm.guest is not None:
            raise ValueError(f"VM {vm.name} has already booted")

    def run(self, vm: QemuProcess, settings: dict[str, int], rng: np.random.Generator, progress: Progress) -> dict[str, Any]:
        steps = 1 + -(-settings["uptime"] // SECONDS_PER_STEP)
        progress(0, steps)
        system = boot_guest(vm, rng, settings["logins"], pti=bool(settings["pti"]))
        if settings["workers"]:
            kernel = system.kernel
            with Started(kernel) as started:  # a web server that cannot start in full is stopped again
                apache = started.spawn("apache2", system.init)
                for _ in range(settings["workers"]):
                    worker = started.fork(apache)
                    wake(worker)
                    serve(worker, float(kernel.rng.uniform(*WORKER_SHARE)))
                    system.arm(worker, WORKER_PERIOD)
        progress(1, steps)
        left = settings["uptime"]
        for step in range(2, steps + 1):
            progress(step, steps, idle_ns=min(SECONDS_PER_STEP, left) * NSEC_PER_SEC)
            left -= SECONDS_PER_STEP
        return {"wakeups": system.wakeups, **system.kernel.stats()}
