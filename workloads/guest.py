"""The guest OS of a VM: booting it under the VM's MMU, and finding it again for later workloads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvmdbgfs.guest.kernel import GuestKernel, KernelConfig
from kvmdbgfs.guest.userspace import Userspace
from kvmdbgfs.guest.virtio import VirtioDrivers

if TYPE_CHECKING:
    from kvmdbgfs.vmm.qemu import QemuProcess


def boot_guest(vm: QemuProcess, rng: np.random.Generator, logins: int = 1, pti: bool = False) -> Userspace:
    """Start the guest kernel on the VM's MMU (its GuestHardware) and bring it to an idle multi-user system
    with ``logins`` users logged in; its virtio drivers probe the VM's devices. ``pti``: the kernel runs
    with page-table isolation.

    A guest that runs out of memory while it boots has no process to kill: it panics ("System is deadlocked
    on memory"), and QEMU's VM stays in the guest-panicked state, where it runs no workload."""
    check_not_panicked(vm)
    if vm.guest is not None:
        raise ValueError(f"VM {vm.name} has already booted")
    try:
        config = KernelConfig(pti=pti)
        kernel = GuestKernel(vm.memory, vm.kvm.arch.guest_hardware, rng, nr_vcpus=vm.nr_vcpus, config=config)
        system = kernel.boot(logins)
    except MemoryError as exc:
        vm.guest_panicked = True
        raise MemoryError(f"{exc} while booting: the guest panicked (destroy the VM)") from exc
    VirtioDrivers(system).probe()
    vm.boot(system)
    assert vm.guest is not None
    return vm.guest


def booted_guest(vm: QemuProcess) -> Userspace:
    """The running guest of a VM; ValueError when the VM has not booted yet."""
    check_not_panicked(vm)
    if vm.guest is None:
        raise ValueError(f"VM {vm.name} has not booted: run the idle workload on it first")
    return vm.guest


def require_booted(vm: QemuProcess) -> None:
    """check_vm() for workloads that need a running guest."""
    booted_guest(vm)


def check_not_panicked(vm: QemuProcess) -> None:
    """Refuse a VM whose guest panicked while booting (ValueError)."""
    if vm.guest_panicked:
        raise ValueError(f"the guest of VM {vm.name} panicked while booting (out of memory): destroy the VM")
