"""QEMU's virtio backends for one VM, seen from KVM: interrupts into the guest (MSI-X through irqfds) and
the guest's queue notifications out of it (port writes KVM serves with the ioeventfds registered here).

- virtio-net: the LAN delivers background traffic (ARP, neighbour discovery, mDNS, NTP): a Poisson stream
  of NET_RX_PER_S packets a second, each an RX interrupt. The guest's notifies (RX refill, TX) need no
  answer from the backend.
- virtio-blk: a request notified by the guest completes BLK_LATENCY_NS later with an interrupt.

Where each interrupt goes is the MSI-X table the guest's drivers programmed (kvmdbgfs.guest.virtio).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvmdbgfs.guest.irq import NSEC_PER_SEC
from kvmdbgfs.guest.virtio import (
    VIRTIO_BLK_NOTIFY_PORT,
    VIRTIO_NET_RX_NOTIFY_PORT,
    VIRTIO_NET_TX_NOTIFY_PORT,
    msix_routes,
)

if TYPE_CHECKING:
    from kvmdbgfs.kvm.vm import Kvm

NET_RX_PER_S = 2.0
BLK_LATENCY_NS = 150_000


class VirtioDevices:
    """The VM's virtio-net and virtio-blk backends."""

    def __init__(self, kvm: Kvm, rng: np.random.Generator) -> None:
        self.kvm = kvm
        self.rng = rng
        self.routes = msix_routes(len(kvm.vcpus))
        self.next_packet_ns: int | None = None
        kvm.pio_bus.kvm_assign_ioeventfd(VIRTIO_NET_RX_NOTIFY_PORT, self._net_notified)
        kvm.pio_bus.kvm_assign_ioeventfd(VIRTIO_NET_TX_NOTIFY_PORT, self._net_notified)
        kvm.pio_bus.kvm_assign_ioeventfd(VIRTIO_BLK_NOTIFY_PORT, self._blk_notified)

    def start(self, now_ns: int) -> None:
        """The guest's drivers are up: the LAN's traffic reaches it from ``now_ns`` on."""
        self.next_packet_ns = now_ns + self._gap_ns()

    def _gap_ns(self) -> int:
        return max(int(self.rng.exponential(NSEC_PER_SEC / NET_RX_PER_S)), 1)

    def next_event_ns(self) -> int | None:
        """When the LAN next delivers a packet (None before the guest's drivers are up)."""
        return self.next_packet_ns

    def deliver(self) -> None:
        """vhost-net receives the packet and signals the RX irqfd."""
        assert self.next_packet_ns is not None
        route = self.routes["virtio-net"]
        self.kvm.kvm_send_userspace_msi(route.cpu, route.vector, self.next_packet_ns)
        self.next_packet_ns += self._gap_ns()

    def _net_notified(self, now_ns: int) -> None:
        """vhost-net's RX refill and TX kicks: buffers to use, nothing to answer."""

    def _blk_notified(self, now_ns: int) -> None:
        """The block backend takes the request and completes it BLK_LATENCY_NS later."""
        route = self.routes["virtio-blk"]
        self.kvm.kvm_send_userspace_msi(route.cpu, route.vector, now_ns + BLK_LATENCY_NS)
