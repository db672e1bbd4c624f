"""QEMU stand-in processes (`kvmdbgfs mount --qemu-processes`): each VM directory's pid is a real process whose
command line reads like QEMU's, with a thread per vCPU whose id the vCPU's `pid` file holds; the processes
end with their VM and with the server, SIGKILL included. Without them, emulated pids stay below pid_max."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Mount, mount_with_scenario, wait_until

from kvmdbgfs.vmm.vmm import Vmm

# One booted VM (its vCPUs entered KVM_RUN: `pid` files hold thread ids) and one that never booted.
SCENARIO = """
[[vm]]
memory = "256M"
vcpus = 2
workload = "idle"
settings = { uptime = 0, workers = 0, logins = 1 }
[[vm]]
memory = "128M"
vcpus = 1
"""
EXIT_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mount_with_scenario(tmp_path_factory, SCENARIO, "--qemu-processes") as running:
        yield running


def vm_dirs(mount: Mount) -> list[str]:
    return sorted(name for name in os.listdir(mount.path) if "-" in name)


def pid_of(vm_dir: str) -> int:
    return int(vm_dir.split("-")[0])


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")


def has_ended(pid: int) -> bool:
    """The process is gone, or has ended and waits only for its parent's wait() (a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_each_vm_directory_names_a_qemu_like_process(mount: Mount) -> None:
    guests = {vm["name"]: vm["guest_name"] for vm in json.loads(mount.cli("vm", "list", "--json").stdout)}
    assert sorted(guests) == vm_dirs(mount) and len(guests) == 2
    for vm_dir, guest in guests.items():
        args = cmdline(pid_of(vm_dir))
        assert args[0] == "qemu-system-x86_64", args
        assert args[args.index("-name") + 1] == f"guest={guest},debug-threads=on"
        # what kvm_stat -g does: `ps -A --format pid,args`, keep lines with " -name "
        listing = mount.sh(f"ps -o args= -p {pid_of(vm_dir)}")
        assert f" -name guest={guest}," in listing


def test_vcpu_pid_files_hold_the_threads_named_like_qemus(mount: Mount) -> None:
    booted = next(name for name in vm_dirs(mount) if (mount.path / name / "vcpu1").exists())
    pid = pid_of(booted)
    tasks = Path(f"/proc/{pid}/task")
    threads = {int(tid.name): (tid / "comm").read_text().strip() for tid in tasks.iterdir()}
    for vcpu in (0, 1):
        tid = int(mount.sh(f"cat {booted}/vcpu{vcpu}/pid"))
        assert threads[tid] == f"CPU {vcpu}/KVM"
    assert threads[pid] == "qemu-system-x86"


def test_the_process_ends_with_its_vm(mount: Mount) -> None:
    name = mount.create_vm("--memory", "64M", "--vcpus", "3")
    pid = pid_of(name)
    assert len(os.listdir(f"/proc/{pid}/task")) == 4  # the main thread and three vCPU threads
    mount.destroy_vm(name)
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), EXIT_TIMEOUT)  # reaped by the server


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_the_processes_end_with_the_server(mount_factory, sig: int) -> None:
    mount = mount_factory("--scenario", "empty", "--qemu-processes")
    pids = [pid_of(mount.create_vm("--memory", "64M", "--vcpus", "1")) for _ in range(2)]
    assert all(not has_ended(pid) for pid in pids)
    mount.stop(sig)
    assert wait_until(lambda: all(has_ended(pid) for pid in pids), EXIT_TIMEOUT), pids


def test_emulated_pids_stay_below_the_hosts_pid_max() -> None:
    vmm = Vmm(seed=3)
    assert vmm.pid_max == int(Path("/proc/sys/kernel/pid_max").read_text())
    pids = [vmm._alloc_pid(8) for _ in range(3 * vmm.pid_max // 40)]  # enough to wrap around at least once
    assert max(pids) + 2 + 8 < vmm.pid_max and min(pids) > 300
    assert any(later < earlier for earlier, later in zip(pids, pids[1:])), "never wrapped"


READER = Path(__file__).parent / "examples" / "kvm_stat_reader.py"
READER_TIMEOUT = 30.0


def test_a_kvm_stat_style_reader_under_exec_selects_a_guest_by_name(mount: Mount) -> None:
    """tests/examples/kvm_stat_reader.py, unmodified paths and all, under `kvmdbgfs exec --mount`: ``-g vm0``
    finds vm0's stand-in by its command line and reads only its directory; after the clock moves, each
    field's total and delta are what the files moved by."""
    guests = {vm["guest_name"]: vm["name"] for vm in json.loads(mount.cli("vm", "list", "--json").stdout)}
    booted = guests["vm0"]
    command = [sys.executable, "-m", "kvmdbgfs", "exec", "--mount", str(mount.path), "--", sys.executable, str(READER)]
    reader = subprocess.Popen(
        [*command, "-g", "vm0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=mount.env
    )
    try:
        read_line = line_reader(reader)
        header = read_line()
        assert header.split("VMs: ")[1].split() == [booted], header
        assert header.startswith(f"# {len([p for p in mount.path.iterdir() if p.is_file()])} fields")
        before = {field: int((mount.path / booted / field).read_text()) for field in ("exits", "halt_exits")}
        mount.cli("clock", "advance", "1s")
        after = {field: int((mount.path / booted / field).read_text()) for field in before}
        assert after["exits"] > before["exits"]
        assert reader.stdin is not None
        reader.stdin.write("\n")
        reader.stdin.flush()
        rows = {}
        while (line := read_line()) != "--":
            field, total, delta = line.split()
            rows[field] = (int(total), int(delta))
        for field in before:
            assert rows[field] == (after[field] - before[field],) * 2, field
        reader.stdin.close()
        assert reader.wait(READER_TIMEOUT) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()


def line_reader(process: subprocess.Popen) -> Callable[[], str]:
    """A function giving the next line the process prints, waited for READER_TIMEOUT seconds at most."""
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in process.stdout], daemon=True).start()

    def next_line() -> str:
        try:
            return lines.get(timeout=READER_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"nothing printed within {READER_TIMEOUT:.0f} s") from None

    return next_line
