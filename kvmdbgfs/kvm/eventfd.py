"""ioeventfds on a VM's PIO bus (virt/kvm/eventfd.c kvm_assign_ioeventfd(), kvm_main.c kvm_io_bus_write()).

A port the VMM registered is served inside the kernel: the guest's OUT exits, KVM signals the eventfd and
re-enters the guest at once, without returning to userspace. The VMM's backend wakes on the signal.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

# What an eventfd signal reaches: the backend, told the guest time of the write.
EventfdSignal = Callable[[int], None]


class KvmIoBus:
    """kvm->buses[KVM_PIO_BUS]: the registered ports and their eventfds."""

    def __init__(self) -> None:
        self._devs: dict[int, EventfdSignal] = {}
        self._lock = threading.Lock()  # kvm->slots_lock, which kvm_assign_ioeventfd() takes

    def kvm_assign_ioeventfd(self, port: int, signal: EventfdSignal) -> None:
        """KVM_IOEVENTFD: writes to ``port`` signal ``signal``; a port already taken is -EEXIST."""
        with self._lock:
            if port in self._devs:
                raise FileExistsError(f"port {port:#x} already has an ioeventfd")
            self._devs[port] = signal

    def kvm_io_bus_write(self, port: int, now_ns: int) -> bool:
        """A guest write to ``port`` at ``now_ns``: True when an ioeventfd took it (else it exits to userspace)."""
        signal = self._devs.get(port)
        if signal is None:
            return False
        signal(now_ns)
        return True
