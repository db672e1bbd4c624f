"""Kernel profiles: what differs between kernel versions, as data.

A profile names the stat set (names, order, types) the kernel's tables hold,
the rmap list design, whether `mmu_rmaps_stat` and the vCPU `pid` file exist,
and how `mmu_rmaps_stat` buckets counts: ffs(), as every kernel that has the
file does; ``NAME+fls`` gives the log2 buckets its header promises instead
(``NAME+ffs`` is NAME itself).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvmdbgfs.kvm.halt import HaltPollParams
from kvmdbgfs.kvm.stats import StatDesc, counters, icounter, loghist, pcounter

_MMU_COUNTERS = counters(
    "mmu_shadow_zapped", "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded", "mmu_recycled", "mmu_cache_miss"
)

VM_STATS_V5_14 = (
    *counters("remote_tlb_flush"),
    *_MMU_COUNTERS,
    icounter("mmu_unsync"),
    icounter("lpages"),
    icounter("nx_lpage_splits"),
    pcounter("max_mmu_page_hash_collisions"),
)

VM_STATS_V5_15 = (
    *counters("remote_tlb_flush", "remote_tlb_flush_requests"),
    *_MMU_COUNTERS,
    icounter("mmu_unsync"),
    icounter("pages_4k"),
    icounter("pages_2m"),
    icounter("pages_1g"),
    icounter("nx_lpage_splits"),
    pcounter("max_mmu_rmap_size"),
    pcounter("max_mmu_page_hash_collisions"),
)

_HALT_V5_14 = counters(
    "halt_successful_poll",
    "halt_attempted_poll",
    "halt_poll_invalid",
    "halt_wakeup",
    "halt_poll_success_ns",
    "halt_poll_fail_ns",
)
_HALT_V5_15 = (
    *_HALT_V5_14,
    *counters("halt_wait_ns"),
    loghist("halt_poll_success_hist"),
    loghist("halt_poll_fail_hist"),
    loghist("halt_wait_hist"),
)

_X86_VCPU_COMMON = counters(
    "pf_guest",
    "tlb_flush",
    "invlpg",
    "exits",
    "io_exits",
    "mmio_exits",
    "signal_exits",
    "irq_window_exits",
    "nmi_window_exits",
    "l1d_flush",
    "halt_exits",
    "request_irq_exits",
    "irq_exits",
    "host_state_reload",
    "fpu_reload",
    "insn_emulation",
    "insn_emulation_fail",
    "hypercalls",
    "irq_injections",
    "nmi_injections",
    "req_event",
    "nested_run",
    "directed_yield_attempted",
    "directed_yield_successful",
)

VCPU_STATS_V5_14 = (*_HALT_V5_14, *counters("pf_fixed"), *_X86_VCPU_COMMON, icounter("guest_mode"))
VCPU_STATS_V5_15 = (*_HALT_V5_15, *counters("pf_fixed"), *_X86_VCPU_COMMON, icounter("guest_mode"))
VCPU_STATS_LATEST = (
    *_HALT_V5_15,
    icounter("blocking"),
    *counters("pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast", "pf_mmio_spte_created"),
    *_X86_VCPU_COMMON,
    *counters("preemption_reported", "preemption_other"),
    icounter("guest_mode"),
    *counters("notify_window_exits"),
)

RMAP_BUCKETS = ("fls", "ffs")

# Halt polling's module defaults and rules per kernel:
# - ae232ea46088 "KVM: do not shrink halt_poll_ns below grow_start" (v5.15): the shrink floor;
# - 97b6847ac10b "KVM: Cap vcpu->halt_poll_ns before halting rather than after" (v6.1);
# - aeb1b22a3ac8 "KVM: Enable halt polling shrink parameter by default" (v6.11): shrink 0 -> 2.
HALT_POLL_V5_14 = HaltPollParams(shrink=0, shrink_floor=False, cap_before_halt=False)
HALT_POLL_V5_15 = HaltPollParams(shrink=0, cap_before_halt=False)
HALT_POLL_V6_4 = HaltPollParams(shrink=0)
HALT_POLL_LATEST = HaltPollParams(shrink=2)


@dataclass(frozen=True)
class ShadowMmuRules:
    """Shadow-MMU rules that changed between kernels (arch/x86/kvm/mmu/), each named by the commit that
    changed it; the model runs the rules of the VM's kernel."""

    # Before c3e5e415bc1e "KVM: X86: Change kvm_sync_page() to return true when remote flush is needed"
    # (v5.16), FNAME(sync_page) flushed remote TLBs itself and returned how many sptes it left present;
    # kvm_sync_page() zapped a page left with none. Since, it returns whether a flush is due and only a role
    # mismatch (never in the model) zaps.
    sync_page_zaps_empty: bool
    # Before f1c4a88c41ea "KVM: X86: Don't unsync pagetables when speculative" (v5.16), a prefetched
    # writable spte unsynced the gfn's shadow pages like a fault; since, it stays read-only.
    prefetch_unsyncs: bool
    # Before 9fd4a4e3a3d9 "KVM: x86/mmu: Remove FNAME(invlpg) and use FNAME(sync_spte) to update vTLB
    # instead." (v6.4), INVLPG zapped the leaf of an unsync page and prefetched it again from the new gPTE
    # (present or not before); since, it syncs only a present spte.
    invlpg_prefetches: bool
    # 4293ddb788c1 "KVM: x86/mmu: Remove redundant spte present check in mmu_set_spte" (v5.15) lost the
    # max_mmu_rmap_size update; 604f533262ae restored it in 6.0-rc7. Queued for 5.15.y and dropped
    # again (linux-stable-rc queue/5.15 of 2022-09-25 keeps only its prerequisite "Fold rmap_recycle into
    # rmap_add"), so no 5.15.y has it and the file reads 0 on every 5.15 kernel.
    updates_max_mmu_rmap_size: bool
    # The NX huge page rules (kvm.nx_huge_pages on), both from v6.2 (absent from the v6.1 source, whose
    # account_huge_nx_page() and kvm_tdp_mmu_map() are the old ones; present in v6.12's). Since "KVM: x86/mmu:
    # Track possible NX huge pages separately from disallowed" and "KVM: x86/mmu: explicitly check
    # nx_hugepage in disallowed_hugepage_adjust()", every page made while a huge page is disallowed is marked
    # nx_huge_page_disallowed, only those that stand where a huge page could be are counted in
    # nx_lpage_splits (and recovered), and a fault goes a level down only over a marked page. Before, only the
    # counted pages were marked (lpage_disallowed) and any page table at the goal level sent the fault down.
    nx_marks_every_disallowed_page: bool = True
    # "KVM: x86/mmu: Split huge pages mapped by the TDP MMU on fault": the TDP MMU replaces the huge spte by a
    # full page of 4K sptes (made executable); before, it zapped it (a remote TLB flush) and linked an empty
    # page.
    tdp_mmu_splits_huge_page_on_fault: bool = True


# v5.14 had the same rules, and no max_mmu_rmap_size stat.
MMU_RULES_V5_15 = ShadowMmuRules(
    sync_page_zaps_empty=True,
    prefetch_unsyncs=True,
    invlpg_prefetches=True,
    updates_max_mmu_rmap_size=False,
    nx_marks_every_disallowed_page=False,
    tdp_mmu_splits_huge_page_on_fault=False,
)
# v6.1: the v5.16 sync and unsync rules and the max_mmu_rmap_size fix, still the old INVLPG and NX rules.
MMU_RULES_V6_1 = replace(
    MMU_RULES_V5_15, sync_page_zaps_empty=False, prefetch_unsyncs=False, updates_max_mmu_rmap_size=True
)
MMU_RULES_V6_4 = ShadowMmuRules(
    sync_page_zaps_empty=False, prefetch_unsyncs=False, invlpg_prefetches=False, updates_max_mmu_rmap_size=True
)


@dataclass(frozen=True)
class KernelProfile:
    """One kernel version's debugfs-visible behaviour."""

    name: str
    vm_stats: tuple[StatDesc, ...]
    vcpu_stats: tuple[StatDesc, ...]
    rmap_design: str
    has_mmu_rmaps_stat: bool
    has_vcpu_pid: bool
    halt_poll: HaltPollParams
    # Exits handled in the fastpath and re-entered at once count in ``exits`` (commit 8b703a49c9df).
    counts_fastpath_exits: bool = False
    rmap_bucket: str = "ffs"
    mmu_rules: ShadowMmuRules = MMU_RULES_V6_4
    # kvm_caps.has_tsc_control (KVM_CAP_TSC_CONTROL): the vCPU's tsc-scaling-ratio files exist.
    has_tsc_scaling: bool = True

    @property
    def all_stats(self) -> tuple[StatDesc, ...]:
        return self.vm_stats + self.vcpu_stats


PROFILES: dict[str, KernelProfile] = {
    profile.name: profile
    for profile in (
        KernelProfile(
            "v5.14", VM_STATS_V5_14, VCPU_STATS_V5_14, "A", False, False, HALT_POLL_V5_14, mmu_rules=MMU_RULES_V5_15
        ),
        KernelProfile(
            "v5.15", VM_STATS_V5_15, VCPU_STATS_V5_15, "B", True, False, HALT_POLL_V5_15, mmu_rules=MMU_RULES_V5_15
        ),
        # The long-term kernels: their stat tables (x86.c, KVM_GENERIC_*_STATS) equal VCPU_STATS_LATEST. 6.1 has
        # the 6.0-rc7 max_mmu_rmap_size fix and the v5.16 sync and unsync rules, but FNAME(invlpg) until v6.4.
        KernelProfile(
            "v6.1", VM_STATS_V5_15, VCPU_STATS_LATEST, "B", True, True, HALT_POLL_V6_4, mmu_rules=MMU_RULES_V6_1
        ),
        KernelProfile("v6.4", VM_STATS_V5_15, VCPU_STATS_LATEST, "C", True, True, HALT_POLL_V6_4),
        KernelProfile(
            "v6.6", VM_STATS_V5_15, VCPU_STATS_LATEST, "C", True, True, HALT_POLL_V6_4, counts_fastpath_exits=True
        ),
        KernelProfile(
            "v6.12", VM_STATS_V5_15, VCPU_STATS_LATEST, "C", True, True, HALT_POLL_LATEST, counts_fastpath_exits=True
        ),
        KernelProfile(
            "latest", VM_STATS_V5_15, VCPU_STATS_LATEST, "C", True, True, HALT_POLL_LATEST, counts_fastpath_exits=True
        ),
    )
}
DEFAULT_PROFILE = "latest"


def _union(*stat_sets: tuple[StatDesc, ...]) -> tuple[StatDesc, ...]:
    seen: dict[str, StatDesc] = {}
    for stats in stat_sets:
        for desc in stats:
            seen.setdefault(desc.name, desc)
    return tuple(seen.values())


# Every stat the model keeps, whichever kernel a VM runs; a profile shows a subset.
ALL_VM_STATS = _union(*(profile.vm_stats for profile in PROFILES.values()))
ALL_VCPU_STATS = _union(*(profile.vcpu_stats for profile in PROFILES.values()))


def profile_names() -> list[str]:
    """Every accepted profile name, the bucket variants included."""
    return [name + suffix for name in PROFILES for suffix in ("", "+fls", "+ffs")]


# Profiles read from files (`--kernel FILE`), by the name the file gives them.
FILE_PROFILES: dict[str, KernelProfile] = {}


def get_profile(name: str) -> KernelProfile:
    """Look a profile up by name; ``NAME+fls`` gives NAME with log2 (fls) buckets, ``NAME+ffs`` is NAME
    (the kernel's ffs buckets, every profile's default; accepted so that older scenarios keep working). A path
    (with a '/' or ending in .json) reads a profile file (kvmdbgfs/kvm/profile_file.py), known by its name from
    then on."""
    if not isinstance(name, str):
        raise ValueError(f"kernel profile must be a name, not {name!r}")
    if name in FILE_PROFILES:
        return FILE_PROFILES[name]
    if "/" in name or name.endswith(".json"):
        from kvmdbgfs.kvm.profile_file import load_profile_file  # it builds on this module's profiles

        profile = load_profile_file(name)
        if FILE_PROFILES.setdefault(profile.name, profile) != profile:
            raise ValueError(f"{name}: another profile named {profile.name!r} is already loaded")
        return profile
    base, plus, variant = name.partition("+")
    known = PROFILES.get(base)
    if known is None or (plus and variant not in RMAP_BUCKETS):
        raise ValueError(f"unknown kernel profile {name!r} (known: {', '.join(profile_names())})")
    if variant == "fls":
        return replace(known, name=name, rmap_bucket="fls")
    return known
