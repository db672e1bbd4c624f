"""The iTLB-multihit mitigation (kvm.nx_huge_pages, mmu.c): executable huge pages are split, and recovered.

On a CPU with X86_BUG_ITLB_MULTIHIT, KVM never lets the guest execute from a huge page: make_spte()
maps every huge page non-executable, and an instruction fetch from one faults with PFERR_FETCH_MASK;
kvm_mmu_hugepage_adjust() then keeps the mapping at 4K (``huge_page_disallowed``), and the shadow page
that takes the huge page's place is accounted as an NX huge page: ``nx_lpage_splits`` counts the pages
on ``possible_nx_huge_pages``. The VM's recovery thread (nx_recovery.py) zaps some of them each period,
so that data accesses can map those ranges huge again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mypy_extensions import mypyc_attr

from kvmdbgfs.arch.x86.mmu.mmu_memslots import MmuMemslots, MmuSlot
from kvmdbgfs.arch.x86.mmu.spte import ACC_EXEC_MASK, PG_LEVEL_4K, is_large_pte, is_shadow_present_pte

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu
    from kvmdbgfs.arch.x86.mmu.shadow_page import KvmMmuPage
    from kvmdbgfs.kvm.stats import StatBlock


@dataclass
class HugePageFault:
    """The level fields of struct kvm_page_fault: what the fault may map, and what it will."""

    req_level: int  # the largest level the memslot and the host allow
    goal_level: int  # the level the leaf is made at
    huge_page_disallowed: bool  # an instruction fetch with the mitigation on
    nx_huge_page_workaround_enabled: bool


def huge_page_access(pte_access: int, level: int, nx_huge_pages: bool) -> int:
    """make_spte()'s access for a leaf of ``level``: under the mitigation a huge page is never executable."""
    return pte_access & ~ACC_EXEC_MASK if level > PG_LEVEL_4K and nx_huge_pages else pte_access


def kvm_mmu_hugepage_adjust(
    memslots: MmuMemslots, ms: MmuSlot, gfn: int, max_level: int, fetch: bool, nx_huge_pages: bool
) -> HugePageFault:
    """kvm_mmu_hugepage_adjust(): the goal level of the leaf (no dirty logging in this model); an instruction
    fetch under the mitigation stays at 4K."""
    fault = HugePageFault(PG_LEVEL_4K, PG_LEVEL_4K, fetch and nx_huge_pages, nx_huge_pages)
    if max_level == PG_LEVEL_4K:
        return fault
    fault.req_level = memslots.max_mapping_level(ms, gfn, max_level)
    if fault.req_level > PG_LEVEL_4K and not fault.huge_page_disallowed:
        fault.goal_level = fault.req_level
    return fault


def disallowed_hugepage_adjust(fault: HugePageFault, spte: int, level: int, child_disallowed: bool) -> None:
    """disallowed_hugepage_adjust(): a page table already stands where the fault would put a huge leaf (it
    maps small pages that may be executable), so go a level further down. ``child_disallowed`` is whether
    that table is marked nx_huge_page_disallowed, which v6.2+ also requires."""
    if (
        level > PG_LEVEL_4K
        and level == fault.goal_level
        and is_shadow_present_pte(spte)
        and not is_large_pte(spte)
        and child_disallowed
    ):
        fault.goal_level -= 1


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class PossibleNxHugePages:
    """kvm->arch.possible_nx_huge_pages, oldest first, with the nx_lpage_splits stat that counts them. Pages are
    keyed by id; the value is what the MMU needs to zap one (a KvmMmuPage, or the TDP MMU's page id)."""

    def __init__(self, stat: StatBlock) -> None:
        self.stat = stat
        self.pages: dict[int, object] = {}

    def track(self, sp_id: int, page: object) -> None:
        """track_possible_nx_huge_page(): a page already on the list (linked at a second place) stays once."""
        if sp_id in self.pages:
            return
        self.pages[sp_id] = page
        self.stat.nx_lpage_splits += 1

    def untrack(self, sp_id: int) -> None:
        """untrack_possible_nx_huge_page()."""
        if self.pages.pop(sp_id, None) is not None:
            self.stat.nx_lpage_splits -= 1

    def oldest(self) -> tuple[int, object] | None:
        return next(iter(self.pages.items()), None)


def account_nx_huge_page(mmu: KvmMmu, sp: KvmMmuPage, nx_huge_page_possible: bool) -> None:
    """account_nx_huge_page() (v6.2+; account_huge_nx_page() before, which marked only the counted pages)."""
    if not nx_huge_page_possible and not mmu.rules.nx_marks_every_disallowed_page:
        return
    sp.nx_huge_page_disallowed = True
    if nx_huge_page_possible:
        mmu.possible_nx_huge_pages.track(sp.id, sp)


def unaccount_nx_huge_page(mmu: KvmMmu, sp: KvmMmuPage) -> None:
    """unaccount_nx_huge_page(): the page is being zapped."""
    sp.nx_huge_page_disallowed = False
    mmu.possible_nx_huge_pages.untrack(sp.id)
