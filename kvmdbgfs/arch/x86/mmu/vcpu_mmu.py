"""A vCPU's MMU state (the root and previous roots of its struct kvm_mmu, CR3) and its pending requests."""

from __future__ import annotations

from typing import Final

from dataclasses import dataclass, field

from kvmdbgfs.arch.x86.mmu.shadow_page import KvmMmuPage
from kvmdbgfs.kvm.stats import StatBlock

KVM_MMU_NUM_PREV_ROOTS: Final = 3

# KVM_REQ_*: work a vCPU does before it next enters the guest, in this order.
KVM_REQ_MMU_FREE_OBSOLETE_ROOTS: Final = 1 << 0
KVM_REQ_MMU_SYNC: Final = 1 << 1
KVM_REQ_TLB_FLUSH: Final = 1 << 2
KVM_REQ_TLB_FLUSH_CURRENT: Final = 1 << 3


@dataclass(eq=False)
class MmuVcpu:
    """``stat`` is the vCPU's StatBlock; ``cr3`` the gfn of the guest's PML4 (None before the first load)."""

    vcpu_id: int
    stat: StatBlock
    cr3: int | None = None
    root: KvmMmuPage | None = None
    prev_roots: list[KvmMmuPage | None] = field(default_factory=lambda: [None] * KVM_MMU_NUM_PREV_ROOTS)
    requests: int = 0
    in_guest_mode: bool = False  # vcpu->mode == IN_GUEST_MODE: running guest code, so a request needs an IPI
    nr_exits: int = 0  # exits taken, whatever a reader has done to the ``exits`` stat

    def count_exit(self) -> None:
        """A VM exit: ``exits`` in the stats (vcpu_enter_guest) and the run loop's own count."""
        self.stat.exits += 1
        self.nr_exits += 1

    def check_request(self, request: int) -> bool:
        """kvm_check_request(): test and clear."""
        if self.requests & request:
            self.requests &= ~request
            return True
        return False
