"""Scenarios: which VMs a mount starts with (`default`, `empty`, or a TOML file).

A scenario file::

    seed = 7                 # optional host seed
    clock = "manual"         # optional: realtime (default) | manual; --clock overrides it
    [host]                   # optional, the host machine (kvmdbgfs/host_model.py); --host KEY=VALUE overrides
    l1d_flush = "cond"
    [[vm]]
    memory = "6G"
    vcpus = 2
    mmu = "shadow"           # shadow | tdp-legacy | tdp
    kernel = "latest"        # optional, a kernel profile
    seed = 1                 # optional
    rmap_design = "C"        # optional, A | B | C | D
    workload = "idle"        # optional, run once the VM exists
    settings = { processes = 150 }   # optional, the workload's parameters
"""

from __future__ import annotations

import threading
import tomllib
from dataclasses import dataclass, field
from typing import Any

from kvmdbgfs.host_model import HostModel, host_model
from kvmdbgfs.kvm.host import KvmHost
from kvmdbgfs.kvm.vm import VmConfig
from kvmdbgfs.regular_file import read_regular_file
from kvmdbgfs.vmm.boot_ahead import BootAhead
from kvmdbgfs.vmm.bootcache import BootCache
from kvmdbgfs.vmm.clock import CLOCK_MODES
from kvmdbgfs.vmm.vmm import Vmm
from kvmdbgfs.vmm.qemu import QemuProcess, WorkloadJob
from kvmdbgfs.workloads import get_workload, make_job

MAX_SCENARIO_BYTES = 1 << 20
CONFIG_KEYS = {"memory", "vcpus", "mmu", "kernel", "seed", "rmap_design"}
VM_KEYS = CONFIG_KEYS | {"workload", "settings"}


@dataclass(frozen=True)
class Scenario:
    """A host seed and the VMs to create, in order."""

    seed: int = 0
    vms: list[dict[str, Any]] = field(default_factory=list)
    clock: str = "realtime"
    host: HostModel = HostModel()


BUILTIN_SCENARIOS = {
    # The seed's contrast: the same idle 6 GiB guest under shadow paging and under EPT.
    "default": Scenario(
        seed=0,
        vms=[
            {"memory": "6G", "vcpus": 2, "mmu": "shadow", "workload": "idle"},
            {"memory": "6G", "vcpus": 2, "mmu": "tdp-legacy", "workload": "idle"},
        ],
    ),
    "empty": Scenario(),
}


def load_scenario(name_or_path: str) -> Scenario:
    """A built-in scenario by name, or one read from a TOML file; ValueError with one line if bad."""
    if name_or_path in BUILTIN_SCENARIOS:
        return BUILTIN_SCENARIOS[name_or_path]
    try:
        data = tomllib.loads(read_regular_file(name_or_path, MAX_SCENARIO_BYTES).decode())
    except FileNotFoundError:
        raise ValueError(
            f"scenario {name_or_path!r}: no such file (built-in: {', '.join(BUILTIN_SCENARIOS)})"
        ) from None
    except OSError as exc:
        raise ValueError(f"scenario {name_or_path!r}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"scenario {name_or_path!r}: {exc}") from None
    unknown = set(data) - {"seed", "vm", "clock", "host"}
    if unknown:
        raise ValueError(f"scenario {name_or_path!r}: unknown keys {sorted(unknown)}")
    vms = data.get("vm", [])
    if not isinstance(vms, list) or not all(isinstance(vm, dict) for vm in vms):
        raise ValueError(f"scenario {name_or_path!r}: [[vm]] entries expected")
    for index, vm in enumerate(vms):
        bad = set(vm) - VM_KEYS
        if bad:
            raise ValueError(f"scenario {name_or_path!r}: vm {index}: unknown keys {sorted(bad)}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"scenario {name_or_path!r}: seed must be a non-negative integer")
    clock = data.get("clock", "realtime")
    if clock not in CLOCK_MODES:
        raise ValueError(f"scenario {name_or_path!r}: clock must be one of {', '.join(CLOCK_MODES)}")
    host = data.get("host", {})
    if not isinstance(host, dict):
        raise ValueError(f"scenario {name_or_path!r}: [host] must be a table")
    try:
        return Scenario(seed=seed, vms=vms, clock=clock, host=host_model(host))
    except ValueError as exc:
        raise ValueError(f"scenario {name_or_path!r}: {exc}") from None


@dataclass(frozen=True)
class VmPlan:
    """One scenario VM, validated: its configuration and the workload to run on it, if any."""

    config: VmConfig
    workload: str | None
    settings: dict[str, Any]


def scenario_plans(host: KvmHost, scenario: Scenario) -> list[VmPlan]:
    """Validate every VM and workload of the scenario before any VM is created."""
    plans = []
    for index, vm in enumerate(scenario.vms):
        try:
            config = host.make_config(**{key: vm[key] for key in CONFIG_KEYS & set(vm)})
            workload, settings = vm.get("workload"), vm.get("settings", {})
            if workload is not None:
                if not isinstance(settings, dict):
                    raise ValueError("settings must be a table")
                get_workload(workload).settings(settings)
            elif settings:
                raise ValueError("settings given without a workload")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"scenario vm {index}: {exc}") from None
        plans.append(VmPlan(config, workload, settings))
    return plans


class ScenarioBoot:
    """The scenario's workloads (the guests' boots first), running while the tree is served, as guests boot on
    a real host. Once every one has ended, the host clock starts where the furthest guest got (the host has
    been up as long as its guests ran) and ``vmm.started`` is set; ``error`` is the first failure. ``ahead``
    hands the later boots to worker processes, if it may."""

    def __init__(self, vmm: Vmm, jobs: list[tuple[QemuProcess, WorkloadJob]], ahead: BootAhead | None = None) -> None:
        self.vmm = vmm
        self.jobs = jobs
        self.ahead = ahead
        self.error: str | None = None
        vmm.started.clear()
        self._thread = threading.Thread(target=self._wait_all, name="scenario boot", daemon=True)
        self._thread.start()

    def _wait_all(self) -> None:
        for vm, job in self.jobs:
            job.done.wait()
            if job.error is not None and self.error is None:
                self.error = f"{vm.name} {job.name}: {job.error}"
        self.vmm.clock.start_at(max((vm.created_ns + vm.guest_ns for vm, _ in self.jobs), default=0))
        self.vmm.started.set()

    def wait(self, timeout: float) -> bool:
        """True once every guest has booted (or failed: see ``error``), False after ``timeout`` seconds."""
        return self.vmm.started.wait(timeout)

    def progress(self) -> tuple[int, int]:
        """Steps done and steps known, over every workload of the scenario."""
        done = total = 0
        for _, job in self.jobs:
            job_done, job_total = job.progress
            if job.done.is_set():
                job_done = job_total = max(job_total, 1)
            done, total = done + job_done, total + max(job_total, 1)
        return done, total

    def describe(self) -> dict[str, Any]:
        """What `status` shows: whether the guests have booted, which still run their scenario workload."""
        return {
            "booted": self.vmm.started.is_set(),
            "booting": [vm.name for vm, job in self.jobs if not job.done.is_set()],
            "boot_error": self.error,
        }


def build_host(
    scenario: Scenario,
    kernel: str,
    clock: str | None = None,
    host: HostModel | None = None,
    boot_cache: BootCache | None = None,
    qemu_processes: bool = False,
    boot_workers: int = 0,
) -> tuple[Vmm, ScenarioBoot]:
    """A host with the scenario's VMs created and their workloads queued: it can be served at once, and the
    guests boot while it is (``ScenarioBoot``), from ``boot_cache`` where it has their boots; with
    ``boot_workers`` (and a cache) the boots after the first that it lacks run in up to that many worker
    processes at once (kvmdbgfs/vmm/boot_ahead.py); with ``qemu_processes`` each VM has a real stand-in QEMU
    process. ``host`` replaces the scenario's [host] (the mount's `--host` options applied to it)."""
    vmm = Vmm(
        profile=kernel,
        seed=scenario.seed,
        clock=clock or scenario.clock,
        host=host or scenario.host,
        boot_cache=boot_cache,
        qemu_processes=qemu_processes,
    )
    ahead = BootAhead(vmm.host_model, vmm.seed, boot_workers) if boot_cache is not None and boot_workers > 0 else None
    jobs: list[tuple[QemuProcess, WorkloadJob]] = []
    for plan in scenario_plans(vmm.host, scenario):
        job = [make_job(plan.workload, plan.settings)] if plan.workload is not None else []
        if job and jobs:
            job[0].ahead = ahead
        vm = vmm.create_vm(plan.config, job)
        jobs += [(vm, first) for first in job]
    return vmm, ScenarioBoot(vmm, jobs, ahead)
