"""The host's userspace side: the QEMU processes (one per VM), their pids, and the host clock.

``Vmm`` boots the host kernel's KVM (x86) and starts a QEMU process for each VM asked for: QEMU picks
its pid and VM fd (the debugfs directory is ``<pid>-<fd>``), registers the memslots and creates the
vCPUs. Destroying a VM is QEMU exiting: its threads stop, then its VM fd is closed.

QEMU's pid and its vCPU threads' ids are emulated (below the host's pid_max, belonging to no process), or,
with ``qemu_processes``, those of a real stand-in process per VM (kvmdbgfs/vmm/standin.py).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from kvmdbgfs.arch.x86.kvm_arch import X86KvmArchFactory
from kvmdbgfs.arch.x86.x86 import HostCpu
from kvmdbgfs.host_model import HostModel
from kvmdbgfs.kvm.host import KvmHost
from kvmdbgfs.kvm.profiles import DEFAULT_PROFILE
from kvmdbgfs.kvm.vm import VmConfig
from kvmdbgfs.vmm.bootcache import BootCache
from kvmdbgfs.vmm.clock import HostClock
from kvmdbgfs.vmm.collector import freeze_long_lived, release_frozen
from kvmdbgfs.vmm.qemu import QemuProcess, WorkloadJob
from kvmdbgfs.vmm.standin import StandinProcess

PID_MAX_DEFAULT = 4194304  # pid_max on 64-bit hosts with many CPUs; the host's own is read when it can be
RESERVED_PIDS = 300
FIRST_VM_FD = 10
CLOCK_WAIT_S = 120.0  # how long `clock advance` waits for the VMs to reach the new time


class Vmm:
    """Every QEMU process on the host, the KVM module they talk to, and the clock that drives them."""

    def __init__(
        self,
        profile: str = DEFAULT_PROFILE,
        seed: int = 0,
        clock: str = "manual",
        host: HostModel = HostModel(),
        boot_cache: BootCache | None = None,
        qemu_processes: bool = False,
    ) -> None:
        self.clock = HostClock(clock)
        self.host_model = host
        self.qemu_processes = qemu_processes
        self.pid_max = host_pid_max()
        host_cpu = HostCpu(l1d_flush=host.l1d_flush, nx_huge_pages=host.nx_huge_pages)
        self.host = KvmHost(X86KvmArchFactory(host_cpu), profile=profile, seed=seed)
        self.seed = seed
        self.boot_cache = boot_cache
        self.vms: dict[str, QemuProcess] = {}
        self._lock = threading.Lock()
        self._rng = np.random.default_rng([seed, 1])
        self._next_pid = 1000 + int(self._rng.integers(0, 3000))
        self._vms_created = 0
        # Set once the host's startup (a scenario's boots) is over: host time then starts where they left it.
        self.started = threading.Event()
        self.started.set()
        self._guest_numbers = itertools.count()

    def create_vm(
        self, config: VmConfig, jobs: Sequence[WorkloadJob] = (), identity: tuple[int, int] | None = None
    ) -> QemuProcess:
        """Start a QEMU process: pid and fd, KVM_CREATE_VM, memslots, vCPUs; it runs ``jobs`` first. With
        ``qemu_processes`` its pid and vCPU thread ids are a stand-in process's (StandinError when it cannot
        start). ``identity``, a (pid, VM fd), is taken as given: a boot worker's copy of another host's VM
        (boot_ahead.py), which its messages then name as that host does."""
        self.host.validate_config(config)
        guest = f"vm{next(self._guest_numbers)}"
        standin = StandinProcess(guest, config.vcpus, config.memory) if self.qemu_processes else None
        try:
            with self._lock:
                if config.seed is None:
                    config = replace(config, seed=self.seed * 1_000_003 + self._vms_created)
                self._vms_created += 1
                if identity is not None:
                    pid, fd = identity
                else:
                    pid = standin.pid if standin else self._alloc_pid(config.vcpus)
                    fd = FIRST_VM_FD + int(self._rng.integers(0, 6))
                # QEMU's main thread and its RCU thread come before the vCPU threads.
                vcpu_tids = standin.vcpu_tids if standin else [pid + 2 + vcpu for vcpu in range(config.vcpus)]
                kvm = self.host.kvm_create_vm(config, f"{pid}-{fd}")
                assert config.seed is not None
                vm = QemuProcess(
                    kvm, pid, fd, config.seed, self.clock, guest, vcpu_tids, jobs, self.boot_cache, standin,
                    on_job_end=self._job_ended,
                )
                self.vms[kvm.name] = vm
        except BaseException:
            if standin:
                standin.stop()
            raise
        return vm

    def _job_ended(self) -> None:
        """A VM's workload has ended: once no VM runs or awaits one, the VMs' state is long-lived."""
        with self._lock:
            vms = list(self.vms.values())
        if not any(vm.busy() for vm in vms):
            freeze_long_lived()

    def _alloc_pid(self, threads: int) -> int:
        """A pid no running QEMU uses, leaving room for its threads' pids."""
        in_use = {vm.pid for vm in self.vms.values()}
        while True:
            pid = self._next_pid
            self._next_pid += 2 + threads + int(self._rng.integers(1, 64))
            if self._next_pid >= self.pid_max:
                self._next_pid = RESERVED_PIDS + 1
            if pid not in in_use and pid + 2 + threads < self.pid_max:
                return pid

    def find_vm(self, name: str) -> QemuProcess:
        with self._lock:
            vm = self.vms.get(name)
        if vm is None:
            if any(kvm.name == name for kvm in self.host.vm_list):
                raise LookupError(f"VM {name!r} is already destroyed (kept alive by open files)")
            raise LookupError(f"no VM named {name!r}")
        return vm

    def destroy_vm(self, name: str) -> QemuProcess:
        """QEMU exits: its workload stops at a safe point, its threads end, the VM fd is closed."""
        with self._lock:
            vm = self.vms.pop(name, None)
        if vm is None:
            self.find_vm(name)
            raise LookupError(f"no VM named {name!r}")
        vm.stop()
        vm.kvm.kvm_vm_release()
        release_frozen()
        return vm

    def advance_clock(self, ns: int, timeout: float = CLOCK_WAIT_S) -> int:
        """`clock advance`: move the manual clock, then wait (bounded) until every VM has run up to it. Time
        moves from where the host's startup left it: a scenario's boots end first."""
        deadline = time.monotonic() + timeout
        if self.clock.manual and not self.started.wait(timeout):
            raise TimeoutError(f"the scenario's guests did not finish booting within {timeout:.0f} s")
        now = self.clock.advance(ns)
        with self._lock:
            vms = list(self.vms.values())
        for vm in vms:
            target = now - vm.created_ns
            while not vm.caught_up(target):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"VM {vm.name} did not reach the new time within {timeout:.0f} s")
                self.clock.wake()
                time.sleep(0.001)
        return now

    def shutdown(self) -> None:
        """Every QEMU process exits (the host is going away); boot snapshots still being written are waited
        for (bounded)."""
        with self._lock:
            vms, self.vms = list(self.vms.values()), {}
        for vm in vms:
            vm.stop()
        if vms:
            release_frozen()  # their objects, frozen with the rest, are garbage once the host is dropped
        if self.boot_cache is not None:
            self.boot_cache.flush()


def host_pid_max() -> int:
    """The host's /proc/sys/kernel/pid_max (emulated pids stay below it), or PID_MAX_DEFAULT."""
    try:
        with open("/proc/sys/kernel/pid_max") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return PID_MAX_DEFAULT
