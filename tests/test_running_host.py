"""A running host: vCPUs halt, poll, take interrupts and exit as time passes (manual clock in-process,
realtime through a real mount)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import Mount, mount_with_scenario, wait_until
from inprocess import cat, walk_files, write

from kvmdbgfs.kvm.stats import HALT_POLL_HIST_COUNT
from kvmdbgfs.sched import emulation_held
from kvmdbgfs.vmm.qemu import REALTIME_QUANTUM_NS, QemuProcess, WorkloadJob
from kvmdbgfs.vmm.vmm import Vmm
from kvmdbgfs.workloads import run_workload, start_workload, wait_workload

SECOND = 1_000_000_000
GROWING = (
    "exits",
    "halt_exits",
    "halt_wakeup",
    "irq_injections",
    "irq_exits",
    "io_exits",
    "host_state_reload",
    "req_event",
)
SHADOW_ONLY = ("mmu_unsync", "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded", "mmu_shadow_zapped", "pf_guest")


def booted_vm(vmm: Vmm, mmu: str = "shadow", vcpus: int = 2) -> QemuProcess:
    vm = vmm.create_vm(vmm.host.make_config(memory="512M", vcpus=vcpus, mmu=mmu, seed=3))
    run_workload(vm, "idle", {"uptime": 0, "workers": 4, "logins": 1})
    vmm.advance_clock(vm.created_ns + vm.guest_ns - vmm.clock.now_ns() + SECOND)  # past the boot
    return vm


def counters(vm: QemuProcess, names: tuple[str, ...]) -> dict[str, int]:
    return {name: int(cat(vm.kvm.host.debugfs_dir, f"{vm.name}/{name}")) for name in names}


@pytest.fixture
def vmm() -> Iterator[Vmm]:
    host = Vmm(seed=9)
    yield host
    host.shutdown()


def test_idle_guest_counters_climb_with_the_clock(vmm: Vmm) -> None:
    vm = booted_vm(vmm)
    before = counters(vm, GROWING)
    vmm.advance_clock(20 * SECOND)  # irq_exits: a host tick while an idle guest runs code, one every few seconds
    after = counters(vm, GROWING)
    assert all(after[name] > before[name] for name in GROWING), (before, after)
    assert vm.describe()["uptime_s"] >= 21


def _bucket_bounds() -> tuple[np.ndarray, np.ndarray]:
    """fls64 buckets: 0 holds 0, bucket i holds [2^(i-1), 2^i); the last one everything above."""
    lo = np.array([0] + [1 << (i - 1) for i in range(1, HALT_POLL_HIST_COUNT)], dtype=object)
    hi = np.array([0] + [(1 << i) - 1 for i in range(1, HALT_POLL_HIST_COUNT - 1)] + [float("inf")], dtype=object)
    return lo, hi


def test_halt_polling_stats_agree_with_their_histograms(vmm: Vmm) -> None:
    vm = booted_vm(vmm)
    run_workload(vm, "rmap_fork", {"children": 20})  # busy vCPUs: short halts, which polling catches
    vmm.advance_clock(10 * SECOND)
    lo, hi = _bucket_bounds()
    for vcpu in vm.kvm.vcpus:
        stat = vcpu.stat
        assert 0 < stat.halt_successful_poll <= stat.halt_attempted_poll
        assert stat.halt_poll_invalid == 0  # vcpu_valid_wakeup() is always true on x86
        for total, hist, count in (
            (stat.halt_poll_success_ns, stat.halt_poll_success_hist, stat.halt_successful_poll),
            (stat.halt_poll_fail_ns, stat.halt_poll_fail_hist, stat.halt_attempted_poll - stat.halt_successful_poll),
            (stat.halt_wait_ns, stat.halt_wait_hist, stat.halt_wakeup),
        ):
            buckets = [int(n) for n in hist]
            assert sum(buckets) == count
            assert sum(n * low for n, low in zip(buckets, lo)) <= total <= sum(
                n * high for n, high in zip(buckets, hi) if n
            )


def test_one_vcpu_guest_rarely_flushes_remotely(vmm: Vmm) -> None:
    vm = booted_vm(vmm, vcpus=1)
    vmm.advance_clock(5 * SECOND)
    stats = counters(vm, ("remote_tlb_flush", "remote_tlb_flush_requests"))
    # kvm_make_all_cpus_request() IPIs only another vCPU running guest code: a 1-vCPU VM has none.
    assert stats["remote_tlb_flush"] == 0 < stats["remote_tlb_flush_requests"]


def test_tdp_guest_halts_without_shadow_paging_exits(vmm: Vmm) -> None:
    vm = booted_vm(vmm, mmu="tdp")
    shadow_before = counters(vm, SHADOW_ONLY)
    before = counters(vm, ("halt_exits", "irq_injections"))
    vmm.advance_clock(10 * SECOND)
    assert counters(vm, SHADOW_ONLY) == shadow_before
    after = counters(vm, ("halt_exits", "irq_injections"))
    assert all(after[name] > before[name] for name in after)


def test_idle_vms_catch_up_on_the_realtime_clocks_boundaries() -> None:
    """Idle VMs run up to multiples of REALTIME_QUANTUM_NS of host time, every VM the same ones: their threads
    wake together and emulate in one burst."""
    host = Vmm(seed=9, clock="realtime")
    try:
        vms = [host.create_vm(host.host.make_config(memory="512M", vcpus=1, seed=seed)) for seed in (1, 2)]
        assert wait_until(lambda: all(vm.guest_ns >= 3 * REALTIME_QUANTUM_NS for vm in vms), 10)
        with emulation_held(10):
            ends = [vm.created_ns + vm.guest_ns for vm in vms]
        assert [end % REALTIME_QUANTUM_NS for end in ends] == [0, 0]
    finally:
        host.shutdown()


def test_the_vms_state_is_frozen_from_the_collector_only_while_no_vm_is_busy(vmm: Vmm) -> None:
    """Once no VM runs or awaits a workload, what is alive is out of the cyclic collector's sight (a full
    collection holds the interpreter lock for every object it walks); a destroyed VM's objects are handed back."""
    gc.unfreeze()
    release = threading.Event()

    def hold(_vm: QemuProcess, progress) -> dict:
        while not release.is_set():
            progress(0, 1)
            time.sleep(0.001)
        return {}

    busy = vmm.create_vm(vmm.host.make_config(memory="256M", vcpus=1, seed=4))
    job = busy.submit(WorkloadJob("hold", hold))
    try:
        booting = vmm.create_vm(vmm.host.make_config(memory="256M", vcpus=1, seed=3))
        run_workload(booting, "idle", {"uptime": 0, "workers": 1, "logins": 1})  # ends while the other VM is busy
        assert gc.get_freeze_count() == 0
    finally:
        release.set()
    assert job.done.wait(30) and job.error is None
    assert wait_until(lambda: gc.get_freeze_count() > 0, 10)
    vmm.destroy_vm(busy.name)
    assert gc.get_freeze_count() == 0


def test_a_destroyed_vms_cycles_are_reclaimed_before_anything_is_frozen_again(vmm: Vmm) -> None:
    """gc.unfreeze() alone hands a destroyed VM's objects back, but if no collection runs before the next quiet
    moment, the next freeze takes its reference cycles with the rest, never to be reclaimed: a host whose VMs come
    and go would grow without bound (540 MiB per destroyed 6 GiB guest in make bench's fork runs)."""
    gc.unfreeze()
    tiny = {"uptime": 0, "workers": 1, "logins": 1}
    gone = vmm.create_vm(vmm.host.make_config(memory="256M", vcpus=1, seed=5))
    run_workload(gone, "idle", tiny)
    assert wait_until(lambda: gc.get_freeze_count() > 0, 10)
    kvm = weakref.ref(gone.kvm)
    vmm.destroy_vm(gone.name)
    del gone
    assert kvm() is not None  # held by its own cycles: only the collector reclaims it
    later = vmm.create_vm(vmm.host.make_config(memory="256M", vcpus=1, seed=6))
    run_workload(later, "idle", tiny)  # its end is the next quiet moment
    assert wait_until(lambda: gc.get_freeze_count() > 0, 10)
    assert kvm() is None


def tree_bytes(vmm: Vmm) -> dict[str, str]:
    root = vmm.host.debugfs_dir
    return {path: cat(root, path) for path in walk_files(root)}


def test_same_seed_and_advances_give_the_same_bytes() -> None:
    trees = []
    for _ in range(2):
        vmm = Vmm(seed=4)
        try:
            booted_vm(vmm)
            vmm.advance_clock(3 * SECOND)
            trees.append(tree_bytes(vmm))
        finally:
            vmm.shutdown()
    assert trees[0] == trees[1]


def test_clearing_a_stat_while_a_workload_runs_is_a_plain_store(vmm: Vmm) -> None:
    vm = booted_vm(vmm)
    job = start_workload(vm, "rmap_fork", {"children": 200})
    root = vmm.host.debugfs_dir
    held, release = threading.Event(), threading.Event()

    def hold_mmu_lock() -> None:
        with vm.kvm.mmu_lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_mmu_lock)
    holder.start()
    try:
        assert held.wait(30)
        # Another thread holds mmu_lock: the clear still goes through at once, since it takes no mmu_lock.
        assert write(root, f"{vm.name}/exits", b"0") == 1
        assert int(cat(root, f"{vm.name}/exits")) == 0
    finally:
        release.set()
        holder.join(30)
    wait_workload(job, timeout=120)


REALTIME_SCENARIO = """
seed = 2
clock = "realtime"
[[vm]]
memory = "512M"
vcpus = 2
workload = "idle"
settings = { uptime = 0, workers = 4, logins = 1 }
"""


@pytest.fixture(scope="module")
def realtime_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mount_with_scenario(tmp_path_factory, REALTIME_SCENARIO, "--clock", "realtime") as mount:
        yield mount


def test_realtime_reads_a_second_apart_differ(realtime_mount: Mount) -> None:
    first = (realtime_mount.path / "exits").read_text()
    time.sleep(1)
    assert (realtime_mount.path / "exits").read_text() != first


def test_a_kvm_stat_style_sampler_sees_exits_and_halts_on_every_sample(realtime_mount: Mount) -> None:
    """Open each top-level field in each VM directory, int() it, every 0.5 s (kvm_stat -d)."""
    vms = [name for name in os.listdir(realtime_mount.path) if (realtime_mount.path / name).is_dir()]
    fields = ("exits", "halt_exits")

    def sample() -> dict[tuple[str, str], int]:
        values = {}
        for vm in vms:
            for field in fields:
                with open(realtime_mount.path / vm / field) as handle:
                    values[vm, field] = int(handle.read())
        return values

    previous = sample()
    for _ in range(4):
        time.sleep(0.5)
        current = sample()
        assert all(current[key] > previous[key] for key in current), (previous, current)
        previous = current


def _workload_of(mount: Mount, name: str) -> str | None:
    listed = {vm["name"]: vm for vm in json.loads(mount.cli("vm", "list", "--json").stdout)}
    return listed[name]["workload"] if name in listed else None


def test_destroying_a_vm_stops_its_workload_and_tells_the_waiting_cli(realtime_mount: Mount) -> None:
    """`run` waits on a workload that `vm destroy` interrupts: it stops at a safe point, the waiting CLI prints
    one clear line and exits 1, and the VM is gone. (`run --detach` returns at once and the workload runs on.)"""
    name = realtime_mount.create_vm("--memory", "512M", "--vcpus", "2")
    realtime_mount.cli("run", "idle", "--vm", name, "--set", "uptime=0", "--set", "workers=4", "--set", "logins=1")
    detached = realtime_mount.cli("run", "memhog", "--vm", name, "--detach", "--json")
    assert json.loads(detached.stdout)["detached"] is True
    assert wait_until(lambda: _workload_of(realtime_mount, name) is None, timeout=60)
    waiting = subprocess.Popen(
        [sys.executable, "-m", "kvmdbgfs.cli", "-m", str(realtime_mount.path), "run", "rmap_fork", "--vm", name,
         "--set", "children=1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=realtime_mount.env,
    )
    try:
        assert wait_until(lambda: _workload_of(realtime_mount, name) == "rmap_fork", timeout=30)
        realtime_mount.destroy_vm(name)
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert (waiting.returncode, out) == (1, "")
    assert err.splitlines()[-1] == f"kvmdbgfs: error: VM {name} was destroyed: the workload stopped"
    assert name not in os.listdir(realtime_mount.path)
