"""Unsync shadow pages: letting the guest write a last-level table directly until its next TLB flush.

mmu_try_to_unsync_pages() decides, when a writable spte is about to map a shadowed gfn,
whether the shadow pages of that gfn can go unsync (all last-level, none write-tracked)
or the spte must stay read-only. Unsync pages are found again through the
``unsync_child_bitmap`` of their parents (mmu_unsync_walk), 16 entries at a time
(struct kvm_mmu_pages), and every unsync leaf comes with the path it was reached by
(struct mmu_page_path), so that syncing or zapping it can clear the bits up that path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, TYPE_CHECKING

from kvmdbgfs.arch.x86.mmu.mmu_memslots import MmuSlot
from kvmdbgfs.arch.x86.mmu.page_track import kvm_gfn_is_write_tracked
from kvmdbgfs.arch.x86.mmu.shadow_page import KvmMmuPage
from kvmdbgfs.arch.x86.mmu.spte import (
    PG_LEVEL_4K,
    PT64_ROOT_4LEVEL,
    SPTE_ENT_PER_PAGE,
    is_large_pte,
    is_shadow_present_pte,
    spte_to_pfn,
    sptep,
)

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu

KVM_PAGE_ARRAY_NR: Final = 16
INVALID_INDEX: Final = -1


def kvm_unsync_page(mmu: KvmMmu, sp: KvmMmuPage) -> None:
    mmu.stat.mmu_unsync += 1
    sp.unsync = True
    kvm_mmu_mark_parents_unsync(mmu, sp)


def kvm_unlink_unsync_page(mmu: KvmMmu, sp: KvmMmuPage) -> None:
    sp.unsync = False
    mmu.stat.mmu_unsync -= 1


def kvm_mmu_mark_parents_unsync(mmu: KvmMmu, sp: KvmMmuPage) -> None:
    """mark_unsync() of every spte linking to ``sp``; a page getting its first unsync child marks its own
    parents in turn (the kernel recurses; the bits and counts end up the same in any order). Parent sptes
    whose bit is set are skipped without a visit, as mark_unsync() would return at once for them."""
    pending = [sp]
    while pending:
        pending.extend(_set_unsync_child_bits(mmu, mmu.parents.take_unmarked(pending.pop())))


def mark_unsync(mmu: KvmMmu, parent_sptep: int) -> None:
    """mark_unsync(): the page holding ``parent_sptep`` has an unsync child there."""
    for parent in _set_unsync_child_bits(mmu, [parent_sptep]):
        kvm_mmu_mark_parents_unsync(mmu, parent)


def _set_unsync_child_bits(mmu: KvmMmu, parent_sptes: list[int]) -> list[KvmMmuPage]:
    """Set the bit of each spte in the page holding it, in order; returns the pages that this gave their
    first unsync child. A shared kernel table has hundreds of parents (one per stale root), so the loop
    is kept tight: one dict lookup and a few int operations an spte."""
    by_id = mmu.sps.by_id
    first_unsync = []
    for parent_sptep in parent_sptes:
        k = (parent_sptep >> 3) - 1
        parent = by_id[k >> 9]
        index = k & 511
        if parent.unsync_child_bitmap >> index & 1:  # no 512-bit mask built for a bit already set
            continue
        parent.unsync_child_bitmap |= 1 << index
        parent.unsync_children += 1
        if parent.unsync_children == 1:
            first_unsync.append(parent)
    return first_unsync


def clear_unsync_child_bit(sp: KvmMmuPage, index: int) -> None:
    sp.unsync_children -= 1
    sp.unsync_child_bitmap &= ~(1 << index)


def mmu_try_to_unsync_pages(mmu: KvmMmu, ms: MmuSlot, gfn: int, synchronizing: bool, prefetch: bool) -> bool:
    """mmu_try_to_unsync_pages(): mark the gfn's shadow pages unsync; True when the spte must stay read-only.
    A prefetched spte unsyncs them only on kernels before v5.16 (``prefetch_unsyncs``)."""
    if kvm_gfn_is_write_tracked(ms, gfn):
        return True
    for sp in mmu.sps.valid_with_gptes(gfn):
        if synchronizing:
            return True
        if sp.unsync:
            continue
        if prefetch and not mmu.rules.prefetch_unsyncs:
            return True
        kvm_unsync_page(mmu, sp)
    return False


class MmuPages:
    """struct kvm_mmu_pages: up to KVM_PAGE_ARRAY_NR (page, index in its parent) entries."""

    def __init__(self) -> None:
        self.page: list[tuple[KvmMmuPage, int]] = []

    def add(self, sp: KvmMmuPage, index: int) -> bool:
        """mmu_pages_add(): True once the array is full."""
        if sp.unsync and any(page is sp for page, _ in self.page):
            return False
        self.page.append((sp, index))
        return len(self.page) == KVM_PAGE_ARRAY_NR


class MmuPagePath:
    """struct mmu_page_path: the parent and the index at each level above an unsync leaf."""

    def __init__(self) -> None:
        self.parent: list[KvmMmuPage | None] = [None] * PT64_ROOT_4LEVEL
        self.idx = [INVALID_INDEX] * PT64_ROOT_4LEVEL

    def copy(self) -> MmuPagePath:
        path = MmuPagePath()
        path.parent, path.idx = list(self.parent), list(self.idx)
        return path


def _unsync_walk(mmu: KvmMmu, sp: KvmMmuPage, pvec: MmuPages) -> int:
    """__mmu_unsync_walk(): unsync leaves below ``sp`` (-1 once ``pvec`` is full), stale bits cleared."""
    nr_unsync_leaf = 0
    bitmap = sp.unsync_child_bitmap
    while bitmap:
        low = bitmap & -bitmap
        bitmap ^= low
        index = low.bit_length() - 1
        ent = mmu.pool.words[sp.id * SPTE_ENT_PER_PAGE + index]
        if not is_shadow_present_pte(ent) or is_large_pte(ent):
            clear_unsync_child_bit(sp, index)
            continue
        child = mmu.sps.by_id[spte_to_pfn(ent)]
        if child.unsync_children:
            if pvec.add(child, index):
                return -1
            ret = _unsync_walk(mmu, child, pvec)
            if not ret:
                clear_unsync_child_bit(sp, index)
                mmu.parents.unmark(child, sptep(sp.id, index))
                continue
            if ret < 0:
                return ret
            nr_unsync_leaf += ret
        elif child.unsync:
            nr_unsync_leaf += 1
            if pvec.add(child, index):
                return -1
        else:
            clear_unsync_child_bit(sp, index)
            mmu.parents.unmark(child, sptep(sp.id, index))
    return nr_unsync_leaf


def mmu_unsync_walk(mmu: KvmMmu, sp: KvmMmuPage, pvec: MmuPages) -> int:
    """mmu_unsync_walk(): refill ``pvec`` from ``sp``; non-zero while there is something to do."""
    pvec.page.clear()
    if not sp.unsync_children:
        return 0
    pvec.add(sp, INVALID_INDEX)
    return _unsync_walk(mmu, sp, pvec)


def mmu_unsync_batches(mmu: KvmMmu, parent: KvmMmuPage) -> Iterator[list[tuple[KvmMmuPage, MmuPagePath]]]:
    """``while (mmu_unsync_walk(parent, &pages)) for_each_sp(pages, sp, parents, i)``: each batch of unsync
    leaves below ``parent`` with the path it was reached by (mmu_pages_first/next). The caller handles a
    batch before the next walk, which then no longer finds what it made sync or zapped."""
    pvec = MmuPages()
    while mmu_unsync_walk(mmu, parent, pvec):
        batch = []
        path = MmuPagePath()
        top = pvec.page[0][0]
        path.parent[top.level - 2] = top
        path.parent[top.level - 1] = None
        for sp, index in pvec.page[1:]:
            path.idx[sp.level - 1] = index
            if sp.level == PG_LEVEL_4K:
                batch.append((sp, path.copy()))
            else:
                path.parent[sp.level - 2] = sp
        yield batch


def mmu_pages_clear_parents(mmu: KvmMmu, leaf: KvmMmuPage, parents: MmuPagePath) -> None:
    """Clear the leaf's bit in its parent, and further up while a parent has no unsync child left."""
    level, child = 0, leaf
    while True:
        sp = parents.parent[level]
        if sp is None:
            return
        clear_unsync_child_bit(sp, parents.idx[level])
        mmu.parents.unmark(child, sptep(sp.id, parents.idx[level]))
        level, child = level + 1, sp
        if sp.unsync_children:
            return
