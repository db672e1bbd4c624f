"""The scripted guest workloads, by name, and how to run one on a VM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from kvmdbgfs.workload import Progress, Workload, no_progress
from workloads.hotplug import Hotplug
from workloads.idle import Idle
from workloads.kbuild import Kbuild
from workloads.memhog import Memhog
from workloads.rmap_fork import RmapFork

if TYPE_CHECKING:
    from kvmdbgfs.kvm.vm import Kvm

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


def run_workload(kvm: Kvm, name: str, overrides: Mapping[str, Any], progress: Progress = no_progress) -> dict[str, Any]:
    """Validate everything, then run the workload holding a VM reference (the VM cannot vanish mid-run)."""
    workload = get_workload(name)
    settings = workload.settings(overrides)
    workload.check_vm(kvm)
    if not kvm.get_kvm_safe():
        raise LookupError(f"VM {kvm.name!r} is gone")
    try:
        with kvm.mmu_lock:
            rng = np.random.default_rng([kvm.config.seed, kvm.workload_runs])
            kvm.workload_runs += 1
            summary = workload.run(kvm, settings, rng, progress)
    finally:
        kvm.put_kvm()
    return {"vm": kvm.name, "workload": name, "settings": settings, **summary}
