"""Kernel profiles from a host (`kvmdbgfs profile --from-host`), their file format, and the built-in LTS profiles.

The binary stats parsing and the file format are tested on bytes built here from the uapi layout, without
/dev/kvm; where this machine has a usable /dev/kvm and a mounted debugfs, the profile's tree is compared with the
kernel's own directory for a VM.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, Mount, assert_one_error_line, mount_env
from expected_files import per_vm_files
from mmu_testlib import new_vm

from kvmdbgfs.debugfs.dentry import dcache_readdir, lookup
from kvmdbgfs.from_host import read_stats_descriptors, release_version, profile_from_descriptors, rules_for
from kvmdbgfs.kvm.profile_file import ProfileError, dumps, loads, save_profile_file
from kvmdbgfs.kvm.profiles import get_profile

NAME_SIZE = 48
# KVM_STATS_TYPE_* | KVM_STATS_UNIT_* << 4 | KVM_STATS_BASE_* << 8
CUMULATIVE, INSTANT, PEAK, LOG_HIST = 0, 1, 2, 4
SECONDS, BOOLEAN = 2 << 4, 4 << 4
VM_DESCS = [("remote_tlb_flush", CUMULATIVE, 0, 1), ("mmu_unsync", INSTANT, 0, 1), ("max_mmu_rmap_size", PEAK, 0, 1),
            ("vendor_extra", CUMULATIVE, 0, 1)]
VCPU_DESCS = [("halt_poll_success_ns", CUMULATIVE | SECONDS, -9, 1), ("halt_wait_hist", LOG_HIST | SECONDS, -9, 32),
              ("blocking", INSTANT | BOOLEAN, 0, 1), ("exits", CUMULATIVE, 0, 1)]


def stats_image(stats_id: str, descs: list[tuple[str, int, int, int]]) -> bytes:
    """A binary stats file as KVM_GET_STATS_FD reads: header, id, descriptors (each followed by its name), data."""
    header_size, desc_size = 24, 16
    desc_offset = header_size + NAME_SIZE
    data_offset = desc_offset + len(descs) * (desc_size + NAME_SIZE)
    image = struct.pack("<IIIIII", 0, NAME_SIZE, len(descs), header_size, desc_offset, data_offset)
    image += stats_id.encode().ljust(NAME_SIZE, b"\0")
    offset = 0
    for name, flags, exponent, size in descs:
        image += struct.pack("<IhHII", flags, exponent, size, offset, 0) + name.encode().ljust(NAME_SIZE, b"\0")
        offset += 8 * size
    return image + bytes(offset)


def parse_image(tmp_path: Path, image: bytes):
    path = tmp_path / "stats"
    path.write_bytes(image)
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_stats_descriptors(fd)
    finally:
        os.close(fd)


def test_binary_stats_descriptors_parse_from_the_uapi_layout(tmp_path: Path) -> None:
    stats_id, descs = parse_image(tmp_path, stats_image("kvm-4242/vcpu-0", VCPU_DESCS))
    assert stats_id == "kvm-4242/vcpu-0"
    assert [(d.name, d.flags, d.exponent, d.size) for d in descs] == VCPU_DESCS
    assert [d.offset for d in descs] == [0, 8, 8 + 256, 8 + 256 + 8]
    assert [d.type.name for d in descs] == ["CUMULATIVE", "LOG_HIST", "INSTANT", "CUMULATIVE"]


@pytest.mark.parametrize("cut", [10, 24 + 48 + 30])
def test_a_truncated_stats_file_is_one_clear_error(tmp_path: Path, cut: int) -> None:
    with pytest.raises(ProfileError, match="stats file ends at byte"):
        parse_image(tmp_path, stats_image("kvm-1", VM_DESCS)[:cut])


def host_profile(tmp_path: Path, release: str = "6.6.30-test", tsc_scaling: bool = False):
    vm = parse_image(tmp_path, stats_image("kvm-1", VM_DESCS))[1]
    vcpu = parse_image(tmp_path, stats_image("kvm-1/vcpu-0", VCPU_DESCS))[1]
    return profile_from_descriptors(release, vm, vcpu, tsc_scaling)


def test_the_profile_file_round_trips_and_builds_that_tree(tmp_path: Path) -> None:
    profile = host_profile(tmp_path)
    assert (profile.name, profile.rules, profile.mmu_rmaps_stat, profile.vcpu_pid) == ("host-6.6.30-test", "v6.6",
                                                                                     True, True)
    assert loads(dumps(profile)) == profile
    path = tmp_path / "host.json"
    save_profile_file(profile, path)
    kvm = new_vm(kernel=str(path), vcpus=1)
    assert kvm.profile == get_profile(profile.name) and kvm.profile.rmap_design == "C"
    created = [name for name, *_ in VM_DESCS + VCPU_DESCS]
    root = kvm.host.debugfs_dir
    assert [n for n in dcache_readdir(root) if "-" not in n] == created[::-1]
    vm_dir = lookup(root, kvm.name)
    assert dcache_readdir(vm_dir) == ["vcpu0", "mmu_rmaps_stat", *created[::-1]]
    modes = {name: stat.S_IMODE(lookup(vm_dir, name).mode) for name in created}
    assert modes == {name: 0o444 if flags & 0xF == INSTANT else 0o644 for name, flags, *_ in VM_DESCS + VCPU_DESCS}
    # No TSC scaling on this host: the vCPU has no tsc-scaling-ratio files.
    assert dcache_readdir(lookup(vm_dir, "vcpu0")) == ["lapic_timer_advance_ns", "tsc-offset", "guest_mode", "pid"]


@pytest.mark.parametrize(
    ("release", "rules", "rmaps_stat", "pid"),
    [("5.14.0", "v5.14", False, False), ("5.16.2", "v5.15", True, False), ("6.0.19", "v5.15", True, True),
     ("6.1.148-android", "v6.1", True, True), ("6.5.1", "v6.4", True, True), ("6.11.0", "v6.6", True, True),
     ("6.12.67", "v6.12", True, True), ("6.18.44-fc", "latest", True, True)],
)
def test_the_release_decides_the_rules_and_the_arch_files(tmp_path, release, rules, rmaps_stat, pid) -> None:
    profile = host_profile(tmp_path, release)
    assert (profile.rules, profile.mmu_rmaps_stat, profile.vcpu_pid) == (rules, rmaps_stat, pid)


def test_kernels_without_binary_stats_or_a_version_are_refused() -> None:
    with pytest.raises(ProfileError, match="older than any profile"):
        rules_for(release_version("5.10.200"))
    with pytest.raises(ProfileError, match="no version number"):
        release_version("custom")


BAD_FILES = {
    "unknown key": ({"colour": 1}, "unknown keys ['colour']"),
    "bad type": ({"vm_stats": [{"name": "x", "type": "sum"}]}, "vm_stats[0]: type 'sum' is not one of"),
    "duplicate": ({"vcpu_stats": [{"name": "remote_tlb_flush", "type": "peak"}]}, "stats named twice"),
    "built-in name": ({"name": "v6.6"}, "name 'v6.6'"),
    "unknown rules": ({"rules": "v4.19"}, "rules 'v4.19': not a built-in profile"),
    "flag": ({"vcpu_pid": 1}, "vcpu_pid must be true or false"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_profile_file_is_one_clear_error(tmp_path: Path, case: str) -> None:
    change, message = BAD_FILES[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**json.loads(dumps(host_profile(tmp_path))), **change}))
    with pytest.raises(ValueError) as raised:
        get_profile(str(path))
    assert str(raised.value).startswith(f"kernel profile {path}: ") and message in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("name", ["v6.1", "v6.6", "v6.12"])
def test_the_long_term_profiles_have_their_kernels_tables(name: str) -> None:
    kvm = new_vm(kernel=name, vcpus=2)
    vm_dir = lookup(kvm.host.debugfs_dir, kvm.name)
    files = sorted(
        f"{entry}/{child}" if lookup(vm_dir, entry).is_dir else entry
        for entry in dcache_readdir(vm_dir)
        for child in (dcache_readdir(lookup(vm_dir, entry)) if lookup(vm_dir, entry).is_dir else [None])
    )
    assert files == per_vm_files("latest", 2)
    profile = get_profile(name)
    assert (profile.rmap_design, profile.counts_fastpath_exits) == {
        "v6.1": ("B", False), "v6.6": ("C", True), "v6.12": ("C", True)}[name]


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmdbgfs.cli", *args], cwd=REPO, env=mount_env(tmp_path),
                          capture_output=True, text=True, timeout=60)


def test_without_a_kvm_device_the_command_fails_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    result = cli(tmp_path, "profile", "--from-host", "--device", str(tmp_path / "kvm"), str(out))
    assert_one_error_line(result, 1, f"kvmdbgfs: error: cannot open {tmp_path / 'kvm'}: No such file or directory…")
    assert not out.exists()


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


def kvm_debugfs() -> Path | None:
    """Where this machine's debugfs shows kvm/, if it is mounted."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "debugfs" and (Path(fields[4]) / "kvm").is_dir():
            return Path(fields[4]) / "kvm"
    return None


def listing(directory: Path) -> list[tuple[str, int]]:
    """Names in readdir order (as ls -U shows them) and modes."""
    return [(name, stat.S_IMODE(os.stat(directory / name).st_mode)) for name in os.listdir(directory)]


@pytest.mark.skipif(not kvm_usable() or kvm_debugfs() is None, reason="needs /dev/kvm and a mounted debugfs")
def test_a_host_profile_lists_the_files_of_the_kernels_own_vm_directory(tmp_path: Path, mount_factory) -> None:
    out = tmp_path / "host.json"
    assert cli(tmp_path, "profile", "--from-host", str(out)).returncode == 0
    mount: Mount = mount_factory("--scenario", "empty", "--kernel", str(out))
    name = mount.create_vm("--vcpus", "1", "--memory", "256M")
    kvm = os.open("/dev/kvm", os.O_RDWR)
    vm = fcntl.ioctl(kvm, 0xAE01, 0)  # KVM_CREATE_VM
    try:
        fcntl.ioctl(vm, 0xAE60, 0)  # KVM_CREATE_IRQCHIP, as QEMU does: the vCPU gets an in-kernel LAPIC
        vcpu = fcntl.ioctl(vm, 0xAE41, 0)  # KVM_CREATE_VCPU
        real = kvm_debugfs() / f"{os.getpid()}-{vm}"
        assert listing(mount.path / name) == listing(real)
        assert listing(mount.path / name / "vcpu0") == listing(real / "vcpu0")
        top = [entry for entry in listing(mount.path) if (mount.path / entry[0]).is_file()]
        assert top == [entry for entry in listing(real.parent) if (real.parent / entry[0]).is_file()]
        os.close(vcpu)
    finally:
        os.close(vm)
        os.close(kvm)


def test_a_profile_file_serves_its_tree_through_a_mount(tmp_path: Path, mount_factory) -> None:
    path = tmp_path / "host.json"
    save_profile_file(host_profile(tmp_path, tsc_scaling=True), path)
    mount = mount_factory("--scenario", "empty", "--kernel", str(path))
    name = mount.create_vm("--vcpus", "1", "--memory", "256M")
    created = [stat_name for stat_name, *_ in VM_DESCS + VCPU_DESCS]
    assert os.listdir(mount.path / name) == ["vcpu0", "mmu_rmaps_stat", *created[::-1]]
    assert (mount.path / name / "vcpu0" / "tsc-scaling-ratio").exists()
    assert json.loads(mount.cli("vm", "list", "--json").stdout)[0]["kernel"] == "host-6.6.30-test"
    assert mount.sh(f"cat {name}/vendor_extra {name}/exits") == "0\n0\n"  # not modelled: reads 0
