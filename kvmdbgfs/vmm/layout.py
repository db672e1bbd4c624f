"""Guest-physical layout of a QEMU q35 PC with SMM, as the memslots KVM sees.

QEMU's q35 puts up to 2 GiB of RAM below 4 GiB when the guest has at least
2.75 GiB (hw/i386/pc_q35.c), the rest above 4 GiB. After SeaBIOS has run,
the PAM registers split 0xc0000-0xfffff into read-only and writable pieces,
each its own memslot; the VGA frame buffer and the BIOS flash are slots too.
The SMM address space mirrors every slot and adds SMRAM at 0xa0000-0xbffff,
which QEMU merges with the low 640 KiB into one slot (same RAM block,
contiguous offsets).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmdbgfs.arch.x86.mmu.memslot import KVM_ADDRESS_SPACE_NUM

PAGE_SHIFT = 12
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

SMM_ADDRESS_SPACE = 1

LOW_RAM_END = 0xA0000
SMRAM_END = 0xC0000
HIGH_MEMORY_START = 4 * GiB
VGA_VRAM_BASE, VGA_VRAM_SIZE = 0xFD000000, 16 * MiB
BIOS_BASE, BIOS_SIZE = 0xFFFC0000, 256 * KiB
# PAM segments of 0xc0000-0xfffff after SeaBIOS: (start, end) pairs, alternately RO and RW.
PAM_SEGMENTS = (
    (0xC0000, 0xC4000),
    (0xC4000, 0xCC000),
    (0xCC000, 0xD0000),
    (0xD0000, 0xE0000),
    (0xE0000, 0xE4000),
    (0xE4000, 0xF0000),
    (0xF0000, 0x100000),
)


@dataclass(frozen=True)
class SlotRegion:
    """One memslot as QEMU registers it: address space, first gfn and number of pages."""

    as_id: int
    base_gfn: int
    npages: int
    ram: bool  # guest RAM (as opposed to ROM, flash or VGA memory)


def below_4g_ram(memory: int) -> int:
    """How much RAM q35 places below 4 GiB (pc_q35_init's lowmem rule)."""
    lowmem = 0x80000000 if memory >= 0xB0000000 else 0xB0000000
    return min(memory, lowmem)


def _region(as_id: int, start: int, end: int, ram: bool) -> SlotRegion:
    return SlotRegion(as_id, start >> PAGE_SHIFT, (end - start) >> PAGE_SHIFT, ram)


def q35_memslots(memory: int) -> list[SlotRegion]:
    """The memslots of both address spaces for a q35 guest with ``memory`` bytes of RAM."""
    low = below_4g_ram(memory)
    regions: list[SlotRegion] = []
    for as_id in range(KVM_ADDRESS_SPACE_NUM):
        low_end = SMRAM_END if as_id == SMM_ADDRESS_SPACE else LOW_RAM_END
        regions.append(_region(as_id, 0, low_end, True))
        regions.extend(_region(as_id, start, end, False) for start, end in PAM_SEGMENTS)
        regions.append(_region(as_id, 1 * MiB, low, True))
        regions.append(_region(as_id, VGA_VRAM_BASE, VGA_VRAM_BASE + VGA_VRAM_SIZE, False))
        regions.append(_region(as_id, BIOS_BASE, BIOS_BASE + BIOS_SIZE, False))
        if memory > low:
            regions.append(_region(as_id, HIGH_MEMORY_START, HIGH_MEMORY_START + memory - low, True))
    return regions
