"""Readers against VMs that come and go: every read is a whole, parseable file or the open fails with ENOENT.

CI runs the short form; `pytest -m stress` runs the long one.
"""

from __future__ import annotations

import errno
import os
import random
import re
import threading
import time
from pathlib import Path

import pytest
from conftest import Mount, wait_until

from kvmdbgfs.control.client import request

READERS = 8
NUMBER = re.compile(rb"-?\d+\n")
RMAPS = re.compile(
    rb"(Rmap_Count:\t0\t1\t2-3\t4-7\t8-15\t16-31\t32-63\t64-127\t128-255\t256-511\t512-1023\t\n"
    rb"(Level=(4K|2M|1G):\t(\d+\t){11}\n){3})?"
)
VM_SHAPES = (
    {"memory": "128M", "vcpus": 1, "mmu": "shadow"},
    {"memory": "64M", "vcpus": 2, "mmu": "tdp"},
    {"memory": "128M", "vcpus": 1, "mmu": "tdp-legacy", "kernel": "v5.15"},
    {"memory": "64M", "vcpus": 1, "mmu": "shadow", "kernel": "v5.14"},
)
LEAVES = ("exits", "max_mmu_rmap_size", "mmu_rmaps_stat", "pages_4k", "vcpu0/tsc-offset", "vcpu0/guest_mode")


def parseable(path: str, data: bytes) -> bool:
    if path.endswith("mmu_rmaps_stat"):
        return RMAPS.fullmatch(data) is not None
    return NUMBER.fullmatch(data) is not None


class Readers:
    """READERS threads opening, reading and closing random files until told to stop."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.reads = 0
        self.enoent = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(seed + i,)) for i in range(READERS)]

    def pick(self, rng: random.Random) -> str:
        names = os.listdir(self.root)
        vms = [name for name in names if "-" in name]
        if not vms or rng.random() < 0.1:
            return rng.choice([name for name in names if "-" not in name])
        vm = rng.choice(vms)
        return f"{vm}/{rng.choice(LEAVES)}"

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            try:
                path = self.pick(rng)
            except OSError as exc:
                self.record(f"listdir: {exc!r}")
                continue
            try:
                with open(self.root / path, "rb", buffering=0) as handle:
                    data = handle.read()
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    with self.lock:
                        self.enoent += 1
                    continue
                self.record(f"{path}: {exc!r}")
                continue
            # (v5.14 VMs have no mmu_rmaps_stat: that open fails with ENOENT above.)
            if not parseable(path, data):
                self.record(f"{path}: unparseable {data!r}")
            with self.lock:
                self.reads += 1

    def record(self, failure: str) -> None:
        with self.lock:
            self.failures.append(failure)


def churn(mount: Mount, seconds: float, seed: int) -> tuple[Readers, int]:
    rng = random.Random(seed)
    readers = Readers(mount.path, seed)
    for thread in readers.threads:
        thread.start()
    created = 0
    deadline = time.monotonic() + seconds
    alive: list[str] = []
    try:
        while time.monotonic() < deadline:
            if len(alive) < 3 or (len(alive) < 6 and rng.random() < 0.5):
                alive.append(request(mount.control, "vm.create", **rng.choice(VM_SHAPES))["name"])
                created += 1
            else:
                request(mount.control, "vm.destroy", name=alive.pop(rng.randrange(len(alive))))
    finally:
        for name in alive:
            request(mount.control, "vm.destroy", name=name)
        readers.stop.set()
        for thread in readers.threads:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in readers.threads), "a reader hung"
    return readers, created


def check_clean(mount: Mount, readers: Readers, created: int) -> None:
    assert readers.failures == []
    assert readers.reads > 100 and created > 5
    # Every VM is gone and nothing holds a reference: no directories, no open files.
    wait_until(lambda: request(mount.control, "vm.list") == [])
    assert request(mount.control, "vm.list") == []
    assert [name for name in os.listdir(mount.path) if "-" in name] == []
    status = request(mount.control, "status")
    assert status["vms"] == 0 and status["open_files"] == 0


def test_readers_while_vms_come_and_go(empty_mount: Mount) -> None:
    readers, created = churn(empty_mount, seconds=8, seed=1)
    check_clean(empty_mount, readers, created)


@pytest.mark.stress
def test_readers_while_vms_come_and_go_long(empty_mount: Mount) -> None:
    readers, created = churn(empty_mount, seconds=120, seed=2)
    check_clean(empty_mount, readers, created)
