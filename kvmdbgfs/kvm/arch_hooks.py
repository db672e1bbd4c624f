"""What generic KVM code calls on ``kvm.arch``: the kernel's ``kvm_arch_*`` hooks.

Generic code (``kvmdbgfs/kvm``) never imports an architecture. The host is
given a :class:`KvmArchFactory` (``kvm_arch_init_vm``), and every VM's arch
object offers the hooks below, named after the kernel functions they mirror.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kvmdbgfs.debugfs.dentry import Dentry
    from kvmdbgfs.kvm.vcpu import KvmVcpu
    from kvmdbgfs.kvm.vm import Kvm, VmConfig


class KvmArchHooks(Protocol):
    """struct kvm_arch and the kvm_arch_* functions generic code calls."""

    def kvm_arch_create_vm_debugfs(self, kvm: Kvm) -> None:
        """Arch files in the VM's debugfs directory."""

    def kvm_arch_create_vcpu_debugfs(self, vcpu: KvmVcpu, dentry: Dentry) -> None:
        """Arch files in a ``vcpu<N>`` directory."""

    def kvm_arch_vm_ioctl_set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR (x86): where the real-mode TSS goes; the arch may register a memslot for it."""

    def kvm_arch_vcpu_create(self, vcpu: KvmVcpu) -> None:
        """The arch part of KVM_CREATE_VCPU (the vCPU's MMU context, its LAPIC)."""

    def kvm_arch_vcpu_ioctl_run(self, vcpu: KvmVcpu, now_ns: int, guest: Any) -> None:
        """KVM_RUN: enter the guest at ``now_ns`` and run it until it halts."""

    def kvm_set_msi(self, vcpu_id: int, vector: int, when_ns: int) -> None:
        """An MSI for one vCPU, pending from ``when_ns``."""

    # The emulated host scheduler runs the vCPU threads in guest-time order; these say when and how long.

    def vcpu_next_wakeup(self) -> tuple[int, int] | None:
        """(guest ns, vcpu id) of the next halted vCPU thread to become runnable."""

    def run_guest_code(self, start_ns: int, guest: Any) -> int:
        """The vCPUs run what the guest executed on them since the last call, from ``start_ns``; returns the end."""

    def guest_code_pending_ns(self) -> int:
        """How long the guest code run before the vCPUs' first KVM_RUN takes."""

    def update_blocking(self, now_ns: int) -> None:
        """The ``blocking`` stats as seen at ``now_ns``."""

    def run_host_threads(self, now_ns: int) -> None:
        """The VM's host kernel threads (x86: NX huge page recovery) do what is due by ``now_ns``."""

    def kvm_arch_prepare_memory_region(self, slot_id: int, as_id: int, base_gfn: int, npages: int) -> Any:
        """A new memslot: its arch metadata (rmaps); returns the slot."""

    def kvm_arch_flush_shadow_memslot(self, slot: Any) -> None:
        """A memslot is about to go: zap what maps it."""

    def kvm_arch_commit_memory_region(self, slot: Any, change: int) -> None:
        """After a memslot was created or deleted."""

    def kvm_arch_destroy_vm(self) -> None:
        """Teardown after the VM left vm_list: zap everything, free every slot's metadata."""


class KvmArchFactory(Protocol):
    """kvm_arch_init_vm(), and the checks of its arguments it makes before anything exists."""

    def kvm_arch_check_config(self, config: VmConfig) -> None:
        """ValueError (the kernel's -EINVAL) for a configuration the arch cannot build."""

    def __call__(self, kvm: Kvm) -> KvmArchHooks:
        """The arch state of a new VM."""
