"""A VM's x86 MMU (the MMU part of struct kvm_arch) and the GuestHardware a guest OS runs on under KVM.

The guest model drives it through the GuestHardware protocol (kvmdbgfs/guest/hardware.py):
every guest access, page-table store, CR3 load, INVLPG and TLB flush becomes what KVM
does for it in the VM's MMU mode:

- ``shadow`` (EPT off): accesses through sptes that are missing or lack a permission take a
  shadow page fault (FNAME(page_fault)); CR3 loads, flushes and INVLPG exit and sync
  unsync pages; page-table stores reach KVM as write faults on the guest's direct map
  (``direct_map_base``, Linux's PAGE_OFFSET by default): a store to a write-protected
  table unsyncs it or is emulated (kvm_mmu_track_write).
- ``tdp-legacy`` (EPT over the shadow MMU): the guest's own tables are walked by the CPU;
  only EPT violations reach KVM (direct_page_fault). CR3 loads, flushes and INVLPG do not exit.
- ``tdp`` (the TDP MMU): as ``tdp-legacy``, with tdp.py's MMU and no rmaps.

Every exit and every host operation takes ``kvm->mmu_lock``, so debugfs readers always see a consistent
state. What the hardware does without exiting (an access whose translations are all present and
permitted, a store through a writable translation, a CR3 load under EPT) takes no lock and runs no
vcpu_enter(), as on a real CPU; it is taken only while the vCPU has no request pending, so requests are
handled at the same entry as if every operation entered. ``access`` over many addresses handles them
in order, exactly as one call per address would (tests hold it to that).
"""

from __future__ import annotations

from threading import RLock
from typing import Final, TYPE_CHECKING

import numpy as np
from mypy_extensions import mypyc_attr

from kvmdbgfs.arch.x86.mmu.leaf_rmap import LeafRmaps
from kvmdbgfs.sched import cond_resched
from kvmdbgfs.arch.x86.mmu.mmu_memslots import (
    KVM_MIN_ALLOC_MMU_PAGES,
    MmuMemslots,
    kvm_mmu_calculate_default_mmu_pages,
)
from kvmdbgfs.arch.x86.mmu.nx_huge_pages import PossibleNxHugePages
from kvmdbgfs.arch.x86.mmu.page_fault import kvm_mmu_do_page_fault
from kvmdbgfs.arch.x86.mmu.paging_tmpl import translate_gvas, walk_addr_generic
from kvmdbgfs.arch.x86.mmu.pte_write import kvm_mmu_track_write
from kvmdbgfs.arch.x86.mmu.roots import kvm_set_cr3, vcpu_enter, vcpu_enter_pending
from kvmdbgfs.arch.x86.mmu.set_spte import RET_PF_EMULATE
from kvmdbgfs.arch.x86.mmu.shadow_page import ParentPtes, ShadowPages
from kvmdbgfs.arch.x86.mmu.spt_pool import SptPool
from kvmdbgfs.arch.x86.mmu.spte import (
    PAGE_SHIFT,
    PG_LEVEL_2M,
    PT64_NX_MASK,
    PT_USER_MASK,
    PT_WRITABLE_MASK,
    SPTE_MMU_PRESENT_MASK,
    U64,
)
from kvmdbgfs.arch.x86.mmu.invlpg import kvm_mmu_invalidate_addr
from kvmdbgfs.arch.x86.mmu.tdp import TdpMmu
from kvmdbgfs.arch.x86.mmu.vcpu_mmu import KVM_REQ_TLB_FLUSH, MmuVcpu
from kvmdbgfs.arch.x86.mmu.zap import (
    kvm_mmu_change_mmu_pages,
    kvm_mmu_unprotect_page,
    kvm_mmu_zap_all,
    kvm_mmu_zap_all_fast,
)
from kvmdbgfs.guest.memory import GuestMemory

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.kvm_arch import KvmArch
    from kvmdbgfs.kvm.vm import Kvm

LINUX_PAGE_OFFSET: Final = 0xFFFF888000000000  # x86-64 Linux's direct map, without KASLR
# Up to this many addresses, checking each in Python beats numpy. Measured on the 6 GiB idle boot's batches of
# 16-64 addresses (in one or two 2M regions): about 50 against 180 us under EPT, 25 against 50 us under shadow.
SCALAR_BATCH: Final = 64


def access_masks(write: bool, user: bool, fetch: bool) -> tuple[int, int]:
    """(mask, value): a leaf spte translates the access without a fault when ``spte & mask == value``: present,
    writable for a write, user for a user access, and not NX for an instruction fetch."""
    needed = SPTE_MMU_PRESENT_MASK | (PT_WRITABLE_MASK if write else 0) | (PT_USER_MASK if user else 0)
    return needed | (PT64_NX_MASK if fetch else 0), needed


ACCESS_MASKS: Final = {(w, u, f): access_masks(w, u, f) for w in (False, True) for u in (False, True) for f in (False, True)}
_STORE_MASK, _STORE_NEEDED = ACCESS_MASKS[True, False, False]  # a kernel store's (store_ptes)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class MmuLock:
    """``with mmu.locked:`` holds kvm->mmu_lock, yielding to waiting readers before taking it (cond_resched).
    ``with mmu.locked.for_exit:`` holds it for a vCPU's exit, whose GuestHardware call has yielded already
    (before it found that the hardware exits)."""

    def __init__(self, lock: RLock) -> None:
        self.lock = lock
        self.depth = 0
        self.for_exit = _ExitLock(self)

    def __enter__(self) -> None:
        if not self.depth:
            cond_resched()  # never while holding the lock: a reader may be waiting for it
        self.for_exit.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.for_exit.__exit__()


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class _ExitLock:
    """MmuLock without its cond_resched() (see MmuLock.for_exit)."""

    def __init__(self, held: MmuLock) -> None:
        self.held = held

    def __enter__(self) -> None:
        self.held.lock.acquire()
        self.held.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.held.depth -= 1
        self.held.lock.release()


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class KvmMmu:
    """One VM's MMU. ``host_max_level`` is the largest page the host backs guest RAM with
    (2: transparent huge pages, the default; 3: 1 GiB hugetlbfs; 1: small pages only); ``nx_huge_pages`` is
    whether the host runs the iTLB-multihit mitigation (is_nx_huge_page_enabled)."""

    def __init__(
        self,
        kvm: Kvm,
        arch: KvmArch,
        host_max_level: int = PG_LEVEL_2M,
        direct_map_base: int = LINUX_PAGE_OFFSET,
        nx_huge_pages: bool = False,
    ) -> None:
        self.kvm = kvm
        self.arch = arch
        self.stat = kvm.stat
        self.rules = kvm.profile.mmu_rules  # the shadow-MMU rules of the VM's kernel
        self.shadow_paging = arch.mmu_mode == "shadow"
        self.direct_map_base = direct_map_base
        self.memory = GuestMemory()
        self.memslots = MmuMemslots(host_max_level)
        self.pool = SptPool()
        self.sps = ShadowPages()
        self.parents = ParentPtes(arch.rmaps.pte_list.name, self.pool)
        self.leaf = LeafRmaps(arch.rmaps, self.pool, self.memslots, kvm.stat, self.flush_remote_tlbs)
        self.nx_huge_pages = nx_huge_pages
        self.possible_nx_huge_pages = PossibleNxHugePages(kvm.stat)
        self.tdp: TdpMmu | None = None
        if arch.mmu_mode == "tdp":
            nx_pages = self.possible_nx_huge_pages
            self.tdp = TdpMmu(self.memslots, kvm.stat, self.rules, self.flush_remote_tlbs, nx_huge_pages, nx_pages)
        self.n_used_mmu_pages = 0
        self.n_max_mmu_pages = 0
        self.n_requested_mmu_pages = 0
        self.indirect_shadow_pages = 0
        self.vcpus: dict[int, MmuVcpu] = {}
        self.current: MmuVcpu | None = None  # the vCPU whose exit is being handled
        self.locked = MmuLock(kvm.mmu_lock)

    # -- plumbing used by the MMU's parts ------------------------------------------------

    def vcpu(self, vcpu_id: int) -> MmuVcpu:
        vcpu = self.vcpus.get(vcpu_id)
        if vcpu is None:
            vcpu = self.vcpus[vcpu_id] = MmuVcpu(vcpu_id, self.kvm.vcpus[vcpu_id].stat)
        return vcpu

    def make_all_cpus_request(self, request: int) -> bool:
        """kvm_make_all_cpus_request(): every vCPU gets the request; true when one of the others was in guest
        mode and had to be kicked with an IPI (the requester itself is handling an exit, outside guest mode)."""
        kicked = False
        for kvm_vcpu in self.kvm.vcpus:
            vcpu = self.vcpu(kvm_vcpu.vcpu_id)
            vcpu.requests |= request
            kicked |= vcpu.in_guest_mode and vcpu is not self.current
        return kicked

    def flush_remote_tlbs(self) -> None:
        """kvm_flush_remote_tlbs(): every call is a request; only one that had to IPI a vCPU running guest code
        counts as a remote flush (no range flush on this host)."""
        self.stat.remote_tlb_flush_requests += 1
        if self.make_all_cpus_request(KVM_REQ_TLB_FLUSH):
            self.stat.remote_tlb_flush += 1

    def _host(self) -> None:
        """The host acts (a QEMU ioctl, an mmu notifier), not a vCPU's exit: no vCPU is the requester that
        kvm_make_all_cpus_request() leaves out, every one in guest mode needs its IPI."""
        self.current = None

    def _enter(self, vcpu_id: int) -> MmuVcpu:
        vcpu = self.current = self.vcpu(vcpu_id)
        vcpu_enter(self, vcpu)
        return vcpu

    # -- translations --------------------------------------------------------------------

    def _pool(self) -> SptPool:
        return self.tdp.pool if self.tdp is not None else self.pool

    def _root_id(self, vcpu: MmuVcpu) -> int | None:
        if self.tdp is not None:
            return self.tdp.root
        return vcpu.root.id if vcpu.root is not None else None

    def _addrs(self, vcpu: MmuVcpu, gvas: np.ndarray, write: bool, user: bool) -> np.ndarray:
        """What KVM's tables translate: the gvas themselves (shadow), else the gpas the CPU's walk of the
        guest tables gives (addresses the guest takes a #PF on never reach KVM)."""
        if self.shadow_paging:
            return gvas
        assert vcpu.cr3 is not None
        gfns = translate_gvas(self.memory, vcpu.cr3, gvas, write, user)
        return gfns[gfns >= 0].astype(np.uint64) << U64(PAGE_SHIFT)

    def _leaf_spte(self, vcpu: MmuVcpu, addr: int) -> int:
        root = self._root_id(vcpu)
        return 0 if root is None else self._pool().leaf_spte(root, addr)

    def _usable(self, vcpu: MmuVcpu, addrs: np.ndarray, write: bool, user: bool, fetch: bool) -> np.ndarray:
        """Which addresses the hardware translates without exiting (present, and W / U / X as needed)."""
        root = self._root_id(vcpu)
        if root is None:
            return np.zeros(len(addrs), bool)
        mask, needed = ACCESS_MASKS[write, user, fetch]
        return (self._pool().leaf_sptes(root, addrs) & U64(mask)) == U64(needed)

    @staticmethod
    def _usable_spte(spte: int, write: bool, user: bool, fetch: bool = False) -> bool:
        mask, needed = ACCESS_MASKS[write, user, fetch]
        return spte & mask == needed

    # -- GuestHardware -------------------------------------------------------------------------

    def _quiet(self, vcpu_id: int) -> MmuVcpu | None:
        """The vCPU, if vcpu_enter() has nothing to do for it (what it does without exiting needs no entry);
        else None."""
        vcpu = self.vcpus.get(vcpu_id)
        if vcpu is None or vcpu.requests or (vcpu.root is None and vcpu_enter_pending(self, vcpu)):
            return None
        return vcpu

    def _translating(self, vcpu_id: int) -> MmuVcpu | None:
        """The vCPU, if the hardware can walk for it without an exit: nothing pending for vcpu_enter()
        (_quiet), a root and a CR3 loaded; else None."""
        vcpu = self._quiet(vcpu_id)
        if vcpu is None or vcpu.cr3 is None or self._root_id(vcpu) is None:
            return None
        return vcpu

    def _enter_access(self, vcpu_id: int) -> MmuVcpu:
        """_enter() for access() (under the lock): the vCPU must have loaded CR3."""
        vcpu = self._enter(vcpu_id)
        if vcpu.cr3 is None:
            raise ValueError(f"vCPU {vcpu_id} accesses memory before loading CR3")
        return vcpu

    def _first_miss(
        self, vcpu: MmuVcpu, gvas: list[int], start: int, write: bool, user: bool, masks: tuple[int, int]
    ) -> tuple[int, int, int]:
        """The first of ``gvas[start:]`` the hardware cannot translate with ``masks`` (ACCESS_MASKS of the
        access): (its index, addr, leaf spte), or (len(gvas), 0, 0) if it translates them all. Addresses the
        guest's own tables do not map (EPT: the guest takes its #PF without an exit) are passed over: _addrs()
        of one address at a time, whose walk gives -1 << PAGE_SHIFT for them."""
        root = self._root_id(vcpu)
        leaf_spte = self._pool().leaf_spte
        mask, needed = masks
        shadow_paging, memory, cr3 = self.shadow_paging, self.memory, vcpu.cr3
        assert cr3 is not None  # both callers' vCPUs loaded CR3 (_translating, _enter_access)
        for n in range(start, len(gvas)):
            addr = gvas[n] if shadow_paging else walk_addr_generic(memory, cr3, gvas[n], write, user) << PAGE_SHIFT
            if addr >= 0:
                spte = 0 if root is None else leaf_spte(root, addr)
                if spte & mask != needed:
                    return n, addr, spte
        return len(gvas), 0, 0

    def access(self, vcpu_id: int, gvas: np.ndarray, write: bool, user: bool, fetch: bool = False) -> None:
        """The vCPU touches each address in order (``fetch``: executes from it); each one the hardware cannot
        translate exits to a fault. The ones before the first such address take no exit (nor the lock); after
        each fault the walk goes on from the next address (the fault may have loaded another root)."""
        cond_resched()
        gvas = np.asarray(gvas, np.uint64).ravel()
        if len(gvas) > SCALAR_BATCH:
            self._access_many(vcpu_id, gvas, write, user, fetch)
            return
        addrs = gvas.tolist()
        last = len(addrs) - 1
        masks = ACCESS_MASKS[write, user, fetch]
        quiet = self._translating(vcpu_id)
        if quiet is not None:
            start, addr, spte = self._first_miss(quiet, addrs, 0, write, user, masks)
            if start > last:
                return
        with self.locked.for_exit:
            vcpu = self._enter_access(vcpu_id)
            if quiet is None:
                start, addr, spte = self._first_miss(vcpu, addrs, 0, write, user, masks)
            while start <= last:
                self._access_fault(vcpu, addr, write, user, spte, fetch)
                if start == last:  # the fault was on the last address: nothing left to check
                    return
                start, addr, spte = self._first_miss(vcpu, addrs, start + 1, write, user, masks)

    def _access_many(self, vcpu_id: int, gvas: np.ndarray, write: bool, user: bool, fetch: bool) -> None:
        """access() of more than SCALAR_BATCH addresses: the hardware's check of all of them with numpy, then,
        if one misses, _access_batch() under the lock."""
        walker = self._translating(vcpu_id)
        if walker is not None and self._usable(walker, self._addrs(walker, gvas, write, user), write, user, fetch).all():
            return
        with self.locked.for_exit:
            vcpu = self._enter_access(vcpu_id)
            self._access_batch(vcpu, self._addrs(vcpu, gvas, write, user), write, user, fetch)

    def _access_batch(self, vcpu: MmuVcpu, addrs: np.ndarray, write: bool, user: bool, fetch: bool) -> None:
        """access() over many addresses at once, as one by one: translations are checked for all of them,
        then again only after a fault took translations away (a zap, a write protection, a new root),
        and individually for the misses an earlier fault may have filled (the prefetch)."""
        pos = 0
        while pos < len(addrs):
            rest = addrs[pos:]
            misses = np.flatnonzero(~self._usable(vcpu, rest, write, user, fetch)).tolist()
            seq, root = self._pool().revoke_seq, self._root_id(vcpu)
            pos = len(addrs)
            for n, miss in enumerate(misses):
                addr = int(rest[miss])
                spte = self._leaf_spte(vcpu, addr)
                if n and self._usable_spte(spte, write, user, fetch):
                    continue
                self._access_fault(vcpu, addr, write, user, spte, fetch)
                if self._pool().revoke_seq != seq or self._root_id(vcpu) != root:
                    pos = len(addrs) - len(rest) + miss + 1
                    break

    def _access_fault(self, vcpu: MmuVcpu, addr: int, write: bool, user: bool, spte: int, fetch: bool) -> None:
        """A #PF or EPT-violation exit on ``addr``, whose leaf spte is ``spte``. A write KVM must emulate that
        is not a page-table write (a data access) is not emulated: retry_instruction() unprotects the gfn
        and lets the guest retry once."""
        for attempt in range(2):
            if attempt:
                spte = self._leaf_spte(vcpu, addr)
            present = bool(spte & SPTE_MMU_PRESENT_MASK)
            vcpu.count_exit()
            ret = kvm_mmu_do_page_fault(self, vcpu, addr, write, user, present, fetch)
            retry = False
            if ret == RET_PF_EMULATE:
                vcpu.stat.insn_emulation += 1
                if not attempt:
                    assert vcpu.cr3 is not None
                    kvm_mmu_unprotect_page(self, walk_addr_generic(self.memory, vcpu.cr3, addr, write, user))
                    retry = True
            vcpu_enter(self, vcpu)
            if not retry:
                return

    def store_pte(self, vcpu_id: int, gfn: int, index: int, value: int) -> None:
        """One guest store into a page-table page (see store_ptes)."""
        self.store_ptes(vcpu_id, gfn, np.array([index]), np.array([value], np.uint64))

    def store_ptes(self, vcpu_id: int, gfn: int, indices: np.ndarray, values: np.ndarray) -> None:
        """Guest stores into page-table page ``gfn``, through the kernel's direct map.

        A store the hardware lets through changes nothing in the MMU, so once one does, the rest
        of the batch goes to memory at once; until then each store is a write fault on the gfn
        (which may unsync its shadow pages) and, if KVM must emulate it, a tracked write."""
        cond_resched()
        indices = np.asarray(indices, np.int64)
        values = np.asarray(values, np.uint64)
        addr = self.direct_map_base + (gfn << PAGE_SHIFT) if self.shadow_paging else gfn << PAGE_SHIFT
        quiet = self._quiet(vcpu_id)
        if quiet is not None:
            spte = self._store_spte(quiet, addr)  # the hardware's walk for the first store
            if spte is None or spte & _STORE_MASK == _STORE_NEEDED:
                self.memory.table(gfn)[indices] = values
                return
        with self.locked.for_exit:
            vcpu = self._enter(vcpu_id)
            for pos in range(len(indices)):
                if pos or quiet is None:
                    spte = self._store_spte(vcpu, addr)
                if spte is None or spte & _STORE_MASK == _STORE_NEEDED:
                    self.memory.table(gfn)[indices[pos:]] = values[pos:]
                    return
                self._faulting_store(vcpu, addr, spte, gfn, int(indices[pos]), int(values[pos]))

    def _store_spte(self, vcpu: MmuVcpu, addr: int) -> int | None:
        """The leaf spte a store through ``addr`` meets; None when paging is off under shadow paging (nothing
        intercepts a store)."""
        if vcpu.cr3 is None and self.shadow_paging:
            return None
        return self._leaf_spte(vcpu, addr)

    def _faulting_store(self, vcpu: MmuVcpu, addr: int, spte: int, gfn: int, index: int, value: int) -> None:
        """A store through a translation (leaf ``spte``) that is missing or read-only: a write fault; the store
        then completes (the guest retries it), and if KVM had to emulate it, the write is tracked."""
        present = bool(spte & SPTE_MMU_PRESENT_MASK)
        vcpu.count_exit()
        ret = kvm_mmu_do_page_fault(self, vcpu, addr, True, False, present)
        self.memory.store_pte(gfn, index, value)
        if ret == RET_PF_EMULATE:
            vcpu.stat.insn_emulation += 1
            kvm_mmu_track_write(self, gfn, index, value)
        vcpu_enter(self, vcpu)

    def load_cr3(self, vcpu_id: int, root_gfn: int, noflush: bool = False) -> None:
        """MOV to CR3: exits under shadow paging only; with the no-flush bit (PCID) nothing is synced, and the
        exit takes kvm->mmu_lock only if the switch misses the cached roots (to free one and load a new one)."""
        cond_resched()
        quiet = self._quiet(vcpu_id)
        if quiet is not None and not self.shadow_paging:
            quiet.cr3 = root_gfn
            return
        if quiet is not None and noflush:
            self.current = quiet
            quiet.count_exit()
            kvm_set_cr3(self, quiet, root_gfn, skip_tlb_flush=True)
            if vcpu_enter_pending(self, quiet):
                with self.locked.for_exit:
                    vcpu_enter(self, quiet)
            return
        with self.locked.for_exit:
            vcpu = self._enter(vcpu_id)
            if not self.shadow_paging:
                vcpu.cr3 = root_gfn
                return
            vcpu.count_exit()
            kvm_set_cr3(self, vcpu, root_gfn, skip_tlb_flush=noflush)
            vcpu_enter(self, vcpu)

    def flush_tlb(self, vcpu_id: int) -> None:
        """A CR3 reload: under shadow paging, an exit that syncs the unsync pages of the current root."""
        cr3 = self.vcpu(vcpu_id).cr3
        if self.shadow_paging and cr3 is not None:
            self.load_cr3(vcpu_id, cr3)

    def invlpg(self, vcpu_id: int, gva: int) -> None:
        """INVLPG: exits under shadow paging only (kvm_mmu_invlpg)."""
        if not self.shadow_paging:
            return
        with self.locked:
            vcpu = self._enter(vcpu_id)
            vcpu.count_exit()
            kvm_mmu_invalidate_addr(self, vcpu, gva)
            vcpu.stat.invlpg += 1
            vcpu_enter(self, vcpu)

    # -- the host side ---------------------------------------------------------------------------

    def kvm_arch_commit_memory_region(self) -> None:
        """After a memslot was created or deleted: the default shadow-page limit follows the memory size of
        both address spaces."""
        with self.locked:
            self._host()
            self.memslots.update(self.arch.memslots)
            if not self.n_requested_mmu_pages:
                kvm_mmu_change_mmu_pages(self, kvm_mmu_calculate_default_mmu_pages(self.arch.memslots))

    def set_nr_mmu_pages(self, nr_mmu_pages: int) -> None:
        """KVM_SET_NR_MMU_PAGES (at least KVM_MIN_ALLOC_MMU_PAGES)."""
        if nr_mmu_pages < KVM_MIN_ALLOC_MMU_PAGES:
            raise ValueError(f"KVM_SET_NR_MMU_PAGES: at least {KVM_MIN_ALLOC_MMU_PAGES} pages (-EINVAL)")
        with self.locked:
            self._host()
            self.n_requested_mmu_pages = nr_mmu_pages
            kvm_mmu_change_mmu_pages(self, nr_mmu_pages)

    def kvm_arch_flush_shadow_memslot(self) -> None:
        """A memslot is being deleted or moved: kvm_mmu_zap_all_fast() (every page, not just the slot's)."""
        with self.locked:
            self._host()
            if self.tdp is None:
                kvm_mmu_zap_all_fast(self)
            elif self.tdp.invalidate_all_roots():
                self.flush_remote_tlbs()

    def kvm_unmap_gfn_range(self, start: int, end: int) -> None:
        """The mmu-notifier invalidation of guest memory [start, end) (e.g. the host reclaimed or
        migrated it): every leaf spte of those gfns is zapped, at every level."""
        with self.locked:
            self._host()
            if self.tdp is not None:
                flush = self.tdp.zap_leafs(start, end)
            else:
                flush = self.leaf.zap_gfn_range(self.arch.memslots, start, end) > 0
            if flush:
                self.flush_remote_tlbs()

    def kvm_mmu_zap_all(self) -> None:
        """kvm_arch_flush_shadow_all() at VM teardown."""
        with self.locked:
            self._host()
            if self.tdp is None:
                kvm_mmu_zap_all(self)
            else:
                self.tdp.invalidate_all_roots()
