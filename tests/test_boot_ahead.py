"""Boots ahead (kvmdbgfs/vmm/boot_ahead.py): a scenario's later guests boot in worker processes into the boot
cache, and the host that waited for them restores byte for byte what it would have booted itself; a worker that
fails or stalls costs only time, and none outlives its VM."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from conftest import spawn_mount, wait_served, wait_until
from test_boot_cache import tree

from kvmdbgfs.scenario import Scenario, ScenarioBoot, build_host
from kvmdbgfs.sched import emulation_held
from kvmdbgfs.vmm import boot_ahead
from kvmdbgfs.vmm.bootcache import BootCache
from kvmdbgfs.vmm.vmm import Vmm
from kvmdbgfs.workloads import run_workload

LOG = "kvmdbgfs.vmm.boot_ahead"
BOOT = {"workload": "idle", "settings": {"uptime": 2, "workers": 0, "logins": 1, "pti": 0}}
SCENARIO = Scenario(
    seed=3,
    clock="manual",
    vms=[
        {"memory": "256M", "vcpus": 2, "mmu": "shadow", **BOOT},
        {"memory": "256M", "vcpus": 2, "mmu": "shadow", "rmap_design": "A", **BOOT},
    ],
)
BIG_BOOT = Scenario(
    seed=3,
    clock="manual",
    vms=[{"memory": "256M", "vcpus": 1, "workload": "idle", "settings": {"uptime": 1}},
         {"memory": "16G", "vcpus": 2, "workload": "idle", "settings": {"uptime": 600}}],
)


def booted(scenario: Scenario, cache: BootCache | None, workers: int) -> tuple[Vmm, ScenarioBoot]:
    vmm, boot = build_host(scenario, "latest", boot_cache=cache, boot_workers=workers)
    assert boot.wait(300) and boot.error is None
    vmm.advance_clock(0)  # every VM has idled up to the host clock the boots left
    return vmm, boot


def trees(
    scenario: Scenario, cache: BootCache | None, workers: int
) -> tuple[dict[str, str], dict[str, str], ScenarioBoot]:
    """The tree once booted, then after rmap_fork on the last VM; and the boot."""
    vmm, boot = booted(scenario, cache, workers)
    try:
        first = tree(vmm)
        run_workload(list(vmm.vms.values())[-1], "rmap_fork", {"children": 30})
        return first, tree(vmm), boot
    finally:
        vmm.shutdown()


@pytest.fixture(scope="module")
def emulated() -> tuple[dict[str, str], dict[str, str]]:
    """The reference: both guests booted in this process, no cache."""
    first, after, _ = trees(SCENARIO, None, 0)
    return first, after


@pytest.fixture
def started_workers(monkeypatch) -> list[subprocess.Popen[bytes]]:
    """Every worker process the test starts."""
    started = []
    start = boot_ahead._start_worker

    def recording(request: dict) -> subprocess.Popen[bytes]:
        started.append(start(request))
        return started[-1]

    monkeypatch.setattr(boot_ahead, "_start_worker", recording)
    return started


def test_a_worker_boots_the_second_guest_into_the_cache_with_the_same_bytes(
    tmp_path: Path, emulated, started_workers
) -> None:
    cache = BootCache(tmp_path / "cache")
    first, after, boot = trees(SCENARIO, cache, 1)
    assert (first, after) == emulated
    assert boot.ahead is not None and boot.ahead.handed == 1 and cache.restored == 1
    assert len(started_workers) == 1 and started_workers[0].returncode is not None  # done, then stopped and reaped
    assert len(cache.entries()) == 2  # the first guest's boot, saved here, and the worker's


def test_a_boot_the_cache_holds_is_restored_without_a_worker(tmp_path: Path, emulated, started_workers) -> None:
    cache = BootCache(tmp_path / "cache")
    trees(SCENARIO, cache, 0)
    first, after, boot = trees(SCENARIO, cache, 1)
    assert (first, after) == emulated and cache.restored == 2 and started_workers == []


def test_without_a_cache_or_workers_nothing_is_handed(tmp_path: Path) -> None:
    for cache, workers in ((None, 1), (BootCache(tmp_path / "cache"), 0)):
        with emulation_held(30):  # no guest starts booting
            vmm, boot = build_host(SCENARIO, "latest", boot_cache=cache, boot_workers=workers)
            for vm in vmm.vms.values():
                with pytest.raises(TimeoutError):  # the boots stop before their first step, once let run
                    vm.cancel_workload(timeout=0)
        vmm.shutdown()
        assert boot.ahead is None and all(job.ahead is None for _, job in boot.jobs) and len(boot.jobs) == 2


def test_a_failing_worker_is_a_warning_and_the_guest_boots_here(tmp_path: Path, emulated, monkeypatch, caplog) -> None:
    request = boot_ahead.BootAhead._request
    monkeypatch.setattr(boot_ahead.BootAhead, "_request",
                        lambda self, vm, job, cache: {**request(self, vm, job, cache), "workload": "no-such-workload"})
    cache = BootCache(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger=LOG):
        first, after, boot = trees(SCENARIO, cache, 1)
    assert (first, after) == emulated and boot.ahead.handed == 0 and cache.restored == 0
    (record,) = caplog.records
    assert record.message.startswith("boot ahead of ")
    assert "the worker failed: ValueError: unknown workload" in record.message
    assert record.message.endswith("; it boots here")


def test_a_failure_to_follow_the_worker_leaves_the_guest_to_boot_here(
    tmp_path: Path, emulated, monkeypatch, caplog
) -> None:
    def broken(*_args: object) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(boot_ahead, "_follow", broken)
    with caplog.at_level(logging.ERROR, logger=LOG):
        first, after, boot = trees(SCENARIO, BootCache(tmp_path / "cache"), 1)
    assert (first, after) == emulated and boot.ahead.handed == 0
    assert "following the worker failed; it boots here" in caplog.text and "RuntimeError: a bug" in caplog.text


def test_a_worker_that_cannot_save_passes_its_warning_on(tmp_path: Path, caplog) -> None:
    (tmp_path / "cache").mkdir(mode=0o777)
    (tmp_path / "cache").chmod(0o777)  # others may write it: no snapshot is saved there (nor read)
    with caplog.at_level(logging.WARNING):
        vmm, boot = booted(SCENARIO, BootCache(tmp_path / "cache"), 1)
    vmm.shutdown()
    second = boot.jobs[-1][0].name
    worker = [r.message for r in caplog.records if r.name == LOG]
    unsafe = "the cache directory is not a directory only the user can write"
    assert len(worker) == 3 and worker[0].startswith(f"boot ahead of {second}: the worker: boot cache: ignoring ")
    assert worker[1:] == [
        f"boot ahead of {second}: the worker: boot cache: not saving {second}: {unsafe}",
        f"boot ahead of {second}: the worker failed: RuntimeError: it wrote no boot snapshot; it boots here",
    ]


def test_a_silent_worker_is_given_up(tmp_path: Path, monkeypatch, caplog, started_workers) -> None:
    monkeypatch.setattr(boot_ahead, "STALL_S", 0.01)  # less than the worker's start-up takes
    with caplog.at_level(logging.WARNING, logger=LOG):
        vmm, boot = booted(Scenario(seed=3, clock="manual", vms=SCENARIO.vms[:1] * 2), BootCache(tmp_path / "c"), 1)
    vmm.shutdown()
    assert boot.ahead.handed == 0 and "the worker reported nothing for 0 s; it boots here" in caplog.text
    assert started_workers[0].returncode is not None  # killed, and reaped


def test_destroying_a_vm_that_waits_for_its_worker_kills_the_worker(tmp_path: Path, started_workers) -> None:
    vmm, boot = build_host(BIG_BOOT, "latest", boot_cache=BootCache(tmp_path / "cache"), boot_workers=1)
    try:
        assert wait_until(lambda: started_workers, timeout=30)
        waiting = list(vmm.vms)[-1]
        assert wait_until(lambda: boot.jobs[-1][1].progress[0] > 0, timeout=60)  # the worker reports its boot
        vmm.destroy_vm(waiting)
        assert started_workers[0].poll() is not None and boot.jobs[-1][1].done.is_set()
        assert "destroyed" in boot.jobs[-1][1].error
    finally:
        vmm.shutdown()


def test_a_mount_boots_its_later_guests_in_workers(tmp_path: Path, mount_factory, monkeypatch) -> None:
    """`mount.py` hands the second guest's boot to a worker (`--boot-workers 1`) and says so once booted; the
    served files are those of a mount that booted both itself (`--no-cache`)."""
    monkeypatch.setenv("KVMDBGFS_CACHE_DIR", str(tmp_path / "cache"))
    scenario = tmp_path / "scenario.toml"
    vm = '[[vm]]\nmemory = "256M"\nvcpus = 2\nworkload = "idle"\nsettings = { uptime = 2, workers = 0, pti = 0 }\n'
    scenario.write_text("seed = 4\n" + vm + vm.replace("vcpus = 2", "vcpus = 1"))
    alone = mount_factory("--scenario", str(scenario), "--clock", "manual", "--no-cache")
    ahead = mount_factory("--scenario", str(scenario), "--clock", "manual", "--boot-workers", "1")
    line = "mount.py: guests booted (1 of 2 restored from the boot cache, 1 of them booted by worker processes)\n"
    assert wait_until(lambda: line in ahead.stderr(), timeout=10), ahead.stderr()
    for mount in (alone, ahead):
        mount.cli("clock", "advance", "1ms")  # and wait until every VM has idled up to it
    for name in ("exits", "pf_fixed", "max_mmu_rmap_size", "halt_wait_ns"):
        assert (ahead.path / name).read_bytes() == (alone.path / name).read_bytes()


def test_a_worker_dies_with_its_server(tmp_path: Path, monkeypatch) -> None:
    """A server killed outright (SIGKILL: nothing of it runs) takes its boot worker with it (PR_SET_PDEATHSIG)."""
    monkeypatch.setenv("KVMDBGFS_CACHE_DIR", str(tmp_path / "cache"))
    scenario = tmp_path / "scenario.toml"
    scenario.write_text('[[vm]]\nmemory = "256M"\nworkload = "idle"\n[[vm]]\nmemory = "16G"\nworkload = "idle"\n')
    mount = wait_served(spawn_mount(tmp_path, "--scenario", str(scenario), "--boot-workers", "1"), booted=False)
    try:
        pattern = f"kvmdbgfs.vmm.boot_ahead {mount.process.pid}$"
        assert wait_until(lambda: workers(pattern), timeout=30)
        mount.process.kill()
        mount.process.wait(timeout=30)
        assert wait_until(lambda: not workers(pattern), timeout=10)
    finally:
        mount.stop()


def workers(pattern: str) -> list[str]:
    """The pids of the processes whose command line matches ``pattern`` (pgrep -f)."""
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, timeout=10).stdout.split()
