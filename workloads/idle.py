"""idle: boot to an idle multi-user system, then let its daemons wake on their timers for a while.

The system is an Ubuntu-like server (systemd, journald, udevd, networkd,
sshd, cron, ... and a login session, over a hundred kernel threads) that
also serves web pages: an apache2 parent with a pool of prefork workers,
forked without exec, so they share its pages and libraries. With the
default pool that is about 150 processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kvmdbgfs.guest.userspace import wake
from kvmdbgfs.workload import Param, Progress, Workload
from workloads.guest import boot_guest

if TYPE_CHECKING:
    from kvmdbgfs.kvm.vm import Kvm

SECONDS_PER_STEP = 5
WORKER_PERIOD = 10.0  # seconds between a prefork worker's wake-ups (keepalive checks, scoreboard)


class Idle(Workload):
    name = "idle"
    description = "boot the guest to an idle multi-user system; its daemons then wake periodically"
    params = (
        Param("uptime", 60, 0, 3600, "seconds of idle time after boot"),
        Param("workers", 120, 0, 1000, "apache2 prefork workers (0: no web server)"),
    )

    def check_vm(self, kvm: Kvm) -> None:
        if kvm.guest is not None:
            raise ValueError(f"VM {kvm.name} has already booted")

    def run(self, kvm: Kvm, settings: dict[str, int], rng: np.random.Generator, progress: Progress) -> dict[str, Any]:
        steps = 1 + -(-settings["uptime"] // SECONDS_PER_STEP)
        progress(0, steps)
        system = boot_guest(kvm, rng)
        if settings["workers"]:
            kernel = system.kernel
            apache = kernel.spawn("apache2", system.init)
            for _ in range(settings["workers"]):
                worker = kernel.fork(apache)
                wake(worker)
                system.arm(worker, WORKER_PERIOD)
        progress(1, steps)
        wakeups, left = 0, settings["uptime"]
        for step in range(2, steps + 1):
            wakeups += system.advance(min(SECONDS_PER_STEP, left))
            left -= SECONDS_PER_STEP
            progress(step, steps)
        return {"wakeups": wakeups, **system.kernel.stats()}
