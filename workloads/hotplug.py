"""hotplug: a pc-dimm plugged in, used by the guest and unplugged again (ACPI memory hotplug under QEMU).

Each round:

1. Plug. QEMU maps the DIMM above the guest's RAM, 1 GiB aligned: one memslot
   in each address space (KVM_SET_USER_MEMORY_REGION; rmaps allocated). The
   guest's ACPI handler adds the memory (its direct map with 2M/1G pages, its
   memmap) and onlines the memory blocks into ZONE_MOVABLE: the model's guest
   uses ``memhp_default_state=online_movable``, the auto-online policy that
   distributions set (kernel option or udev rule) for memory meant to be
   unplugged again.
2. Use. A few services each map an anonymous buffer and write it, ``use``
   bytes in all; movable allocations prefer ZONE_MOVABLE, so the buffers (and
   page cache filled meanwhile) land on the DIMM, and the DIMM slot's rmaps
   fill: 4K entries for the user mappings, 2M ones for the direct map where
   the MMU maps it with large pages. The guest then runs on for a while.
3. Unplug. The guest offlines the blocks (every page in use is migrated: user
   PTEs rewritten to the new frames, TLBs flushed) and removes them (memmap
   and direct map torn down), then QEMU deletes the memslots: KVM_MR_DELETE
   zaps the MMU (kvm_arch_flush_shadow_memslot) and the slots go with their
   rmaps. The guest runs on.

The buffers stay with their processes, now in the guest's other memory,
until the next round, whose users free them first.

A round has one safe point, at its end, when the DIMM is unplugged: a
cancelled run (or a destroyed VM) stops there and its users unmap their
buffers. A run that ends early elsewhere (the guest out of memory) unmaps
the buffers made so far, then unplugs the DIMM if it is plugged: its pages
in use are migrated out, and its memslots deleted. A guest that cannot add
the DIMM's memory (no free 2 MiB block for its memmap) leaves nothing of it
behind. If even that unplug finds no memory to migrate to, the DIMM stays
plugged and online, and the error says the guest is out of memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvmdbgfs.vmm.layout import HIGH_MEMORY_START, KVM_ADDRESS_SPACE_NUM, PAGE_SHIFT, below_4g_ram
from kvmdbgfs.guest.memory_hotplug import MEMORY_BLOCK_PAGES, add_memory, offline_and_remove_memory
from kvmdbgfs.guest.migrate import MigrationResult
from kvmdbgfs.guest.physmem import STRUCT_PAGES_PER_PAGE
from kvmdbgfs.workloads.base import Param, Progress, Workload
from kvmdbgfs.workloads.guest import booted_guest, require_booted
from kvmdbgfs.workloads.teardown import Started

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.memslot import KvmMemorySlot
    from kvmdbgfs.guest.process import Task
    from kvmdbgfs.guest.vma import Vma
    from kvmdbgfs.vmm.qemu import QemuProcess

DIMM_ALIGN = 1 << 30  # QEMU places DIMMs in the device memory region, 1 GiB aligned
MEMORY_BLOCK_SIZE = MEMORY_BLOCK_PAGES << PAGE_SHIFT
IDLE_SECONDS = 5
USERS = 4  # services that put a buffer on the DIMM


@dataclass
class Dimm:
    """A pc-dimm of ``npages`` frames from frame ``start``, and its memslots while it is plugged."""

    start: int
    npages: int
    slots: list[KvmMemorySlot] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + self.npages


def dimm_slot(vm: QemuProcess, size: int) -> Dimm:
    """Where QEMU maps a DIMM of ``size`` bytes: the first 1 GiB-aligned address above the guest's RAM."""
    high_ram = vm.memory - below_4g_ram(vm.memory)
    base = -(-(HIGH_MEMORY_START + high_ram) // DIMM_ALIGN) * DIMM_ALIGN
    return Dimm(base >> PAGE_SHIFT, size >> PAGE_SHIFT)


def plug(vm: QemuProcess, dimm: Dimm) -> None:
    """pc_dimm_plug: a memslot per address space (KVM_SET_USER_MEMORY_REGION); then the guest's ACPI
    handler adds the memory and onlines it (add_memory, online_pages into ZONE_MOVABLE). A guest that
    cannot add it (no free 2 MiB block for its memmap) reports the failure, and the memslots go again."""
    first_id = max(slot.id for slot in vm.memslots) + 1
    slots = [
        vm.kvm.kvm_set_memory_region(first_id + as_id, as_id, dimm.start, dimm.npages)
        for as_id in range(KVM_ADDRESS_SPACE_NUM)
    ]
    try:
        add_memory(booted_guest(vm).kernel, dimm.start, dimm.end)
    except MemoryError:
        delete_memslots(vm, slots)
        raise
    dimm.slots = slots


def unplug(vm: QemuProcess, dimm: Dimm) -> MigrationResult:
    """The guest offlines and removes the memory (offline_pages, remove_memory) and ejects the device; QEMU
    then deletes the memslots. Out of memory for the migration, the DIMM stays plugged and online."""
    result = offline_and_remove_memory(booted_guest(vm).kernel, dimm.start, dimm.end)
    delete_memslots(vm, dimm.slots)
    dimm.slots = []
    return result


def delete_memslots(vm: QemuProcess, slots: list[KvmMemorySlot]) -> None:
    """KVM_MR_DELETE of each of a DIMM's memslots: KVM zaps what maps them, and they go with their rmaps."""
    for slot in slots:
        vm.kvm.kvm_delete_memory_region(slot)


def map_buffers(users: list[Task], use_pages: int) -> Iterator[tuple[Task, Vma]]:
    """Each user maps its share of ``use_pages`` anonymous pages and writes all of it. Each mapping is
    yielded as soon as it is made, before it is written, so that the caller can track it."""
    for task, share in zip(users, np.array_split(np.arange(use_pages), len(users))):
        if not len(share):
            continue
        vma = task.mmap(len(share) << PAGE_SHIFT, name="[anon:dimm]")
        yield task, vma
        task.touch(vma.start, vma.end, write=True)


def fill_buffers(users: list[Task], use_pages: int) -> list[tuple[Task, Vma]]:
    """map_buffers, all of them."""
    return list(map_buffers(users, use_pages))


class Hotplug(Workload):
    name = "hotplug"
    description = "plug a DIMM (a memslot per address space), online and use it, offline (migrate) and unplug it"
    params = (
        Param("size", 1 << 30, 128 << 20, 16 << 30, "DIMM size, whole 128M memory blocks", size=True),
        Param("use", 64 << 20, 0, 16 << 30, "anonymous memory the guest's services put on the DIMM", size=True),
        Param("rounds", 3, 1, 100, "plug/unplug cycles"),
    )
    check_vm = staticmethod(require_booted)

    def settings(self, overrides: Mapping[str, Any]) -> dict[str, int]:
        """The parameters, each in its range, plus: whole memory blocks, and ``use`` no larger than the DIMM."""
        settings = super().settings(overrides)
        if settings["size"] % MEMORY_BLOCK_SIZE:
            raise ValueError(f"size must be a multiple of 128M (the guest's memory block), not {settings['size']}")
        if settings["use"] > settings["size"]:
            raise ValueError(f"use ({settings['use']}) must not exceed the DIMM size ({settings['size']})")
        return settings

    def run(self, vm: QemuProcess, settings: dict[str, int], rng: np.random.Generator, progress: Progress) -> dict[str, Any]:
        system = booted_guest(vm)
        dimm = dimm_slot(vm, settings["size"])
        use_pages = settings["use"] >> PAGE_SHIFT
        free_pages = system.kernel.stats()["pages_free"]
        if use_pages + dimm.npages // STRUCT_PAGES_PER_PAGE > free_pages:
            raise ValueError(
                f"hotplug: use ({settings['use']}) and the DIMM's memmap do not fit in the guest's free memory "
                f"({free_pages << PAGE_SHIFT}), where unplugging must migrate them"
            )
        users = [system.services[i] for i in np.sort(rng.choice(len(system.services), USERS, replace=False))]
        buffers: list[tuple[Task, Vma]] = []
        migrated = remapped = pte_writes = zapped = 0
        heads: list[int] = []
        with Started(system.kernel) as started:  # an early end unmaps the buffers, then unplugs a plugged DIMM
            for round_ in range(settings["rounds"]):
                for task, vma in buffers:
                    started.munmap(task, vma)
                plug(vm, dimm)
                started.track(dimm, lambda: unplug(vm, dimm))
                buffers = [(task, started.mapped(task, vma)) for task, vma in map_buffers(users, use_pages)]
                system.advance(IDLE_SECONDS)
                heads = [int(np.count_nonzero(level)) for level in dimm.slots[0].rmap or ()]
                writes, shadow_zapped = vm.kvm.stat.mmu_pte_write, vm.kvm.stat.mmu_shadow_zapped
                result = unplug(vm, dimm)
                started.ended(dimm)
                migrated, remapped = migrated + result.pages, remapped + result.ptes
                pte_writes += vm.kvm.stat.mmu_pte_write - writes
                zapped += vm.kvm.stat.mmu_shadow_zapped - shadow_zapped
                system.advance(IDLE_SECONDS)
                progress(round_ + 1, settings["rounds"])
        return {
            "rounds": settings["rounds"],
            "dimm_base": hex(dimm.start << PAGE_SHIFT),
            "users": [task.pid for task in users],
            "dimm_rmap_heads_in_use": heads,  # 4K, 2M, 1G heads of the DIMM's slot before the last unplug
            "pages_migrated": migrated,
            "ptes_remapped": remapped,
            "emulated_pte_writes": pte_writes,  # guest page-table writes KVM emulated during the unplugs
            "shadow_pages_zapped": zapped,  # during the unplugs: emulated writes, then KVM_MR_DELETE
        }
