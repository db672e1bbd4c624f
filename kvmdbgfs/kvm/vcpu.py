"""A vCPU: its stats and the x86 state its debugfs files show (struct kvm_vcpu, kvm_vcpu_arch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmdbgfs.kvm.stats import StatBlock

if TYPE_CHECKING:
    from kvmdbgfs.kvm.vm import Kvm

# VMX: kvm_caps.tsc_scaling_ratio_frac_bits = 48; the default ratio is 1.0 in that fixed point.
TSC_SCALING_RATIO_FRAC_BITS = 48
DEFAULT_TSC_SCALING_RATIO = 1 << TSC_SCALING_RATIO_FRAC_BITS
# LAPIC_TIMER_ADVANCE_NS_INIT: where adaptive tuning of the timer advance starts.
LAPIC_TIMER_ADVANCE_NS_INIT = 1000


@dataclass(eq=False)
class KvmVcpu:
    """One vCPU of a VM."""

    kvm: Kvm
    vcpu_id: int
    stat: StatBlock
    tsc_offset: int
    pid: int = 0
    tsc_scaling_ratio: int = DEFAULT_TSC_SCALING_RATIO
    timer_advance_ns: int = LAPIC_TIMER_ADVANCE_NS_INIT
    lapic_in_kernel: bool = True

    def kvm_vcpu_ioctl_run(self, now_ns: int, guest: Any) -> None:
        """KVM_RUN on the vCPU fd (kvm_vcpu_ioctl): the arch's run loop, from ``now_ns`` until the guest halts."""
        self.kvm.arch.kvm_arch_vcpu_ioctl_run(self, now_ns, guest)
