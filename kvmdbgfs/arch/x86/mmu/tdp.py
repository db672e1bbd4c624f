"""The TDP MMU (tdp_mmu.c): EPT tables built without the shadow MMU's machinery.

One root serves every vCPU (same role). Pages are not hashed, not counted against
n_max_mmu_pages, and leaves are not rmapped (kvm_memslots_have_rmaps() is false), so
``mmu_rmaps_stat`` stays empty; the page-size stats still follow every leaf that appears
or goes (handle_changed_spte). There is no prefetch. With the NX huge page mitigation an instruction fetch
from a huge page splits it (v6.2+; before, the huge spte was zapped) under a page accounted as an NX huge page.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TYPE_CHECKING

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.arch.x86.mmu.mmu_memslots import MmuMemslots
from kvmdbgfs.arch.x86.mmu.nx_huge_pages import (
    PossibleNxHugePages,
    disallowed_hugepage_adjust,
    huge_page_access,
    kvm_mmu_hugepage_adjust,
)
from kvmdbgfs.arch.x86.mmu.set_spte import RetPf
from kvmdbgfs.arch.x86.mmu.spt_pool import SptPool
from kvmdbgfs.arch.x86.mmu.spte import (
    ACC_ALL,
    KVM_MAX_HUGEPAGE_LEVEL,
    KVM_PAGES_PER_HPAGE,
    PAGE_SHIFT,
    PG_LEVEL_4K,
    PT64_NX_MASK,
    PT64_ROOT_4LEVEL,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    SPTE_BASE_ADDR_MASK,
    SPTE_ENT_PER_PAGE,
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

U64_MAX: Final = (1 << 64) - 1

if TYPE_CHECKING:
    from kvmdbgfs.kvm.profiles import ShadowMmuRules
    from kvmdbgfs.kvm.stats import StatBlock


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class TdpMmu:
    def __init__(
        self,
        memslots: MmuMemslots,
        vm_stat: StatBlock,
        rules: ShadowMmuRules,
        flush_remote_tlbs: Callable[[], None],
        nx_huge_pages: bool = False,
        possible_nx_huge_pages: PossibleNxHugePages | None = None,
    ) -> None:
        self.memslots = memslots
        self.vm_stat = vm_stat
        self.rules = rules
        self.flush_remote_tlbs = flush_remote_tlbs
        self.nx_huge_pages = nx_huge_pages
        self.possible_nx_huge_pages = possible_nx_huge_pages or PossibleNxHugePages(vm_stat)
        self.pool = SptPool()
        self.root: int | None = None
        # The pages marked nx_huge_page_disallowed, each with its link: (parent page, index, level of the
        # parent, the first gfn it maps).
        self.nx_disallowed: dict[int, tuple[int, int, int, int]] = {}

    def get_root(self) -> int:
        """kvm_tdp_mmu_get_vcpu_root_hpa(): the VM's root, allocated on first use."""
        if self.root is None:
            self.root = self.pool.alloc(PT64_ROOT_4LEVEL)
        return self.root

    def page_fault(self, gfn: int, fetch: bool = False) -> RetPf:
        """kvm_tdp_mmu_page_fault() / kvm_tdp_mmu_map(): tables down to the goal level, then the leaf. An
        instruction fetch under the NX huge page mitigation goes down to 4K, splitting a huge page on its way."""
        ms = self.memslots.fault_slot(gfn)
        fault = kvm_mmu_hugepage_adjust(self.memslots, ms, gfn, KVM_MAX_HUGEPAGE_LEVEL, fetch, self.nx_huge_pages)
        gpa = gfn << PAGE_SHIFT
        sp_id, level = self.get_root(), PT64_ROOT_4LEVEL
        while True:
            index = spte_index(gpa, level)
            spte = self.pool.words[sp_id * SPTE_ENT_PER_PAGE + index]
            if fault.nx_huge_page_workaround_enabled:
                marked = not self.rules.nx_marks_every_disallowed_page or spte_to_pfn(spte) in self.nx_disallowed
                disallowed_hugepage_adjust(fault, spte, level, marked)
            if level == fault.goal_level:
                break
            if is_shadow_present_pte(spte) and not is_large_pte(spte):
                sp_id, level = spte_to_pfn(spte), level - 1
                continue
            child = self.pool.alloc(level - 1)
            possible = fault.huge_page_disallowed and fault.req_level >= level
            if possible or (fault.huge_page_disallowed and self.rules.nx_marks_every_disallowed_page):
                self.nx_disallowed[child] = (sp_id, index, level, gfn_round_for_level(gfn, level))
            if is_shadow_present_pte(spte):
                self._replace_huge_page(sp_id, index, level, spte, child)
            self.pool.set(sp_id, index, make_nonleaf_spte(child))
            if possible:
                self.possible_nx_huge_pages.track(child, child)
            sp_id, level = child, level - 1
        old = self.pool.words[sp_id * SPTE_ENT_PER_PAGE + index]
        access = huge_page_access(ACC_ALL, level, self.nx_huge_pages)
        new = leaf_spte_bits(access, level, gfn_round_for_level(gfn, level), accessed=True)
        new |= PT_WRITABLE_MASK | SPTE_MMU_WRITEABLE | PT_DIRTY_MASK
        if new == old:
            return RetPf.SPURIOUS
        if not is_shadow_present_pte(old):
            self.vm_stat.account_pages(level, 1)
        self.pool.set(sp_id, index, new)
        return RetPf.FIXED

    def _replace_huge_page(self, sp_id: int, index: int, level: int, huge_spte: int, child: int) -> None:
        """A huge leaf gives way to page ``child``: tdp_mmu_split_huge_page() fills it with the small sptes that
        map the same memory (executable again at 4K, make_huge_page_split_spte), or (before v6.2) the leaf is
        zapped and ``child`` stays empty. The caller links ``child``."""
        self.vm_stat.account_pages(level, -1)
        if not self.rules.tdp_mmu_splits_huge_page_on_fault:
            self.pool.set(sp_id, index, 0)
            self.flush_remote_tlbs()  # tdp_mmu_zap_spte_atomic()
            return
        span = KVM_PAGES_PER_HPAGE(level - 1)
        child_spte = huge_spte
        if level - 1 == PG_LEVEL_4K:
            child_spte &= ~PT_PAGE_SIZE_MASK
            if self.nx_huge_pages:
                child_spte &= ~PT64_NX_MASK
        pfns = np.arange(512, dtype=np.uint64) * U64(span) + U64(spte_to_pfn(huge_spte))
        self.pool.spt[child, :] = U64(child_spte & ~SPTE_BASE_ADDR_MASK & U64_MAX) | (pfns << U64(PAGE_SHIFT))
        self.vm_stat.account_pages(level - 1, 512)

    def zap_sp(self, sp_id: int) -> bool:
        """kvm_tdp_mmu_zap_sp(): unlink page ``sp_id`` (an accounted NX huge page) from its parent and free it
        with everything below it; returns whether a flush is due."""
        parent, index, level, base = self.nx_disallowed[sp_id]
        self.pool.set(parent, index, 0)
        self._free_table(sp_id, level - 1, base)
        return True

    def _free_table(self, sp_id: int, level: int, base: int) -> None:
        """handle_removed_pt(): the leaves of a page that is no longer linked go, its tables with them."""
        self._zap_table(sp_id, level, base, base, base + 512 * KVM_PAGES_PER_HPAGE(level))
        row = self.pool.spt[sp_id]
        links = np.flatnonzero((row & U64(SPTE_MMU_PRESENT_MASK)) != 0)
        span = KVM_PAGES_PER_HPAGE(level)
        for index, child in zip(links.tolist(), sptes_to_pfn(row[links]).tolist()):
            self._free_table(child, level - 1, base + index * span)
        if self.nx_disallowed.pop(sp_id, None) is not None:
            self.possible_nx_huge_pages.untrack(sp_id)
        self.pool.free(sp_id)

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
        for sp_id in self.nx_disallowed:
            self.possible_nx_huge_pages.untrack(sp_id)
        self.nx_disallowed.clear()
        self.pool = SptPool()
        self.root = None
        return zapped
