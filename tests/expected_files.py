"""The kernel's per-VM file sets, written out from the reference (§4.2, §3) rather than from the code."""

VM_STATS_V5_15 = """remote_tlb_flush remote_tlb_flush_requests mmu_shadow_zapped mmu_pte_write mmu_pde_zapped
mmu_flooded mmu_recycled mmu_cache_miss mmu_unsync pages_4k pages_2m pages_1g nx_lpage_splits
max_mmu_rmap_size max_mmu_page_hash_collisions""".split()

VM_STATS_V5_14 = """remote_tlb_flush mmu_shadow_zapped mmu_pte_write mmu_pde_zapped mmu_flooded mmu_recycled
mmu_cache_miss mmu_unsync lpages nx_lpage_splits max_mmu_page_hash_collisions""".split()

HALT_V5_14 = """halt_successful_poll halt_attempted_poll halt_poll_invalid halt_wakeup halt_poll_success_ns
halt_poll_fail_ns""".split()
HALT_V5_15 = HALT_V5_14 + "halt_wait_ns halt_poll_success_hist halt_poll_fail_hist halt_wait_hist".split()

X86_VCPU_V5_15 = """pf_fixed pf_guest tlb_flush invlpg exits io_exits mmio_exits signal_exits irq_window_exits
nmi_window_exits l1d_flush halt_exits request_irq_exits irq_exits host_state_reload fpu_reload insn_emulation
insn_emulation_fail hypercalls irq_injections nmi_injections req_event nested_run directed_yield_attempted
directed_yield_successful guest_mode""".split()

X86_VCPU_LATEST = """pf_taken pf_fixed pf_emulate pf_spurious pf_fast pf_mmio_spte_created pf_guest tlb_flush invlpg
exits io_exits mmio_exits signal_exits irq_window_exits nmi_window_exits l1d_flush halt_exits request_irq_exits
irq_exits host_state_reload fpu_reload insn_emulation insn_emulation_fail hypercalls irq_injections
nmi_injections req_event nested_run directed_yield_attempted directed_yield_successful preemption_reported
preemption_other guest_mode notify_window_exits""".split()

VCPU_ARCH_FILES = "guest_mode tsc-offset lapic_timer_advance_ns tsc-scaling-ratio tsc-scaling-ratio-frac-bits".split()

# Stats whose debugfs file is 0444 (instant stats); every other stat file is 0644.
INSTANT = {"mmu_unsync", "pages_4k", "pages_2m", "pages_1g", "nx_lpage_splits", "lpages", "guest_mode", "blocking"}

PROFILE_STATS = {
    "v5.14": VM_STATS_V5_14 + HALT_V5_14 + X86_VCPU_V5_15,
    "v5.15": VM_STATS_V5_15 + HALT_V5_15 + X86_VCPU_V5_15,
    "latest": VM_STATS_V5_15 + HALT_V5_15 + ["blocking"] + X86_VCPU_LATEST,
}
PROFILE_HAS_RMAPS_STAT = {"v5.14": False, "v5.15": True, "latest": True}
PROFILE_VCPU_FILES = {
    "v5.14": sorted(VCPU_ARCH_FILES),
    "v5.15": sorted(VCPU_ARCH_FILES),
    "latest": sorted(VCPU_ARCH_FILES + ["pid"]),
}


def per_vm_files(profile: str, vcpus: int) -> list[str]:
    """Every path under a VM directory (files only), sorted, for ``vcpus`` vCPUs."""
    files = list(PROFILE_STATS[profile])
    if PROFILE_HAS_RMAPS_STAT[profile]:
        files.append("mmu_rmaps_stat")
    for vcpu in range(vcpus):
        files.extend(f"vcpu{vcpu}/{name}" for name in PROFILE_VCPU_FILES[profile])
    return sorted(files)
