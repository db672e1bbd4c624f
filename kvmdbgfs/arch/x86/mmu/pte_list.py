"""The rmap list designs (arch/x86/kvm/mmu/mmu.c ``pte_list_*``), one interface, chosen by name.

A: up to v5.14; B: v5.15 - v6.3; C: v6.4+; D: ours (C with O(1) removal).
"""

from __future__ import annotations

from kvmdbgfs.arch.x86.mmu.pte_list_base import (
    PteListDesign,
    RmapCorruption,
    list_heads,
    occurrence_rounds,
    scan_heads,
)
from kvmdbgfs.arch.x86.mmu.pte_list_head import DesignC, DesignD
from kvmdbgfs.arch.x86.mmu.pte_list_pool import RmapCosts
from kvmdbgfs.arch.x86.mmu.pte_list_tail import DesignA, DesignB

_DESIGNS: dict[str, type[PteListDesign]] = {cls.name: cls for cls in (DesignA, DesignB, DesignC, DesignD)}
PTE_LIST_DESIGNS: tuple[str, ...] = tuple(_DESIGNS)


def make_pte_list(name: str) -> PteListDesign:
    """A fresh design instance (its own descriptor pool and cost counters: one per VM)."""
    try:
        return _DESIGNS[name]()
    except KeyError:
        raise ValueError(f"unknown rmap design {name!r} (known: {', '.join(PTE_LIST_DESIGNS)})") from None


__all__ = [
    "PTE_LIST_DESIGNS",
    "PteListDesign",
    "RmapCorruption",
    "RmapCosts",
    "list_heads",
    "make_pte_list",
    "occurrence_rounds",
    "scan_heads",
]
