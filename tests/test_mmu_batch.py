"""Batch paths against one-by-one processing: access() over many addresses, store_ptes over a table page
and the zap of a whole shadow page must leave exactly the state the same operations one at a time leave."""

from __future__ import annotations

import numpy as np
import pytest
from mmu_testlib import BASE, USER_RO, USER_RW, ToyGuest, check_invariants, gvas, mmu_state, new_vm

from kvmdbgfs.arch.x86.mmu.mmu import LINUX_PAGE_OFFSET
from kvmdbgfs.arch.x86.mmu.pte_list import PTE_LIST_DESIGNS
from kvmdbgfs.arch.x86.mmu.zap import kvm_mmu_commit_zap_page, kvm_mmu_prepare_zap_page, mmu_page_zap_pte
from kvmdbgfs.guest.pte import make_pte

ZERO = 0x3333


def scenario(seed: int, mode: str, design: str, batch: bool):
    """A random but reproducible guest: processes sharing pages (one mapped over 1000 times), page-table
    stores, CR3 switches, flushes and INVLPG under a small shadow-page limit."""
    rng = np.random.default_rng(seed)
    kvm = new_vm(mode, vcpus=2, design=design)
    guest = ToyGuest(kvm)
    mmu = kvm.arch.mmu
    mmu.set_nr_mmu_pages(64)
    pgds = [guest.new_pgd() for _ in range(24)]
    for pgd in pgds:
        for region in range(3):
            gfns = rng.integers(0x3000, 0x3100, 512)
            gfns[rng.random(512) < 0.4] = ZERO
            guest.map(pgd, BASE + (region << 21), gfns, USER_RW if region else USER_RO)

    def access(cpu: int, addrs: np.ndarray, write: bool, user: bool) -> None:
        if batch:
            mmu.access(cpu, addrs, write, user)
        else:
            for addr in addrs.tolist():
                mmu.access(cpu, np.array([addr], np.uint64), write, user)

    def stores(cpu: int, table: int, indices: np.ndarray, values: np.ndarray) -> None:
        if batch:
            mmu.store_ptes(cpu, table, indices, values)
        else:
            for index, value in zip(indices.tolist(), values.tolist()):
                mmu.store_pte(cpu, table, index, value)

    for _ in range(150):
        cpu = int(rng.integers(2))
        pgd = pgds[int(rng.integers(len(pgds)))]
        op = rng.random()
        if op < 0.2:
            mmu.load_cr3(cpu, pgd)
        elif op < 0.55 and mmu.vcpu(cpu).cr3 is not None:
            region = int(rng.integers(3))
            start = int(rng.integers(0, 400))
            access(
                cpu,
                gvas(BASE + (region << 21) + start * 4096, int(rng.integers(17, 120))),
                bool(region and rng.random() < 0.5),
                True,
            )
        elif op < 0.65 and mmu.vcpu(cpu).cr3 is not None:  # the kernel reads (rarely writes) table pages
            tables = np.array(sorted(mmu.memory._tables), np.uint64)
            tables = tables[rng.integers(len(tables), size=24)]
            access(cpu, tables * np.uint64(4096) + np.uint64(LINUX_PAGE_OFFSET), bool(rng.random() < 0.1), False)
        elif op < 0.8:
            pt = guest.pt_of(pgd, BASE + (int(rng.integers(1, 3)) << 21))
            first = int(rng.integers(0, 480))
            values = np.array([make_pte(int(g), USER_RW) for g in rng.integers(0x3000, 0x3100, 30)], np.uint64)
            values[rng.random(30) < 0.3] = 0
            stores(cpu, pt, np.arange(first, first + 30), values)
        elif op < 0.9:
            pd = pgd + 2
            stores(cpu, pd, np.arange(8, 14), np.zeros(6, np.uint64))
        elif op < 0.95:
            mmu.flush_tlb(cpu)
        elif mmu.vcpu(cpu).cr3 is not None:
            mmu.invlpg(cpu, BASE + (1 << 21) + 4096 * int(rng.integers(0, 64)))
    return kvm


@pytest.mark.parametrize("mode", ["shadow", "tdp-legacy", "tdp"])
@pytest.mark.parametrize("seed", [0, 1, 4])
def test_batches_equal_one_by_one(mode: str, seed: int) -> None:
    design = PTE_LIST_DESIGNS[seed % len(PTE_LIST_DESIGNS)]
    batched = scenario(seed, mode, design, batch=True)
    single = scenario(seed, mode, design, batch=False)
    left, right = mmu_state(batched), mmu_state(single)
    assert [key for key in left if left[key] != right[key]] == []
    check_invariants(batched)
    if mode == "shadow":  # shadow pages were zapped for room, and an rmap list was recycled
        assert batched.stat.mmu_recycled and batched.stat.max_mmu_rmap_size == 1001


def test_the_shadow_scenario_exercises_every_path() -> None:
    kvm = scenario(0, "shadow", "C", batch=True)
    for stat in ("mmu_shadow_zapped", "mmu_pte_write", "mmu_flooded", "mmu_recycled", "mmu_cache_miss"):
        assert getattr(kvm.stat, stat), stat
    for stat in ("pf_fixed", "pf_emulate", "tlb_flush", "invlpg", "insn_emulation"):
        assert kvm.vcpu_stat_sum(stat), stat


@pytest.mark.parametrize("design", PTE_LIST_DESIGNS)
def test_zapping_a_page_in_one_batch_equals_zapping_its_entries_one_by_one(design: str) -> None:
    """kvm_mmu_page_unlink_children() against mmu_page_zap_pte() on each of the 512 entries."""
    states = []
    for whole_page in (True, False):
        kvm = scenario(2, "shadow", design, batch=True)
        mmu = kvm.arch.mmu
        victims = [sp for sp in mmu.sps.active.values() if sp.level <= 2 and not sp.unsync_children][:6]
        invalid_list: list = []
        for sp in victims:
            if not whole_page:
                for index in range(512):
                    mmu_page_zap_pte(mmu, sp, index)
            kvm_mmu_prepare_zap_page(mmu, sp, invalid_list)
        kvm_mmu_commit_zap_page(mmu, invalid_list)
        check_invariants(kvm)
        states.append(mmu_state(kvm))
    assert states[0] == states[1]
