"""The host machine's model: a scenario's [host] table, `--host` overrides, and the L1TF flush (vmx_l1d_flush)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import MOUNT_PY, REPO, assert_one_error_line, mount_env

from kvmdbgfs.arch.x86.kvm_arch import X86KvmArchFactory
from kvmdbgfs.arch.x86.x86 import MSR_IA32_TSC_DEADLINE, HostCpu
from kvmdbgfs.host_model import HostModel
from kvmdbgfs.kvm.host import KvmHost
from kvmdbgfs.kvm.vm import Kvm
from kvmdbgfs.scenario import load_scenario

STATS = ("l1d_flush", "exits", "irq_exits", "host_state_reload", "preemption_reported")
TICK_NS = 10_000_000  # the guest's next timer, armed before each HLT
WORK_NS = 3_000_000  # the guest code run after each wake-up: host ticks and preemptions land in it


class TickingGuest:
    """A guest that, on each interrupt, computes a while, arms its TSC deadline and halts."""

    def __init__(self, kvm: Kvm) -> None:
        self.loop = kvm.arch.run

    def interrupt(self, cpu: int, vectors: list[int], now_ns: int, then_idle: bool = True) -> None:
        self.loop.execute(cpu, WORK_NS)
        self.loop.wrmsr(cpu, MSR_IA32_TSC_DEADLINE, now_ns + TICK_NS)
        self.loop.hlt(cpu)

    def idle_cpu(self, cpu: int, interrupts: int) -> None:
        raise AssertionError("not reached: the guest always halts")


def run_stats(mode: str, mmu: str) -> dict[str, int]:
    """One vCPU's run loop for 2 s of guest time on a host flushing the L1D as ``mode``; ends halted."""
    host = KvmHost(X86KvmArchFactory(HostCpu(l1d_flush=mode)))
    kvm = host.kvm_create_vm(host.make_config(memory="256M", vcpus=1, mmu=mmu, seed=0), "1234-10")
    vcpu = host.kvm_vm_ioctl_create_vcpu(kvm, 0)
    guest = TickingGuest(kvm)
    kvm.arch.kvm_arch_vcpu_ioctl_run(vcpu, 0, guest)
    while (wake := kvm.arch.vcpu_next_wakeup()) is not None and wake[0] < 2_000_000_000:
        kvm.arch.kvm_arch_vcpu_ioctl_run(vcpu, wake[0], guest)
    return {name: kvm.vcpu_stat_sum(name) for name in STATS}


@pytest.fixture(scope="module")
def by_mode() -> dict[str, dict[str, dict[str, int]]]:
    return {mode: {mmu: run_stats(mode, mmu) for mmu in ("shadow", "tdp")} for mode in ("off", "cond", "always")}


def test_without_ept_nothing_flushes_and_off_never_does(by_mode) -> None:
    assert [by_mode[mode]["shadow"]["l1d_flush"] for mode in by_mode] == [0, 0, 0]
    assert by_mode["off"]["tdp"]["l1d_flush"] == 0
    others = {mode: {k: v for k, v in stats["tdp"].items() if k != "l1d_flush"} for mode, stats in by_mode.items()}
    assert others["off"] == others["cond"] == others["always"]  # the mitigation changes no other counter
    assert others["off"]["irq_exits"] > 0 and others["off"]["host_state_reload"] > others["off"]["preemption_reported"]


def test_cond_flushes_after_a_schedule_in_or_a_host_interrupt(by_mode) -> None:
    """Each host-interrupt exit and each schedule-in (a blocking halt, a preemption) flushes the next entry;
    a preemption at a tick's exit is one entry for both."""
    tdp = by_mode["cond"]["tdp"]
    assert tdp["l1d_flush"] == tdp["irq_exits"] + tdp["host_state_reload"] - tdp["preemption_reported"] > 0


def test_always_flushes_every_entry(by_mode) -> None:
    """The vCPU entered once before its first exit and re-entered after every exit but its last HLT: entries
    equal exits."""
    tdp = by_mode["always"]["tdp"]
    assert tdp["l1d_flush"] == tdp["exits"] > by_mode["cond"]["tdp"]["l1d_flush"]


def test_the_scenario_host_table_is_read(tmp_path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[host]\nvendor = "intel"\nl1d_flush = "cond"\n')
    assert load_scenario(str(path)).host == HostModel(l1d_flush="cond")
    assert load_scenario("default").host == HostModel()


BAD_HOSTS = {
    'vendor = "amd"': "[host] vendor 'amd' is not modelled (SVM's memslots, NPT and TSC scaling differ): use intel",
    "nx_huge_pages = 2": "[host] nx_huge_pages must be true or false",
    'l1d_flush = "sometimes"': "[host] l1d_flush must be one of off, cond, always, not 'sometimes'",
    "colour = 1": "[host]: unknown keys ['colour'] (known: vendor, nx_huge_pages, l1d_flush)",
}


@pytest.mark.parametrize("line", BAD_HOSTS)
def test_a_bad_host_table_is_refused_with_one_line(tmp_path, line: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(f"[host]\n{line}\n")
    with pytest.raises(ValueError) as raised:
        load_scenario(str(path))
    message = BAD_HOSTS[line]
    assert str(raised.value).startswith(f"scenario {str(path)!r}: {message.rstrip('…')}")


def test_host_options_override_the_scenarios_host_table_in_a_mount(tmp_path, mount_factory) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[host]\nl1d_flush = "off"\n')
    mount = mount_factory("--scenario", str(path), "--host", "l1d_flush=always")
    name = mount.create_vm("--vcpus", "1", "--memory", "256M", "--mmu", "tdp")
    mount.cli("run", "idle", "--vm", name, "--set", "uptime=0", "--set", "workers=1", "--set", "logins=1")
    assert int(mount.sh(f"cat {name}/l1d_flush")) == int(mount.sh(f"cat {name}/exits")) > 0


def test_a_refused_host_option_is_one_line_and_mounts_nothing(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, str(MOUNT_PY), str(tmp_path), "--scenario", "empty", "--host", "vendor=amd"],
        cwd=REPO, env=mount_env(tmp_path), capture_output=True, text=True, timeout=60,
    )
    assert_one_error_line(result, 2, "mount.py: error: " + BAD_HOSTS['vendor = "amd"'])
