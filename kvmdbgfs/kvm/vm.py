"""A VM: its reference count, vCPUs, stats and arch state (struct kvm)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmdbgfs.kvm.eventfd import KvmIoBus
from kvmdbgfs.kvm.profiles import ALL_VM_STATS, KernelProfile
from kvmdbgfs.kvm.stats import StatBlock
from kvmdbgfs.kvm.vcpu import KvmVcpu

if TYPE_CHECKING:
    from kvmdbgfs.debugfs.dentry import Dentry
    from kvmdbgfs.kvm.arch_hooks import KvmArchHooks
    from kvmdbgfs.kvm.host import KvmHost

MMU_MODES = ("shadow", "tdp-legacy", "tdp")
KVM_MR_CREATE, KVM_MR_DELETE = 0, 1  # enum kvm_mr_change


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
    """struct kvm. ``users_count`` starts at 1, the creator's reference (the VM fd); ``name`` is the
    ``<pid>-<fd>`` its creator gave (the debugfs directory's name)."""

    def __init__(self, host: KvmHost, config: VmConfig, profile: KernelProfile, name: str) -> None:
        self.host = host
        self.config = config
        self.profile = profile
        self.name = name
        self.stat = StatBlock(ALL_VM_STATS)
        self.vcpus: list[KvmVcpu] = []
        self.users_count = 1
        self.creator_ref_dropped = False
        self._refcount_lock = threading.Lock()
        # kvm->mmu_lock: held per fault, batch step or zap by anything that reads or changes MMU state.
        self.mmu_lock = threading.RLock()
        # kvm->slots_lock: serialises memslot changes.
        self.slots_lock = threading.Lock()
        self.debugfs_dentry: Dentry | None = None
        self.pio_bus = KvmIoBus()
        self.arch: KvmArchHooks

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

    def kvm_vm_release(self) -> None:
        """The VM fd is closed (QEMU exits): drop the creator's reference. Open files keep the VM until closed."""
        with self._refcount_lock:
            if self.creator_ref_dropped:
                raise LookupError(f"VM {self.name!r} is already destroyed (kept alive by open files)")
            self.creator_ref_dropped = True
        self.put_kvm()

    def kvm_set_memory_region(self, slot_id: int, as_id: int, base_gfn: int, npages: int) -> Any:
        """KVM_SET_USER_MEMORY_REGION creating a slot: the arch prepares it (its rmaps), then commits."""
        with self.slots_lock:
            slot = self.arch.kvm_arch_prepare_memory_region(slot_id, as_id, base_gfn, npages)
            self.arch.kvm_arch_commit_memory_region(slot, KVM_MR_CREATE)
        return slot

    def kvm_delete_memory_region(self, slot: Any) -> None:
        """KVM_SET_USER_MEMORY_REGION with size 0 (KVM_MR_DELETE): the MMU is zapped, then the slot goes."""
        with self.slots_lock:
            self.arch.kvm_arch_flush_shadow_memslot(slot)
            self.arch.kvm_arch_commit_memory_region(slot, KVM_MR_DELETE)

    def kvm_send_userspace_msi(self, vcpu_id: int, vector: int, when_ns: int) -> None:
        """An irqfd signalled (or KVM_SIGNAL_MSI) at ``when_ns``: the MSI goes to the arch's interrupt delivery."""
        self.arch.kvm_set_msi(vcpu_id, vector, when_ns)

    def vcpu_stat_sum(self, name: str) -> int:
        """A vCPU stat summed over this VM's vCPUs, as the per-VM debugfs file shows it."""
        return sum(vcpu.stat.read_u64(name) for vcpu in self.vcpus)
