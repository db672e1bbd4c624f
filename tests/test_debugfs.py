"""The in-memory debugfs layer, without a mount."""

from __future__ import annotations

import errno

import pytest

from kvmdbgfs.debugfs import create_dir, create_file, lookup, remove_recursive, simple_attribute_fops, single_open_fops
from kvmdbgfs.debugfs.dentry import new_root
from kvmdbgfs.debugfs.file import vfs_open
from kvmdbgfs.debugfs.simple_attr import format_u64, kstrtoull


class Counter:
    def __init__(self) -> None:
        self.value = 7
        self.reads = 0

    def get(self) -> int:
        self.reads += 1
        return self.value


def counter_fops(writable: bool = True):
    def set_(data: Counter, value: int) -> None:
        data.value = value

    return simple_attribute_fops(lambda data: data.get(), set_ if writable else None, "%llu\n")


def errno_of(call) -> int:
    with pytest.raises(OSError) as info:
        call()
    return info.value.errno


def test_create_lookup_and_remove_recursive() -> None:
    root = new_root()
    vm = create_dir("1-10", root)
    create_file("exits", 0o644, vm, Counter(), counter_fops())
    sub = create_dir("vcpu0", vm)
    create_file("pid", 0o444, sub, Counter(), counter_fops(False))
    assert lookup(root, "/1-10/vcpu0/pid").mode == 0o100444
    assert lookup(root, "/1-10").is_dir
    assert errno_of(lambda: lookup(root, "/1-10/nope")) == errno.ENOENT
    assert errno_of(lambda: lookup(root, "/1-10/exits/x")) == errno.ENOTDIR
    assert errno_of(lambda: create_dir("1-10", root)) == errno.EEXIST
    pid = lookup(root, "/1-10/vcpu0/pid")
    remove_recursive(vm)
    assert root.children == {}
    assert pid.removed
    assert errno_of(lambda: vfs_open(pid, 0)) == errno.ENOENT


def test_link_counts_follow_subdirectories_as_debugfs_keeps_them() -> None:
    """A directory has 2 links plus one per subdirectory (created or removed); a file has 1."""
    root = new_root()
    vm = create_dir("1-2", root)
    stat_file = create_file("exits", 0o444, vm, Counter(), counter_fops(False))
    vcpus = [create_dir(f"vcpu{i}", vm) for i in range(3)]
    assert (root.nlink, vm.nlink, vcpus[0].nlink, stat_file.nlink) == (3, 5, 2, 1)
    remove_recursive(vcpus[1])
    assert vm.nlink == 4
    remove_recursive(vm)
    assert root.nlink == 2


def test_simple_attr_generates_at_offset_zero_and_keeps_the_text() -> None:
    root = new_root()
    data = Counter()
    file = vfs_open(create_file("x", 0o644, root, data, counter_fops()), 0)
    fops = file.dentry.fops
    assert fops.read(file, 1, 0) == b"7"
    data.value = 12345
    # The rest of this open reads the text generated at offset 0.
    assert fops.read(file, 10, 1) == b"\n"
    assert fops.read(file, 10, 2) == b""
    assert data.reads == 1
    # A new read from 0 regenerates.
    assert fops.read(file, 100, 0) == b"12345\n"


def test_simple_attr_read_past_zero_first_is_empty() -> None:
    root = new_root()
    file = vfs_open(create_file("x", 0o644, root, Counter(), counter_fops()), 0)
    assert file.dentry.fops.read(file, 10, 3) == b""


def test_simple_attr_write_paths() -> None:
    root = new_root()
    data = Counter()
    file = vfs_open(create_file("x", 0o644, root, data, counter_fops()), 1)
    assert file.dentry.fops.write(file, b"0\n", 0) == 2
    assert data.value == 0
    readonly = vfs_open(create_file("y", 0o444, root, Counter(), counter_fops(False)), 1)
    assert errno_of(lambda: readonly.dentry.fops.write(readonly, b"0\n", 0)) == errno.EACCES


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"0", 0), (b"0\n", 0), (b"+0", 0), (b"00", 0), (b"0x0", 0), (b"12\n", 12), (b"0x1f", 31), (b"017", 15),
        (b"0\x00junk", 0),  # a C string: the NUL ends it
        (b"18446744073709551615", (1 << 64) - 1),
    ],
)
def test_kstrtoull_accepts(text: bytes, value: int) -> None:
    assert kstrtoull(text) == value


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (b"", errno.EINVAL),
        (b"\n", errno.EINVAL),
        (b" 0", errno.EINVAL),
        (b"0 ", errno.EINVAL),
        (b"-0", errno.EINVAL),
        (b"0\n\n", errno.EINVAL),
        (b"abc", errno.EINVAL),
        (b"08", errno.EINVAL),
        (b"0x", errno.EINVAL),
        (b"0xg", errno.EINVAL),
        (b"0x0x0", errno.EINVAL),  # the base prefix is taken once
        (b"00o0", errno.EINVAL),
        (b"++0", errno.EINVAL),
        (b"+", errno.EINVAL),
        (b"\x00", errno.EINVAL),
        (b"18446744073709551616", errno.ERANGE),
        (b"99999999999999999999x", errno.ERANGE),  # overflow is reported before what follows the digits
    ],
)
def test_kstrtoull_rejects(text: bytes, code: int) -> None:
    assert errno_of(lambda: kstrtoull(text)) == code


def test_format_u64_signed_and_unsigned() -> None:
    assert format_u64("%lld\n", -5) == "-5\n"
    assert format_u64("%llu\n", -1) == "18446744073709551615\n"
    assert format_u64("%llu\n", 42) == "42\n"


def test_single_open_snapshot_and_regeneration() -> None:
    root = new_root()
    state = {"n": 0}

    def show(data: dict) -> str:
        data["n"] += 1
        return f"line {data['n']}\n" * 3

    file = vfs_open(create_file("s", 0o644, root, state, single_open_fops(show)), 0)
    fops = file.dentry.fops
    first = fops.read(file, 5, 0)
    rest = fops.read(file, 100, 5)
    assert first + rest == b"line 1\n" * 3
    assert fops.read(file, 100, 0) == b"line 2\n" * 3
    assert errno_of(lambda: fops.write(file, b"0", 0)) == errno.EINVAL


def test_directories_cannot_be_opened_as_files() -> None:
    root = new_root()
    vm = create_dir("vm", root)
    assert errno_of(lambda: vfs_open(vm, 0)) == errno.EISDIR
