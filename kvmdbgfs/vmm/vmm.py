"""The host's userspace side: the QEMU processes (one per VM), their pids, and the host clock.

``Vmm`` boots the host kernel's KVM (x86) and starts a QEMU process for each VM asked for: QEMU picks
its pid and VM fd (the debugfs directory is ``<pid>-<fd>``), registers the memslots and creates the
vCPUs. Destroying a VM is QEMU exiting: its threads stop, then its VM fd is closed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np

from kvmdbgfs.arch.x86.kvm_arch import X86KvmArchFactory
from kvmdbgfs.arch.x86.x86 import HostCpu
from kvmdbgfs.host_model import HostModel
from kvmdbgfs.kvm.host import KvmHost
from kvmdbgfs.kvm.profiles import DEFAULT_PROFILE
from kvmdbgfs.kvm.vm import VmConfig
from kvmdbgfs.vmm.clock import HostClock
from kvmdbgfs.vmm.qemu import QemuProcess

PID_MAX = 4194304  # pid_max on 64-bit
RESERVED_PIDS = 300
FIRST_VM_FD = 10
CLOCK_WAIT_S = 120.0  # how long `clock advance` waits for the VMs to reach the new time


class Vmm:
    """Every QEMU process on the host, the KVM module they talk to, and the clock that drives them."""

    def __init__(
        self, profile: str = DEFAULT_PROFILE, seed: int = 0, clock: str = "manual", host: HostModel = HostModel()
    ) -> None:
        self.clock = HostClock(clock)
        self.host = KvmHost(X86KvmArchFactory(HostCpu(l1d_flush=host.l1d_flush)), profile=profile, seed=seed)
        self.seed = seed
        self.vms: dict[str, QemuProcess] = {}
        self._lock = threading.Lock()
        self._rng = np.random.default_rng([seed, 1])
        self._next_pid = 1000 + int(self._rng.integers(0, 3000))
        self._vms_created = 0

    def create_vm(self, config: VmConfig) -> QemuProcess:
        """Start a QEMU process: pid and fd, KVM_CREATE_VM, memslots, vCPUs."""
        self.host.validate_config(config)
        with self._lock:
            if config.seed is None:
                config = replace(config, seed=self.seed * 1_000_003 + self._vms_created)
            self._vms_created += 1
            pid = self._alloc_pid(config.vcpus)
            fd = FIRST_VM_FD + int(self._rng.integers(0, 6))
            kvm = self.host.kvm_create_vm(config, f"{pid}-{fd}")
            assert config.seed is not None
            vm = self.vms[kvm.name] = QemuProcess(kvm, pid, fd, config.seed, self.clock)
        return vm

    def _alloc_pid(self, threads: int) -> int:
        """A pid no running QEMU uses, leaving room for its threads' pids."""
        in_use = {vm.pid for vm in self.vms.values()}
        while True:
            pid = self._next_pid
            self._next_pid += 2 + threads + int(self._rng.integers(1, 64))
            if self._next_pid >= PID_MAX:
                self._next_pid = RESERVED_PIDS + 1
            if pid not in in_use and pid + 2 + threads < PID_MAX:
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
        return vm

    def advance_clock(self, ns: int, timeout: float = CLOCK_WAIT_S) -> int:
        """`clock advance`: move the manual clock, then wait (bounded) until every VM has run up to it."""
        now = self.clock.advance(ns)
        deadline = time.monotonic() + timeout
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
        """Every QEMU process exits (the host is going away)."""
        with self._lock:
            vms, self.vms = list(self.vms.values()), {}
        for vm in vms:
            vm.stop()
