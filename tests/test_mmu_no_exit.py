"""What the hardware does without exiting takes no exit and no mmu_lock, and still meets pending requests
at the same entry as before (in-process)."""

from __future__ import annotations

import threading
import time

import numpy as np
from mmu_testlib import BASE, DATA, faulted_process, gvas, vcpu_stats

from kvmdbgfs import sched
from kvmdbgfs.arch.x86.mmu.mmu import LINUX_PAGE_OFFSET


def run_bounded(action, seconds: float = 5.0) -> threading.Thread:
    """Runs ``action`` in a thread; returns it after at most ``seconds`` (alive if still blocked)."""
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    thread.join(seconds)
    return thread


def test_translated_accesses_and_stores_run_while_another_thread_holds_mmu_lock() -> None:
    kvm, _guest, _pgd, _pd, _pt = faulted_process()
    mmu = kvm.arch.mmu
    table = DATA + 100  # a page the guest writes through its direct map, shadowed by nothing
    mmu.store_ptes(0, table, np.array([0]), np.array([1], np.uint64))  # faults the direct map in
    exits = vcpu_stats(kvm, "exits")["exits"]
    with kvm.mmu_lock:
        done = run_bounded(lambda: mmu.access(0, gvas(BASE, 8), write=False, user=True))
        assert not done.is_alive(), "an access through present sptes waited for mmu_lock"
        done = run_bounded(lambda: mmu.store_ptes(0, table, np.array([1, 2]), np.array([5, 6], np.uint64)))
        assert not done.is_alive(), "a store through a writable spte waited for mmu_lock"
    assert vcpu_stats(kvm, "exits")["exits"] == exits
    assert mmu.memory.table(table)[:3].tolist() == [1, 5, 6]


def test_an_access_that_exits_waits_for_mmu_lock() -> None:
    kvm, _guest, _pgd, _pd, _pt = faulted_process()
    mmu = kvm.arch.mmu
    exits = vcpu_stats(kvm, "exits")["exits"]
    untranslated = gvas(BASE + 12 * 4096, 1)  # mapped by the guest, not prefetched by the first fault
    with kvm.mmu_lock:
        blocked = run_bounded(lambda: mmu.access(0, untranslated, write=False, user=True), seconds=0.2)
        assert blocked.is_alive(), "a faulting access ran without mmu_lock"
    blocked.join(5)
    assert not blocked.is_alive()
    assert vcpu_stats(kvm, "exits")["exits"] == exits + 1


def test_a_pending_request_is_handled_at_the_next_access_even_without_an_exit() -> None:
    kvm, _guest, _pgd, _pd, _pt = faulted_process()
    mmu = kvm.arch.mmu
    before = vcpu_stats(kvm, "exits", "tlb_flush")
    mmu.access(0, gvas(BASE, 1), write=False, user=True)
    assert vcpu_stats(kvm, "exits", "tlb_flush") == before
    mmu._host()
    mmu.flush_remote_tlbs()  # KVM_REQ_TLB_FLUSH for every vCPU
    mmu.access(0, gvas(BASE, 1), write=False, user=True)
    assert vcpu_stats(kvm, "exits", "tlb_flush") == {"exits": before["exits"], "tlb_flush": before["tlb_flush"] + 1}
    mmu.access(0, gvas(BASE, 1), write=False, user=True)
    assert vcpu_stats(kvm, "tlb_flush") == {"tlb_flush": before["tlb_flush"] + 1}


def test_every_pcid_cr3_switch_is_an_exit_under_shadow_paging() -> None:
    kvm, guest, pgd, _pd, _pt = faulted_process()
    mmu = kvm.arch.mmu
    other = guest.new_pgd()
    mmu.load_cr3(0, other, noflush=True)
    exits = vcpu_stats(kvm, "exits")["exits"]
    roots = []
    for _ in range(3):
        mmu.load_cr3(0, pgd, noflush=True)
        roots.append(mmu.vcpu(0).root.gfn)
        mmu.load_cr3(0, other, noflush=True)
        roots.append(mmu.vcpu(0).root.gfn)
    assert roots == [pgd, other] * 3
    assert vcpu_stats(kvm, "exits")["exits"] == exits + 6
    assert mmu.direct_map_base == LINUX_PAGE_OFFSET


def test_a_pcid_switch_to_a_cached_root_takes_no_mmu_lock_and_a_miss_waits_for_it() -> None:
    """fast_pgd_switch() works on the vCPU's own roots; only a switch that misses them frees a root and loads
    a new one, under kvm->mmu_lock. Both are exits."""
    kvm, guest, pgd, _pd, _pt = faulted_process()
    mmu = kvm.arch.mmu
    other = guest.new_pgd()
    mmu.load_cr3(0, other, noflush=True)
    exits = vcpu_stats(kvm, "exits")["exits"]
    with kvm.mmu_lock:
        done = run_bounded(lambda: mmu.load_cr3(0, pgd, noflush=True))
        assert not done.is_alive(), "a switch to a cached root waited for mmu_lock"
        assert mmu.vcpu(0).root.gfn == pgd
        missing = guest.new_pgd()
        blocked = run_bounded(lambda: mmu.load_cr3(0, missing, noflush=True), seconds=0.2)
        assert blocked.is_alive(), "a switch that loads a new root ran without mmu_lock"
    blocked.join(5)
    assert not blocked.is_alive()
    assert mmu.vcpu(0).root.gfn == missing
    assert vcpu_stats(kvm, "exits")["exits"] == exits + 2


def test_cond_resched_still_waits_out_a_readers_grace_after_quiet_calls() -> None:
    """cond_resched() decides the quiet case without reading the clock; a request that has just ended must
    still hold an emulation thread back until its GRACE_S is over."""
    waited: list[float] = []

    def emulate() -> None:
        sched.emulation_thread()
        for _ in range(100):
            sched.cond_resched()  # nothing waits: the quiet case
        start = time.monotonic()
        with sched.serving():
            pass
        sched.cond_resched()
        waited.append(time.monotonic() - start)

    assert not run_bounded(emulate).is_alive()
    assert waited[0] >= sched.GRACE_S
