"""VM lifetime through a real mount (reference §4.1): open stat files pin a destroyed VM; open vCPU files
do not, and read EIO once their directory went with the VM."""

from __future__ import annotations

import errno
import json
import os
import threading

import subprocess

import pytest
from conftest import Mount, wait_until

STAT_FILES = ("exits", "max_mmu_rmap_size", "mmu_rmaps_stat")
VCPU_FILES = ("vcpu0/tsc-offset", "vcpu1/pid", "vcpu0/lapic_timer_advance_ns")


@pytest.fixture
def mount(empty_mount: Mount) -> Mount:
    return empty_mount


def test_read_after_destroy(mount: Mount) -> None:
    name = mount.create_vm("--memory", "256M")
    expected = {path: (mount.path / name / path).read_bytes() for path in STAT_FILES}
    handles = {path: open(mount.path / name / path, "rb", buffering=0) for path in STAT_FILES}
    # One handle has read its first bytes before the destroy, the others nothing yet.
    first = handles["mmu_rmaps_stat"].read(5)
    mount.destroy_vm(name)
    try:
        assert first + handles["mmu_rmaps_stat"].read() == expected["mmu_rmaps_stat"]
        for path in STAT_FILES[:2]:
            assert handles[path].read() == expected[path], path
    finally:
        for handle in handles.values():
            handle.close()


def test_new_open_of_a_destroyed_but_pinned_vm(mount: Mount) -> None:
    name = mount.create_vm("--memory", "256M")
    expected = (mount.path / name / "vcpu0" / "tsc-offset").read_bytes()
    with open(mount.path / name / "exits", "rb", buffering=0):
        mount.destroy_vm(name)
        assert name in os.listdir(mount.path)
        assert (mount.path / name / "vcpu0" / "tsc-offset").read_bytes() == expected
        assert mount.sh(f"cat {name}/pages_4k") == "0\n"
        listed = {vm["name"]: vm for vm in json.loads(mount.cli("vm", "list", "--json").stdout)}
        assert listed[name]["destroyed"] is True and listed[name]["users_count"] == 1


def test_directory_gone_after_the_last_close(mount: Mount) -> None:
    name = mount.create_vm("--memory", "256M")
    first = open(mount.path / name / "exits", "rb", buffering=0)
    second = open(mount.path / name / "mmu_rmaps_stat", "rb", buffering=0)
    mount.destroy_vm(name)
    first.close()
    assert os.path.isdir(mount.path / name)
    assert second.read(4) == b"Rmap"
    second.close()
    # Gone as soon as the server has the release, and no entry or attribute
    # caching keeps it: stat, ls and open all agree at once.
    assert wait_until(lambda: not os.path.exists(mount.path / name))
    assert name not in os.listdir(mount.path)
    with pytest.raises(FileNotFoundError):
        open(mount.path / name / "exits", "rb")
    assert wait_until(lambda: mount.cli("vm", "list", "--json").stdout.strip() == "[]")


def test_open_racing_destroy(mount: Mount) -> None:
    """Openers racing a destroy either read a whole file or get ENOENT; nothing else."""
    for round_ in range(5):
        name = mount.create_vm("--memory", "128M", "--vcpus", "1")
        path = mount.path / name / "mmu_rmaps_stat"
        expected = path.read_bytes()
        outcomes: list[object] = []
        start = threading.Event()

        def opener() -> None:
            start.wait()
            for _ in range(40):
                try:
                    with open(path, "rb", buffering=0) as handle:
                        outcomes.append(handle.read())
                except OSError as exc:
                    outcomes.append(exc.errno)

        threads = [threading.Thread(target=opener) for _ in range(4)]
        for thread in threads:
            thread.start()
        start.set()
        mount.destroy_vm(name)
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        assert set(outcomes) <= {expected, errno.ENOENT}, (round_, set(outcomes) - {expected, errno.ENOENT})
        assert wait_until(lambda: not os.path.exists(mount.path / name))
    assert wait_until(lambda: mount.cli("vm", "list", "--json").stdout.strip() == "[]")


def test_open_vcpu_files_do_not_keep_a_destroyed_vm(mount: Mount) -> None:
    """The vCPU files take no VM reference: the VM and its directory go at the destroy (the sums: see
    test_host.py); a read on a vCPU file still open then fails with EIO (cat says so), its close succeeds."""
    name = mount.create_vm("--memory", "256M", "--vcpus", "2")
    keep = mount.create_vm("--memory", "128M", "--vcpus", "1")
    handles = {path: open(mount.path / name / path, "rb", buffering=0) for path in VCPU_FILES}
    assert handles["vcpu0/tsc-offset"].read(2)  # read one before the destroy, the others not
    mount.destroy_vm(name)
    try:
        assert wait_until(lambda: not os.path.exists(mount.path / name))
        assert name not in os.listdir(mount.path)
        listed = [vm["name"] for vm in json.loads(mount.cli("vm", "list", "--json").stdout)]
        assert listed == [keep]
        for path, handle in handles.items():
            assert os.fstat(handle.fileno()).st_nlink == 0, path  # the inode outlives its dentry
            with pytest.raises(OSError) as raised:
                handle.read()
            assert raised.value.errno == errno.EIO, path
        cat = subprocess.run(["cat"], stdin=handles["vcpu1/pid"], capture_output=True, text=True, timeout=60)
        assert cat.returncode == 1 and cat.stderr.strip().endswith("Input/output error")
    finally:
        for handle in handles.values():
            handle.close()
    with pytest.raises(FileNotFoundError):
        open(mount.path / name / "vcpu0" / "tsc-offset", "rb")
