"""Write protection of shadowed guest page tables (account_shadowed, page_track.c's write tracking).

A new shadow page of a guest table write-protects that table's gfn: a last-level page
disallows huge pages over the gfn and clears W in every spte of the gfn's rmaps; an
upper-level page adds a write-track reference, which does the same and also makes
every write fault on the gfn an emulated write (no unsync possible).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmdbgfs.arch.x86.mmu.mmu_memslots import MmuSlot
from kvmdbgfs.arch.x86.mmu.shadow_page import KvmMmuPage
from kvmdbgfs.arch.x86.mmu.spte import PG_LEVEL_4K

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.mmu import KvmMmu


def kvm_gfn_is_write_tracked(ms: MmuSlot, gfn: int) -> bool:
    return gfn in ms.write_track


def account_shadowed(mmu: KvmMmu, sp: KvmMmuPage) -> None:
    """account_shadowed(): write-protect the gfn of the guest table ``sp`` shadows."""
    mmu.indirect_shadow_pages += 1
    ms = mmu.memslots.lookup(sp.gfn)
    if ms is None:
        return
    if sp.level > PG_LEVEL_4K:
        ms.update_write_track(sp.gfn, 1)  # __kvm_write_track_add_gfn
    ms.update_disallow_lpage(sp.gfn, 1)
    if mmu.leaf.write_protect_gfn(ms, sp.gfn):
        mmu.flush_remote_tlbs()


def unaccount_shadowed(mmu: KvmMmu, sp: KvmMmuPage) -> None:
    """unaccount_shadowed(): drop the write-track reference or the huge-page veto."""
    mmu.indirect_shadow_pages -= 1
    ms = mmu.memslots.lookup(sp.gfn)
    if ms is None:
        return
    if sp.level > PG_LEVEL_4K:
        ms.update_write_track(sp.gfn, -1)  # __kvm_write_track_remove_gfn
    ms.update_disallow_lpage(sp.gfn, -1)


def kvm_vcpu_write_protect_gfn(mmu: KvmMmu, gfn: int) -> bool:
    """kvm_vcpu_write_protect_gfn(): write-protect a gfn again (syncing an unsync page); True if a flush is due."""
    ms = mmu.memslots.lookup(gfn)
    return ms is not None and mmu.leaf.write_protect_gfn(ms, gfn)
