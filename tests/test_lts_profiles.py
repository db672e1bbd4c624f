"""The long-term profiles (v6.1, v6.6, v6.12) pinned to their kernels' own tables and debugfs files.

Read from the kernel sources of Debian's linux-source-6.1 (6.1.192) and linux-source-6.12 (6.12.118)
packages (stable updates of the v6.1 and v6.12 tags): include/linux/kvm_host.h (KVM_GENERIC_VM_STATS,
KVM_GENERIC_VCPU_STATS), include/linux/kvm_types.h (HALT_POLL_HIST_COUNT), arch/x86/kvm/x86.c
(kvm_vm_stats_desc, kvm_vcpu_stats_desc), virt/kvm/kvm_main.c (kvm_create_vm_debugfs, kvm_create_vcpu_debugfs,
kvm_stats_debugfs_mode, kvm_init_debug) and arch/x86/kvm/debugfs.c (kvm_arch_create_vcpu_debugfs,
kvm_arch_create_vm_debugfs). Both kernels have the same tables and files, listed below. No v6.6 source could
be read here (no tagged tree in reach, no Debian package); v6.6 lies between the two, whose tables are equal,
so it is pinned to the same list.
"""

from __future__ import annotations

import pytest
from mmu_testlib import new_vm

from kvmdbgfs.debugfs.dentry import dcache_readdir, lookup
from kvmdbgfs.kvm.profiles import get_profile
from kvmdbgfs.kvm.stats import HALT_POLL_HIST_COUNT

# type:name in table order. C cumulative, I instant, P peak, H log histogram of HALT_POLL_HIST_COUNT (32) buckets.
VM_TABLE = """C:remote_tlb_flush C:remote_tlb_flush_requests C:mmu_shadow_zapped C:mmu_pte_write C:mmu_pde_zapped
C:mmu_flooded C:mmu_recycled C:mmu_cache_miss I:mmu_unsync I:pages_4k I:pages_2m I:pages_1g I:nx_lpage_splits
P:max_mmu_rmap_size P:max_mmu_page_hash_collisions""".split()
VCPU_TABLE = """C:halt_successful_poll C:halt_attempted_poll C:halt_poll_invalid C:halt_wakeup C:halt_poll_success_ns
C:halt_poll_fail_ns C:halt_wait_ns H:halt_poll_success_hist H:halt_poll_fail_hist H:halt_wait_hist I:blocking
C:pf_taken C:pf_fixed C:pf_emulate C:pf_spurious C:pf_fast C:pf_mmio_spte_created C:pf_guest C:tlb_flush C:invlpg
C:exits C:io_exits C:mmio_exits C:signal_exits C:irq_window_exits C:nmi_window_exits C:l1d_flush C:halt_exits
C:request_irq_exits C:irq_exits C:host_state_reload C:fpu_reload C:insn_emulation C:insn_emulation_fail
C:hypercalls C:irq_injections C:nmi_injections C:req_event C:nested_run C:directed_yield_attempted
C:directed_yield_successful C:preemption_reported C:preemption_other I:guest_mode C:notify_window_exits""".split()
# kvm_create_vcpu_debugfs: "pid", then the x86 files (the LAPIC's with an in-kernel LAPIC, the TSC-scaling ones
# with kvm_caps.has_tsc_control), every one 0444.
VCPU_FILES = "pid guest_mode tsc-offset lapic_timer_advance_ns tsc-scaling-ratio tsc-scaling-ratio-frac-bits".split()
TYPE_LETTER = {"CUMULATIVE": "C", "INSTANT": "I", "PEAK": "P", "LOG_HIST": "H"}
LTS = ["v6.1", "v6.6", "v6.12"]


def mode_of(letter: str) -> int:
    """kvm_stats_debugfs_mode(): instant stats 0444, every other type 0644."""
    return 0o444 if letter == "I" else 0o644


@pytest.mark.parametrize("name", LTS)
def test_the_stat_tables_are_the_kernels_in_order_and_type(name: str) -> None:
    profile = get_profile(name)
    assert [f"{TYPE_LETTER[d.type.name]}:{d.name}" for d in profile.vm_stats] == VM_TABLE
    assert [f"{TYPE_LETTER[d.type.name]}:{d.name}" for d in profile.vcpu_stats] == VCPU_TABLE
    assert HALT_POLL_HIST_COUNT == 32


@pytest.mark.parametrize("name", LTS)
def test_a_vms_directory_has_the_kernels_files_in_creation_order_and_modes(name: str) -> None:
    """kvm_create_vm_debugfs: the VM stats, the vCPU stats, then mmu_rmaps_stat (0644); each vCPU's directory
    when it is created. dcache_readdir lists the newest first."""
    kvm = new_vm(kernel=name, vcpus=2)
    vm_dir = lookup(kvm.host.debugfs_dir, kvm.name)
    stats = [entry.split(":") for entry in VM_TABLE + VCPU_TABLE]
    assert dcache_readdir(vm_dir)[::-1] == [stat for _, stat in stats] + ["mmu_rmaps_stat", "vcpu0", "vcpu1"]
    assert [lookup(vm_dir, stat).mode & 0o7777 for _, stat in stats] == [mode_of(letter) for letter, _ in stats]
    assert lookup(vm_dir, "mmu_rmaps_stat").mode & 0o7777 == 0o644
    for vcpu in ("vcpu0", "vcpu1"):
        assert dcache_readdir(lookup(vm_dir, vcpu))[::-1] == VCPU_FILES
        assert {lookup(vm_dir, f"{vcpu}/{file}").mode & 0o7777 for file in VCPU_FILES} == {0o444}


@pytest.mark.parametrize("name", LTS)
def test_the_top_level_has_the_tables_in_order_with_their_modes(name: str) -> None:
    """kvm_init_debug: the VM table then the vCPU table, at module load (before any VM directory)."""
    kvm = new_vm(kernel=name)
    top = kvm.host.debugfs_dir
    stats = [entry.split(":") for entry in VM_TABLE + VCPU_TABLE]
    assert [entry for entry in dcache_readdir(top)[::-1] if entry != kvm.name] == [stat for _, stat in stats]
    assert [lookup(top, stat).mode & 0o7777 for _, stat in stats] == [mode_of(letter) for letter, _ in stats]
