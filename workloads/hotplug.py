"""hotplug: memslots added and removed, as QEMU does for a pc-dimm plugged in and unplugged.

Each round plugs a DIMM above the guest's RAM (one memslot in each address
space, rmaps allocated), the guest's processes keep running, then the DIMM
is unplugged: KVM_MR_DELETE zaps the MMU (kvm_arch_flush_shadow_memslot)
and the slots go with their rmaps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kvmdbgfs.guest.layout import HIGH_MEMORY_START, KVM_ADDRESS_SPACE_NUM, PAGE_SHIFT, below_4g_ram
from kvmdbgfs.workload import Param, Progress, Workload
from workloads.guest import booted_guest, require_booted

if TYPE_CHECKING:
    from kvmdbgfs.kvm.vm import Kvm

DIMM_ALIGN = 1 << 30  # QEMU places DIMMs in the device memory region, 1 GiB aligned
IDLE_SECONDS = 5


class Hotplug(Workload):
    name = "hotplug"
    description = "plug a DIMM (a memslot per address space), let the guest run, unplug it; repeat"
    params = (
        Param("size", 1 << 30, 128 << 20, 16 << 30, "DIMM size", size=True),
        Param("rounds", 3, 1, 100, "plug/unplug cycles"),
    )
    check_vm = staticmethod(require_booted)

    def run(self, kvm: Kvm, settings: dict[str, int], rng: np.random.Generator, progress: Progress) -> dict[str, Any]:
        system = booted_guest(kvm)
        arch = kvm.arch
        high_ram = kvm.config.memory - below_4g_ram(kvm.config.memory)
        base = -(-(HIGH_MEMORY_START + high_ram) // DIMM_ALIGN) * DIMM_ALIGN
        npages = settings["size"] >> PAGE_SHIFT
        zapped = 0
        for round_ in range(settings["rounds"]):
            first_id = max(slot.id for slot in arch.memslots) + 1
            slots = [
                arch.kvm_set_memory_region(first_id + as_id, as_id, base >> PAGE_SHIFT, npages)
                for as_id in range(KVM_ADDRESS_SPACE_NUM)
            ]
            system.advance(IDLE_SECONDS)
            before = kvm.stat.mmu_shadow_zapped
            for slot in slots:
                arch.kvm_delete_memory_region(slot)
            zapped += kvm.stat.mmu_shadow_zapped - before
            system.advance(IDLE_SECONDS)
            progress(round_ + 1, settings["rounds"])
        return {"rounds": settings["rounds"], "dimm_base": hex(base), "shadow_pages_zapped": zapped}
