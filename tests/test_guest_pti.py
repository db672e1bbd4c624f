"""Page-table isolation in the guest (pti): a user twin per process pgd, the CR3 switches of kernel entry
and exit, and what it does to the shadow MMU's rmaps."""

from __future__ import annotations

import numpy as np
import pytest
from mmu_testlib import check_invariants, new_vm, rmap_count
from test_guest_helpers import BARE, TEST_VA, MiB, hw, user_pte

from kvmdbgfs.guest.kernel import GuestKernel, KernelConfig
from kvmdbgfs.guest.process import Task
from kvmdbgfs.guest.pte import PT64_NX_MASK, PT_PRESENT_MASK, PT_USER_MASK, pte_gfn
from kvmdbgfs.guest.recording import RecordingHardware

PAGE = 4096


def pti_kernel(hardware=None, pti: bool = True) -> GuestKernel:
    return GuestKernel(
        256 * MiB, hardware or RecordingHardware(), np.random.default_rng(1), 2, config=KernelConfig(pti=pti)
    )


def process(kernel: GuestKernel) -> Task:
    task = kernel.kthread("test")
    kernel.exec(task, BARE)
    task.mmap(2 * MiB, addr=TEST_VA)
    task.touch(TEST_VA, TEST_VA + 4 * PAGE, write=True)
    return task


def test_the_user_pgd_mirrors_the_user_half_and_maps_only_the_entry_text_of_the_kernel() -> None:
    kernel = pti_kernel()
    task = process(kernel)
    assert kernel.ctx.pti is not None and task.mm is not None
    pgd = task.mm.pgd
    user_pgd = kernel.ctx.pti.user_pgds[pgd]
    kernel_half, user_half = kernel.ctx.memory.table(pgd), kernel.ctx.memory.table(user_pgd)
    present_user = [i for i in range(256) if kernel_half[i] & PT_PRESENT_MASK]
    assert present_user and all(kernel_half[i] & PT_USER_MASK for i in present_user)
    # __pti_set_user_pgtbl: the same tables below, NX only in the kernel's copy of the user half.
    assert all(int(kernel_half[i]) == int(user_half[i]) | PT64_NX_MASK for i in present_user)
    assert not any(user_half[i] & PT64_NX_MASK for i in present_user)
    assert [i for i in range(256, 512) if user_half[i]] == [511]  # the entry text (pti_clone_entry_text)
    assert user_half[511] != kernel_half[511]  # through tables of its own
    assert user_pte(kernel, task, TEST_VA)  # the kernel pgd's walk still reaches the user's pages


def test_user_code_runs_on_the_user_pgd_and_the_kernel_on_the_kernel_pgd() -> None:
    kernel = pti_kernel()
    task = process(kernel)
    assert kernel.ctx.pti is not None and task.mm is not None
    pgd, user_pgd = task.mm.pgd, kernel.ctx.pti.user_pgds[task.mm.pgd]
    start = len(hw(kernel).events)
    task.touch(TEST_VA + 8 * PAGE, TEST_VA + 9 * PAGE, write=True)  # a #PF: into the kernel and back
    task.mprotect(TEST_VA, 2 * MiB, 1)  # PROT_READ: PTEs rewritten and the TLB flushed
    task.touch(TEST_VA, TEST_VA + PAGE, write=False)
    events = hw(kernel).events[start:]
    loads = [(e.gfn, bool(e.value)) for e in events if e.op == "cr3"]
    # The first touch already runs on the user pgd; the fault enters the kernel (no flush either way), the
    # return carries the no-flush bit; after mprotect's flush the user ASID is flushed on the way out.
    assert loads == [(pgd, True), (user_pgd, True), (pgd, True), (user_pgd, False)]
    stores = [i for i, e in enumerate(events) if e.op == "store"]
    cr3 = [i for i, e in enumerate(events) if e.op == "cr3"]
    assert all(any(c < s for c in cr3) for s in stores)
    user_accesses = [e for e in events if e.op == "access" and e.user]
    assert user_accesses and all(e.path[0] == user_pgd for e in user_accesses)


def test_an_exiting_process_frees_both_pgds() -> None:
    kernel = pti_kernel()
    task = process(kernel)
    assert kernel.ctx.pti is not None and task.mm is not None
    pgds = [task.mm.pgd, kernel.ctx.pti.user_pgds[task.mm.pgd]]
    kernel.exit(task)
    assert pgds[0] not in kernel.ctx.pti.user_pgds
    assert kernel.ctx.pages.refcount[pgds].tolist() == [0, 0]


def test_without_pti_there_is_one_pgd_and_no_switch() -> None:
    kernel = pti_kernel(pti=False)
    start = len(hw(kernel).events)
    task = process(kernel)
    assert kernel.ctx.pti is None and task.mm is not None
    assert not any(e.op == "cr3" and e.value for e in hw(kernel).events[start:])
    assert not any(kernel.ctx.memory.table(task.mm.pgd)[:256] & np.uint64(PT64_NX_MASK))


@pytest.mark.parametrize("pti", [True, False])
def test_a_user_page_the_kernel_touches_has_a_second_rmap_entry_under_pti(pti: bool) -> None:
    """Under shadow paging the kernel pgd is a root of its own, and the NX of its user entries gives the shadow
    pages below them other roles: the kernel's copy_to_user maps the page a second time."""
    kvm = new_vm("shadow", memory="256M", vcpus=2)
    kernel = pti_kernel(kvm.arch.guest_hardware, pti)
    task = process(kernel)
    assert task.mm is not None
    gfn = pte_gfn(user_pte(kernel, task, TEST_VA))
    assert rmap_count(kvm, gfn) == 1
    task.access_user(TEST_VA, TEST_VA + PAGE, write=True)
    assert rmap_count(kvm, gfn) == (2 if pti else 1)
    mmu = kvm.arch.mmu
    roots = {root.gfn for vcpu in mmu.vcpus.values() for root in (vcpu.root, *vcpu.prev_roots) if root is not None}
    assert (kernel.ctx.pti.user_pgds[task.mm.pgd] in roots) if pti else task.mm.pgd in roots
    kernel.exit(task)
    check_invariants(kvm)


def test_a_cr3_load_with_the_no_flush_bit_switches_roots_without_a_flush() -> None:
    """kvm_set_cr3(): with PCID's no-flush bit KVM neither syncs nor flushes (the PTI entry code's switches);
    each load still exits under shadow paging."""
    kvm = new_vm("shadow", memory="128M", vcpus=1)
    mmu, vcpu = kvm.arch.mmu, kvm.vcpus[0]
    flushes, exits = vcpu.stat.tlb_flush, vcpu.stat.exits
    mmu.load_cr3(0, 0x2000)
    mmu.load_cr3(0, 0x2001, noflush=True)
    mmu.load_cr3(0, 0x2000, noflush=True)  # back to the cached previous root
    assert (vcpu.stat.tlb_flush - flushes, vcpu.stat.exits - exits) == (1, 3)
    assert mmu.vcpu(0).root is not None and mmu.vcpu(0).root.gfn == 0x2000
    check_invariants(kvm)
