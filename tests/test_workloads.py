"""Workloads on emulated guests, in-process: what they leave in the MMU and in the debugfs files."""

from __future__ import annotations

import re

import pytest
from inprocess import cat, walk_files

from kvmdbgfs.kvm.host import KvmHost
from kvmdbgfs.kvm.vm import Kvm
from workloads import run_workload

ROW = re.compile(r"Level=(4K|2M|1G):\t((?:\d+\t){11})\n")


def histogram(host: KvmHost, kvm: Kvm) -> dict[str, list[int]]:
    text = cat(host.debugfs_dir, f"{kvm.name}/mmu_rmaps_stat")
    return {level: [int(v) for v in values.split()] for level, values in ROW.findall(text)}


def booted(mmu: str, memory: str = "1G", kernel: str = "latest", seed: int = 5) -> tuple[KvmHost, Kvm]:
    host = KvmHost(profile=kernel, seed=seed)
    kvm = host.create_vm(host.make_config(memory=memory, vcpus=2, mmu=mmu, seed=seed))
    run_workload(kvm, "idle", {"uptime": 10})
    return host, kvm


@pytest.fixture(scope="module")
def shadow() -> tuple[KvmHost, Kvm]:
    return booted("shadow")


def test_idle_shadow_guest_shares_pages_across_processes(shadow) -> None:
    host, kvm = shadow
    rows = histogram(host, kvm)
    assert sum(rows["4K"]) == 2 * (160 + 64 + 261888 + 4096 + 64) + 32
    assert sum(rows["4K"][2:]) > 1000  # many gfns mapped by several processes
    assert kvm.stat.max_mmu_rmap_size >= 8
    assert kvm.stat.pages_4k > 10000 and kvm.stat.mmu_cache_miss > 100
    assert int(cat(host.debugfs_dir, f"{kvm.name}/pages_4k")) == kvm.stat.pages_4k
    assert int(cat(host.debugfs_dir, f"{kvm.name}/pf_fixed")) > 0
    # Under shadow paging every guest #PF exits first and is reflected back into the guest.
    assert int(cat(host.debugfs_dir, f"{kvm.name}/pf_guest")) == kvm.vcpu_stat_sum("pf_guest") > 1000


def test_idle_tdp_legacy_has_only_0_and_1_columns() -> None:
    host, kvm = booted("tdp-legacy")
    rows = histogram(host, kvm)
    for level in ("4K", "2M", "1G"):
        assert sum(rows[level][2:]) == 0, level
    # EPT over THP-backed host memory maps the guest with 2M leaves wherever a slot covers the frame.
    assert rows["2M"][1] == kvm.stat.pages_2m > 50 and kvm.stat.max_mmu_rmap_size <= 1
    assert kvm.vcpu_stat_sum("pf_guest") == 0  # with EPT the guest's own faults never exit


def test_idle_tdp_has_no_rmaps_but_counts_pages() -> None:
    host, kvm = booted("tdp")
    assert cat(host.debugfs_dir, f"{kvm.name}/mmu_rmaps_stat") == ""
    assert kvm.stat.pages_2m > 50  # 2M leaves, as with tdp-legacy, but no rmap behind them


def test_rmap_fork_grows_max_rmap_size_by_about_n() -> None:
    host, kvm = booted("shadow", seed=6)
    before = kvm.stat.max_mmu_rmap_size
    summary = run_workload(kvm, "rmap_fork", {"children": 60})
    assert summary["max_mmu_rmap_size_before"] == before
    assert 60 <= kvm.stat.max_mmu_rmap_size - before <= 75
    assert cat(host.debugfs_dir, f"{kvm.name}/max_mmu_rmap_size") == f"{kvm.stat.max_mmu_rmap_size}\n"


def test_same_seed_same_tree() -> None:
    def tree() -> dict[str, str]:
        host, kvm = booted("shadow", memory="512M", seed=9)
        run_workload(kvm, "rmap_fork", {"children": 10})
        return {path: cat(host.debugfs_dir, path) for path in walk_files(host.debugfs_dir)}

    assert tree() == tree()


@pytest.mark.parametrize("name", ["rmap_fork", "kbuild", "memhog", "hotplug"])
def test_workloads_need_a_booted_guest_and_change_nothing_without_one(name: str) -> None:
    host = KvmHost()
    kvm = host.create_vm(host.make_config(memory="256M", vcpus=1, mmu="shadow"))
    before = {path: cat(host.debugfs_dir, path) for path in walk_files(host.debugfs_dir)}
    with pytest.raises(ValueError, match="has not booted: run the idle workload on it first"):
        run_workload(kvm, name, {})
    assert {path: cat(host.debugfs_dir, path) for path in walk_files(host.debugfs_dir)} == before
    assert kvm.workload_runs == 0 and kvm.users_count == 1


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("idle", {"uptime": -1}, "uptime must be between 0 and 3600, not -1"),
        ("rmap_fork", {"children": 5}, "children must be between 10 and 1000, not 5"),
        ("rmap_fork", {"kids": 5}, "rmap_fork: unknown parameter 'kids'"),
        ("memhog", {"size": "1Q"}, "size: not a size: '1Q'"),
        ("nosuch", {}, "unknown workload 'nosuch'"),
    ],
)
def test_bad_parameters_are_refused_first(name: str, settings: dict, message: str) -> None:
    host = KvmHost()
    kvm = host.create_vm(host.make_config(memory="256M", vcpus=1, mmu="shadow"))
    with pytest.raises(ValueError, match=re.escape(message)):
        run_workload(kvm, name, settings)
    assert kvm.guest is None and kvm.workload_runs == 0


def test_idle_twice_is_refused(shadow) -> None:
    host, kvm = shadow
    runs = kvm.workload_runs
    with pytest.raises(ValueError, match="has already booted"):
        run_workload(kvm, "idle", {})
    assert kvm.workload_runs == runs


def test_kbuild_memhog_hotplug(shadow) -> None:
    host, kvm = shadow
    assert run_workload(kvm, "kbuild", {"files": 4, "jobs": 2})["compiles"] == 4
    summary = run_workload(kvm, "memhog", {"size": "64M"})
    assert summary["resident_pages"] >= (64 << 20) // 4096 and summary["pages_2m"] > 0
    slots = len(kvm.arch.memslots)
    heads = sum(histogram(host, kvm)["4K"])
    summary = run_workload(kvm, "hotplug", {"size": "256M", "rounds": 2})
    assert summary["rounds"] == 2 and summary["shadow_pages_zapped"] > 0
    assert len(kvm.arch.memslots) == slots and sum(histogram(host, kvm)["4K"]) == heads
