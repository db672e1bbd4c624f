"""The emulated host machine: a scenario's ``[host]`` table, with `kvmdbgfs mount --host KEY=VALUE` on top.

    [host]
    vendor = "intel"          # intel (VMX): the only one modelled; amd is refused
    nx_huge_pages = false     # kvm.nx_huge_pages (iTLB multihit): true on an affected CPU (=auto there, or =force)
    l1d_flush = "off"         # kvm_intel.vmentry_l1d_flush on an L1TF-affected CPU: off | cond | always

``nx_huge_pages`` (is_nx_huge_page_enabled): huge sptes are made non-executable, an instruction fetch from one
maps the range at 4K under a shadow page counted in ``nx_lpage_splits``, and the VM's recovery worker zaps
1/nx_huge_pages_recovery_ratio (60) of those pages every 60 s of VM time (kvmdbgfs/arch/x86/mmu/nx_huge_pages.py).
The kernel's default, ``auto``, turns it on only on CPUs that are affected by iTLB multihit (X86_BUG_ITLB_MULTIHIT:
Intel Core and Xeon parts before Cascade Lake / Ice Lake that do not report ARCH_CAP_PSCHANGE_MC_NO; never AMD);
the default here, false, is an unaffected CPU (or nx_huge_pages=off).

``l1d_flush`` (vmx_l1d_flush): with ``cond`` a VM entry flushes the L1D when the vCPU was scheduled in or a host
interrupt ran since the last entry; with ``always`` every VM entry flushes; ``off`` is a CPU that is not
affected (or =never). Only VMs with EPT flush: with EPT off the mitigation is not needed
(vmx_setup_l1d_flush: VMENTER_L1D_FLUSH_EPT_DISABLED).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from kvmdbgfs.workloads.base import parse_assignments

VENDORS = ("intel", "amd")
L1D_FLUSH_MODES = ("off", "cond", "always")


@dataclass(frozen=True)
class HostModel:
    """What the host CPU is and which KVM mitigations it runs."""

    vendor: str = "intel"
    nx_huge_pages: bool = False
    l1d_flush: str = "off"


HOST_KEYS = tuple(field.name for field in fields(HostModel))


def host_model(table: dict[str, Any]) -> HostModel:
    """A checked HostModel from a ``[host]`` table; ValueError with one line for anything else."""
    unknown = set(table) - set(HOST_KEYS)
    if unknown:
        raise ValueError(f"[host]: unknown keys {sorted(unknown)} (known: {', '.join(HOST_KEYS)})")
    host = replace(HostModel(), **table)
    if host.vendor not in VENDORS:
        raise ValueError(f"[host] vendor must be one of {', '.join(VENDORS)}, not {host.vendor!r}")
    if host.vendor == "amd":
        raise ValueError("[host] vendor 'amd' is not modelled (SVM's memslots, NPT and TSC scaling differ): use intel")
    if not isinstance(host.nx_huge_pages, bool):
        raise ValueError("[host] nx_huge_pages must be true or false")
    if host.l1d_flush not in L1D_FLUSH_MODES:
        raise ValueError(f"[host] l1d_flush must be one of {', '.join(L1D_FLUSH_MODES)}, not {host.l1d_flush!r}")
    return host


def parse_host_overrides(assignments: list[str]) -> dict[str, Any]:
    """`--host KEY=VALUE` options as a ``[host]`` table: true/false are booleans, anything else a string."""
    return {key: {"true": True, "false": False}.get(value, value)
            for key, value in parse_assignments(assignments, "--host").items()}
