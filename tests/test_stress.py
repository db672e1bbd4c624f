"""Stress: one mount under everything at once, for two identical rounds; nothing may fail, hang or leak.

The mount runs the realtime clock (idle guests keep running in the background). During a round:

- 8 readers: 4 read random files whole, 2 read them in 7-byte pieces (one open, many reads: a text
  regenerated between two reads would tear), 2 open a ``vcpu0/`` file, read it, hold it until its VM has been
  destroyed and read it again;
- a writer runs ``sh -c 'echo 0 > FILE'`` on random clearable stats, top-level and per-VM;
- VMs are created and destroyed (3 to 6 alive), and a few are destroyed in the middle of their boot;
- a booted VM runs ``rmap_fork`` (200 children) over and over, each run submitted when the previous one ends.

Checked after each round: no errno but ENOENT, except EIO from a ``vcpu<N>/`` file read after its VM's destroy
began (vCPU files take no VM reference: their directory goes with the VM unless a stat file still pins it); every read is a whole file that parses, and once a VM is created its ``mmu_rmaps_stat`` counts the same
number of rmap heads on every level at every read (a line torn between two snapshots would not); every boot
destroyed midway ends as a destroyed VM's workload does, every ``rmap_fork`` run without error; every thread,
shell and control request ends (all are bounded: a hung mount fails the test, it does not hang it); then only
the workload VM is left, no file is open, the server holds exactly the fds it held before the first round and
has written no traceback. The server's RSS after the second round is within 20 MiB of its RSS after the first.
At the end the workload VM is destroyed in the middle of a run, and no VM is left.

CI runs the short form (the boot and both rounds in under 60 s); ``pytest -m stress`` runs the long one.
"""

from __future__ import annotations

import errno
import functools
import os
import random
import re
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, wait_until

from kvmdbgfs.control.client import RequestError, request

WHOLE_READERS, CHUNKED_READERS, HOLDERS = 4, 2, 2  # the 8 readers
CHUNK = 7
NUMBER = re.compile(rb"-?\d+\n")
RMAPS = re.compile(
    rb"(Rmap_Count:\t0\t1\t2-3\t4-7\t8-15\t16-31\t32-63\t64-127\t128-255\t256-511\t512-1023\t\n"
    rb"(Level=(4K|2M|1G):\t(\d+\t){11}\n){3})?"
)
RMAPS_LEVEL = re.compile(rb"Level=\w+:\t([\d\t]+)\n")
VM_FILES = (
    "exits",
    "max_mmu_rmap_size",
    "mmu_rmaps_stat",
    "pages_4k",
    "halt_wait_ns",
    "vcpu0/tsc-offset",
    "vcpu0/guest_mode",
    "vcpu0/lapic_timer_advance_ns",
)
VCPU_FILES = ("tsc-offset", "guest_mode", "lapic_timer_advance_ns", "tsc-scaling-ratio")
# Stats that `echo 0 >` clears (0644) in every profile; the top level (the latest profile) has a few more.
CLEARABLE = (
    "exits",
    "halt_exits",
    "halt_wakeup",
    "io_exits",
    "irq_injections",
    "pf_fixed",
    "remote_tlb_flush",
    "req_event",
    "tlb_flush",
    "mmu_shadow_zapped",
    "max_mmu_page_hash_collisions",
)
TOP_CLEARABLE = (*CLEARABLE, "max_mmu_rmap_size", "halt_wait_hist", "remote_tlb_flush_requests")
TOP_FILES = (*TOP_CLEARABLE, "pages_4k", "mmu_unsync", "blocking")
# How sh reports ENOENT from `> FILE`: bash says strerror(ENOENT), dash (Debian's sh) "Directory nonexistent".
SH_ENOENT = re.compile(r"(No such file or directory|Directory nonexistent)\n$")

VM_SHAPES = (
    {"memory": "128M", "vcpus": 1, "mmu": "shadow"},
    {"memory": "64M", "vcpus": 2, "mmu": "tdp"},
    {"memory": "128M", "vcpus": 1, "mmu": "tdp-legacy", "kernel": "v5.15"},
    {"memory": "64M", "vcpus": 1, "mmu": "shadow", "kernel": "v5.14"},
)
BOOTING_SHAPE = {"memory": "256M", "vcpus": 1, "mmu": "tdp"}  # the smallest, quickest guest to boot
WORKLOAD_SHAPE = {"memory": "256M", "vcpus": 1, "mmu": "shadow", "seed": 7}
BOOT = {"uptime": 0, "workers": 0, "logins": 1}
RMAP_FORK = {"children": 200}
# The run destroyed 0.5 s after it started must still be running then: 200 children take 0.4 s compiled
# (kvmdbgfs/native.py).
RMAP_FORK_DESTROYED = {"children": 1000}

CONTROL_TIMEOUT = 60.0  # for each read of a control socket (a running workload sends progress twice a second)
SHELL_TIMEOUT = 20.0
JOIN_TIMEOUT = 60.0  # for all of a round's threads, the last rmap_fork run and boot included
HOLD_TIMEOUT = 3.0  # longest a holder waits for its VM to be destroyed
SETTLE_TIMEOUT = 20.0  # for destroyed VMs, open files and fds to be released
RSS_SLACK = 20 << 20


@pytest.fixture(autouse=True)
def bounded_requests() -> Iterator[None]:
    """request() makes its own socket: a default timeout makes a stuck server fail the test, not hang it."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(CONTROL_TIMEOUT)
    yield
    socket.setdefaulttimeout(previous)


class Round:
    """What the threads of one round share: the stop signal, which VMs exist, counts and failures."""

    def __init__(self, mount: Mount, worker: str) -> None:
        self.mount = mount
        self.root = mount.path
        self.worker = worker
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.counts: Counter[str] = Counter()
        self.created: set[str] = {worker}  # vm.create has returned: every file and memslot is there
        self.destroying: set[str] = set()  # vm.destroy has been sent
        self.destroyed: set[str] = set()  # vm.destroy has returned
        self.heads: dict[str, list[int]] = {}

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def fail(self, failure: str) -> None:
        with self.lock:
            self.failures.append(failure)

    def is_in(self, vm: str, vms: set[str]) -> bool:
        with self.lock:
            return vm in vms

    def vms(self) -> list[str]:
        return [name for name in os.listdir(self.root) if "-" in name]

    def call(self, cmd: str, **args: Any) -> Any:
        return request(self.mount.control, cmd, **args)

    def create_vm(self, shape: dict[str, Any]) -> str:
        name: str = self.call("vm.create", **shape)["name"]
        with self.lock:
            self.created.add(name)
            self.counts["created"] += 1
        return name

    def destroy_vm(self, name: str) -> None:
        with self.lock:
            self.destroying.add(name)
        destroy_vm(self.mount, name)
        with self.lock:
            self.destroyed.add(name)


def destroy_vm(mount: Mount, name: str) -> None:
    request(mount.control, "vm.destroy", name=name)


def workload_of(mount: Mount, name: str) -> str | None:
    """The workload running on VM ``name``."""
    return {vm["name"]: vm["workload"] for vm in request(mount.control, "vm.list")}[name]


def guarded(round_: Round, target: Callable[..., None], *args: Any) -> threading.Thread:
    """A daemon thread (a hung one must not keep pytest from exiting) whose exceptions are failures."""

    def run() -> None:
        try:
            target(round_, *args)
        except Exception as exc:
            round_.fail(f"{target.__name__}: {exc!r}")

    return threading.Thread(target=run, daemon=True)


# -- readers ----------------------------------------------------------------------------------------------------


def judge_errno(round_: Round, path: str, exc: OSError, reading: bool) -> None:
    """ENOENT when opening; EIO when reading a vcpu file after its VM's destroy began; nothing else."""
    if exc.errno == errno.ENOENT and not reading:
        round_.count("ENOENT")
    elif exc.errno == errno.EIO and reading and "/vcpu" in path and round_.is_in(vm_of(path), round_.destroying):
        round_.count("EIO")
    else:
        round_.fail(f"{path}: {'read' if reading else 'open'}: {exc!r}")


def vm_of(path: str) -> str:
    return path.split("/")[0]


def check_text(round_: Round, path: str, data: bytes, created: bool) -> None:
    """A whole file that parses. Once its VM is ``created`` (all memslots in), a VM's rmap histogram counts the
    same number of heads on every level at every read."""
    if path.endswith("mmu_rmaps_stat"):
        if RMAPS.fullmatch(data) is None:
            round_.fail(f"{path}: unparseable {data!r}")
        elif data and created:
            heads = [sum(map(int, row.split())) for row in RMAPS_LEVEL.findall(data)]
            with round_.lock:
                first = round_.heads.setdefault(path, heads)
            if heads != first:
                round_.fail(f"{path}: torn, {heads} heads after {first}")
    elif NUMBER.fullmatch(data) is None:
        round_.fail(f"{path}: unparseable {data!r}")


def open_file(round_: Round, path: str) -> int | None:
    try:
        return os.open(round_.root / path, os.O_RDONLY)
    except OSError as exc:
        judge_errno(round_, path, exc, reading=False)
        return None


def read_from_zero(round_: Round, path: str, fd: int, size: int, created: bool) -> None:
    """Read the whole text from offset 0 in reads of ``size`` bytes, and check it."""
    parts = []
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, size):
            parts.append(chunk)
    except OSError as exc:
        judge_errno(round_, path, exc, reading=True)
        return
    check_text(round_, path, b"".join(parts), created)
    round_.count("reads")


def read_once(round_: Round, rng: random.Random, size: int) -> None:
    vms = round_.vms()
    path = rng.choice(TOP_FILES) if not vms or rng.random() < 0.1 else f"{rng.choice(vms)}/{rng.choice(VM_FILES)}"
    created = round_.is_in(vm_of(path), round_.created)
    fd = open_file(round_, path)
    if fd is not None:
        try:
            read_from_zero(round_, path, fd, size, created)
        finally:
            os.close(fd)


def hold_once(round_: Round, rng: random.Random) -> None:
    """Open a vcpu0 file, read it, keep it open until its VM has been destroyed (bounded), read it again."""
    vms = round_.vms()
    if not vms:
        time.sleep(0.01)
        return
    vm = rng.choice(vms)
    path = f"{vm}/vcpu0/{rng.choice(VCPU_FILES)}"
    fd = open_file(round_, path)
    if fd is None:
        return
    try:
        read_from_zero(round_, path, fd, 4096, created=False)
        deadline = time.monotonic() + HOLD_TIMEOUT
        while not round_.is_in(vm, round_.destroyed) and not round_.stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        if round_.is_in(vm, round_.destroyed):
            round_.count("held across a destroy")
        read_from_zero(round_, path, fd, 4096, created=False)
    finally:
        os.close(fd)


def reader(round_: Round, seed: int, once: Callable[[Round, random.Random], None]) -> None:
    rng = random.Random(seed)
    while not round_.stop.is_set():
        once(round_, rng)


# -- the writer -------------------------------------------------------------------------------------------------


def echo_zero(round_: Round, path: str) -> bool:
    """`echo 0 > path` in a real shell: it succeeds or says ENOENT. False when the shell hung."""
    try:
        result = subprocess.run(
            ["sh", "-c", 'echo 0 > "$1"', "sh", path],
            cwd=round_.root,
            capture_output=True,
            text=True,
            timeout=SHELL_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        round_.fail(f"echo 0 > {path}: hung")
        return False
    if result.returncode == 0:
        round_.count("writes")
    elif SH_ENOENT.search(result.stderr):
        round_.count("write ENOENT")
    else:
        round_.fail(f"echo 0 > {path}: {result.returncode} {result.stderr!r}")
    return True


def writer(round_: Round, seed: int) -> None:
    """Clear random stats. Per-VM ones only once the VM's creation has returned: before, the directory is there but
    not all of its files yet, and `>` on a name not there yet is a create, which debugfs refuses with EACCES."""
    rng = random.Random(seed)
    while not round_.stop.is_set():
        vms = [vm for vm in round_.vms() if round_.is_in(vm, round_.created)]
        if not vms or rng.random() < 0.25:
            path = rng.choice(TOP_CLEARABLE)
        else:
            path = f"{rng.choice(vms)}/{rng.choice(CLEARABLE)}"
        if not echo_zero(round_, path):
            return


# -- workloads and churn ----------------------------------------------------------------------------------------


def keep_workload_running(round_: Round) -> None:
    """rmap_fork on the workload VM, run after run until the round stops (the last run is let finish)."""
    while not round_.stop.is_set():
        summary = round_.call("workload.run", vm=round_.worker, workload="rmap_fork", settings=RMAP_FORK)
        if summary.get("workload") != "rmap_fork":
            round_.fail(f"rmap_fork: {summary!r}")
        round_.count("rmap_fork runs")


def destroyed_mid_run(
    mount: Mount, name: str, workload: str, settings: dict[str, int], delay: float, destroy: Callable[[str], None]
) -> str:
    """Run ``workload`` on VM ``name`` and ``destroy`` the VM ``delay`` seconds after it started; what the (not
    detached) run request answered: its summary or its error."""
    answers: list[str] = []

    def run() -> None:
        try:
            answers.append(repr(request(mount.control, "workload.run", vm=name, workload=workload, settings=settings)))
        except (RequestError, OSError) as exc:
            answers.append(str(exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if wait_until(lambda: workload_of(mount, name) == workload, SETTLE_TIMEOUT):
        time.sleep(delay)
    destroy(name)
    thread.join(CONTROL_TIMEOUT)
    return answers[0] if answers else "no answer"


def stopped_by_destroy(name: str) -> str:
    """What a workload's request answers when its VM was destroyed while it ran."""
    return f"VM {name} was destroyed: the workload stopped"


def boot_and_destroy(round_: Round, boots: int, seed: int) -> None:
    """``boots`` VMs, one after the other, destroyed a moment after their boot (the idle workload) started. A boot
    stops at its next safe point only, seconds later: the destroy waits for it, so this has a thread of its own."""
    rng = random.Random(seed)
    for _ in range(boots):
        name = round_.create_vm(BOOTING_SHAPE)
        answer = destroyed_mid_run(round_.mount, name, "idle", BOOT, rng.uniform(0.1, 0.5), round_.destroy_vm)
        if answer == stopped_by_destroy(name):
            round_.count("destroyed mid-boot")
        else:
            round_.fail(f"boot of {name}, destroyed: {answer}")


def churn(round_: Round, seconds: float, rng: random.Random) -> None:
    """Create and destroy VMs (3 to 6 alive) until ``seconds`` have passed, then destroy the rest."""
    alive: list[str] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if len(alive) < 3 or (len(alive) < 6 and rng.random() < 0.5):
                alive.append(round_.create_vm(rng.choice(VM_SHAPES)))
            else:
                round_.destroy_vm(alive.pop(rng.randrange(len(alive))))
    finally:
        for name in alive:
            round_.destroy_vm(name)


def run_round(mount: Mount, worker: str, seconds: float, boots: int, seed: int) -> Round:
    """Readers, the writer, the workload and the boots run in threads while this one churns VMs; all are joined
    (bounded)."""
    round_ = Round(mount, worker)
    kinds = [functools.partial(read_once, size=4096)] * WHOLE_READERS
    kinds += [functools.partial(read_once, size=CHUNK)] * CHUNKED_READERS + [hold_once] * HOLDERS
    threads = [guarded(round_, reader, seed * 100 + i, once) for i, once in enumerate(kinds)]
    threads += [
        guarded(round_, writer, seed * 100 + 97),
        guarded(round_, keep_workload_running),
        guarded(round_, boot_and_destroy, boots, seed * 100 + 98),
    ]
    for thread in threads:
        thread.start()
    try:
        churn(round_, seconds, random.Random(seed))
    finally:
        round_.stop.set()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    assert not [thread for thread in threads if thread.is_alive()], f"threads still running (hung): {round_.counts}"
    return round_


# -- what is checked --------------------------------------------------------------------------------------------


def server_fds(mount: Mount) -> int:
    return len(os.listdir(f"/proc/{mount.process.pid}/fd"))


def settled_fds(mount: Mount) -> int:
    """The server's fd count once it holds still (the connection of the request that found the mount up closes
    on the server's side a little after the answer): the same in three reads 0.2 s apart, within 10 s."""
    counts = [server_fds(mount)]
    deadline = time.monotonic() + 10
    while (len(counts) < 3 or len(set(counts[-3:])) > 1) and time.monotonic() < deadline:
        time.sleep(0.2)
        counts.append(server_fds(mount))
    return counts[-1]


def server_rss(mount: Mount) -> int:
    status = Path(f"/proc/{mount.process.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.M)
    assert match is not None, status
    return int(match.group(1)) << 10


def vm_names(mount: Mount) -> list[str]:
    return [vm["name"] for vm in request(mount.control, "vm.list")]


def check_round(round_: Round, boots: int) -> None:
    """No failure, and every kind of work was actually done."""
    counts = round_.counts
    assert round_.failures == [], "\n".join([*round_.failures[:20], f"{len(round_.failures)} failures; {counts}"])
    assert counts["reads"] > 100 and counts["held across a destroy"] > 0, counts
    assert counts["writes"] > 10 and counts["created"] > 10, counts
    assert counts["destroyed mid-boot"] == boots and counts["rmap_fork runs"] > 0, counts


def check_settled(mount: Mount, vms: list[str], fds: int) -> None:
    """Only ``vms`` left, in the server and in the tree; no open file; the server back at ``fds`` fds."""
    assert wait_until(lambda: vm_names(mount) == vms, SETTLE_TIMEOUT), vm_names(mount)
    assert [name for name in os.listdir(mount.path) if "-" in name] == vms
    assert wait_until(lambda: request(mount.control, "status")["open_files"] == 0, SETTLE_TIMEOUT)
    assert wait_until(lambda: server_fds(mount) == fds, SETTLE_TIMEOUT), f"{server_fds(mount)} fds, {fds} before"
    assert "Traceback" not in mount.stderr(), mount.stderr()


def start_workload_vm(mount: Mount) -> str:
    """A booted VM for rmap_fork (booting takes seconds: once, before the rounds)."""
    name: str = request(mount.control, "vm.create", **WORKLOAD_SHAPE)["name"]
    request(mount.control, "workload.run", vm=name, workload="idle", settings=BOOT)
    return name


def stress(mount: Mount, seconds: float, boots: int, seed: int) -> None:
    fds = settled_fds(mount)
    worker = start_workload_vm(mount)
    rss = []
    for _ in range(2):
        round_ = run_round(mount, worker, seconds, boots, seed)
        check_round(round_, boots)
        check_settled(mount, [worker], fds)
        rss.append(server_rss(mount))
    assert abs(rss[1] - rss[0]) <= RSS_SLACK, f"RSS {rss[0] >> 20} MiB after the first round, {rss[1] >> 20} after"
    answer = destroyed_mid_run(
        mount, worker, "rmap_fork", RMAP_FORK_DESTROYED, 0.5, functools.partial(destroy_vm, mount)
    )
    assert answer == stopped_by_destroy(worker)
    check_settled(mount, [], fds)
    assert request(mount.control, "status")["vms"] == 0


def test_stress(mount_factory: Callable[..., Mount]) -> None:
    stress(mount_factory("--scenario", "empty", "--clock", "realtime"), seconds=8, boots=1, seed=1)


@pytest.mark.stress
def test_stress_long(mount_factory: Callable[..., Mount]) -> None:
    stress(mount_factory("--scenario", "empty", "--clock", "realtime"), seconds=60, boots=4, seed=2)
