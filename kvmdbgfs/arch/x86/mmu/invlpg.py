"""INVLPG under shadow paging (kvm_mmu_invlpg -> kvm_mmu_invalidate_addr): the unsync leaf on the
address's walk in every cached root is brought up to date with the guest's PTE.

How depends on the kernel (the profile's ``invlpg_prefetches``): up to v6.3 FNAME(invlpg) zaps
that spte and prefetches it again from the new gPTE, so an entry the guest just filled in gets a
(speculative) spte; from v6.4 FNAME(sync_spte) syncs only an spte that is present.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmdbgfs.arch.x86.mmu.page_fault import prefetch_gpte
from kvmdbgfs.arch.x86.mmu.shadow_page import KvmMmuPage
from kvmdbgfs.arch.x86.mmu.spte import SPTE_ENT_PER_PAGE, is_last_spte, is_shadow_present_pte, spte_index, spte_to_pfn
from kvmdbgfs.arch.x86.mmu.sync import sync_spte
from kvmdbgfs.arch.x86.mmu.zap import mmu_page_zap_pte

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu, MmuVcpu


def kvm_mmu_invalidate_addr(mmu: KvmMmu, vcpu: MmuVcpu, gva: int) -> None:
    """kvm_mmu_invalidate_addr() (FNAME(invlpg) before v6.4) for every cached root: walk ``gva`` while the
    pages have unsync children, updating the entry of each unsync page on the way."""
    update = _zap_and_prefetch if mmu.rules.invlpg_prefetches else _sync_present
    for root in [vcpu.root, *vcpu.prev_roots]:
        if root is None:
            continue
        sp = root
        while True:
            index = spte_index(gva, sp.level)
            if sp.unsync:
                update(mmu, sp, index)
            if not sp.unsync_children:
                break
            spte = mmu.pool.words[sp.id * SPTE_ENT_PER_PAGE + index]
            if not is_shadow_present_pte(spte) or is_last_spte(spte, sp.level):
                break
            sp = mmu.sps.by_id[spte_to_pfn(spte)]


def _sync_present(mmu: KvmMmu, sp: KvmMmuPage, index: int) -> None:
    """v6.4+: kvm_sync_spte() on the entry if it is present; flush if that changed it."""
    if sync_spte(mmu, sp, index):
        mmu.flush_remote_tlbs()


def _zap_and_prefetch(mmu: KvmMmu, sp: KvmMmuPage, index: int) -> None:
    """Up to v6.3: mmu_page_zap_pte() on the entry, a flush if it was present, then FNAME(prefetch_gpte)()
    from the guest's PTE as it is now (FNAME(update_pte) before v5.16)."""
    was_present = is_shadow_present_pte(mmu.pool.words[sp.id * SPTE_ENT_PER_PAGE + index])
    mmu_page_zap_pte(mmu, sp, index)
    if was_present:
        mmu.flush_remote_tlbs()
    prefetch_gpte(mmu, sp, index, mmu.memory.read_pte(sp.gfn, index))
