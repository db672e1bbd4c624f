"""The exporter-style collector (kvm_collector.py) against a tree whose VMs churn: 100 creates and destroys a
second through the control socket while it walks 50 times. os.walk must never take a VM's name for a file
(it would become a field, as kvm_stat's field list once showed VM names)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import Mount
from kvm_collector import collect

from kvmdbgfs.control.client import request

WALKS = 50
CHURN_PER_S = 100
LIVE_VMS = 4
VM_NAME = re.compile(r"[0-9]+-[0-9]+")


class Churn(threading.Thread):
    """Create and destroy VMs at CHURN_PER_S operations a second, keeping up to LIVE_VMS alive."""

    def __init__(self, control: Path) -> None:
        super().__init__(daemon=True)
        self.control = control
        self.stop = threading.Event()
        self.operations = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        live: list[str] = []
        start = time.monotonic()
        try:
            while not self.stop.is_set():
                if len(live) < LIVE_VMS:
                    live.append(request(self.control, "vm.create", memory="64M", vcpus=1)["name"])
                else:
                    request(self.control, "vm.destroy", name=live.pop(0))
                self.operations += 1
                self.stop.wait(max(0.0, start + self.operations / CHURN_PER_S - time.monotonic()))
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_no_vm_name_is_taken_for_a_file_under_churn(mount_factory) -> None:
    mount: Mount = mount_factory("--scenario", "empty")
    fields = collect(str(mount.path)).fields
    churn = Churn(mount.control)
    churn.start()
    try:
        walks = [collect(str(mount.path)) for _ in range(WALKS)]
    finally:
        churn.stop.set()
        churn.join(timeout=30)
    assert churn.error is None and not churn.is_alive()
    assert churn.operations >= WALKS, "the VMs did not churn while the collector walked"
    assert [walk.fields for walk in walks if walk.fields != fields] == []
    assert not [name for name in fields if VM_NAME.fullmatch(name)]
    vm_samples = {vm for walk in walks for vm, _stat in walk.samples if vm}
    assert vm_samples and all(VM_NAME.fullmatch(vm) for vm in vm_samples)
    assert {stat for walk in walks for _vm, stat in walk.samples} <= set(fields)


def test_the_collector_prints_samples(mount_factory) -> None:
    mount: Mount = mount_factory("--scenario", "empty")
    name = request(mount.control, "vm.create", memory="64M", vcpus=1)["name"]
    script = Path(__file__).with_name("kvm_collector.py")
    out = subprocess.run([sys.executable, str(script), str(mount.path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out
    lines = out.stdout.splitlines()
    assert "kvm_exits 0" in lines and f'kvm_exits{{vm="{name}"}} 0' in lines
    assert not [line for line in lines if "mmu_rmaps_stat" in line]
