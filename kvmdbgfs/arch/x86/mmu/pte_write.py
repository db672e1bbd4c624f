"""Emulated writes to shadowed guest page tables (kvm_mmu_track_write, formerly kvm_mmu_pte_write).

The guest's store has already reached memory. For every valid shadow page of the gfn
the written spte is zapped (a leaf: drop_spte; a link: the child is unlinked), unless
the page is being flooded (a third emulated write to an upper-level page with no fault
through it in between), in which case the whole page is zapped. Guest stores are aligned
8-byte stores, so detect_write_misaligned() never fires and is not modelled.
"""

from __future__ import annotations

from typing import Final, TYPE_CHECKING

from kvmdbgfs.arch.x86.mmu.shadow_page import KvmMmuPage
from kvmdbgfs.arch.x86.mmu.spte import PG_LEVEL_4K, SPTE_ENT_PER_PAGE, is_shadow_present_pte
from kvmdbgfs.arch.x86.mmu.zap import kvm_mmu_prepare_zap_page, kvm_mmu_remote_flush_or_zap, mmu_page_zap_pte

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu

WRITE_FLOODING_THRESHOLD: Final = 3


def detect_write_flooding(sp: KvmMmuPage) -> bool:
    """detect_write_flooding(): last-level pages are exempt (they can go unsync instead)."""
    if sp.level == PG_LEVEL_4K:
        return False
    sp.write_flooding_count += 1
    return sp.write_flooding_count >= WRITE_FLOODING_THRESHOLD


def kvm_mmu_track_write(mmu: KvmMmu, gfn: int, index: int, new: int) -> None:
    """kvm_mmu_track_write(): the guest wrote ``new`` into entry ``index`` of page ``gfn``."""
    if not mmu.indirect_shadow_pages:
        return
    mmu.stat.mmu_pte_write += 1
    invalid_list: list[KvmMmuPage] = []
    flush = False
    for sp in mmu.sps.valid_with_gptes(gfn):
        if sp.invalid:
            continue
        if detect_write_flooding(sp):
            kvm_mmu_prepare_zap_page(mmu, sp, invalid_list)
            mmu.stat.mmu_flooded += 1
            continue
        entry = mmu.pool.words[sp.id * SPTE_ENT_PER_PAGE + index]
        mmu_page_zap_pte(mmu, sp, index)
        if new and sp.level != PG_LEVEL_4K:
            mmu.stat.mmu_pde_zapped += 1
        if is_shadow_present_pte(entry):
            flush = True
    kvm_mmu_remote_flush_or_zap(mmu, invalid_list, flush)
