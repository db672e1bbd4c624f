"""The virtual CPUs a guest runs on under KVM (the guest's GuestHardware): memory and paging operations
go to the MMU, halts, MSR writes, port I/O and hypercalls to the vCPU run loop."""

from __future__ import annotations

from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu
from kvmdbgfs.arch.x86.x86 import VcpuRunLoop


class VmxGuestHardware:
    """What VMX hardware does with each guest operation: run it, or exit to KVM (see x86.py and mmu.py)."""

    def __init__(self, mmu: KvmMmu, run: VcpuRunLoop) -> None:
        self.memory = mmu.memory
        self.store_pte = mmu.store_pte
        self.store_ptes = mmu.store_ptes
        self.load_cr3 = mmu.load_cr3
        self.access = mmu.access
        self.invlpg = mmu.invlpg
        self.flush_tlb = mmu.flush_tlb
        self.execute = run.execute
        self.hlt = run.hlt
        self.wrmsr = run.wrmsr
        self.pio = run.pio
        self.vmcall = run.vmcall
