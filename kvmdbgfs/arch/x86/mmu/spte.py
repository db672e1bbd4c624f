"""Shadow page-table entries (arch/x86/kvm/mmu/spte.h, spte.c): their bits, and where an spte lives.

sptes use the layout KVM uses with shadow paging (kvm_mmu_reset_all_pte_masks): the
x86 PTE bits plus KVM's software bits. The model uses the same layout for the EPT
entries of the TDP modes (a deviation: real EPT entries put R/W/X in bits 0-2). A
leaf's frame field holds the gfn (host pfn == gfn in this model); a non-leaf's frame
field holds the id of the child shadow page (in the kernel, __pa(child->spt)).

An spte's *address*, which is what the rmap and ``parent_ptes`` lists hold, is
``8 * (sp_id * 512 + index + 1)``: dense, positive multiples of 8, as the rmap engine wants.
"""

from __future__ import annotations

from typing import Final

import numpy as np

PT_PRESENT_MASK: Final = 1 << 0
PT_WRITABLE_MASK: Final = 1 << 1
PT_USER_MASK: Final = 1 << 2
PT_ACCESSED_MASK: Final = 1 << 5
PT_DIRTY_MASK: Final = 1 << 6
PT_PAGE_SIZE_MASK: Final = 1 << 7
SPTE_HOST_WRITEABLE: Final = 1 << 9  # DEFAULT_SPTE_HOST_WRITABLE
SPTE_MMU_WRITEABLE: Final = 1 << 10  # DEFAULT_SPTE_MMU_WRITABLE
SPTE_MMU_PRESENT_MASK: Final = 1 << 11
PT64_NX_MASK: Final = 1 << 63
SPTE_BASE_ADDR_MASK: Final = ((1 << 52) - 1) & ~0xFFF
PAGE_SHIFT: Final = 12

# What a translation needs to be usable: losing any of these bits revokes access.
SPTE_PERM_MASK: Final = PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_USER_MASK

# ACC_*_MASK: access bits of a guest walk and of kvm_mmu_page_role.access.
ACC_EXEC_MASK: Final = 1
ACC_WRITE_MASK: Final = PT_WRITABLE_MASK
ACC_USER_MASK: Final = PT_USER_MASK
ACC_ALL: Final = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK

SPTE_ENT_PER_PAGE: Final = 512
PTE_PREFETCH_NUM: Final = 8
PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3
PT64_ROOT_4LEVEL: Final = 4
KVM_MAX_HUGEPAGE_LEVEL: Final = PG_LEVEL_1G

U64: Final = np.uint64


def KVM_PAGES_PER_HPAGE(level: int) -> int:  # noqa: N802 - kernel macro name
    """4K pages in one page of ``level``: 1, 512, 262144."""
    return 1 << ((level - 1) * 9)


def gfn_round_for_level(gfn: int, level: int) -> int:
    return gfn & -KVM_PAGES_PER_HPAGE(level)


def spte_index(addr: int, level: int) -> int:
    """SPTE_INDEX(): the index of ``addr`` (a gva or gpa) in a page-table page of ``level``."""
    return (addr >> (PAGE_SHIFT + (level - 1) * 9)) & (SPTE_ENT_PER_PAGE - 1)


def make_nonleaf_spte(child_id: int) -> int:
    """make_nonleaf_spte(): a link to a child page, every permission granted (the leaf decides)."""
    return (
        SPTE_MMU_PRESENT_MASK
        | (child_id << PAGE_SHIFT)
        | PT_PRESENT_MASK
        | PT_WRITABLE_MASK
        | PT_USER_MASK
        | PT_ACCESSED_MASK
    )


def is_shadow_present_pte(spte: int) -> bool:
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def is_large_pte(spte: int) -> bool:
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_writable_pte(spte: int) -> bool:
    return bool(spte & PT_WRITABLE_MASK)


def is_last_spte(spte: int, level: int) -> bool:
    return level == PG_LEVEL_4K or is_large_pte(spte)


def spte_to_pfn(spte: int) -> int:
    """The frame of a leaf (its gfn here) or the child page id of a link."""
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


def sptes_to_pfn(sptes: np.ndarray) -> np.ndarray:
    """spte_to_pfn() of an array of sptes, as int64."""
    return ((sptes & U64(SPTE_BASE_ADDR_MASK)) >> U64(PAGE_SHIFT)).astype(np.int64)


def sptes_present(sptes: np.ndarray) -> np.ndarray:
    return (sptes & U64(SPTE_MMU_PRESENT_MASK)) != 0


def sptes_large(sptes: np.ndarray) -> np.ndarray:
    return (sptes & U64(PT_PAGE_SIZE_MASK)) != 0


def sptep(sp_id: int, index: int) -> int:
    """The address of entry ``index`` of shadow page ``sp_id``, as lists hold it."""
    return (sp_id * SPTE_ENT_PER_PAGE + index + 1) << 3


def sptep_many(sp_id: int, indices: np.ndarray) -> np.ndarray:
    """sptep() for several entries of one page, as int64."""
    return (np.asarray(indices, np.int64) + (sp_id * SPTE_ENT_PER_PAGE + 1)) << 3


def sptep_to_sp_index(addr: int) -> tuple[int, int]:
    """sptep_to_sp() and spte_index() of one spte address: (page id, index)."""
    k = (addr >> 3) - 1
    return k >> 9, k & (SPTE_ENT_PER_PAGE - 1)


def sptep_to_sp(addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sptep_to_sp() and spte_index() of spte addresses: (page ids, indices)."""
    k = (np.asarray(addrs, np.int64) >> 3) - 1
    return k // SPTE_ENT_PER_PAGE, k % SPTE_ENT_PER_PAGE


def leaf_spte_bits(pte_access: int, level: int, pfn: int, accessed: bool) -> int:
    """The part of make_spte() that does not depend on the MMU's state: present, A, NX, U, PS, the frame."""
    spte = SPTE_MMU_PRESENT_MASK | PT_PRESENT_MASK | SPTE_HOST_WRITEABLE | (pfn << PAGE_SHIFT)
    if accessed:
        spte |= PT_ACCESSED_MASK
    if not pte_access & ACC_EXEC_MASK:
        spte |= PT64_NX_MASK
    if pte_access & ACC_USER_MASK:
        spte |= PT_USER_MASK
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    return spte
