"""Roots: loading one for a vCPU (kvm_mmu_load), switching CR3 through the previous-roots cache
(__kvm_mmu_new_pgd), freeing them, and the request handling of vcpu_enter_guest() that drives both.
"""

from __future__ import annotations

from typing import Final, TYPE_CHECKING

from kvmdbgfs.arch.x86.mmu.page_hash import kvm_mmu_get_shadow_page
from kvmdbgfs.arch.x86.mmu.shadow_page import KvmMmuPage, mmu_page_role
from kvmdbgfs.arch.x86.mmu.spte import ACC_ALL, PT64_ROOT_4LEVEL
from kvmdbgfs.arch.x86.mmu.sync import kvm_mmu_sync_roots
from kvmdbgfs.arch.x86.mmu.vcpu_mmu import (
    KVM_MMU_NUM_PREV_ROOTS,
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
    KVM_REQ_MMU_SYNC,
    KVM_REQ_TLB_FLUSH,
    KVM_REQ_TLB_FLUSH_CURRENT,
    MmuVcpu,
)
from kvmdbgfs.arch.x86.mmu.zap import kvm_mmu_commit_zap_page, make_mmu_pages_available, mmu_free_root_page

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu

SHADOW_ROOT_ROLE: Final = mmu_page_role(PT64_ROOT_4LEVEL, direct=False, access=ACC_ALL)
DIRECT_ROOT_ROLE: Final = mmu_page_role(PT64_ROOT_4LEVEL, direct=True, access=ACC_ALL)


def kvm_mmu_load(mmu: KvmMmu, vcpu: MmuVcpu) -> None:
    """kvm_mmu_load(): mmu_alloc_shadow_roots() (the guest's PML4) or mmu_alloc_direct_roots() (gfn 0)."""
    make_mmu_pages_available(mmu)
    if mmu.shadow_paging:
        assert vcpu.cr3 is not None
        root = kvm_mmu_get_shadow_page(mmu, vcpu.cr3, SHADOW_ROOT_ROLE)
    else:
        root = kvm_mmu_get_shadow_page(mmu, 0, DIRECT_ROOT_ROLE)
    root.root_count += 1
    vcpu.root = root
    kvm_mmu_sync_roots(mmu, vcpu)


def is_root_usable(root: KvmMmuPage | None, pgd: int) -> bool:
    return root is not None and not root.invalid and root.gfn == pgd


def kvm_mmu_free_roots(mmu: KvmMmu, vcpu: MmuVcpu, current: bool, previous: list[int]) -> None:
    """kvm_mmu_free_roots(): drop the vCPU's reference on the current root and/or some previous roots, under
    kvm->mmu_lock (which it takes itself: a CR3 switch that misses the cached roots gets here without it)."""
    invalid_list: list[KvmMmuPage] = []
    with mmu.locked.for_exit:
        for i in previous:
            root = vcpu.prev_roots[i]
            if root is not None:
                mmu_free_root_page(mmu, root, invalid_list)
                vcpu.prev_roots[i] = None
        if current and vcpu.root is not None:
            mmu_free_root_page(mmu, vcpu.root, invalid_list)
            vcpu.root = None
        kvm_mmu_commit_zap_page(mmu, invalid_list)


def fast_pgd_switch(vcpu: MmuVcpu, pgd: int) -> bool:
    """fast_pgd_switch() via cached_root_find_and_keep_current(), on the vCPU's own roots (no mmu_lock): true
    when the current root or a cached one is for ``pgd`` (a cached one becomes current, the old current the
    most recent previous root); false when none is, the rotation having made the least recent root current."""
    if is_root_usable(vcpu.root, pgd):
        return True
    for i in range(KVM_MMU_NUM_PREV_ROOTS):
        vcpu.root, vcpu.prev_roots[i] = vcpu.prev_roots[i], vcpu.root
        if is_root_usable(vcpu.root, pgd):
            return True
    return False


def kvm_mmu_new_pgd(mmu: KvmMmu, vcpu: MmuVcpu, pgd: int) -> None:
    """__kvm_mmu_new_pgd(): switch to a cached root for ``pgd``, else free the least recent one (a new root is
    loaded on the next entry)."""
    if not fast_pgd_switch(vcpu, pgd):
        kvm_mmu_free_roots(mmu, vcpu, current=True, previous=[])
        return
    assert vcpu.root is not None
    vcpu.root.write_flooding_count = 0


def kvm_mmu_free_obsolete_roots(mmu: KvmMmu, vcpu: MmuVcpu) -> None:
    """kvm_mmu_free_obsolete_roots(): let go of every cached root that was zapped."""
    obsolete = [i for i, root in enumerate(vcpu.prev_roots) if root is not None and root.invalid]
    current = vcpu.root is not None and vcpu.root.invalid
    if current or obsolete:
        kvm_mmu_free_roots(mmu, vcpu, current, obsolete)


def vcpu_enter(mmu: KvmMmu, vcpu: MmuVcpu) -> None:
    """The request handling and kvm_mmu_reload() of vcpu_enter_guest(), repeated until nothing is pending.

    A remote flush (KVM_REQ_TLB_FLUSH) also covers a pending flush of the current context; each
    flush done counts in tlb_flush."""
    while vcpu_enter_pending(mmu, vcpu):
        if vcpu.check_request(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS):
            kvm_mmu_free_obsolete_roots(mmu, vcpu)
        if vcpu.check_request(KVM_REQ_MMU_SYNC):
            kvm_mmu_sync_roots(mmu, vcpu)
        if vcpu.check_request(KVM_REQ_TLB_FLUSH):
            vcpu.stat.tlb_flush += 1
            vcpu.check_request(KVM_REQ_TLB_FLUSH_CURRENT)
        if vcpu.check_request(KVM_REQ_TLB_FLUSH_CURRENT):
            vcpu.stat.tlb_flush += 1
        if _needs_root(mmu, vcpu):
            kvm_mmu_load(mmu, vcpu)


def vcpu_enter_pending(mmu: KvmMmu, vcpu: MmuVcpu) -> bool:
    """Whether vcpu_enter() has anything to do: a request, or a root to load."""
    return bool(vcpu.requests) or (vcpu.root is None and _needs_root(mmu, vcpu))


def _needs_root(mmu: KvmMmu, vcpu: MmuVcpu) -> bool:
    """kvm_mmu_reload()'s test: no root yet (the TDP MMU keeps its own; shadow paging waits for CR3)."""
    return vcpu.root is None and mmu.tdp is None and (vcpu.cr3 is not None or not mmu.shadow_paging)


def kvm_set_cr3(mmu: KvmMmu, vcpu: MmuVcpu, pgd: int, skip_tlb_flush: bool = False) -> None:
    """kvm_set_cr3() under shadow paging: a new pgd switches roots; a load without the PCID no-flush bit
    flushes the TLB and syncs."""
    if pgd != vcpu.cr3:
        vcpu.cr3 = pgd
        kvm_mmu_new_pgd(mmu, vcpu, pgd)
    if not skip_tlb_flush:
        vcpu.requests |= KVM_REQ_MMU_SYNC | KVM_REQ_TLB_FLUSH_CURRENT
