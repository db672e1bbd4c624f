"""Hand-built guests for the MMU tests, a snapshot of the MMU's state, and a checker of its invariants.

A ``ToyGuest`` writes 4-level tables straight into a KvmMmu's GuestMemory (as a guest
would before KVM shadows them; tests then store through the MMU where it matters), with
a kernel direct map of 1 GiB pages at PAGE_OFFSET like Linux's, so that guest stores to
page tables reach KVM as they do on a real host.
"""

from __future__ import annotations

import numpy as np

from kvmdbgfs.arch.x86.mmu.memslot import KVM_NR_PAGE_SIZES
from kvmdbgfs.arch.x86.mmu.mmu import LINUX_PAGE_OFFSET, KvmMmu
from kvmdbgfs.arch.x86.mmu.spte import PG_LEVEL_4K, PT_WRITABLE_MASK, sptep, sptes_large, sptes_present, sptes_to_pfn
from kvmdbgfs.guest.pte import (
    PT64_NX_MASK,
    PT_ACCESSED_MASK,
    PT_DIRTY_MASK,
    PT_PAGE_SIZE_MASK,
    PT_PRESENT_MASK,
    PT_USER_MASK,
    make_pte,
    pt_index,
)
from kvmdbgfs.guest.pte import PT_WRITABLE_MASK as GPT_WRITABLE
from kvmdbgfs.arch.x86.kvm_arch import X86KvmArchFactory
from kvmdbgfs.arch.x86.x86 import HostCpu
from kvmdbgfs.kvm.host import KvmHost
from kvmdbgfs.kvm.vm import Kvm
from kvmdbgfs.vmm.layout import q35_memslots
from kvmdbgfs.vmm.qemu import QEMU_TSS_ADDR

A, D = PT_ACCESSED_MASK, PT_DIRTY_MASK
USER_TABLE = PT_PRESENT_MASK | GPT_WRITABLE | PT_USER_MASK | A | D
KERNEL_TABLE = PT_PRESENT_MASK | GPT_WRITABLE | A | D
USER_RW = PT_PRESENT_MASK | GPT_WRITABLE | PT_USER_MASK | A | D | PT64_NX_MASK
USER_RO = PT_PRESENT_MASK | PT_USER_MASK | A | PT64_NX_MASK
KERNEL_1G = PT_PRESENT_MASK | GPT_WRITABLE | A | D | PT_PAGE_SIZE_MASK | PT64_NX_MASK
KERNEL_PDPT = 0x1F00  # the direct map's PDPT page, shared by every process
BASE = 0x400000  # PML4 0, PDPT 0, PD 2: the first PT page maps 4 MiB .. 6 MiB
DATA = 0x3000  # the first data page of a test process
U64 = np.uint64


def new_vm(
    mmu: str = "shadow",
    memory: str = "128M",
    vcpus: int = 1,
    design: str | None = None,
    kernel: str = "latest",
    nx_huge_pages: bool = False,
) -> Kvm:
    """A bare VM, without a VMM (so no vCPU thread runs): what QEMU would set up, done by hand —
    KVM_CREATE_VM, KVM_SET_TSS_ADDR, the q35 memslots, then the vCPUs. ``nx_huge_pages``: the host runs the
    iTLB-multihit mitigation."""
    host = KvmHost(X86KvmArchFactory(HostCpu(nx_huge_pages=nx_huge_pages)), profile=kernel)
    config = host.make_config(memory=memory, vcpus=vcpus, mmu=mmu, seed=0, rmap_design=design)
    kvm = host.kvm_create_vm(config, "1234-10")
    kvm.arch.kvm_arch_vm_ioctl_set_tss_addr(QEMU_TSS_ADDR)
    for slot_id, region in enumerate(q35_memslots(config.memory)):
        kvm.kvm_set_memory_region(slot_id, region.as_id, region.base_gfn, region.npages)
    for vcpu_id in range(vcpus):
        host.kvm_vm_ioctl_create_vcpu(kvm, vcpu_id)
    return kvm


class ToyGuest:
    """Page tables of processes built directly in guest memory; data pages are only gfns."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.mmu: KvmMmu = kvm.arch.mmu
        self.memory = self.mmu.memory
        self.next_table = 0x2000
        self.memory.store_pte(KERNEL_PDPT, 0, make_pte(0, KERNEL_1G))

    def alloc_table(self) -> int:
        gfn = self.next_table
        self.next_table += 1
        return gfn

    def new_pgd(self) -> int:
        """A process's PML4, sharing the kernel's direct map (PML4 entry 273)."""
        pgd = self.alloc_table()
        self.memory.store_pte(pgd, pt_index(LINUX_PAGE_OFFSET, 4), make_pte(KERNEL_PDPT, KERNEL_TABLE))
        return pgd

    def pt_of(self, pgd: int, gva: int) -> int:
        """The PT page mapping ``gva``, allocating missing levels (plain memory writes)."""
        table = pgd
        for level in (4, 3, 2):
            entry = self.memory.read_pte(table, pt_index(gva, level))
            if not entry & PT_PRESENT_MASK:
                child = self.alloc_table()
                self.memory.store_pte(table, pt_index(gva, level), make_pte(child, USER_TABLE))
                entry = make_pte(child, USER_TABLE)
            table = (entry >> 12) & ((1 << 40) - 1)
        return table

    def map(self, pgd: int, gva: int, gfns: list[int] | np.ndarray, flags: int = USER_RW) -> int:
        """Map consecutive 4K pages at ``gva`` (inside one PT page) to ``gfns``; returns the PT gfn."""
        pt = self.pt_of(pgd, gva)
        first = pt_index(gva, 1)
        for i, gfn in enumerate(gfns):
            self.memory.store_pte(pt, first + i, make_pte(int(gfn), flags))
        return pt


def guest_with_process(
    npages: int = 16, flags: int = USER_RW, kernel: str = "latest"
) -> tuple[Kvm, ToyGuest, int, int]:
    """A shadow VM with one process mapping ``npages`` pages at BASE to DATA..., its CR3 loaded on vCPU 0;
    returns (kvm, guest, pgd, PT gfn)."""
    kvm = new_vm(kernel=kernel)
    guest = ToyGuest(kvm)
    pgd = guest.new_pgd()
    pt = guest.map(pgd, BASE, range(DATA, DATA + npages), flags)
    kvm.arch.mmu.load_cr3(0, pgd)
    return kvm, guest, pgd, pt


def faulted_process(kernel: str = "latest") -> tuple[Kvm, ToyGuest, int, int, int]:
    """A process whose first page was touched (pages 1..7 prefetched with it): its four tables are shadowed
    (PML4, PDPT, PD write-tracked); returns (kvm, guest, pgd, PD gfn, PT gfn)."""
    kvm, guest, pgd, pt = guest_with_process(kernel=kernel)
    kvm.arch.mmu.access(0, gvas(BASE, 1), write=False, user=True)
    return kvm, guest, pgd, pgd + 2, pt


def gvas(base: int, npages: int) -> np.ndarray:
    return np.arange(npages, dtype=np.uint64) * U64(4096) + U64(base)


def rmap_entries(kvm: Kvm) -> dict[tuple[int, int, int], list[int]]:
    """Every non-empty rmap list: (slot base, level, index) -> sptes in list order (the walk is not charged
    to the design's cost counters)."""
    pte_list = kvm.arch.rmaps.pte_list
    costs = pte_list.costs.as_dict()
    lists = {}
    for slot in kvm.arch.memslots:
        for level, heads in enumerate(slot.rmap or ()):
            nonempty = np.flatnonzero(heads)
            for index in nonempty.tolist():
                lists[(slot.base_gfn, level + 1, index)] = list(pte_list.iterate(heads, index))
    for name, value in costs.items():
        setattr(pte_list.costs, name, value)
    return lists


def _stat_values(stat: object) -> dict[str, object]:
    return {name: value.tolist() if isinstance(value, np.ndarray) else value for name, value in vars(stat).items()}


def mmu_state(kvm: Kvm) -> dict:
    """Everything a batch and the same operations one by one must agree on."""
    mmu = kvm.arch.mmu
    pool = mmu.tdp.pool if mmu.tdp is not None else mmu.pool
    return {
        "rmaps": rmap_entries(kvm),
        "costs": kvm.arch.rmaps.pte_list.costs.as_dict(),
        "live_descs": kvm.arch.rmaps.pte_list.live_descs,
        "spt": {sp_id: pool.spt[sp_id].tobytes() for sp_id in range(1, pool.next_id)},
        "pages": sorted(
            (sp.id, sp.gfn, sp.role, sp.unsync, sp.unsync_child_bitmap, sp.root_count) for sp in mmu.sps.by_id.values()
        ),
        "parents": {sp.id: sorted(mmu.parents.of(sp)) for sp in mmu.sps.by_id.values()},
        "vm_stat": _stat_values(kvm.stat),
        "vcpu_stat": [_stat_values(vcpu.stat) for vcpu in kvm.vcpus],
        "memory": {gfn: mmu.memory.table(gfn).tobytes() for gfn in sorted(mmu.memory._tables)},
    }


def check_invariants(kvm: Kvm) -> None:
    """The rmaps hold exactly the present leaf sptes; counts, parents, unsync bits and write protection agree."""
    mmu = kvm.arch.mmu
    if mmu.tdp is not None:
        return
    pool = mmu.pool
    leaves: dict[tuple[int, int], set[int]] = {}
    per_level = [0] * KVM_NR_PAGE_SIZES
    links: dict[int, set[int]] = {sp_id: set() for sp_id in mmu.sps.by_id}
    for sp in mmu.sps.by_id.values():
        row = pool.spt[sp.id]
        present = np.flatnonzero(sptes_present(row))
        if sp.level == PG_LEVEL_4K:
            leaf = np.ones(len(present), bool)
        else:
            leaf = sptes_large(row[present])
        for index, gfn in zip(present[leaf].tolist(), sptes_to_pfn(row[present[leaf]]).tolist()):
            leaves.setdefault((gfn, sp.level), set()).add(sptep(sp.id, index))
            per_level[sp.level - 1] += 1
        for index, child in zip(present[~leaf].tolist(), sptes_to_pfn(row[present[~leaf]]).tolist()):
            links[child].add(sptep(sp.id, index))
    rmapped: dict[tuple[int, int], set[int]] = {}
    for (base, level, index), sptes in rmap_entries(kvm).items():
        assert any(ms.base_gfn == base for ms in mmu.memslots.slots)
        assert len(set(sptes)) == len(sptes)
        for spte in sptes:
            k = (spte >> 3) - 1
            gfn = int(sptes_to_pfn(pool.spt[k // 512, k % 512 : k % 512 + 1])[0])
            assert (gfn >> (9 * (level - 1))) - (base >> (9 * (level - 1))) == index
            rmapped.setdefault((gfn, level), set()).add(spte)
    assert rmapped == leaves
    assert [kvm.stat.pages_4k, kvm.stat.pages_2m, kvm.stat.pages_1g] == per_level
    for sp in mmu.sps.by_id.values():
        assert set(mmu.parents.of(sp)) == links[sp.id], sp
        unmarked = mmu.parents.unmarked.get(sp.id, set())
        assert unmarked <= links[sp.id], sp  # only current links are kept as possibly unmarked ...
        for parent_spte in links[sp.id] - unmarked:  # ... and every other link has its bit set
            k = (parent_spte >> 3) - 1
            assert mmu.sps.by_id[k // 512].unsync_child_bitmap >> (k % 512) & 1, (sp, parent_spte)
    assert kvm.stat.mmu_unsync == sum(sp.unsync for sp in mmu.sps.by_id.values())
    assert mmu.n_used_mmu_pages == sum(1 for sp in mmu.sps.by_id.values() if not sp.invalid or sp.root_count)
    for sp in mmu.sps.by_id.values():
        if sp.unsync:
            for parent_spte in mmu.parents.of(sp):
                k = (parent_spte >> 3) - 1
                assert mmu.sps.by_id[k // 512].unsync_child_bitmap >> (k % 512) & 1
    for gfn, sps in mmu.sps.by_gfn.items():
        if all(sp.unsync for sp in sps):
            continue
        for spte in set().union(
            *(leaves.get((gfn >> (9 * (lv - 1)) << (9 * (lv - 1)), lv), set()) for lv in (1, 2, 3))
        ):
            k = (spte >> 3) - 1
            assert not pool.get(k // 512, k % 512) & PT_WRITABLE_MASK, f"shadowed gfn {gfn:#x} mapped writable"


def leaf_spte(kvm: Kvm, gva: int, vcpu_id: int = 0) -> int:
    """The leaf spte the vCPU's current root translates ``gva`` with (0 if none)."""
    mmu = kvm.arch.mmu
    root = mmu.vcpu(vcpu_id).root
    return 0 if root is None else mmu.pool.leaf_spte(root.id, gva)


def rmap_count(kvm: Kvm, gfn: int, level: int = 1) -> int:
    """pte_list_count of (gfn, level) in address space 0."""
    slot = next(s for s in kvm.arch.memslots if s.as_id == 0 and s.contains(gfn))
    return kvm.arch.rmaps.rmap_count(slot, gfn, level)


def vcpu_stats(kvm: Kvm, *names: str) -> dict[str, int]:
    return {name: kvm.vcpu_stat_sum(name) for name in names}


def vm_stats(kvm: Kvm, *names: str) -> dict[str, int]:
    return {name: kvm.stat.read_u64(name) for name in names}
