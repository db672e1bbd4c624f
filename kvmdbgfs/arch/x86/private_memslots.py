"""The memslots KVM registers for itself on a VMX host (arch/x86/kvm/vmx/vmx.c, __x86_set_memory_region).

- The real-mode TSS: KVM_SET_TSS_ADDR (QEMU calls it at start-up) makes a 3-page slot at the given address,
  unless the CPU runs real mode itself (unrestricted guest, which needs EPT): with EPT off it exists
  (vmx_set_tss_addr).
- The APIC-access page: the first vCPU with an in-kernel LAPIC on a CPU that virtualizes APIC accesses
  (flexpriority) makes a 1-page slot at the default APIC base (kvm_alloc_apic_access_page), EPT or not.
- The identity-map page table exists only with EPT on and no unrestricted guest, a CPU this model has not.

__x86_set_memory_region() registers each one in every address space, so both have them, and
kvm_mmu_rmaps_stat() counts their rmap heads like any other slot's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmdbgfs.arch.x86.mmu.memslot import KVM_ADDRESS_SPACE_NUM
from kvmdbgfs.arch.x86.mmu.spte import PAGE_SHIFT

if TYPE_CHECKING:
    from kvmdbgfs.kvm.vm import Kvm

KVM_USER_MEM_SLOTS = 509
TSS_PRIVATE_MEMSLOT = KVM_USER_MEM_SLOTS
APIC_ACCESS_PAGE_PRIVATE_MEMSLOT = KVM_USER_MEM_SLOTS + 1
RMODE_TSS_PAGES = 3
APIC_DEFAULT_PHYS_BASE = 0xFEE00000


def x86_set_memory_region(kvm: Kvm, slot_id: int, gpa: int, npages: int) -> None:
    """__x86_set_memory_region(): the same private slot in every address space."""
    for as_id in range(KVM_ADDRESS_SPACE_NUM):
        kvm.kvm_set_memory_region(slot_id, as_id, gpa >> PAGE_SHIFT, npages)


def vmx_set_tss_addr(kvm: Kvm, addr: int, unrestricted_guest: bool) -> None:
    """vmx_set_tss_addr(): the real-mode TSS slot, needed only without unrestricted guest."""
    if not unrestricted_guest:
        x86_set_memory_region(kvm, TSS_PRIVATE_MEMSLOT, addr, RMODE_TSS_PAGES)


def kvm_alloc_apic_access_page(kvm: Kvm) -> None:
    """kvm_alloc_apic_access_page(): the APIC-access slot, once per VM."""
    x86_set_memory_region(kvm, APIC_ACCESS_PAGE_PRIVATE_MEMSLOT, APIC_DEFAULT_PHYS_BASE, 1)
