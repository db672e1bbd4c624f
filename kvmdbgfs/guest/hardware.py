"""What the guest OS asks of the (virtual) CPU, and a bare-metal implementation for tests.

The guest kernel model performs every page-table store, CR3 load, TLB flush
and memory access through a ``GuestHardware``. On bare metal these are plain
stores and no-ops; under KVM (the MMU in ``kvmdbgfs/arch/x86/mmu``) a store
to a write-protected page-table page becomes an emulated write, an access
to an unmapped address becomes a page fault, and so on.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from kvmdbgfs.guest.memory import GuestMemory


class GuestHardware(Protocol):
    """The operations of a vCPU the guest kernel uses."""

    memory: GuestMemory

    def store_pte(self, vcpu_id: int, gfn: int, index: int, value: int) -> None:
        """The guest writes ``value`` into entry ``index`` of the page-table page ``gfn``."""

    def store_ptes(self, vcpu_id: int, gfn: int, indices: np.ndarray, values: np.ndarray) -> None:
        """Several stores into one page-table page, in order (a batch of ``store_pte``)."""

    def load_cr3(self, vcpu_id: int, root_gfn: int, noflush: bool = False) -> None:
        """A context switch: the vCPU now translates through the PML4 at ``root_gfn``; it flushes the TLB (of
        the PCID) unless ``noflush`` (CR3 bit 63 with PCIDs on)."""

    def access(self, vcpu_id: int, gvas: np.ndarray, write: bool, user: bool, fetch: bool = False) -> None:
        """The vCPU touches each address in ``gvas`` (in order) through the current CR3; ``fetch``: it executes
        instructions there (a fault then carries PFERR_FETCH_MASK)."""

    def invlpg(self, vcpu_id: int, gva: int) -> None:
        """INVLPG: drop the translation of one address."""

    def flush_tlb(self, vcpu_id: int) -> None:
        """A full (non-global) TLB flush, e.g. a CR3 reload by the guest's flush_tlb_mm."""

    def execute(self, vcpu_id: int, ns: int) -> None:
        """The vCPU runs ``ns`` of instructions that touch nothing the hypervisor sees (a program's own work)."""

    def hlt(self, vcpu_id: int, interrupts: int) -> None:
        """HLT: the vCPU idles until its next interrupt; ``interrupts`` is how many it handled since it woke."""

    def wrmsr(self, vcpu_id: int, msr: int, value: int) -> None:
        """WRMSR: the TSC deadline (ns of guest time) or an x2APIC ICR write (an IPI)."""

    def pio(self, vcpu_id: int, port: int) -> None:
        """An OUT to an I/O port (a virtio queue notify)."""

    def vmcall(self, vcpu_id: int, nr: int, targets: list[int], vector: int) -> None:
        """A KVM hypercall (PV send-IPI, PV sched-yield)."""


class BareMetal:
    """Hardware with no hypervisor: stores go to memory, everything else is free."""

    def __init__(self, memory: GuestMemory | None = None) -> None:
        self.memory = memory or GuestMemory()
        self.cr3: dict[int, int] = {}

    def store_pte(self, vcpu_id: int, gfn: int, index: int, value: int) -> None:
        self.memory.store_pte(gfn, index, value)

    def store_ptes(self, vcpu_id: int, gfn: int, indices: np.ndarray, values: np.ndarray) -> None:
        self.memory.table(gfn)[indices] = values

    def load_cr3(self, vcpu_id: int, root_gfn: int, noflush: bool = False) -> None:
        self.cr3[vcpu_id] = root_gfn

    def access(self, vcpu_id: int, gvas: np.ndarray, write: bool, user: bool, fetch: bool = False) -> None:
        """Nothing to do: bare-metal hardware walks the tables itself."""

    def invlpg(self, vcpu_id: int, gva: int) -> None:
        """Nothing to do on bare metal."""

    def flush_tlb(self, vcpu_id: int) -> None:
        """Nothing to do on bare metal."""

    def execute(self, vcpu_id: int, ns: int) -> None:
        """Nothing to account on bare metal."""

    def hlt(self, vcpu_id: int, interrupts: int) -> None:
        """Nothing to do on bare metal: the CPU sleeps."""

    def wrmsr(self, vcpu_id: int, msr: int, value: int) -> None:
        """Nothing to do on bare metal: the LAPIC takes the write."""

    def pio(self, vcpu_id: int, port: int) -> None:
        """Nothing to do on bare metal: the device takes the write."""

    def vmcall(self, vcpu_id: int, nr: int, targets: list[int], vector: int) -> None:
        """Bare metal has no hypervisor to call."""
