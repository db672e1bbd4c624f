"""The scripted guest workloads, by name, and how to run one on a VM."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from kvmdbgfs.vmm.qemu import WorkloadJob
from kvmdbgfs.workloads.base import Progress, Workload, no_progress
from kvmdbgfs.workloads.hotplug import Hotplug
from kvmdbgfs.workloads.idle import Idle
from kvmdbgfs.workloads.kbuild import Kbuild
from kvmdbgfs.workloads.memhog import Memhog
from kvmdbgfs.workloads.rmap_fork import RmapFork

if TYPE_CHECKING:
    from kvmdbgfs.vmm.qemu import QemuProcess

WORKLOADS: dict[str, Workload] = {
    workload.name: workload for workload in (Idle(), RmapFork(), Kbuild(), Memhog(), Hotplug())
}


def get_workload(name: str) -> Workload:
    workload = WORKLOADS.get(name)
    if workload is None:
        raise ValueError(f"unknown workload {name!r} (known: {', '.join(WORKLOADS)})")
    return workload


def describe_workload(workload: Workload) -> dict[str, Any]:
    """What `kvmdbgfs workloads` lists."""
    return {
        "name": workload.name,
        "description": workload.description,
        "params": [
            {"name": p.name, "default": p.default, "min": p.minimum, "max": p.maximum, "help": p.help}
            for p in workload.params
        ],
    }


def make_job(name: str, overrides: Mapping[str, Any]) -> WorkloadJob:
    """Validate the workload and its settings; the job that runs it on a VM's vCPU threads.

    The VM's own checks (booted or not) run when the workload starts, after what was queued before it.
    Randomness comes from the VM's seed and how many workloads it ran before, so a scenario replays. The
    first workload of a fresh VM is restored from the VM's boot cache when it has run before (see
    kvmdbgfs/vmm/bootcache.py), and saved there when it has not."""
    workload = get_workload(name)
    settings = workload.settings(overrides)

    def run(vm: QemuProcess, progress: Progress) -> dict[str, Any]:
        workload.check_vm(vm)
        cache = vm.boot_cache
        key = cache.key(vm, name, settings) if cache is not None else None
        if cache is not None and key is not None and (summary := cache.restore(key, vm)) is not None:
            return summary
        rng = np.random.default_rng([vm.seed, vm.workload_runs])
        vm.workload_runs += 1
        summary = {"vm": vm.name, "workload": name, "settings": settings, **workload.run(vm, settings, rng, progress)}
        if cache is not None and key is not None:
            cache.save(key, vm, summary)
        return summary

    return WorkloadJob(name, run, settings)


def start_workload(vm: QemuProcess, name: str, overrides: Mapping[str, Any]) -> WorkloadJob:
    """Queue the workload on the VM (see make_job)."""
    return vm.submit(make_job(name, overrides))


def wait_workload(job: WorkloadJob, progress: Progress = no_progress, timeout: float | None = None) -> dict[str, Any]:
    """Wait for a queued workload, passing its progress on; its summary, or ValueError with its error.

    ``progress`` runs on the waiting thread, never on the VM's: if it blocks or raises (a client gone), or the
    wait times out, only the waiting stops; the workload runs to its end as if it had been waited for."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not job.done.is_set():
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"workload {job.name} still running after {timeout:.0f} s")
        job.wait_change(0.5)
        progress(*job.progress)
    if job.error is not None:
        raise ValueError(job.error)
    assert job.result is not None
    return job.result


def run_workload(vm: QemuProcess, name: str, overrides: Mapping[str, Any], progress: Progress = no_progress) -> dict:
    """Queue a workload on the VM and wait for its summary."""
    return wait_workload(start_workload(vm, name, overrides), progress)
