"""The bad-input matrix against a real mount: every refused operation gives the kernel's errno and changes nothing.

One mount serves the whole module: two small VMs from a scenario file (a
shadow-MMU VM with two vCPUs and a TDP-MMU VM with one). A snapshot holds
everything an outside observer can see: every path with its metadata, the
content of every file, and the server's view (`vm.list` with each VM's
``users_count``, and its count of open files). Nothing in the tree changes
on its own (no workload runs, every stat reads 0), so each test compares the
snapshot after its operation with the one before it: the module keeps the
last verified snapshot as the next test's "before" (one snapshot per test;
a mismatch replaces it, so one failure does not cascade).

Paths in the tables use ``{vm}`` for the shadow VM's directory and ``{tdp}``
for the TDP VM's.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Callable, Iterator

import pytest
from conftest import Mount, wait_until
from expected_files import per_vm_files
from inprocess import write
from conftest import mount_with_scenario

from kvmdbgfs.control.client import request

SCENARIO = """\
seed = 3
[[vm]]
memory = "256M"
vcpus = 2
mmu = "shadow"
seed = 1
[[vm]]
memory = "256M"
vcpus = 1
mmu = "tdp"
seed = 2
"""

U64_MAX = (1 << 64) - 1
CHUNK = 1 << 16


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mount_with_scenario(tmp_path_factory, SCENARIO) as running:
        yield running


@pytest.fixture(scope="module")
def vms(mount: Mount) -> dict[str, str]:
    """The directory names of the two VMs, by the placeholder the tables use."""
    listed = request(mount.control, "vm.list")
    by_mmu = {vm["mmu"]: vm["name"] for vm in listed}
    assert sorted(by_mmu) == ["shadow", "tdp"], listed
    return {"vm": by_mmu["shadow"], "tdp": by_mmu["tdp"]}


@pytest.fixture
def at(mount: Mount, vms: dict[str, str]) -> Callable[[str], str]:
    """``at("{vm}/exits")``: the absolute path of a table entry."""
    return lambda relative: os.path.join(mount.path, relative.format(**vms))


def read_file(path: str) -> bytes:
    """open, read to the end, close (os-level: no extra fstat round trip through FUSE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = []
        while chunk := os.read(fd, CHUNK):
            parts.append(chunk)
            if len(chunk) < CHUNK:
                break
        return b"".join(parts)
    finally:
        os.close(fd)


def settled_server_view(mount: Mount) -> dict:
    """The server's view once every close has been processed (FUSE sends RELEASE asynchronously)."""
    wait_until(lambda: request(mount.control, "status")["open_files"] == 0)
    return {"open_files": request(mount.control, "status")["open_files"], "vms": request(mount.control, "vm.list")}


def describe_path(path: str) -> tuple:
    """A path's metadata and, for a file, its content."""
    info = os.lstat(path)
    seen = (stat.filemode(info.st_mode), info.st_nlink, info.st_uid, info.st_gid, info.st_size)
    seen += (info.st_mtime_ns, info.st_ctime_ns)
    return seen + (read_file(path),) if stat.S_ISREG(info.st_mode) else seen


def snapshot(mount: Mount) -> dict:
    """Everything an outside observer can see of the mount, as one comparable value."""
    root = str(mount.path)
    tree = {".": describe_path(root)}
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(subdirs + files):
            path = os.path.join(directory, name)
            tree[os.path.relpath(path, root)] = describe_path(path)
    return {"tree": tree, **settled_server_view(mount)}


def describe_change(before: dict, after: dict) -> str:
    old, new = before["tree"], after["tree"]
    lines = [f"appeared: {sorted(set(new) - set(old))}", f"vanished: {sorted(set(old) - set(new))}"]
    for path in sorted(set(old) & set(new)):
        if old[path] != new[path]:
            lines.append(f"changed {path}: {old[path]} -> {new[path]}")
    lines += [f"{key}: {before[key]} -> {after[key]}" for key in ("open_files", "vms") if before[key] != after[key]]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def baseline(mount: Mount) -> dict:
    """The last verified snapshot, shared by the module's tests."""
    return {"snapshot": snapshot(mount)}


@pytest.fixture
def unchanged(mount: Mount, baseline: dict) -> Callable[[], None]:
    """Call after the operation: the mount must look exactly as before it."""

    def check() -> None:
        before, after = baseline["snapshot"], snapshot(mount)
        if after != before:
            baseline["snapshot"] = after
            pytest.fail("the mount changed:\n" + describe_change(before, after))

    return check


def expect_errno(operation: Callable[[], object], expected: int) -> None:
    with pytest.raises(OSError) as info:
        operation()
    assert errno.errorcode.get(info.value.errno) == errno.errorcode[expected], info.value


def write_once(path: str, data: bytes) -> int:
    """open(O_WRONLY), one write(), close."""
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def ftruncate(path: str, length: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, length)
    finally:
        os.close(fd)


def bash(mount: Mount, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=mount.path, capture_output=True, text=True, timeout=30)


def test_the_tree_is_the_profiles(mount: Mount, vms: dict[str, str], baseline: dict) -> None:
    """The snapshot covers what the tables name: the latest profile's per-VM files, every stat reading 0."""
    tree = baseline["snapshot"]["tree"]
    files = {path: entry[-1] for path, entry in tree.items() if entry[0].startswith("-")}
    for placeholder, vcpus in (("vm", 2), ("tdp", 1)):
        prefix = vms[placeholder] + "/"
        in_vm = sorted(path.removeprefix(prefix) for path in files if path.startswith(prefix))
        assert in_vm == per_vm_files("latest", vcpus)
    top_level = [path for path in files if "/" not in path]
    assert len(top_level) > 50 and all(files[path] == b"0\n" for path in top_level)
    assert [vm["users_count"] for vm in baseline["snapshot"]["vms"]] == [1, 1]


# Everything that would change the tree's shape or its metadata: (operation on `at`, errno).
TREE_CHANGES = {
    "mkdir-top": (lambda at: os.mkdir(at("newdir")), errno.EPERM),
    "mkdir-in-vm": (lambda at: os.mkdir(at("{vm}/vcpu2")), errno.EPERM),
    "mkdir-in-vcpu": (lambda at: os.mkdir(at("{tdp}/vcpu0/newdir")), errno.EPERM),
    "rmdir-vm": (lambda at: os.rmdir(at("{vm}")), errno.EPERM),
    "rmdir-vcpu": (lambda at: os.rmdir(at("{vm}/vcpu1")), errno.EPERM),
    "unlink-top-file": (lambda at: os.unlink(at("exits")), errno.EPERM),
    "unlink-vm-file": (lambda at: os.unlink(at("{vm}/exits")), errno.EPERM),
    "unlink-vcpu-file": (lambda at: os.unlink(at("{vm}/vcpu0/tsc-offset")), errno.EPERM),
    "unlink-rmaps-stat": (lambda at: os.unlink(at("{tdp}/mmu_rmaps_stat")), errno.EPERM),
    "rename-file": (lambda at: os.rename(at("exits"), at("exits2")), errno.EPERM),
    "rename-file-over-file": (lambda at: os.rename(at("exits"), at("io_exits")), errno.EPERM),
    "rename-file-across-vms": (lambda at: os.rename(at("{vm}/exits"), at("{tdp}/exits2")), errno.EPERM),
    "rename-vm-dir": (lambda at: os.rename(at("{vm}"), at("1-10")), errno.EPERM),
    "rename-vcpu-dir": (lambda at: os.rename(at("{vm}/vcpu1"), at("{vm}/vcpu2")), errno.EPERM),
    "link": (lambda at: os.link(at("exits"), at("exits2")), errno.EPERM),
    "link-into-vcpu": (lambda at: os.link(at("{vm}/exits"), at("{vm}/vcpu0/exits")), errno.EPERM),
    "symlink-top": (lambda at: os.symlink("exits", at("exits2")), errno.EPERM),
    "symlink-in-vm": (lambda at: os.symlink("exits", at("{vm}/exits2")), errno.EPERM),
    "mknod-fifo": (lambda at: os.mknod(at("fifo"), stat.S_IFIFO | 0o600), errno.EPERM),
    "mknod-char": (lambda at: os.mknod(at("{vm}/null"), stat.S_IFCHR | 0o600, os.makedev(1, 3)), errno.EPERM),
    # mknod(S_IFREG) is vfs_create(): a directory without ->create gives EACCES, as on debugfs.
    "mknod-regular": (lambda at: os.mknod(at("regular"), stat.S_IFREG | 0o600), errno.EACCES),
    "chmod-file": (lambda at: os.chmod(at("exits"), 0o600), errno.EPERM),
    "chmod-read-only-file": (lambda at: os.chmod(at("{vm}/pages_4k"), 0o644), errno.EPERM),
    "chmod-dir": (lambda at: os.chmod(at("{vm}"), 0o700), errno.EPERM),
    "chown-file": (lambda at: os.chown(at("{vm}/exits"), 1, 1), errno.EPERM),
    "chown-dir": (lambda at: os.chown(at("{vm}/vcpu0"), 1, 1), errno.EPERM),
    "utime": (lambda at: os.utime(at("{vm}/exits"), ns=(10**9, 10**9)), errno.EPERM),
    "utime-now": (lambda at: os.utime(at("exits")), errno.EPERM),
    "truncate-top": (lambda at: os.truncate(at("exits"), 1), errno.EPERM),
    "truncate-vm": (lambda at: os.truncate(at("{vm}/exits"), 4096), errno.EPERM),
    "truncate-vcpu-file": (lambda at: os.truncate(at("{vm}/vcpu0/pid"), 1), errno.EPERM),
    "ftruncate-top": (lambda at: ftruncate(at("exits"), 1), errno.EPERM),
    "ftruncate-rmaps-stat": (lambda at: ftruncate(at("{vm}/mmu_rmaps_stat"), 2), errno.EPERM),
    # A new name: vfs_create() without ->create gives EACCES.
    "create-top": (lambda at: os.open(at("newfile"), os.O_CREAT | os.O_WRONLY, 0o644), errno.EACCES),
    "create-in-vm": (lambda at: os.open(at("{vm}/newfile"), os.O_CREAT | os.O_WRONLY, 0o644), errno.EACCES),
    "create-in-vcpu": (lambda at: os.open(at("{vm}/vcpu0/new"), os.O_CREAT | os.O_RDWR | os.O_TRUNC), errno.EACCES),
    "create-exclusive": (lambda at: os.open(at("{tdp}/new"), os.O_CREAT | os.O_EXCL | os.O_WRONLY), errno.EACCES),
}


@pytest.mark.parametrize("operation, expected", TREE_CHANGES.values(), ids=TREE_CHANGES.keys())
def test_tree_change_is_refused(at, unchanged, operation, expected: int) -> None:
    expect_errno(lambda: operation(at), expected)
    unchanged()


XATTR_CHANGES = {
    "setxattr-file": (lambda path: os.setxattr(path, "user.note", b"x"), "exits"),
    "setxattr-dir": (lambda path: os.setxattr(path, "user.note", b"x", os.XATTR_CREATE), "{vm}"),
    "removexattr": (lambda path: os.removexattr(path, "user.note"), "{vm}/exits"),
}


@pytest.mark.parametrize("operation, target", XATTR_CHANGES.values(), ids=XATTR_CHANGES.keys())
def test_xattr_change_is_refused(at, unchanged, operation, target: str) -> None:
    """EPERM; and debugfs still has no extended attributes (ENODATA), none listed."""
    expect_errno(lambda: operation(at(target)), errno.EPERM)
    expect_errno(lambda: os.getxattr(at(target), "user.note"), errno.ENODATA)
    assert os.listxattr(at(target)) == []
    unchanged()


BAD_VALUES = {
    "nonzero": (b"1", errno.EINVAL),
    "nonzero-newline": (b"7\n", errno.EINVAL),
    "u64-max": (str(U64_MAX).encode(), errno.EINVAL),
    "garbage": (b"abc", errno.EINVAL),
    "zero-then-garbage": (b"0abc", errno.EINVAL),
    "leading-space": (b" 0", errno.EINVAL),
    "two-newlines": (b"0\n\n", errno.EINVAL),
    "minus-one": (b"-1", errno.EINVAL),
    "bad-hex": (b"0x", errno.EINVAL),
    "prefix-twice": (b"0x0x0", errno.EINVAL),
    "octal-letter": (b"00o0", errno.EINVAL),
    "overflow": (str(U64_MAX + 1).encode(), errno.ERANGE),
    "overflow-hex": (b"0x1" + b"0" * 16, errno.ERANGE),
}


@pytest.mark.parametrize("value, expected", BAD_VALUES.values(), ids=BAD_VALUES.keys())
@pytest.mark.parametrize("target", ["exits", "{vm}/remote_tlb_flush"])
def test_bad_write_to_clearable_stat(at, unchanged, target: str, value: bytes, expected: int) -> None:
    """kstrtoull() refuses the text (EINVAL/ERANGE) or the clear callback refuses non-zero (EINVAL)."""
    expect_errno(lambda: write_once(at(target), value), expected)
    unchanged()


OTHER_CLEARABLE = ["remote_tlb_flush", "max_mmu_rmap_size", "halt_poll_fail_hist", "{vm}/exits", "{tdp}/halt_wait_ns"]


@pytest.mark.parametrize("target", OTHER_CLEARABLE)
def test_nonzero_write_to_other_clearable_stats(at, unchanged, target: str) -> None:
    """VM stats, peak stats, histograms, vCPU sums: 0644 and clear-only, top level and per VM."""
    expect_errno(lambda: write_once(at(target), b"2\n"), errno.EINVAL)
    unchanged()


ZERO_WRITES = [
    ("exits", b"0"),
    ("{vm}/exits", b"0\n"),
    ("{tdp}/remote_tlb_flush", b"+0"),
    ("pf_fixed", b"00"),
    ("{vm}/max_mmu_rmap_size", b"0X0\n"),
    ("halt_exits", b"0\x00junk"),
]


@pytest.mark.parametrize("target, value", ZERO_WRITES)
def test_zero_clears(at, unchanged, target: str, value: bytes) -> None:
    """Every spelling of 0 that kstrtoull(base 0) takes clears; the write reports every byte."""
    assert write_once(at(target), value) == len(value)
    assert read_file(at(target)) == b"0\n"
    unchanged()


@pytest.mark.parametrize("target", ["exits", "{vm}/remote_tlb_flush"])
def test_empty_write_changes_nothing(at, unchanged, target: str) -> None:
    """The kernel's FUSE client answers a 0-byte write itself (0) without asking the server.

    On debugfs write(fd, "", 0) reaches simple_attr_write and fails with
    EINVAL (test_empty_write_is_einval_in_process); through FUSE it cannot.
    """
    assert write_once(at(target), b"") == 0
    unchanged()


def test_empty_write_is_einval_in_process() -> None:
    """What the debugfs layer answers when an empty write does reach it."""
    from kvmdbgfs.vmm.vmm import Vmm

    vmm = Vmm()
    try:
        name = vmm.create_vm(vmm.host.make_config(memory="64M", vcpus=1)).name
        for path in ("/exits", f"/{name}/exits"):
            expect_errno(lambda: write(vmm.host.debugfs_dir, path, b""), errno.EINVAL)
    finally:
        vmm.shutdown()


READ_ONLY = ["pages_4k", "guest_mode", "{vm}/pages_4k", "{tdp}/mmu_unsync", "{vm}/vcpu0/tsc-offset", "{vm}/vcpu1/pid"]


@pytest.mark.parametrize("target", READ_ONLY)
def test_write_to_read_only_file_is_eacces(at, unchanged, target: str) -> None:
    """A 0444 attribute has no set callback: EACCES (root passes the open itself)."""
    expect_errno(lambda: write_once(at(target), b"0"), errno.EACCES)
    unchanged()


@pytest.mark.parametrize("value", [b"1", b"junk", b"-1"])
def test_write_of_anything_to_read_only_file_is_eacces(at, unchanged, value: bytes) -> None:
    """The missing set callback is checked before the text is parsed."""
    expect_errno(lambda: write_once(at("{tdp}/vcpu0/tsc-scaling-ratio"), value), errno.EACCES)
    unchanged()


RMAPS_STAT_WRITES = [("{vm}/mmu_rmaps_stat", b"0"), ("{tdp}/mmu_rmaps_stat", b"0\n"), ("{vm}/mmu_rmaps_stat", b"x")]


@pytest.mark.parametrize("target, value", RMAPS_STAT_WRITES)
def test_write_to_mmu_rmaps_stat_is_einval(at, unchanged, target: str, value: bytes) -> None:
    """0644 but single_open without a write method: vfs_write's EINVAL."""
    expect_errno(lambda: write_once(at(target), value), errno.EINVAL)
    unchanged()


@pytest.mark.parametrize("target", ["exits", "{vm}/remote_tlb_flush", "{tdp}/halt_poll_fail_hist"])
def test_shell_echo_zero_and_truncate(mount: Mount, vms: dict[str, str], unchanged, target: str) -> None:
    """`echo 0 >` opens with O_TRUNC (truncate to 0 is a no-op) then writes; `truncate -s 0` succeeds."""
    relative = target.format(**vms)
    result = bash(mount, f"echo 0 > {relative} && truncate -s 0 {relative} && cat {relative}")
    assert (result.returncode, result.stdout, result.stderr) == (0, "0\n", "")
    os.truncate(os.path.join(mount.path, relative), 0)
    unchanged()


SHELL_REFUSALS = {
    "nonzero": ("echo 1 > {vm}/exits", "Invalid argument"),
    "read-only": ("echo 0 > {vm}/pages_4k", "Permission denied"),
    "vcpu-file": ("echo 0 > {vm}/vcpu0/tsc-offset", "Permission denied"),
    "rmaps-stat": ("echo 0 > {vm}/mmu_rmaps_stat", "Invalid argument"),
    "overflow": (f"echo {U64_MAX + 1} > exits", "Numerical result out of range"),
    "truncate-nonzero": ("truncate -s 1 exits", "Operation not permitted"),
    "new-file": ("echo 0 > {vm}/new", "Permission denied"),
    "mkdir": ("mkdir {vm}/vcpu9", "Operation not permitted"),
    "rm-rf": ("rm -rf {vm}", "Operation not permitted"),
    "touch": ("touch exits", "Operation not permitted"),
}


@pytest.mark.parametrize("script, message", SHELL_REFUSALS.values(), ids=SHELL_REFUSALS.keys())
def test_shell_refusal(mount: Mount, vms: dict[str, str], unchanged, script: str, message: str) -> None:
    """The same refusals as a shell user meets them: exit status 1 and the errno's text."""
    result = bash(mount, script.format(**vms))
    assert result.returncode == 1 and message in result.stderr, result
    unchanged()


def read_fd(path: str, flags: int = os.O_RDONLY) -> bytes:
    """open(2) and read(2): unlike Python's open(), nothing refuses a directory before the kernel does."""
    fd = os.open(path, flags)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


LOOKUP_ERRORS = {
    "read-vm-dir": (lambda at: read_fd(at("{vm}")), errno.EISDIR),
    "read-vcpu-dir": (lambda at: read_fd(at("{tdp}/vcpu0")), errno.EISDIR),
    "read-root": (lambda at: read_fd(at("")), errno.EISDIR),
    "open-dir-for-write": (lambda at: write_once(at("{vm}"), b"0"), errno.EISDIR),
    "missing-top": (lambda at: read_fd(at("no_such_stat")), errno.ENOENT),
    "missing-in-vm": (lambda at: read_fd(at("{vm}/no_such_stat")), errno.ENOENT),
    "missing-vcpu": (lambda at: read_fd(at("{tdp}/vcpu1/pid")), errno.ENOENT),
    "missing-vm": (lambda at: read_fd(at("1-10/exits")), errno.ENOENT),
    "missing-write": (lambda at: write_once(at("{vm}/no_such_stat"), b"0"), errno.ENOENT),
    "missing-stat": (lambda at: os.stat(at("{vm}/vcpu7")), errno.ENOENT),
    "missing-listdir": (lambda at: os.listdir(at("{vm}/vcpu7")), errno.ENOENT),
    "file-as-dir": (lambda at: os.stat(at("exits/x")), errno.ENOTDIR),
    "listdir-file": (lambda at: os.listdir(at("{vm}/exits")), errno.ENOTDIR),
}


@pytest.mark.parametrize("operation, expected", LOOKUP_ERRORS.values(), ids=LOOKUP_ERRORS.keys())
def test_lookup_error(at, unchanged, operation, expected: int) -> None:
    expect_errno(lambda: operation(at), expected)
    unchanged()
