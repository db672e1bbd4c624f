"""The emulated host machine: a scenario's ``[host]`` table, with `kvmdbgfs mount --host KEY=VALUE` on top.

    [host]
    vendor = "intel"          # intel (VMX): the only one modelled; amd is refused
    nx_huge_pages = false     # kvm.nx_huge_pages (iTLB multihit): only false (an unaffected CPU) is modelled
    l1d_flush = "off"         # kvm_intel.vmentry_l1d_flush on an L1TF-affected CPU: off | cond | always

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
    if host.nx_huge_pages:
        raise ValueError("[host] nx_huge_pages = true is not modelled (the guest's instruction fetches do not reach "
                         "the MMU, so no huge page would split): use false")
    if host.l1d_flush not in L1D_FLUSH_MODES:
        raise ValueError(f"[host] l1d_flush must be one of {', '.join(L1D_FLUSH_MODES)}, not {host.l1d_flush!r}")
    return host


def parse_host_overrides(assignments: list[str]) -> dict[str, Any]:
    """`--host KEY=VALUE` options as a ``[host]`` table: true/false are booleans, anything else a string."""
    return {key: {"true": True, "false": False}.get(value, value)
            for key, value in parse_assignments(assignments, "--host").items()}
