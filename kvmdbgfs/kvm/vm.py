"""A VM: its reference count, vCPUs, stats and arch state (struct kvm)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmdbgfs.kvm.profiles import ALL_VM_STATS, KernelProfile
from kvmdbgfs.kvm.stats import StatBlock
from kvmdbgfs.kvm.vcpu import KvmVcpu

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.kvm_arch import KvmArch
    from kvmdbgfs.debugfs.dentry import Dentry
    from kvmdbgfs.guest.userspace import Userspace
    from kvmdbgfs.kvm.host import KvmHost

MMU_MODES = ("shadow", "tdp-legacy", "tdp")


@dataclass(frozen=True)
class VmConfig:
    """What `vm create` asks for."""

    memory: int
    vcpus: int
    mmu: str
    kernel: str
    seed: int | None
    rmap_design: str | None = None


class Kvm:
    """struct kvm. ``users_count`` starts at 1, the creator's reference (the VM fd)."""

    def __init__(self, host: KvmHost, config: VmConfig, profile: KernelProfile, pid: int, fd: int) -> None:
        self.host = host
        self.config = config
        self.profile = profile
        self.pid = pid
        self.fd = fd
        self.name = f"{pid}-{fd}"
        self.stat = StatBlock(ALL_VM_STATS)
        self.vcpus: list[KvmVcpu] = []
        self.users_count = 1
        self.creator_ref_dropped = False
        self._refcount_lock = threading.Lock()
        # kvm->mmu_lock: held by anything that reads or changes MMU state.
        self.mmu_lock = threading.RLock()
        self.debugfs_dentry: Dentry | None = None
        self.workload_runs = 0
        # The guest OS once a workload has booted it (workloads.guest).
        self.guest: Userspace | None = None
        self.arch: KvmArch

    def get_kvm_safe(self) -> bool:
        """kvm_get_kvm_safe(): refcount_inc_not_zero(&users_count)."""
        with self._refcount_lock:
            if self.users_count == 0:
                return False
            self.users_count += 1
            return True

    def put_kvm(self) -> None:
        """kvm_put_kvm(): drop a reference; the last one destroys the VM."""
        with self._refcount_lock:
            if self.users_count <= 0:
                raise RuntimeError(f"VM {self.name}: reference count underflow")
            self.users_count -= 1
            last = self.users_count == 0
        if last:
            self.host.kvm_destroy_vm(self)

    def vcpu_stat_sum(self, name: str) -> int:
        """A vCPU stat summed over this VM's vCPUs, as the per-VM debugfs file shows it."""
        return sum(vcpu.stat.read_u64(name) for vcpu in self.vcpus)
