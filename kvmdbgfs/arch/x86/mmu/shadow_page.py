"""Shadow pages (struct kvm_mmu_page), their role, the mmu_page_hash and their parent_ptes lists.

A shadow page is one Python object (the kernel has one struct per page too); its
512 sptes are a row of the SptPool. ``ShadowPages`` holds ``kvm->arch.mmu_page_hash``
(4096 buckets, newest page first in a bucket), ``active_mmu_pages`` (allocation
order, oldest first), every page not yet freed by id (what sptep_to_sp() and
spte_to_child_sp() find from an address) and the valid pages that shadow guest
tables by gfn (what ``for_each_gfn_valid_sp_with_gptes`` finds by walking a bucket).
"""

from __future__ import annotations

from typing import Final

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.arch.x86.mmu.pte_list import make_pte_list
from kvmdbgfs.arch.x86.mmu.spt_pool import SptPool
from kvmdbgfs.zero_extend import zero_extended

KVM_MMU_HASH_SHIFT: Final = 12
KVM_NUM_MMU_PAGES: Final = 1 << KVM_MMU_HASH_SHIFT
GOLDEN_RATIO_64: Final = 0x61C8864680B583EB
U64_MASK: Final = (1 << 64) - 1

# union kvm_mmu_page_role: level:4, has_4_byte_gpte:1, quadrant:2, direct:1, access:3,
# invalid:1, efer_nx:1, cr0_wp:1, ... (bit positions as in the kernel's role.word).
ROLE_DIRECT_SHIFT: Final = 7
ROLE_ACCESS_SHIFT: Final = 8
ROLE_EFER_NX: Final = 1 << 12
ROLE_CR0_WP: Final = 1 << 13


def mmu_page_role(level: int, direct: bool, access: int) -> int:
    """role.word of a page of a 64-bit guest with EFER.NX and CR0.WP set (the only guest modelled)."""
    return level | (int(direct) << ROLE_DIRECT_SHIFT) | (access << ROLE_ACCESS_SHIFT) | ROLE_EFER_NX | ROLE_CR0_WP


def kvm_page_table_hashfn(gfn: int) -> int:
    """hash_64(gfn, KVM_MMU_HASH_SHIFT)."""
    return ((gfn * GOLDEN_RATIO_64) & U64_MASK) >> (64 - KVM_MMU_HASH_SHIFT)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class KvmMmuPage:
    """struct kvm_mmu_page. ``unsync_child_bitmap`` is a 512-bit int."""

    __slots__ = (
        "access",
        "direct",
        "gfn",
        "id",
        "invalid",
        "level",
        "nx_huge_page_disallowed",
        "role",
        "root_count",
        "unsync",
        "unsync_child_bitmap",
        "unsync_children",
        "write_flooding_count",
    )

    def __init__(self, sp_id: int, gfn: int, role: int) -> None:
        self.id = sp_id
        self.gfn = gfn
        self.role = role
        self.level = role & 0xF
        self.direct = bool(role >> ROLE_DIRECT_SHIFT & 1)
        self.access = role >> ROLE_ACCESS_SHIFT & 7
        self.unsync = False
        self.unsync_children = 0
        self.unsync_child_bitmap = 0
        self.write_flooding_count = 0
        self.root_count = 0
        self.invalid = False
        self.nx_huge_page_disallowed = False

    def gfn_at(self, index: int) -> int:
        """kvm_mmu_page_get_gfn() of a direct page: the gfn entry ``index`` maps."""
        return self.gfn + (index << ((self.level - 1) * 9))

    def __repr__(self) -> str:
        kind = "direct" if self.direct else "indirect"
        return f"<sp {self.id} gfn {self.gfn:#x} level {self.level} {kind} access {self.access}>"


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class ShadowPages:
    """The VM's shadow pages: mmu_page_hash, active_mmu_pages, by id, valid pages with guest PTEs by gfn."""

    def __init__(self) -> None:
        self.buckets: list[list[KvmMmuPage]] = [[] for _ in range(KVM_NUM_MMU_PAGES)]
        self.active: dict[int, KvmMmuPage] = {}
        self.by_id: dict[int, KvmMmuPage] = {}
        self.by_gfn: dict[int, list[KvmMmuPage]] = {}

    def bucket(self, gfn: int) -> list[KvmMmuPage]:
        """The bucket of ``gfn``; the newest page is last (walk it reversed)."""
        return self.buckets[kvm_page_table_hashfn(gfn)]

    def add(self, sp: KvmMmuPage) -> None:
        """hlist_add_head into the bucket, list_add to active_mmu_pages."""
        self.bucket(sp.gfn).append(sp)
        self.active[sp.id] = sp
        self.by_id[sp.id] = sp
        if not sp.direct:
            self.by_gfn.setdefault(sp.gfn, []).insert(0, sp)

    def invalidate(self, sp: KvmMmuPage) -> None:
        """role.invalid = 1: lookups no longer see the page, and it leaves active_mmu_pages."""
        sp.invalid = True
        del self.active[sp.id]
        self.bucket(sp.gfn).remove(sp)
        if not sp.direct:
            same = self.by_gfn[sp.gfn]
            same.remove(sp)
            if not same:
                del self.by_gfn[sp.gfn]

    def free(self, sp: KvmMmuPage) -> None:
        """kvm_mmu_free_shadow_page(): the page is gone (it was invalidated and unlinked first)."""
        del self.by_id[sp.id]

    def valid_with_gptes(self, gfn: int) -> list[KvmMmuPage]:
        """for_each_gfn_valid_sp_with_gptes: the valid indirect pages of ``gfn``, newest first (a copy)."""
        return list(self.by_gfn.get(gfn, ()))

    def has_gptes(self, gfn: int) -> bool:
        return gfn in self.by_gfn


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class ParentPtes:
    """Each page's ``parent_ptes``: the non-leaf sptes pointing at it, on the VM's pte_list design.

    Besides the lists, each page keeps the parent sptes that may lack its bit in their page's
    ``unsync_child_bitmap`` (a superset: every link starts there, a cleared bit puts its link back).
    mark_unsync() of a parent whose bit is set does nothing, so kvm_mmu_mark_parents_unsync() need
    only visit these: a shared kernel table has one parent per root, hundreds, nearly all marked."""

    def __init__(self, design: str, pool: SptPool) -> None:
        self.pte_list = make_pte_list(design)
        self.pool = pool
        self.heads = np.zeros(pool.capacity, np.int64)
        self.unmarked: dict[int, set[int]] = {}

    def _heads(self) -> np.ndarray:
        if len(self.heads) < self.pool.capacity:
            self.heads = zero_extended(self.heads, self.pool.capacity)
        return self.heads

    def add(self, sp: KvmMmuPage, parent_sptep: int) -> None:
        """mmu_page_add_parent_pte."""
        self.pte_list.add(self._heads(), sp.id, parent_sptep)
        self.unmarked.setdefault(sp.id, set()).add(parent_sptep)

    def remove(self, sp: KvmMmuPage, parent_sptep: int) -> None:
        """mmu_page_remove_parent_pte."""
        self.pte_list.remove(self.heads, sp.id, parent_sptep)
        self.unmarked[sp.id].discard(parent_sptep)

    def remove_batch(self, child_ids: np.ndarray, parent_sptes: np.ndarray) -> None:
        """mmu_page_remove_parent_pte for several (child, parent spte) pairs, in order."""
        self.pte_list.remove_batch(self.heads, child_ids, parent_sptes)
        for child_id, parent_sptep in zip(child_ids.tolist(), parent_sptes.tolist()):
            self.unmarked[child_id].discard(parent_sptep)

    def of(self, sp: KvmMmuPage) -> list[int]:
        """for_each_rmap_spte over ``sp->parent_ptes`` (an empty or single-entry head needs no list walk)."""
        head = int(self._heads()[sp.id])
        if not head & 1:
            return [head] if head else []
        return self.pte_list.gather(self.heads, np.array([sp.id]))[1].tolist()

    def unmark(self, sp: KvmMmuPage, parent_sptep: int) -> None:
        """The bit of ``sp`` was cleared in the page holding ``parent_sptep`` (nothing to keep once ``sp``
        has been unlinked from all its parents, as a zapped page is before its bit goes)."""
        unmarked = self.unmarked.get(sp.id)
        if unmarked is not None:
            unmarked.add(parent_sptep)

    def take_unmarked(self, sp: KvmMmuPage) -> list[int]:
        """The parent sptes of ``sp`` that may lack its bit, ascending; the caller sets their bits."""
        unmarked = self.unmarked.get(sp.id)
        if not unmarked:
            return []
        sptes = sorted(unmarked)
        unmarked.clear()
        return sptes

    def zap(self, sp: KvmMmuPage) -> np.ndarray:
        """Empty ``sp->parent_ptes``; returns the parent sptes it held."""
        self.unmarked.pop(sp.id, None)
        return self.pte_list.zap(self._heads(), sp.id)
