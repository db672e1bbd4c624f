"""The TDP MMU (tdp_mmu.c): EPT tables built without the shadow MMU's machinery.

One root serves every vCPU (same role). Pages are not hashed, not counted against
n_max_mmu_pages, and leaves are not rmapped (kvm_memslots_have_rmaps() is false), so
``mmu_rmaps_stat`` stays empty; the page-size stats still follow every leaf that appears
or goes (handle_changed_spte). There is no prefetch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvmdbgfs.arch.x86.mmu.mmu_memslots import MmuMemslots
from kvmdbgfs.arch.x86.mmu.set_spte import RetPf
from kvmdbgfs.arch.x86.mmu.spt_pool import SptPool
from kvmdbgfs.arch.x86.mmu.spte import (
    ACC_ALL,
    KVM_MAX_HUGEPAGE_LEVEL,
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PG_LEVEL_4K,
    PT64_ROOT_4LEVEL,
    PT_DIRTY_MASK,
    PT_WRITABLE_MASK,
    SPTE_MMU_PRESENT_MASK,
    SPTE_MMU_WRITEABLE,
    U64,
    gfn_round_for_level,
    is_large_pte,
    is_shadow_present_pte,
    leaf_spte_bits,
    make_nonleaf_spte,
    spte_index,
    spte_to_pfn,
    sptes_large,
    sptes_to_pfn,
)

if TYPE_CHECKING:
    from kvmdbgfs.kvm.stats import StatBlock


class TdpMmu:
    def __init__(self, memslots: MmuMemslots, vm_stat: StatBlock) -> None:
        self.memslots = memslots
        self.vm_stat = vm_stat
        self.pool = SptPool()
        self.root: int | None = None

    def get_root(self) -> int:
        """kvm_tdp_mmu_get_vcpu_root_hpa(): the VM's root, allocated on first use."""
        if self.root is None:
            self.root = self.pool.alloc(PT64_ROOT_4LEVEL)
        return self.root

    def page_fault(self, gfn: int) -> RetPf:
        """kvm_tdp_mmu_page_fault() / kvm_tdp_mmu_map(): tables down to the goal level, then the leaf."""
        ms = self.memslots.fault_slot(gfn)
        goal_level = self.memslots.max_mapping_level(ms, gfn, KVM_MAX_HUGEPAGE_LEVEL)
        gpa = gfn << PAGE_SHIFT
        sp_id, level = self.get_root(), PT64_ROOT_4LEVEL
        while level > goal_level:
            index = spte_index(gpa, level)
            spte = self.pool.get(sp_id, index)
            if not is_shadow_present_pte(spte):
                child = self.pool.alloc(level - 1)
                self.pool.set(sp_id, index, make_nonleaf_spte(child))
                sp_id = child
            else:  # a gfn's mapping level never changes here (no dirty logging, no NX splits)
                assert not is_large_pte(spte), "a huge leaf above the goal level"
                sp_id = spte_to_pfn(spte)
            level -= 1
        index = spte_index(gpa, level)
        old = self.pool.get(sp_id, index)
        new = leaf_spte_bits(ACC_ALL, level, gfn_round_for_level(gfn, level), accessed=True)
        new |= PT_WRITABLE_MASK | SPTE_MMU_WRITEABLE | PT_DIRTY_MASK
        if new == old:
            return RetPf.SPURIOUS
        if not is_shadow_present_pte(old):
            self.vm_stat.account_pages(level, 1)
        self.pool.set(sp_id, index, new)
        return RetPf.FIXED

    def zap_leafs(self, start: int, end: int) -> bool:
        """kvm_tdp_mmu_zap_leafs() / kvm_tdp_mmu_unmap_gfn_range(): clear every leaf over [start, end);
        returns whether anything was cleared (the caller flushes)."""
        if self.root is None:
            return False
        return self._zap_table(self.root, PT64_ROOT_4LEVEL, 0, start, end) > 0

    def _zap_table(self, sp_id: int, level: int, base: int, start: int, end: int) -> int:
        span = KVM_PAGES_PER_HPAGE(level)
        first = max(0, (start - base) // span)
        last = min(512, -(-(end - base) // span))
        if first >= last:
            return 0
        indices = np.arange(first, last)
        row = self.pool.spt[sp_id, indices]
        present = (row & U64(SPTE_MMU_PRESENT_MASK)) != 0
        leaf = present & (sptes_large(row) | (level == PG_LEVEL_4K))
        zapped = int(leaf.sum())
        if zapped:
            self.pool.clear_many(np.full(zapped, sp_id), indices[leaf])
            self.vm_stat.account_pages(level, -zapped)
        for index, child in zip(indices[present & ~leaf].tolist(), sptes_to_pfn(row[present & ~leaf]).tolist()):
            zapped += self._zap_table(child, level - 1, base + index * span, start, end)
        return zapped

    def invalidate_all_roots(self) -> bool:
        """kvm_tdp_mmu_invalidate_all_roots() + zapping them: every leaf goes, the next fault builds a new root."""
        zapped = self.zap_leafs(0, 1 << 52)
        self.pool = SptPool()
        self.root = None
        return zapped
