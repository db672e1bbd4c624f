"""Per-VM x86 state (struct kvm_arch): memslots of both address spaces, the rmaps behind them and the MMU."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmdbgfs.arch.x86.mmu.memslot import KvmMemorySlot
from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu
from kvmdbgfs.arch.x86.mmu.rmap import KvmRmaps
from kvmdbgfs.guest.layout import q35_memslots

if TYPE_CHECKING:
    from kvmdbgfs.kvm.vm import Kvm


class KvmArch:
    """The x86 part of a VM: MMU mode, memslots, rmaps and the MMU (``mmu``, the guest's GuestHardware).

    Rmap arrays exist only when the VM has rmaps (kvm_memslots_have_rmaps):
    always with the shadow MMU (``shadow`` and ``tdp-legacy``), never in this
    model with the TDP MMU (``tdp``), which would need a nested shadow root.
    """

    def __init__(self, kvm: Kvm, rmap_design: str) -> None:
        self.mmu_mode = kvm.config.mmu
        self.rmaps = KvmRmaps(rmap_design, kvm.stat)
        self.memslots: list[KvmMemorySlot] = []
        self._shadow_root_allocated = self.mmu_mode != "tdp"
        self.mmu = KvmMmu(kvm, self)
        for slot_id, region in enumerate(q35_memslots(kvm.config.memory)):
            self.kvm_set_memory_region(slot_id, region.as_id, region.base_gfn, region.npages)

    def memslots_have_rmaps(self) -> bool:
        """kvm_memslots_have_rmaps()."""
        return self._shadow_root_allocated

    def kvm_set_memory_region(self, slot_id: int, as_id: int, base_gfn: int, npages: int) -> KvmMemorySlot:
        """Add a memslot; kvm_alloc_memslot_metadata() allocates its rmaps when the VM has them."""
        slot = KvmMemorySlot(slot_id, as_id, base_gfn, npages)
        if self.memslots_have_rmaps():
            slot.alloc_rmaps()
        self.memslots.append(slot)
        self.mmu.kvm_arch_commit_memory_region()
        return slot

    def kvm_delete_memory_region(self, slot: KvmMemorySlot) -> None:
        """KVM_MR_DELETE: kvm_arch_flush_shadow_memslot() zaps the MMU, then the slot goes with its rmaps."""
        self.mmu.kvm_arch_flush_shadow_memslot()
        self.memslots.remove(slot)
        slot.free_rmaps()
        self.mmu.kvm_arch_commit_memory_region()

    def destroy(self) -> None:
        """kvm_arch_flush_shadow_all() then kvm_arch_destroy_vm(): zap every shadow page, free every slot's rmaps."""
        self.mmu.kvm_mmu_zap_all()
        for slot in self.memslots:
            slot.free_rmaps()
        self.memslots.clear()
