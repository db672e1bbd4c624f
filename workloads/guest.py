"""The guest OS of a VM: booting it under the VM's MMU, and finding it again for later workloads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvmdbgfs.guest.kernel import GuestKernel
from kvmdbgfs.guest.userspace import Userspace
from kvmdbgfs.guest.virtio import VirtioDrivers

if TYPE_CHECKING:
    from kvmdbgfs.vmm.qemu import QemuProcess


def boot_guest(vm: QemuProcess, rng: np.random.Generator, logins: int = 1) -> Userspace:
    """Start the guest kernel on the VM's MMU (its GuestHardware) and bring it to an idle multi-user system
    with ``logins`` users logged in; its virtio drivers probe the VM's devices."""
    if vm.guest is not None:
        raise ValueError(f"VM {vm.name} has already booted")
    kernel = GuestKernel(vm.memory, vm.kvm.arch.guest_hardware, rng, nr_vcpus=vm.nr_vcpus)
    system = kernel.boot(logins)
    VirtioDrivers(system).probe()
    vm.boot(system)
    assert vm.guest is not None
    return vm.guest


def booted_guest(vm: QemuProcess) -> Userspace:
    """The running guest of a VM; ValueError when the VM has not booted yet."""
    if vm.guest is None:
        raise ValueError(f"VM {vm.name} has not booted: run the idle workload on it first")
    return vm.guest


def require_booted(vm: QemuProcess) -> None:
    """check_vm() for workloads that need a running guest."""
    booted_guest(vm)
