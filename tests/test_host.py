"""The emulated host and its debugfs tree, in-process: layout, modes, sums, writes, lifetime."""

from __future__ import annotations

import errno
import os
import re

import pytest
from expected_files import INSTANT, PROFILE_STATS, per_vm_files
from inprocess import cat, read_all, walk_files, write

from kvmdbgfs.debugfs.dentry import lookup
from kvmdbgfs.debugfs.file import vfs_open
from kvmdbgfs.kvm.host import KvmHost


def make_host(profile: str = "latest", seed: int = 0) -> KvmHost:
    return KvmHost(profile=profile, seed=seed)


def small_vm(host: KvmHost, **kwargs):
    options = {"memory": "256M", "vcpus": 2, "mmu": "shadow", **kwargs}
    return host.create_vm(host.make_config(**options))


def errno_of(call) -> int:
    with pytest.raises(OSError) as info:
        call()
    return info.value.errno


@pytest.mark.parametrize("profile", ["v5.14", "v5.15", "latest"])
def test_file_list_per_vm_matches_the_profile(profile: str) -> None:
    host = make_host(profile)
    kvm = small_vm(host, vcpus=3)
    assert walk_files(host.debugfs_dir.children[kvm.name]) == per_vm_files(profile, 3)
    top_level = sorted(name for name, d in host.debugfs_dir.children.items() if not d.is_dir)
    assert top_level == sorted(PROFILE_STATS[profile])


def test_ffs_profile_variant_keeps_the_file_set() -> None:
    host = make_host("v5.15+ffs")
    kvm = small_vm(host)
    assert walk_files(host.debugfs_dir.children[kvm.name]) == per_vm_files("v5.15", 2)


def test_modes_follow_the_stat_types() -> None:
    host = make_host()
    kvm = small_vm(host)
    vm_dir = host.debugfs_dir.children[kvm.name]
    assert vm_dir.mode & 0o7777 == 0o755
    for name in PROFILE_STATS["latest"]:
        expected = 0o444 if name in INSTANT else 0o644
        assert vm_dir.children[name].mode & 0o7777 == expected, name
        assert host.debugfs_dir.children[name].mode & 0o7777 == expected, name
    assert vm_dir.children["mmu_rmaps_stat"].mode & 0o7777 == 0o644
    for dentry in vm_dir.children["vcpu0"].children.values():
        assert dentry.mode & 0o7777 == 0o444


def test_directory_names_are_pid_fd_and_unique() -> None:
    host = make_host()
    names = [small_vm(host).name for _ in range(6)]
    assert len(set(names)) == 6
    for name in names:
        pid, fd = map(int, re.fullmatch(r"(\d+)-(\d+)", name).groups())
        assert 300 < pid < 4194304 and fd >= 10


def test_same_seed_same_tree() -> None:
    def snapshot(seed: int) -> dict[str, str]:
        host = make_host(seed=seed)
        for mmu in ("shadow", "tdp-legacy", "tdp"):
            small_vm(host, mmu=mmu)
        return {path: cat(host.debugfs_dir, path) for path in walk_files(host.debugfs_dir)}

    assert snapshot(3) == snapshot(3)
    assert snapshot(3).keys() != snapshot(4).keys()


def test_vcpu_files_in_their_kernel_formats() -> None:
    host = make_host()
    kvm = small_vm(host, vcpus=2)
    root = host.debugfs_dir
    offset = cat(root, f"{kvm.name}/vcpu1/tsc-offset")
    assert re.fullmatch(r"-\d+\n", offset)
    assert int(offset) == kvm.vcpus[1].tsc_offset
    assert cat(root, f"{kvm.name}/vcpu0/tsc-scaling-ratio") == f"{1 << 48}\n"
    assert cat(root, f"{kvm.name}/vcpu0/tsc-scaling-ratio-frac-bits") == "48\n"
    assert cat(root, f"{kvm.name}/vcpu0/lapic_timer_advance_ns") == "1000\n"
    assert cat(root, f"{kvm.name}/vcpu0/guest_mode") == "0\n"
    assert cat(root, f"{kvm.name}/vcpu1/pid") == f"{kvm.pid + 3}\n"


def test_top_level_is_a_plain_sum_even_for_peaks() -> None:
    host = make_host()
    first, second = small_vm(host), small_vm(host)
    first.stat.max_mmu_rmap_size, second.stat.max_mmu_rmap_size = 5, 7
    first.vcpus[0].stat.exits, first.vcpus[1].stat.exits, second.vcpus[0].stat.exits = 3, 4, 10
    root = host.debugfs_dir
    assert cat(root, "max_mmu_rmap_size") == "12\n"
    assert cat(root, f"{first.name}/max_mmu_rmap_size") == "5\n"
    assert cat(root, f"{first.name}/exits") == "7\n"
    assert cat(root, "exits") == "17\n"


def test_histogram_stat_files_show_bucket_zero() -> None:
    host = make_host()
    kvm = small_vm(host)
    kvm.vcpus[0].stat.halt_wait_hist[0] = 4
    kvm.vcpus[0].stat.halt_wait_hist[5] = 100
    kvm.vcpus[1].stat.halt_wait_hist[0] = 1
    assert cat(host.debugfs_dir, f"{kvm.name}/halt_wait_hist") == "5\n"
    write(host.debugfs_dir, f"{kvm.name}/halt_wait_hist", b"0\n")
    assert int(kvm.vcpus[0].stat.halt_wait_hist[5]) == 100
    assert cat(host.debugfs_dir, f"{kvm.name}/halt_wait_hist") == "0\n"


def test_clearing_per_vm_and_top_level() -> None:
    host = make_host()
    first, second = small_vm(host), small_vm(host)
    for kvm in (first, second):
        kvm.stat.mmu_cache_miss = 9
        kvm.vcpus[1].stat.pf_fixed = 2
    root = host.debugfs_dir
    assert write(root, f"{first.name}/mmu_cache_miss", b"0\n") == 2
    assert (first.stat.mmu_cache_miss, second.stat.mmu_cache_miss) == (0, 9)
    write(root, f"{first.name}/pf_fixed", b"0")
    assert [v.stat.pf_fixed for v in first.vcpus + second.vcpus] == [0, 0, 0, 2]
    write(root, "pf_fixed", b"0\n")
    write(root, "mmu_cache_miss", b"0\n")
    assert cat(root, "pf_fixed") == "0\n" and cat(root, "mmu_cache_miss") == "0\n"


@pytest.mark.parametrize("path_kind", ["top", "vm"])
@pytest.mark.parametrize(("data", "code"), [(b"1\n", errno.EINVAL), (b"x\n", errno.EINVAL), (b" 0", errno.EINVAL)])
def test_bad_writes_change_nothing(path_kind: str, data: bytes, code: int) -> None:
    host = make_host()
    kvm = small_vm(host)
    kvm.stat.mmu_pte_write = 4
    path = "mmu_pte_write" if path_kind == "top" else f"{kvm.name}/mmu_pte_write"
    assert errno_of(lambda: write(host.debugfs_dir, path, data)) == code
    assert kvm.stat.mmu_pte_write == 4


@pytest.mark.parametrize("path", ["pages_4k", "{vm}/pages_4k", "{vm}/vcpu0/tsc-offset", "{vm}/vcpu0/pid"])
def test_readonly_files_refuse_writes_with_eacces(path: str) -> None:
    host = make_host()
    kvm = small_vm(host)
    kvm.stat.pages_4k = 3
    assert errno_of(lambda: write(host.debugfs_dir, path.format(vm=kvm.name), b"0\n")) == errno.EACCES
    assert kvm.stat.pages_4k == 3


def test_mmu_rmaps_stat_refuses_writes() -> None:
    host = make_host()
    kvm = small_vm(host)
    assert errno_of(lambda: write(host.debugfs_dir, f"{kvm.name}/mmu_rmaps_stat", b"0\n")) == errno.EINVAL


def test_mixed_profiles_sum_only_what_each_kernel_has() -> None:
    host = make_host()
    new, old = small_vm(host), small_vm(host, kernel="v5.14")
    new.stat.max_mmu_rmap_size, old.stat.max_mmu_rmap_size = 3, 50
    assert cat(host.debugfs_dir, "max_mmu_rmap_size") == "3\n"
    assert "max_mmu_rmap_size" not in host.debugfs_dir.children[old.name].children


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"memory": "lots"}, "bad memory size"),
        ({"memory": "1M"}, "memory must be"),
        ({"memory": "65G"}, "memory must be"),
        ({"vcpus": 0}, "vcpus"),
        ({"vcpus": 5000}, "vcpus"),
        ({"mmu": "ept"}, "unknown MMU mode"),
        ({"kernel": "v4.19"}, "unknown kernel profile"),
        ({"kernel": "latest+fls"}, "unknown kernel profile"),
        ({"rmap_design": "E"}, "unknown rmap design"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_vm_configs_are_refused_before_anything_changes(options: dict, message: str) -> None:
    host = make_host()
    before = walk_files(host.debugfs_dir)
    with pytest.raises(ValueError, match=message):
        small_vm(host, **options)
    assert host.vm_list == [] and walk_files(host.debugfs_dir) == before
    # The next VM gets the name it would have got with no failed attempt.
    assert small_vm(host).name == small_vm(make_host()).name


# Lifetime (reference §4.1), in-process.


def test_open_pins_the_vm_and_the_last_close_removes_it() -> None:
    host = make_host()
    kvm = small_vm(host)
    root = host.debugfs_dir
    kvm.stat.mmu_cache_miss = 42
    file = vfs_open(lookup(root, f"{kvm.name}/mmu_cache_miss"), os.O_RDONLY)
    assert kvm.users_count == 2
    host.destroy_vm(kvm.name)
    assert kvm.users_count == 1
    assert kvm.name in root.children and kvm in host.vm_list
    assert read_all(file) == b"42\n"
    # A new open of the destroyed-but-pinned VM succeeds and pins it too.
    assert cat(root, f"{kvm.name}/vcpu0/guest_mode") == "0\n"
    file.dentry.fops.release(file)
    assert kvm.users_count == 0
    assert kvm.name not in root.children and host.vm_list == []
    assert errno_of(lambda: vfs_open(file.dentry, os.O_RDONLY)) == errno.ENOENT


def test_open_fails_with_enoent_once_the_count_is_zero() -> None:
    host = make_host()
    kvm = small_vm(host)
    dentry = lookup(host.debugfs_dir, f"{kvm.name}/exits")
    host.destroy_vm(kvm.name)
    assert errno_of(lambda: vfs_open(dentry, os.O_RDONLY)) == errno.ENOENT
    assert kvm.users_count == 0


def test_destroy_twice_or_unknown_is_refused() -> None:
    host = make_host()
    kvm = small_vm(host)
    file = vfs_open(lookup(host.debugfs_dir, f"{kvm.name}/exits"), os.O_RDONLY)
    host.destroy_vm(kvm.name)
    with pytest.raises(LookupError, match="already destroyed"):
        host.destroy_vm(kvm.name)
    with pytest.raises(LookupError, match="no VM named"):
        host.destroy_vm("1-1")
    assert kvm.users_count == 1
    file.dentry.fops.release(file)


def test_tdp_vm_has_no_rmaps_and_an_empty_mmu_rmaps_stat() -> None:
    host = make_host()
    kvm = small_vm(host, mmu="tdp")
    assert all(slot.rmap is None for slot in kvm.arch.memslots)
    assert cat(host.debugfs_dir, f"{kvm.name}/mmu_rmaps_stat") == ""
