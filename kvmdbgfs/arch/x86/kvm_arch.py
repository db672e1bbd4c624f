"""Per-VM x86 state (struct kvm_arch) and the kvm_arch_* hooks generic KVM calls on it."""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

from kvmdbgfs.arch.x86.debugfs import kvm_arch_create_vcpu_debugfs, kvm_arch_create_vm_debugfs
from kvmdbgfs.arch.x86.guest_hardware import VmxGuestHardware
from kvmdbgfs.arch.x86.mmu.memslot import KvmMemorySlot
from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu
from kvmdbgfs.arch.x86.mmu.nx_recovery import NxRecoveryWorker
from kvmdbgfs.arch.x86.mmu.pte_list import PTE_LIST_DESIGNS
from kvmdbgfs.arch.x86.mmu.rmap import KvmRmaps
from kvmdbgfs.arch.x86.mmu.vcpu_mmu import MmuVcpu
from kvmdbgfs.arch.x86.private_memslots import kvm_alloc_apic_access_page, vmx_set_tss_addr
from kvmdbgfs.arch.x86.x86 import GuestCpu, HostCpu, VcpuRunLoop

if TYPE_CHECKING:
    from kvmdbgfs.debugfs.dentry import Dentry
    from kvmdbgfs.kvm.vcpu import KvmVcpu
    from kvmdbgfs.kvm.vm import Kvm, VmConfig


class KvmArch:
    """The x86 part of a VM: MMU mode, memslots, rmaps and the MMU (``mmu``, the guest's GuestHardware).

    Rmap arrays exist only when the VM has rmaps (kvm_memslots_have_rmaps):
    always with the shadow MMU (``shadow`` and ``tdp-legacy``), never in this
    model with the TDP MMU (``tdp``), which would need a nested shadow root.
    Memslots come from userspace (KVM_SET_USER_MEMORY_REGION), through the
    generic code and the hooks below.
    """

    def __init__(self, kvm: Kvm, rmap_design: str, host_cpu: HostCpu) -> None:
        self.kvm = kvm
        self.mmu_mode = kvm.config.mmu
        self.rmaps = KvmRmaps(rmap_design, kvm.stat, kvm.profile.mmu_rules.updates_max_mmu_rmap_size)
        self.memslots: list[KvmMemorySlot] = []
        self.apic_access_memslot_enabled = False
        self._shadow_root_allocated = self.mmu_mode != "tdp"
        self.mmu = KvmMmu(kvm, self, nx_huge_pages=host_cpu.nx_huge_pages)
        # kvm_mmu_post_init_vm(): the NX huge page recovery thread (it only sleeps while the mitigation is off).
        self.nx_recovery = NxRecoveryWorker(self.mmu) if host_cpu.nx_huge_pages else None
        # vmx_setup_l1d_flush(): with EPT off the L1TF mitigation is not needed, nothing flushes.
        l1d_flush = host_cpu.l1d_flush if self.mmu_mode != "shadow" else "off"
        self.run = VcpuRunLoop(
            kvm.profile.halt_poll, host_cpu, kvm.profile.counts_fastpath_exits, kvm.pio_bus, l1d_flush
        )
        # What KVM_RUN puts the guest on.
        self.guest_hardware = VmxGuestHardware(self.mmu, self.run)

    def memslots_have_rmaps(self) -> bool:
        """kvm_memslots_have_rmaps()."""
        return self._shadow_root_allocated

    # -- kvm_arch_* hooks ---------------------------------------------------------------

    def kvm_arch_create_vm_debugfs(self, kvm: Kvm) -> None:
        kvm_arch_create_vm_debugfs(kvm)

    def kvm_arch_create_vcpu_debugfs(self, vcpu: KvmVcpu, dentry: Dentry) -> None:
        kvm_arch_create_vcpu_debugfs(vcpu, dentry)

    def kvm_arch_vm_ioctl_set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: the real-mode TSS's private memslot, when EPT is off (no unrestricted guest)."""
        vmx_set_tss_addr(self.kvm, addr, unrestricted_guest=self.mmu_mode != "shadow")

    def kvm_arch_vcpu_create(self, vcpu: KvmVcpu) -> None:
        """kvm_arch_vcpu_create() -> vmx_vcpu_create(): the APIC-access page's private memslot with the first
        in-kernel LAPIC, then the vCPU's MMU context, its LAPIC and run state."""
        if vcpu.lapic_in_kernel and not self.apic_access_memslot_enabled:
            kvm_alloc_apic_access_page(self.kvm)
            self.apic_access_memslot_enabled = True
        mmu_vcpu = self.mmu.vcpus[vcpu.vcpu_id] = MmuVcpu(vcpu.vcpu_id, vcpu.stat)
        self.run.add_vcpu(vcpu, mmu_vcpu)

    def kvm_arch_vcpu_ioctl_run(self, vcpu: KvmVcpu, now_ns: int, guest: GuestCpu) -> None:
        """KVM_RUN: the vCPU thread runs from ``now_ns`` (see x86.py) until the guest halts again."""
        self.run.kvm_arch_vcpu_ioctl_run(vcpu.vcpu_id, now_ns, guest)

    def kvm_set_msi(self, vcpu_id: int, vector: int, when_ns: int) -> None:
        """kvm_set_msi() -> kvm_irq_delivery_to_apic(): an MSI (an irqfd or KVM_SIGNAL_MSI) for one vCPU."""
        self.run.kvm_set_irq(vcpu_id, vector, when_ns)

    # -- the vCPU threads' schedule, which the emulated host scheduler follows -------------------------

    def vcpu_next_wakeup(self) -> tuple[int, int] | None:
        """(guest ns, vcpu id) of the next halted vCPU thread to become runnable (its timer or an interrupt)."""
        return self.run.next_wake()

    def run_guest_code(self, start_ns: int, guest: GuestCpu) -> int:
        """The vCPUs run what the guest executed on them since the last call, side by side from ``start_ns``;
        returns when the longest ends."""
        return self.run.run_guest_code(start_ns, guest)

    def guest_code_pending_ns(self) -> int:
        """How long the guest code run before the vCPUs' first KVM_RUN (the boot) takes."""
        return self.run.pending_ns()

    def run_host_threads(self, now_ns: int) -> None:
        """The VM's host kernel threads (kvm-nx-lpage-recovery) run what is due by ``now_ns`` of the VM's time."""
        if self.nx_recovery is not None:
            self.nx_recovery.run_until(now_ns)

    def update_blocking(self, now_ns: int) -> None:
        """The ``blocking`` stats as a reader sees them at ``now_ns``."""
        self.run.blocking_at(now_ns)

    # -- memslots ----------------------------------------------------------------------------------

    def kvm_arch_prepare_memory_region(self, slot_id: int, as_id: int, base_gfn: int, npages: int) -> KvmMemorySlot:
        """kvm_arch_prepare_memory_region(): kvm_alloc_memslot_metadata() allocates the rmaps when the VM has them."""
        slot = KvmMemorySlot(slot_id, as_id, base_gfn, npages)
        if self.memslots_have_rmaps():
            slot.alloc_rmaps()
        return slot

    def kvm_arch_flush_shadow_memslot(self, slot: KvmMemorySlot) -> None:
        """kvm_arch_flush_shadow_memslot(): zap the MMU (every page, not just the slot's)."""
        self.mmu.kvm_arch_flush_shadow_memslot()

    def kvm_arch_commit_memory_region(self, slot: KvmMemorySlot, change: int) -> None:
        """kvm_arch_commit_memory_region(): the slot joins or leaves (its rmaps go with it), then the
        default shadow-page limit follows the memory size."""
        if slot in self.memslots:
            self.memslots.remove(slot)
            slot.free_rmaps()
        else:
            self.memslots.append(slot)
        self.mmu.kvm_arch_commit_memory_region()

    def kvm_arch_destroy_vm(self) -> None:
        """kvm_arch_flush_shadow_all() then kvm_arch_destroy_vm(): zap every shadow page, free every slot's rmaps."""
        self.mmu.kvm_mmu_zap_all()
        for slot in self.memslots:
            slot.free_rmaps()
        self.memslots.clear()


@dataclass(frozen=True)
class X86KvmArchFactory:
    """kvm_arch_init_vm() for x86 on ``host_cpu``: the rmap design is the VM's choice, else its kernel's. Its
    repr names the host model (part of a boot snapshot's key)."""

    host_cpu: HostCpu = HostCpu()

    def kvm_arch_check_config(self, config: VmConfig) -> None:
        if config.rmap_design is not None and config.rmap_design not in PTE_LIST_DESIGNS:
            raise ValueError(f"unknown rmap design {config.rmap_design!r} (known: {', '.join(PTE_LIST_DESIGNS)})")

    def __call__(self, kvm: Kvm) -> KvmArch:
        return KvmArch(kvm, kvm.config.rmap_design or kvm.profile.rmap_design, self.host_cpu)
