"""The iTLB-multihit mitigation (kvm.nx_huge_pages): instruction fetches split huge pages, recovery zaps them.

Hand-built guests give the exact numbers of each MMU (mmu.c direct_map / FNAME(fetch), tdp_mmu.c
kvm_tdp_mmu_map, and the v5.15 rules where they differ); an emulated guest shows the same through the VMM's
clock, in-process and through a real mount.
"""

from __future__ import annotations

import numpy as np
import pytest
from mmu_testlib import BASE, DATA, U64, USER_RO, D, ToyGuest, check_invariants, gvas, new_vm, vcpu_stats, vm_stats

from kvmdbgfs.arch.x86.mmu.nx_recovery import kvm_recover_nx_huge_pages, nx_huge_pages_recovery_period_ns
from kvmdbgfs.guest.pte import PT64_NX_MASK, PT_PAGE_SIZE_MASK, make_pte, pt_index, pte_gfn
from kvmdbgfs.host_model import HostModel, host_model, parse_host_overrides
from kvmdbgfs.kvm.vm import Kvm
from kvmdbgfs.scenario import load_scenario
from kvmdbgfs.vmm.vmm import Vmm
from kvmdbgfs.workloads import run_workload

USER_RX = USER_RO & ~PT64_NX_MASK  # user text: executable, read-only
USER_RX_2M = USER_RX | D | PT_PAGE_SIZE_MASK
HUGE = BASE + (1 << 21)  # a guest 2 MiB page, mapped to HUGE_GFN
HUGE_GFN = 0x4000  # 64 MiB: 2 MiB-aligned, inside the main memslot
SPLIT_STATS = ("nx_lpage_splits", "pages_4k", "pages_2m", "remote_tlb_flush_requests")
MINUTE_NS = 60_000_000_000


def executable_process(mmu: str, nx: bool, kernel: str = "latest") -> tuple[Kvm, int]:
    """A process whose text is 16 4K pages at BASE (gfns DATA...) and one 2 MiB page at HUGE; returns (kvm, the
    address to run from: HUGE under shadow paging, where only a guest huge page maps huge, else BASE)."""
    kvm = new_vm(mmu, kernel=kernel, nx_huge_pages=nx)
    guest = ToyGuest(kvm)
    pgd = guest.new_pgd()
    guest.map(pgd, BASE, range(DATA, DATA + 16), USER_RX)
    pdpt = pte_gfn(guest.memory.read_pte(pgd, pt_index(HUGE, 4)))
    pd = pte_gfn(guest.memory.read_pte(pdpt, pt_index(HUGE, 3)))
    guest.memory.store_pte(pd, pt_index(HUGE, 2), make_pte(HUGE_GFN, USER_RX_2M))
    kvm.arch.mmu.load_cr3(0, pgd)
    return kvm, HUGE if mmu == "shadow" else BASE


def read_then_run(mmu: str, nx: bool, kernel: str = "latest") -> tuple[Kvm, int]:
    """The process reads its first text page (a huge mapping), then executes it."""
    kvm, text = executable_process(mmu, nx, kernel)
    kvm.arch.mmu.access(0, gvas(text, 1), write=False, user=True)
    assert vm_stats(kvm, "pages_2m", "pages_4k") == {"pages_2m": 1, "pages_4k": 0}
    kvm.arch.mmu.access(0, gvas(text, 1), write=False, user=True, fetch=True)
    return kvm, text


@pytest.mark.parametrize("mmu", ["shadow", "tdp-legacy", "tdp"])
def test_without_the_mitigation_a_huge_page_is_executable(mmu: str) -> None:
    kvm, _text = read_then_run(mmu, nx=False)
    assert vm_stats(kvm, *SPLIT_STATS)["nx_lpage_splits"] == 0
    assert vm_stats(kvm, "pages_2m", "pages_4k") == {"pages_2m": 1, "pages_4k": 0}
    assert vcpu_stats(kvm, "pf_taken") == {"pf_taken": 1}  # the fetch did not exit


# What one fetch from a non-executable huge page leaves: the shadow MMU drops the huge spte (a flush), links an
# empty page and maps the 4K page with its prefetched block of 8; the TDP MMU (v6.2+) splits the huge page into
# 512 executable 4K sptes, no flush; before v6.2 it zapped it (a flush) and mapped the one 4K page.
SPLIT = {
    ("shadow", "latest"): {"nx_lpage_splits": 1, "pages_4k": 8, "pages_2m": 0, "remote_tlb_flush_requests": 1},
    ("tdp-legacy", "latest"): {"nx_lpage_splits": 1, "pages_4k": 8, "pages_2m": 0, "remote_tlb_flush_requests": 1},
    ("tdp", "latest"): {"nx_lpage_splits": 1, "pages_4k": 512, "pages_2m": 0, "remote_tlb_flush_requests": 0},
    ("tdp", "v5.15"): {"nx_lpage_splits": 1, "pages_4k": 1, "pages_2m": 0, "remote_tlb_flush_requests": 1},
    ("tdp", "v6.1"): {"nx_lpage_splits": 1, "pages_4k": 1, "pages_2m": 0, "remote_tlb_flush_requests": 1},
    ("tdp", "v6.4"): {"nx_lpage_splits": 1, "pages_4k": 512, "pages_2m": 0, "remote_tlb_flush_requests": 0},
}


@pytest.mark.parametrize(("mmu", "kernel"), SPLIT)
def test_a_fetch_from_a_huge_page_splits_it(mmu: str, kernel: str) -> None:
    kvm, _text = read_then_run(mmu, nx=True, kernel=kernel)
    assert vm_stats(kvm, *SPLIT_STATS) == SPLIT[(mmu, kernel)]
    assert vcpu_stats(kvm, "pf_taken") == {"pf_taken": 2}
    check_invariants(kvm)


@pytest.mark.parametrize(("kernel", "pages_4k", "exits"), [("latest", 512, 2), ("v6.1", 2, 3), ("v5.15", 2, 3)])
def test_after_the_split_data_accesses_map_small_pages(kernel: str, pages_4k: int, exits: int) -> None:
    """A read of another page of the split range: v6.2+ split it whole already; before, the fault wants the
    huge page, but the page table now there sends it down to 4K (disallowed_hugepage_adjust)."""
    kvm, _text = read_then_run("tdp", nx=True, kernel=kernel)
    kvm.arch.mmu.access(0, gvas(BASE + 8 * 4096, 1), write=False, user=True)
    assert vm_stats(kvm, "pages_4k", "pages_2m", "nx_lpage_splits") == {
        "pages_4k": pages_4k,
        "pages_2m": 0,
        "nx_lpage_splits": 1,
    }
    assert vcpu_stats(kvm, "pf_taken") == {"pf_taken": exits}


@pytest.mark.parametrize("mmu", ["shadow", "tdp-legacy", "tdp"])
def test_recovery_zaps_the_split_page_and_the_range_maps_huge_again(mmu: str) -> None:
    kvm, text = read_then_run(mmu, nx=True)
    assert kvm_recover_nx_huge_pages(kvm.arch.mmu) == 1
    assert vm_stats(kvm, "nx_lpage_splits", "pages_4k", "pages_2m") == {
        "nx_lpage_splits": 0,
        "pages_4k": 0,
        "pages_2m": 0,
    }
    kvm.arch.mmu.access(0, gvas(text, 1), write=False, user=True)
    assert vm_stats(kvm, "pages_2m", "pages_4k") == {"pages_2m": 1, "pages_4k": 0}
    kvm.arch.mmu.access(0, gvas(text, 1), write=False, user=True, fetch=True)
    assert vm_stats(kvm, "nx_lpage_splits") == {"nx_lpage_splits": 1}
    check_invariants(kvm)


def test_recovery_zaps_a_sixtieth_of_the_splits_rounded_up_every_minute() -> None:
    """nx_huge_pages_recovery_ratio=60, period_ms=0: 60 s, and ceil(61 / 60) = 2 pages."""
    assert nx_huge_pages_recovery_period_ns() == MINUTE_NS
    assert nx_huge_pages_recovery_period_ns(ratio=7200) == 1_000_000_000 and nx_huge_pages_recovery_period_ns(0) is None
    kvm = new_vm("tdp", memory="512M", nx_huge_pages=True)
    guest = ToyGuest(kvm)
    pgd = guest.new_pgd()
    ranges = np.arange(61, dtype=np.uint64) * U64(1 << 21) + U64(BASE)
    for n, gva in enumerate(ranges.tolist()):
        guest.map(pgd, gva, [0x10000 + 512 * n], USER_RX)  # from 256 MiB: 61 2 MiB ranges of guest memory
    kvm.arch.mmu.load_cr3(0, pgd)
    kvm.arch.mmu.access(0, ranges, write=False, user=True, fetch=True)  # nothing mapped yet: no huge page to split,
    # but each range gets a page table where a huge page could be, counted as a split
    assert vm_stats(kvm, "nx_lpage_splits", "pages_4k", "pages_2m") == {
        "nx_lpage_splits": 61,
        "pages_4k": 61,
        "pages_2m": 0,
    }
    assert kvm_recover_nx_huge_pages(kvm.arch.mmu) == 2
    assert vm_stats(kvm, "nx_lpage_splits", "pages_4k") == {"nx_lpage_splits": 59, "pages_4k": 59}


@pytest.fixture(scope="module", params=["tdp", "shadow"])
def booted(request) -> dict[str, list[int]]:
    """A 256 MiB guest booted (systemd, sshd and one login, no web server) on a host with the mitigation, then two
    minutes of idle on the manual clock: nx_lpage_splits after the boot and after each minute; with EPT also the same
    boot without the mitigation (the shadow case is in the hand-built tests above)."""
    splits = {}
    for nx in (False, True) if request.param == "tdp" else (True,):
        vmm = Vmm(seed=1, host=HostModel(nx_huge_pages=nx))
        try:
            vm = vmm.create_vm(vmm.host.make_config(memory="256M", vcpus=1, mmu=request.param, seed=1))
            run_workload(vm, "idle", {"uptime": 0, "workers": 0, "logins": 1})
            splits[f"nx={nx}"] = [vm.kvm.stat.nx_lpage_splits]
            for _ in range(2 if nx else 0):
                vmm.advance_clock(MINUTE_NS)
                splits[f"nx={nx}"].append(vm.kvm.stat.nx_lpage_splits)
        finally:
            vmm.shutdown()
    return splits


def test_a_booted_guest_splits_the_huge_pages_it_executes_from(booted) -> None:
    """Kernel text (2 MiB pages in the guest, so under shadow paging too) and, with EPT, the programs' text."""
    assert booted.get("nx=False", [0]) == [0]
    assert booted["nx=True"][0] > 0


def test_the_recovery_worker_brings_the_splits_down_each_minute(booted) -> None:
    after_boot, *minutes = booted["nx=True"]
    assert minutes[0] < after_boot and minutes[-1] < after_boot


def test_a_mount_with_the_mitigation_splits_and_recovers(mount_factory) -> None:
    mount = mount_factory("--scenario", "empty", "--clock", "manual", "--host", "nx_huge_pages=true")
    name = mount.create_vm("--vcpus", "1", "--memory", "256M", "--mmu", "tdp", "--seed", "1")
    mount.cli("run", "idle", "--vm", name, "--set", "uptime=0", "--set", "workers=0", "--set", "logins=1")
    split = int(mount.sh(f"cat {name}/nx_lpage_splits"))
    assert split > 0 and int(mount.sh("cat nx_lpage_splits")) == split
    assert int(mount.sh(f"cat {name}/pages_4k")) >= 512 * split
    mount.cli("clock", "advance", "60s")
    assert int(mount.sh(f"grep -h . {name}/nx_lpage_splits")) < split


def test_the_scenario_and_the_command_line_turn_the_mitigation_on(tmp_path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[host]\nnx_huge_pages = true\n")
    assert load_scenario(str(path)).host == HostModel(nx_huge_pages=True)
    assert host_model(parse_host_overrides(["nx_huge_pages=true"])) == HostModel(nx_huge_pages=True)
    assert load_scenario("default").host.nx_huge_pages is False  # an unaffected CPU unless asked
