"""The guest OS of a VM: booting it under the VM's MMU, and finding it again for later workloads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvmdbgfs.guest.kernel import GuestKernel
from kvmdbgfs.guest.userspace import Userspace

if TYPE_CHECKING:
    from kvmdbgfs.kvm.vm import Kvm


def boot_guest(kvm: Kvm, rng: np.random.Generator, logins: int = 1) -> Userspace:
    """Start the guest kernel on the VM's MMU (its GuestHardware) and bring it to an idle multi-user system
    with ``logins`` users logged in."""
    if kvm.guest is not None:
        raise ValueError(f"VM {kvm.name} has already booted")
    kernel = GuestKernel(kvm.config.memory, kvm.arch.mmu, rng, nr_vcpus=kvm.config.vcpus)
    kvm.guest = kernel.boot(logins)
    return kvm.guest


def booted_guest(kvm: Kvm) -> Userspace:
    """The running guest of a VM; ValueError when the VM has not booted yet."""
    if kvm.guest is None:
        raise ValueError(f"VM {kvm.name} has not booted: run the idle workload on it first")
    return kvm.guest


def require_booted(kvm: Kvm) -> None:
    """check_vm() for workloads that need a running guest."""
    booted_guest(kvm)
