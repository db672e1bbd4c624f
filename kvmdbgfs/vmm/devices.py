"""QEMU's virtio backends for one VM, seen from KVM: interrupts into the guest (MSI-X through irqfds) and
the guest's notifications out of it (port writes served by ioeventfds).

- virtio-net: the LAN delivers background traffic (ARP, neighbour discovery, mDNS, NTP): a Poisson stream
  of NET_RX_PER_S packets a second, each an RX interrupt on vCPU 0. The guest's handler refills the RX ring
  and notifies; it answers one packet in REPLY_EVERY (an ARP reply: a TX notify).
- virtio-blk: the guest's writeback (wb_workfn, every dirty_writeback_interval = 5 s) writes what its
  daemons logged: one request, completed by the backend BLK_LATENCY_NS later with an interrupt on vCPU 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvmdbgfs.guest.irq import NSEC_PER_SEC

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.x86 import VcpuRunLoop
    from kvmdbgfs.guest.userspace import Userspace

NET_RX_PER_S = 2.0
REPLY_EVERY = 4
DIRTY_WRITEBACK_INTERVAL = 5.0
BLK_LATENCY_NS = 150_000
VIRTIO_NET_VECTOR, VIRTIO_BLK_VECTOR = 0x22, 0x23  # what the guest's MSI-X setup assigned
VIRTIO_NET_NOTIFY_PORT, VIRTIO_BLK_NOTIFY_PORT = 0xC050, 0xC090  # legacy virtio I/O BARs, queue notify


class VirtioDevices:
    """The VM's virtio-net and virtio-blk: the backends' interrupts, and the guest drivers' handlers."""

    def __init__(self, run: VcpuRunLoop, rng: np.random.Generator, nr_vcpus: int) -> None:
        self.run = run
        self.rng = rng
        self.net_cpu, self.blk_cpu = 0, min(1, nr_vcpus - 1)
        self.next_packet_ns: int | None = None
        self.packets = 0

    def attach(self, system: Userspace, now_ns: int) -> None:
        """The guest's drivers probe: their interrupt handlers, and the writeback timer."""
        system.device_handlers[VIRTIO_NET_VECTOR] = self.virtnet_poll
        system.device_handlers[VIRTIO_BLK_VECTOR] = self.virtblk_done
        system.add_timer(self.blk_cpu, system.now + DIRTY_WRITEBACK_INTERVAL, self.wb_workfn)
        self.hw = system.kernel.hw
        self.next_packet_ns = now_ns + self._gap_ns()

    def _gap_ns(self) -> int:
        return max(int(self.rng.exponential(NSEC_PER_SEC / NET_RX_PER_S)), 1)

    def next_event_ns(self) -> int | None:
        """When the LAN next delivers a packet."""
        return self.next_packet_ns

    def deliver(self) -> None:
        """vhost-net receives the packet and signals the RX irqfd."""
        assert self.next_packet_ns is not None
        self.run.kvm_set_irq(self.net_cpu, VIRTIO_NET_VECTOR, self.next_packet_ns)
        self.next_packet_ns += self._gap_ns()

    # -- the guest's drivers --------------------------------------------------------------------

    def virtnet_poll(self, cpu: int) -> None:
        """virtnet_poll(): take the packet, refill the RX ring and notify; now and then transmit a reply."""
        self.packets += 1
        self.hw.pio(cpu, VIRTIO_NET_NOTIFY_PORT)
        if self.packets % REPLY_EVERY == 0:
            self.hw.pio(cpu, VIRTIO_NET_NOTIFY_PORT + 1)

    def wb_workfn(self, cpu: int) -> float:
        """The flusher writes the logged pages: one request, notified; the backend completes it later."""
        self.hw.pio(cpu, VIRTIO_BLK_NOTIFY_PORT)
        when = self.run.runs[cpu].now_ns + BLK_LATENCY_NS
        self.run.kvm_set_irq(self.blk_cpu, VIRTIO_BLK_VECTOR, when)
        return DIRTY_WRITEBACK_INTERVAL

    def virtblk_done(self, cpu: int) -> None:
        """virtblk_done(): the request completed; the flusher's wait ends."""
