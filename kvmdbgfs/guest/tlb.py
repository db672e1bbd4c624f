"""Per-vCPU TLB state: switch_mm_irqs_off, lazy TLB mode and the flush functions (arch/x86/mm/tlb.c).

Each vCPU has a loaded mm (None for init_mm) and may be lazy (a kernel thread
or an exiting task borrowing the previous mm). A flush of an mm reaches the
vCPUs that have it loaded: a non-lazy one flushes (INVLPG per page up to
tlb_single_page_flush_ceiling pages, else a full flush); a lazy one switches
to init_mm when it is the flushing CPU or tables were freed, and otherwise
is skipped and catches up through tlb_gen when it switches back.
Under page-table isolation (``pti``) all of it runs on a kernel pgd, and a flush on a vCPU
invalidates the user ASID too, which the next return to user space then flushes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol, TYPE_CHECKING

from mypy_extensions import mypyc_attr

from kvmdbgfs.guest.hardware import GuestHardware
from kvmdbgfs.guest.irq import CALL_FUNCTION_VECTOR, X2APIC_ICR, icr
from kvmdbgfs.guest.vaddr import PAGE_SIZE

if TYPE_CHECKING:
    from kvmdbgfs.guest.pti import PageTableIsolation

KVM_HC_SEND_IPI: Final = 10

TLB_SINGLE_PAGE_FLUSH_CEILING: Final = 33
TLB_FLUSH_ALL: Final = -1


class TlbMm(Protocol):
    pgd: int
    tlb_gen: int


@dataclass
class CpuTlbState:
    """cpu_tlbstate: the loaded mm (None: init_mm), whether the CPU is lazy, the tlb_gen it has caught up with."""

    loaded_mm: TlbMm | None = None
    is_lazy: bool = False
    loaded_gen: int = 0


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class Tlb:
    def __init__(
        self, hardware: GuestHardware, nr_cpus: int, init_pgd: int, pti: PageTableIsolation | None = None
    ) -> None:
        self.hw = hardware
        self.init_pgd = init_pgd
        self.pti = pti
        self.cpus = [CpuTlbState() for _ in range(nr_cpus)]
        for cpu in range(nr_cpus):
            hardware.load_cr3(cpu, init_pgd)

    def _kernel_mode(self, cpu: int) -> None:
        """The code that follows runs in the kernel on ``cpu``: under PTI, on a kernel pgd."""
        if self.pti is not None:
            self.pti.to_kernel(cpu)

    def _flushed(self, cpu: int) -> None:
        """``cpu`` flushed (part of) its TLB: under PTI that was the kernel ASID, so the user one must follow."""
        if self.pti is not None:
            self.pti.invalidate_user_asid(cpu)

    def switch_mm(self, cpu: int, mm: TlbMm) -> None:
        """switch_mm_irqs_off: load ``mm``'s pgd unless it is already loaded (then catch up on missed flushes)."""
        state = self.cpus[cpu]
        self._kernel_mode(cpu)
        if state.loaded_mm is mm:
            if state.is_lazy and state.loaded_gen != mm.tlb_gen:
                self.hw.flush_tlb(cpu)
                self._flushed(cpu)
        else:
            self.hw.load_cr3(cpu, mm.pgd)
            self._flushed(cpu)
            state.loaded_mm = mm
        state.is_lazy = False
        state.loaded_gen = mm.tlb_gen

    def enter_lazy_tlb(self, cpu: int) -> None:
        """A kernel thread (or an exiting task) keeps the previous mm loaded."""
        self._kernel_mode(cpu)
        self.cpus[cpu].is_lazy = self.cpus[cpu].loaded_mm is not None

    def switch_to_init_mm(self, cpu: int) -> None:
        """switch_mm_irqs_off(NULL, &init_mm): leave a lazily held mm."""
        self._kernel_mode(cpu)
        self.hw.load_cr3(cpu, self.init_pgd)
        self._flushed(cpu)
        self.cpus[cpu] = CpuTlbState()

    def loaded_on(self, mm: TlbMm) -> list[int]:
        """mm_cpumask(mm): the vCPUs that have ``mm`` loaded (lazily or not)."""
        return [cpu for cpu, state in enumerate(self.cpus) if state.loaded_mm is mm]

    def flush_tlb_mm_range(
        self, mm: TlbMm, cpu: int, start: int, end: int, freed_tables: bool, stride: int = PAGE_SIZE
    ) -> None:
        """flush_tlb_mm_range from vCPU ``cpu``; ``end`` TLB_FLUSH_ALL flushes everything (flush_tlb_mm).
        ``stride`` is the page size the range was mapped with (PMD_SIZE for a THP)."""
        mm.tlb_gen += 1
        full = end == TLB_FLUSH_ALL or (end - start) // stride > TLB_SINGLE_PAGE_FLUSH_CEILING
        targets = self.loaded_on(mm)
        self.send_call_function_ipi(cpu, [t for t in targets if t != cpu and not self.cpus[t].is_lazy])
        for target in sorted(targets, key=lambda c: c != cpu):  # the local flush first
            state = self.cpus[target]
            if state.is_lazy:
                if target == cpu or freed_tables:
                    self.switch_to_init_mm(target)
                continue
            self._kernel_mode(target)
            if full:
                self.hw.flush_tlb(target)
            else:
                for va in range(start, end, stride):
                    self.hw.invlpg(target, va)
            self._flushed(target)
            state.loaded_gen = mm.tlb_gen

    def send_call_function_ipi(self, cpu: int, targets: list[int]) -> None:
        """smp_call_function_many(): one target by an x2APIC ICR write, several by the PV send-IPI hypercall."""
        if len(targets) == 1:
            self.hw.wrmsr(cpu, X2APIC_ICR, icr(targets[0], CALL_FUNCTION_VECTOR))
        elif targets:
            self.hw.vmcall(cpu, KVM_HC_SEND_IPI, targets, CALL_FUNCTION_VECTOR)

    def flush_tlb_mm(self, mm: TlbMm, cpu: int) -> None:
        self.flush_tlb_mm_range(mm, cpu, 0, TLB_FLUSH_ALL, True)

    def flush_tlb_page(self, mm: TlbMm, cpu: int, va: int) -> None:
        self.flush_tlb_mm_range(mm, cpu, va, va + PAGE_SIZE, False)

    def flush_tlb_all(self) -> None:
        """flush_tlb_all: every vCPU flushes its whole TLB."""
        for cpu in range(len(self.cpus)):
            self._kernel_mode(cpu)
            self.hw.flush_tlb(cpu)
            self._flushed(cpu)

    def flush_tlb_kernel_range(self, start: int, end: int) -> None:
        """flush_tlb_kernel_range: on every vCPU, INVLPG each page or, past the ceiling, flush_tlb_all."""
        if (end - start) // PAGE_SIZE > TLB_SINGLE_PAGE_FLUSH_CEILING:
            self.flush_tlb_all()
            return
        for cpu in range(len(self.cpus)):
            self._kernel_mode(cpu)
            for va in range(start, end, PAGE_SIZE):
                self.hw.invlpg(cpu, va)
            self._flushed(cpu)  # flush_tlb_one_kernel: under PTI also flush_tlb_one_user
