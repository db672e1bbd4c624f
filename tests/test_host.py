"""The emulated host and its debugfs tree, in-process: layout, modes, sums, writes, lifetime."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator

import pytest
from expected_files import INSTANT, PROFILE_STATS, per_vm_files
from inprocess import cat, read_all, walk_files, write

from kvmdbgfs.debugfs.dentry import lookup
from kvmdbgfs.debugfs.file import vfs_open
from kvmdbgfs.kvm.vm import Kvm
from kvmdbgfs.vmm.vmm import Vmm


@pytest.fixture
def make_vmm() -> Iterator[Callable[..., Vmm]]:
    """``make_vmm(profile, seed)`` starts a VMM (manual clock); every one is shut down afterwards."""
    vmms: list[Vmm] = []

    def factory(profile: str = "latest", seed: int = 0) -> Vmm:
        vmms.append(Vmm(profile=profile, seed=seed))
        return vmms[-1]

    try:
        yield factory
    finally:
        for vmm in vmms:
            vmm.shutdown()


def small_vm(vmm: Vmm, **kwargs) -> Kvm:
    """A VM QEMU created (never booted: its vCPUs have not entered KVM_RUN); its struct kvm."""
    options = {"memory": "256M", "vcpus": 2, "mmu": "shadow", **kwargs}
    return vmm.create_vm(vmm.host.make_config(**options)).kvm


def errno_of(call) -> int:
    with pytest.raises(OSError) as info:
        call()
    return info.value.errno


@pytest.mark.parametrize("profile", ["v5.14", "v5.15", "latest"])
def test_file_list_per_vm_matches_the_profile(profile: str, make_vmm) -> None:
    vmm = make_vmm(profile)
    host = vmm.host
    kvm = small_vm(vmm, vcpus=3)
    assert walk_files(host.debugfs_dir.children[kvm.name]) == per_vm_files(profile, 3)
    top_level = sorted(name for name, d in host.debugfs_dir.children.items() if not d.is_dir)
    assert top_level == sorted(PROFILE_STATS[profile])


@pytest.mark.parametrize("variant", ["+fls", "+ffs"])
def test_bucket_variants_keep_the_file_set(make_vmm, variant: str) -> None:
    vmm = make_vmm("v5.15" + variant)
    host = vmm.host
    kvm = small_vm(vmm)
    assert walk_files(host.debugfs_dir.children[kvm.name]) == per_vm_files("v5.15", 2)
    assert kvm.profile.rmap_bucket == variant[1:]


def test_modes_follow_the_stat_types(make_vmm) -> None:
    vmm = make_vmm()
    host = vmm.host
    kvm = small_vm(vmm)
    vm_dir = host.debugfs_dir.children[kvm.name]
    assert vm_dir.mode & 0o7777 == 0o755
    for name in PROFILE_STATS["latest"]:
        expected = 0o444 if name in INSTANT else 0o644
        assert vm_dir.children[name].mode & 0o7777 == expected, name
        assert host.debugfs_dir.children[name].mode & 0o7777 == expected, name
    assert vm_dir.children["mmu_rmaps_stat"].mode & 0o7777 == 0o644
    for dentry in vm_dir.children["vcpu0"].children.values():
        assert dentry.mode & 0o7777 == 0o444


def test_directory_names_are_pid_fd_and_unique(make_vmm) -> None:
    vmm = make_vmm()
    names = [small_vm(vmm).name for _ in range(6)]
    assert len(set(names)) == 6
    for name in names:
        pid, fd = map(int, re.fullmatch(r"(\d+)-(\d+)", name).groups())
        assert 300 < pid < 4194304 and fd >= 10


def test_same_seed_same_tree(make_vmm) -> None:
    def snapshot(seed: int) -> dict[str, str]:
        vmm = make_vmm(seed=seed)
        host = vmm.host
        for mmu in ("shadow", "tdp-legacy", "tdp"):
            small_vm(vmm, mmu=mmu)
        return {path: cat(host.debugfs_dir, path) for path in walk_files(host.debugfs_dir)}

    assert snapshot(3) == snapshot(3)
    assert snapshot(3).keys() != snapshot(4).keys()


def test_vcpu_files_in_their_kernel_formats(make_vmm) -> None:
    vmm = make_vmm()
    host = vmm.host
    kvm = small_vm(vmm, vcpus=2)
    root = host.debugfs_dir
    offset = cat(root, f"{kvm.name}/vcpu1/tsc-offset")
    assert re.fullmatch(r"-\d+\n", offset)
    assert int(offset) == kvm.vcpus[1].tsc_offset
    assert cat(root, f"{kvm.name}/vcpu0/tsc-scaling-ratio") == f"{1 << 48}\n"
    assert cat(root, f"{kvm.name}/vcpu0/tsc-scaling-ratio-frac-bits") == "48\n"
    assert cat(root, f"{kvm.name}/vcpu0/lapic_timer_advance_ns") == "1000\n"
    assert cat(root, f"{kvm.name}/vcpu0/guest_mode") == "0\n"
    # The kernel shows 0 until the vCPU's first KVM_RUN, which only a booted guest makes (test_workloads.py
    # checks the thread ids after boot).
    assert cat(root, f"{kvm.name}/vcpu0/pid") == cat(root, f"{kvm.name}/vcpu1/pid") == "0\n"


def test_top_level_is_a_plain_sum_even_for_peaks(make_vmm) -> None:
    vmm = make_vmm()
    host = vmm.host
    first, second = small_vm(vmm), small_vm(vmm)
    first.stat.max_mmu_rmap_size, second.stat.max_mmu_rmap_size = 5, 7
    first.vcpus[0].stat.exits, first.vcpus[1].stat.exits, second.vcpus[0].stat.exits = 3, 4, 10
    root = host.debugfs_dir
    assert cat(root, "max_mmu_rmap_size") == "12\n"
    assert cat(root, f"{first.name}/max_mmu_rmap_size") == "5\n"
    assert cat(root, f"{first.name}/exits") == "7\n"
    assert cat(root, "exits") == "17\n"


def test_histogram_stat_files_show_bucket_zero(make_vmm) -> None:
    vmm = make_vmm()
    host = vmm.host
    kvm = small_vm(vmm)
    kvm.vcpus[0].stat.halt_wait_hist[0] = 4
    kvm.vcpus[0].stat.halt_wait_hist[5] = 100
    kvm.vcpus[1].stat.halt_wait_hist[0] = 1
    assert cat(host.debugfs_dir, f"{kvm.name}/halt_wait_hist") == "5\n"
    write(host.debugfs_dir, f"{kvm.name}/halt_wait_hist", b"0\n")
    assert int(kvm.vcpus[0].stat.halt_wait_hist[5]) == 100
    assert cat(host.debugfs_dir, f"{kvm.name}/halt_wait_hist") == "0\n"


def test_clearing_per_vm_and_top_level(make_vmm) -> None:
    vmm = make_vmm()
    host = vmm.host
    first, second = small_vm(vmm), small_vm(vmm)
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
def test_bad_writes_change_nothing(path_kind: str, data: bytes, code: int, make_vmm) -> None:
    vmm = make_vmm()
    host = vmm.host
    kvm = small_vm(vmm)
    kvm.stat.mmu_pte_write = 4
    path = "mmu_pte_write" if path_kind == "top" else f"{kvm.name}/mmu_pte_write"
    assert errno_of(lambda: write(host.debugfs_dir, path, data)) == code
    assert kvm.stat.mmu_pte_write == 4


@pytest.mark.parametrize("path", ["pages_4k", "{vm}/pages_4k", "{vm}/vcpu0/tsc-offset", "{vm}/vcpu0/pid"])
def test_readonly_files_refuse_writes_with_eacces(path: str, make_vmm) -> None:
    vmm = make_vmm()
    host = vmm.host
    kvm = small_vm(vmm)
    kvm.stat.pages_4k = 3
    assert errno_of(lambda: write(host.debugfs_dir, path.format(vm=kvm.name), b"0\n")) == errno.EACCES
    assert kvm.stat.pages_4k == 3


def test_mmu_rmaps_stat_refuses_writes(make_vmm) -> None:
    vmm = make_vmm()
    host = vmm.host
    kvm = small_vm(vmm)
    assert errno_of(lambda: write(host.debugfs_dir, f"{kvm.name}/mmu_rmaps_stat", b"0\n")) == errno.EINVAL


def test_mixed_profiles_sum_only_what_each_kernel_has(make_vmm) -> None:
    vmm = make_vmm()
    host = vmm.host
    new, old = small_vm(vmm), small_vm(vmm, kernel="v5.14")
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
        ({"kernel": "latest+log2"}, "unknown kernel profile"),
        ({"rmap_design": "E"}, "unknown rmap design"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_vm_configs_are_refused_before_anything_changes(options: dict, message: str, make_vmm) -> None:
    vmm = make_vmm()
    host = vmm.host
    before = walk_files(host.debugfs_dir)
    with pytest.raises(ValueError, match=message):
        small_vm(vmm, **options)
    assert host.vm_list == [] and walk_files(host.debugfs_dir) == before
    # The next VM gets the name it would have got with no failed attempt.
    assert small_vm(vmm).name == small_vm(make_vmm()).name


# Lifetime (reference §4.1), in-process.


def test_open_pins_the_vm_and_the_last_close_removes_it(make_vmm) -> None:
    vmm = make_vmm()
    host = vmm.host
    kvm = small_vm(vmm)
    root = host.debugfs_dir
    kvm.stat.mmu_cache_miss = 42
    file = vfs_open(lookup(root, f"{kvm.name}/mmu_cache_miss"), os.O_RDONLY)
    assert kvm.users_count == 2
    vmm.destroy_vm(kvm.name)
    assert kvm.users_count == 1
    assert kvm.name in root.children and kvm in host.vm_list
    assert read_all(file) == b"42\n"
    # A new open of the destroyed-but-pinned VM succeeds and pins it too.
    assert cat(root, f"{kvm.name}/mmu_cache_miss") == "42\n"
    file.f_op.release(file)
    assert kvm.users_count == 0
    assert kvm.name not in root.children and host.vm_list == []
    assert errno_of(lambda: vfs_open(file.dentry, os.O_RDONLY)) == errno.ENOENT


def test_an_open_vcpu_file_keeps_nothing_and_reads_eio(make_vmm) -> None:
    """kvm_arch_create_vcpu_debugfs() files take no VM reference: the destroy removes the VM, its directory
    and its share of the top-level sums at once; the open file reads EIO and can still be released."""
    vmm = make_vmm()
    host = vmm.host
    gone, kept = small_vm(vmm), small_vm(vmm, vcpus=1)
    root = host.debugfs_dir
    gone.stat.mmu_cache_miss, kept.stat.mmu_cache_miss = 40, 2
    gone.vcpus[1].stat.exits, kept.vcpus[0].stat.exits = 7, 3
    paths = [f"{gone.name}/vcpu0/tsc-offset", f"{gone.name}/vcpu1/pid"]
    files = [vfs_open(lookup(root, path), os.O_RDONLY) for path in paths]
    assert gone.users_count == 1 and read_all(files[0]) == cat(root, f"{gone.name}/vcpu0/tsc-offset").encode()
    assert (cat(root, "mmu_cache_miss"), cat(root, "exits")) == ("42\n", "10\n")
    vmm.destroy_vm(gone.name)
    assert gone.users_count == 0 and host.vm_list == [kept] and gone.name not in root.children
    assert (cat(root, "mmu_cache_miss"), cat(root, "exits")) == ("2\n", "3\n")
    for file in files:
        assert errno_of(lambda: read_all(file)) == errno.EIO
        file.f_op.release(file)
    assert errno_of(lambda: vfs_open(files[0].dentry, os.O_RDONLY)) == errno.ENOENT


def test_open_fails_with_enoent_once_the_count_is_zero(make_vmm) -> None:
    vmm = make_vmm()
    host = vmm.host
    kvm = small_vm(vmm)
    dentry = lookup(host.debugfs_dir, f"{kvm.name}/exits")
    vmm.destroy_vm(kvm.name)
    assert errno_of(lambda: vfs_open(dentry, os.O_RDONLY)) == errno.ENOENT
    assert kvm.users_count == 0


def test_destroy_twice_or_unknown_is_refused(make_vmm) -> None:
    vmm = make_vmm()
    host = vmm.host
    kvm = small_vm(vmm)
    file = vfs_open(lookup(host.debugfs_dir, f"{kvm.name}/exits"), os.O_RDONLY)
    vmm.destroy_vm(kvm.name)
    with pytest.raises(LookupError, match="already destroyed"):
        vmm.destroy_vm(kvm.name)
    with pytest.raises(LookupError, match="no VM named"):
        vmm.destroy_vm("1-1")
    assert kvm.users_count == 1
    file.f_op.release(file)


def test_tdp_vm_has_no_rmaps_and_an_empty_mmu_rmaps_stat(make_vmm) -> None:
    vmm = make_vmm()
    host = vmm.host
    kvm = small_vm(vmm, mmu="tdp")
    assert all(slot.rmap is None for slot in kvm.arch.memslots)
    assert cat(host.debugfs_dir, f"{kvm.name}/mmu_rmaps_stat") == ""
