"""The guest's virtio drivers (drivers/net/virtio_net.c, drivers/block/virtio_blk.c) and its writeback.

What the guest sees of its two virtio devices is fixed by the PCI setup (legacy I/O BARs, whose queue
notify registers are ports) and by the MSI-X vectors its drivers assigned at probe, one per device, each
steered to one vCPU. The drivers' interrupt handlers and the flusher notify the devices with port
writes; the devices answer with interrupts (the VMM's backends, kvmdbgfs.vmm.devices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TYPE_CHECKING

from mypy_extensions import mypyc_attr

if TYPE_CHECKING:
    from kvmdbgfs.guest.userspace import Userspace

VIRTIO_NET_VECTOR, VIRTIO_BLK_VECTOR = 0x22, 0x23  # what the drivers' MSI-X setup assigned
VIRTIO_NET_RX_NOTIFY_PORT, VIRTIO_NET_TX_NOTIFY_PORT, VIRTIO_BLK_NOTIFY_PORT = 0xC050, 0xC051, 0xC090
NET_CPU, BLK_CPU = 0, 1  # the vCPUs the two MSI-X vectors are steered to (the blk one: the last vCPU if fewer)
REPLY_EVERY: Final = 4  # one packet in four gets an answer (an ARP or neighbour reply)
DIRTY_WRITEBACK_INTERVAL: Final = 5.0  # vm.dirty_writeback_centisecs = 500


@dataclass(frozen=True)
class MsixRoute:
    """Where a device's interrupt goes: the vCPU and vector its MSI-X table entry names."""

    cpu: int
    vector: int


def msix_routes(nr_vcpus: int) -> dict[str, MsixRoute]:
    """The MSI-X entries the drivers program at probe, by device."""
    return {
        "virtio-net": MsixRoute(NET_CPU, VIRTIO_NET_VECTOR),
        "virtio-blk": MsixRoute(min(BLK_CPU, nr_vcpus - 1), VIRTIO_BLK_VECTOR),
    }


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class VirtioDrivers:
    """virtio-net's NAPI poll, virtio-blk's completion and the flusher that feeds it, on one guest."""

    def __init__(self, system: Userspace) -> None:
        self.system = system
        self.hw = system.kernel.hw
        self.packets = 0
        self.requests = 0

    def probe(self) -> None:
        """virtnet_probe() / virtblk_probe(): the interrupt handlers, and the writeback timer (wb_workfn)."""
        routes = msix_routes(self.system.kernel.nr_vcpus)
        self.system.device_handlers[routes["virtio-net"].vector] = self.virtnet_poll
        self.system.device_handlers[routes["virtio-blk"].vector] = self.virtblk_done
        cpu = routes["virtio-blk"].cpu
        self.system.add_timer(cpu, self.system.now + DIRTY_WRITEBACK_INTERVAL, self.wb_workfn)

    def virtnet_poll(self, cpu: int) -> None:
        """virtnet_poll(): take the packet, refill the RX ring and notify; now and then transmit a reply."""
        self.packets += 1
        self.hw.pio(cpu, VIRTIO_NET_RX_NOTIFY_PORT)
        if self.packets % REPLY_EVERY == 0:
            self.hw.pio(cpu, VIRTIO_NET_TX_NOTIFY_PORT)

    def wb_workfn(self, cpu: int) -> float:
        """The flusher writes what the daemons logged: one request, notified; it runs again a period later."""
        self.requests += 1
        self.hw.pio(cpu, VIRTIO_BLK_NOTIFY_PORT)
        return DIRTY_WRITEBACK_INTERVAL

    def virtblk_done(self, cpu: int) -> None:
        """virtblk_done(): the request completed; the flusher's wait ends."""
