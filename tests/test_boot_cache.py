"""Boot snapshots (kvmdbgfs/vmm/bootcache.py): a restored boot gives the bytes and the behaviour of an emulated
one; a changed key misses; a bad entry is a warning and a miss, never trusted."""

from __future__ import annotations

import gc
import io
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

import pytest
from conftest import REPO, mount_env, wait_until
from inprocess import cat, walk_files

from kvmdbgfs.scenario import Scenario, build_host
from kvmdbgfs.vmm import bootcache
from kvmdbgfs.vmm.bootcache import BootCache
from kvmdbgfs.vmm.qemu import QemuProcess
from kvmdbgfs.vmm.vmm import Vmm
from kvmdbgfs.workloads import get_workload, run_workload

BOOT = get_workload("idle").settings({"uptime": 20, "workers": 3, "logins": 1})  # every key, as a job has them
VM = {"memory": "256M", "vcpus": 2, "seed": 5, "workload": "idle", "settings": BOOT}


def tree(vmm: Vmm) -> dict[str, str]:
    """Every file of the host's tree, the VM directory's name left out (pids differ between hosts)."""
    root = vmm.host.debugfs_dir
    files = {}
    for path in walk_files(root):
        first, _, rest = path.partition("/")
        files[rest if "-" in first else path] = cat(root, path)
    return files


def run_host(host_seed: int, cache: BootCache | None) -> tuple[dict[str, str], dict[str, str]]:
    """Boot the scenario's VM, then run rmap_fork on it: the tree after each."""
    vmm, boot = build_host(Scenario(seed=host_seed, vms=[VM], clock="manual"), "latest", None, boot_cache=cache)
    try:
        assert boot.wait(300) and boot.error is None
        booted = tree(vmm)
        run_workload(next(iter(vmm.vms.values())), "rmap_fork", {"children": 50})
        return booted, tree(vmm)
    finally:
        vmm.shutdown()


@pytest.fixture(scope="module")
def cold() -> tuple[dict[str, str], dict[str, str]]:
    """The reference: host seed 2 (other pids, fds and TSC offsets than the host that fills the cache)."""
    return run_host(2, None)


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[dict[str, str], dict[str, str]]]:
    """A cache that host seed 1 filled with the VM's boot, and what that host's tree was."""
    directory = tmp_path_factory.mktemp("filled") / "cache"
    return directory, run_host(1, BootCache(directory))


@pytest.fixture
def cache(tmp_path: Path, filled) -> BootCache:
    """A copy of the filled cache, the test's to change."""
    shutil.copytree(filled[0], tmp_path / "cache")
    return BootCache(tmp_path / "cache")


@pytest.fixture
def fresh_vm() -> QemuProcess:
    """A fresh VM with the scenario's configuration, on a host of its own."""
    vmm = Vmm(seed=3)
    config = vmm.host.make_config(memory=VM["memory"], vcpus=VM["vcpus"], seed=VM["seed"])
    yield vmm.create_vm(config)
    vmm.shutdown()


def test_a_restored_boot_gives_the_same_bytes_and_the_same_behaviour(cache: BootCache, filled, cold) -> None:
    assert len(cache.entries()) == 1
    assert run_host(2, cache) == cold
    assert filled[1][0].keys() == cold[0].keys() and filled[1][0]["exits"] == cold[0]["exits"]


def test_a_boot_saved_and_restored_in_many_pieces_is_the_same(tmp_path: Path, cold, monkeypatch) -> None:
    """The payload is deflated, inflated and unpickled RESTORE_CHUNK bytes per call (each call holds the
    interpreter lock): with pieces of 4 KiB the restored host is the same."""
    monkeypatch.setattr(bootcache, "RESTORE_CHUNK", 4096)
    cache = BootCache(tmp_path / "cache")
    run_host(1, cache)
    assert cache.restored == 0 and len(cache.entries()) == 1
    assert run_host(2, cache) == cold and cache.restored == 1


def test_a_boot_ends_before_its_snapshot_is_written(tmp_path: Path, monkeypatch) -> None:
    """The entry is written on the cache's writer thread once the guest has booted; a restore of that key
    meanwhile waits for the write and then restores it."""
    written = threading.Event()
    deflate = bootcache._deflate
    monkeypatch.setattr(bootcache, "_deflate", lambda payload: (written.wait(60), deflate(payload))[1])
    cache = BootCache(tmp_path / "cache")
    first, boot = build_host(Scenario(seed=1, vms=[VM], clock="manual"), "latest", None, boot_cache=cache)
    try:
        assert boot.wait(300) and boot.error is None
        assert cache.entries() == [] and cache.restored == 0
        threading.Timer(0.5, written.set).start()
        second, boot = build_host(Scenario(seed=2, vms=[VM], clock="manual"), "latest", None, boot_cache=cache)
        try:
            assert boot.wait(300) and boot.error is None and cache.restored == 1 and len(cache.entries()) == 1
        finally:
            second.shutdown()
    finally:
        written.set()
        first.shutdown()


def test_large_sparse_arrays_are_pickled_by_their_nonzero_entries_and_come_back_whole(fresh_vm: QemuProcess) -> None:
    rng = np.random.default_rng(0)
    sparse = np.zeros((300, 512), np.uint64)
    sparse[rng.integers(0, 300, 50), rng.integers(0, 512, 50)] = rng.integers(1, 1 << 63, 50, dtype=np.uint64)
    arrays = {
        "sparse": sparse, "same": sparse, "bools": np.zeros(1 << 17, bool), "dense": rng.integers(-5, 5, 1 << 15),
        "negative zeros": np.full(1 << 14, -0.0), "strided": sparse[:, ::2], "small": np.arange(8, dtype=np.int8),
    }
    buffer = io.BytesIO()
    bootcache._Saver(buffer, fresh_vm).dump(arrays)
    loaded = bootcache._Loader(io.BytesIO(buffer.getvalue()), fresh_vm).load()
    for name, array in arrays.items():
        got, want = loaded[name], array
        assert (got.dtype, got.shape, got.tobytes()) == (want.dtype, want.shape, want.tobytes())
        assert got.flags.writeable and got.flags.c_contiguous
    assert loaded["same"] is loaded["sparse"]
    dense_bytes = sum(arrays[name].nbytes for name in ("dense", "negative zeros", "strided", "small"))
    assert len(buffer.getvalue()) < dense_bytes + 4096  # the sparse and the all-zero ones take next to nothing


def inline(obj: object, attribute: str) -> bool:
    """Whether ``obj`` holds its attributes inline (CPython 3.11+: its attribute values are its own referents),
    rather than in a dict of their own (the dict is then the referent)."""
    value = getattr(obj, attribute)
    return any(referent is value for referent in gc.get_referents(obj))


def test_restored_and_saved_vms_keep_their_objects_attributes_inline(cache: BootCache, fresh_vm: QemuProcess) -> None:
    """A dict update by the unpickler, or a __dict__ the pickler asks for, would move an object's attributes into a
    dict for good (every access slower: rmap_fork 15%); restored objects get them one by one, and a saved VM
    goes on as its own restored copy."""
    probe = fresh_vm.kvm.arch
    if not inline(probe, "mmu") or (vars(probe), inline(probe, "mmu"))[1]:
        pytest.skip("this Python does not keep attributes inline until __dict__ is asked for")
    (entry,) = cache.entries()
    assert cache.restore(entry.name, fresh_vm) is not None
    for _ in range(2):
        arch = fresh_vm.kvm.arch
        objects = [(arch, "mmu"), (arch.mmu, "pool"), (arch.mmu.pool, "spt"), (arch.rmaps, "pte_list"),
                   (arch.mmu, "memory"), (arch.mmu.memory, "_tables"), (fresh_vm.guest, "kernel")]
        assert [inline(obj, attribute) for obj, attribute in objects] == [True] * len(objects)
        cache.save("0" * 64, fresh_vm, {})


def test_a_changed_key_misses(cache: BootCache, fresh_vm: QemuProcess, monkeypatch) -> None:
    (entry,) = cache.entries()
    assert cache.key(fresh_vm, "idle", BOOT) == entry.name
    other_keys = {
        cache.key(fresh_vm, "idle", {**BOOT, "workers": 4}),
        cache.key(fresh_vm, "memhog", BOOT),
    }
    monkeypatch.setattr(bootcache, "_SOURCE_DIGEST", "another version of the project")
    other_keys.add(cache.key(fresh_vm, "idle", BOOT))
    assert len(other_keys) == 3 and entry.name not in other_keys
    assert cache.restore(other_keys.pop(), fresh_vm) is None and fresh_vm.guest is None


def test_a_vm_that_ran_is_no_longer_fresh(cache: BootCache, fresh_vm: QemuProcess) -> None:
    fresh_vm.guest_ns = 1
    assert cache.key(fresh_vm, "idle", BOOT) is None


@pytest.mark.parametrize("damage", ["payload", "truncated", "header", "another key's entry"])
def test_a_bad_entry_is_ignored_with_a_warning(cache: BootCache, fresh_vm: QemuProcess, caplog, damage: str) -> None:
    (entry,) = cache.entries()
    path = Path(entry.path)
    data = bytearray(path.read_bytes())
    if damage == "payload":
        data[-100] ^= 0xFF
    elif damage == "truncated":
        del data[-1000:]
    elif damage == "header":
        data[:10] = b"not json!!"
    else:
        path = path.with_name("0" * 64)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="kvmdbgfs.vmm.bootcache"):
        assert cache.restore(path.name, fresh_vm) is None
    assert fresh_vm.guest is None and fresh_vm.workload_runs == 0
    assert [r.message.startswith(f"boot cache: ignoring {path}: ") for r in caplog.records] == [True]


def test_a_directory_others_can_write_is_not_trusted(cache: BootCache, fresh_vm: QemuProcess, caplog) -> None:
    (entry,) = cache.entries()
    os.chmod(cache.directory, 0o777)
    with caplog.at_level(logging.WARNING, logger="kvmdbgfs.vmm.bootcache"):
        assert cache.restore(entry.name, fresh_vm) is None
    assert "not a directory only the user can write" in caplog.text and fresh_vm.guest is None


def test_eviction_keeps_the_most_recently_used_within_the_cap(cache: BootCache) -> None:
    (entry,) = cache.entries()
    newer = Path(entry.path).with_name("1" * 64)
    shutil.copyfile(entry.path, newer)
    os.utime(entry.path, ns=(0, 0))  # long unused
    cache.max_bytes = newer.stat().st_size + 1
    cache.evict()
    assert [e.name for e in cache.entries()] == [newer.name]


def test_cache_clear_command(tmp_path: Path, cache: BootCache) -> None:
    env = dict(mount_env(tmp_path), KVMDBGFS_CACHE_DIR=str(cache.directory))
    command = [sys.executable, "-m", "kvmdbgfs", "cache", "clear"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"removed 1 boot snapshot from {cache.directory}\n")
    assert cache.entries() == []


def test_mounts_fill_the_cache_unless_told_not_to(tmp_path: Path, mount_factory, monkeypatch) -> None:
    """A mount boots its scenario's guests through the cache; `--no-cache` neither reads nor fills it."""
    monkeypatch.setenv("KVMDBGFS_CACHE_DIR", str(tmp_path / "cache"))
    scenario = tmp_path / "scenario.toml"
    scenario.write_text('seed = 4\n[[vm]]\nmemory = "256M"\nvcpus = 1\nworkload = "idle"\nsettings = { workers = 0 }\n')
    uncached = mount_factory("--scenario", str(scenario), "--no-cache")
    assert BootCache(tmp_path / "cache").entries() == []
    cached = mount_factory("--scenario", str(scenario))
    # The entry is written after the guest booted (by the cache's writer thread): bounded wait for it.
    assert wait_until(lambda: len(BootCache(tmp_path / "cache").entries()) == 1, timeout=30)
    restored = mount_factory("--scenario", str(scenario))
    for mount, how in ((uncached, "no boot cache"), (cached, "0 of 1"), (restored, "1 of 1")):
        line = f"mount.py: guests booted ({how}{' restored from the boot cache' * (mount is not uncached)})\n"
        assert wait_until(lambda: line in mount.stderr(), timeout=10), mount.stderr()
    for mount in (cached, restored):
        for name in ("exits", "pf_fixed", "max_mmu_rmap_size"):
            assert (mount.path / name).read_bytes() == (uncached.path / name).read_bytes()
