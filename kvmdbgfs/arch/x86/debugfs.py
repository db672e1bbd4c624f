"""x86 debugfs hooks (arch/x86/kvm/debugfs.c): per-vCPU files and the per-VM ``mmu_rmaps_stat``."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from kvmdbgfs.arch.x86.mmu.rmaps_stat import mmu_rmaps_stat_show
from kvmdbgfs.debugfs.dentry import Dentry, create_file
from kvmdbgfs.debugfs.seq_file import single_open_fops
from kvmdbgfs.kvm.debugfs import VmPinnedFops, create_vcpu_file
from kvmdbgfs.kvm.vcpu import TSC_SCALING_RATIO_FRAC_BITS, KvmVcpu

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.kvm_arch import KvmArch
    from kvmdbgfs.kvm.vm import Kvm


def kvm_mmu_rmaps_stat_show(kvm: Kvm) -> str:
    """kvm_mmu_rmaps_stat_show(): the rmap-length histogram, under mmu_lock for the whole walk."""
    with kvm.mmu_lock:
        arch = cast("KvmArch", kvm.arch)  # an x86 VM's struct kvm_arch
        slots = arch.memslots if arch.memslots_have_rmaps() else []
        return mmu_rmaps_stat_show(slots, arch.rmaps.pte_list, kvm.profile.rmap_bucket)


# 0644 without a write method: a write fails with EINVAL, as vfs_write answers.
MMU_RMAPS_STAT_FOPS = VmPinnedFops(single_open_fops(kvm_mmu_rmaps_stat_show), lambda kvm: kvm)


def kvm_arch_create_vm_debugfs(kvm: Kvm) -> None:
    """kvm_arch_create_vm_debugfs(): ``mmu_rmaps_stat`` on kernels that have it."""
    if kvm.profile.has_mmu_rmaps_stat:
        assert kvm.debugfs_dentry is not None
        create_file("mmu_rmaps_stat", 0o644, kvm.debugfs_dentry, kvm, MMU_RMAPS_STAT_FOPS)


def kvm_arch_create_vcpu_debugfs(vcpu: KvmVcpu, dentry: Dentry) -> None:
    """kvm_arch_create_vcpu_debugfs(): guest_mode, tsc-offset and, when present, the LAPIC and TSC-scaling files."""
    create_vcpu_file("guest_mode", vcpu, dentry, lambda v: v.stat.read_u64("guest_mode"), "%lld\n")
    create_vcpu_file("tsc-offset", vcpu, dentry, lambda v: v.tsc_offset, "%lld\n")
    if vcpu.lapic_in_kernel:
        create_vcpu_file("lapic_timer_advance_ns", vcpu, dentry, lambda v: v.timer_advance_ns, "%llu\n")
    if vcpu.kvm.profile.has_tsc_scaling:
        create_vcpu_file("tsc-scaling-ratio", vcpu, dentry, lambda v: v.tsc_scaling_ratio, "%llu\n")
        create_vcpu_file("tsc-scaling-ratio-frac-bits", vcpu, dentry, lambda v: TSC_SCALING_RATIO_FRAC_BITS, "%llu\n")
