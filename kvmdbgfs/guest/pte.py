"""x86-64 page-table entry format (4-level paging), as the guest writes it and KVM's walker reads it."""

from __future__ import annotations

from typing import Final

PT_PRESENT_MASK: Final = 1 << 0
PT_WRITABLE_MASK: Final = 1 << 1
PT_USER_MASK: Final = 1 << 2
PT_ACCESSED_MASK: Final = 1 << 5
PT_DIRTY_MASK: Final = 1 << 6
PT_PAGE_SIZE_MASK: Final = 1 << 7  # PS: a 2M entry in a PD, a 1G entry in a PDPT
PT_GLOBAL_MASK: Final = 1 << 8
PT64_NX_MASK: Final = 1 << 63
PT64_BASE_ADDR_MASK: Final = ((1 << 52) - 1) & ~0xFFF

PT64_ENT_PER_PAGE: Final = 512
PT64_LEVEL_BITS: Final = 9
PAGE_SHIFT: Final = 12
PT64_ROOT_4LEVEL: Final = 4
PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3


def pte_gfn(pte: int) -> int:
    """The frame an entry points at (a table for a non-leaf entry, the page for a leaf)."""
    return (pte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT


def make_pte(gfn: int, flags: int) -> int:
    """An entry pointing at ``gfn`` with ``flags`` (PT_*_MASK bits)."""
    return (gfn << PAGE_SHIFT) | flags


def is_present(pte: int) -> bool:
    return bool(pte & PT_PRESENT_MASK)


def is_large(pte: int) -> bool:
    return bool(pte & PT_PAGE_SIZE_MASK)


def points_to_table(entry: int) -> bool:
    """A present non-leaf entry (PS clear): it points at the next level's table (pmd_present && !pmd_leaf)."""
    return entry & (PT_PRESENT_MASK | PT_PAGE_SIZE_MASK) == PT_PRESENT_MASK


def pt_index(gva: int, level: int) -> int:
    """PT64_INDEX(): the index of ``gva`` in the table at ``level`` (1 = PT ... 4 = PML4)."""
    return (gva >> (PAGE_SHIFT + (level - 1) * PT64_LEVEL_BITS)) & (PT64_ENT_PER_PAGE - 1)


def level_span(level: int) -> int:
    """Bytes mapped by one entry at ``level``: 4K, 2M, 1G, 512G."""
    return 1 << (PAGE_SHIFT + (level - 1) * PT64_LEVEL_BITS)
