"""The x86 vCPU run loop: vcpu_run(), vcpu_enter_guest(), vcpu_block() and the VMX exit handlers' stats
(arch/x86/kvm/x86.c, arch/x86/kvm/vmx/vmx.c), with the LAPIC's TSC-deadline timer and IRR (lapic.c).

The emulation is event-driven. A vCPU thread blocked in KVM_RUN is resumed by the VMM at the guest time
its next wake-up arrives (its TSC deadline, or an interrupt another vCPU or a device sent): kvm_vcpu_halt()
then accounts the halt that ended there, vcpu_enter_guest() injects what is pending, and the guest's code
runs (``GuestCpu.interrupt``) until it executes HLT again. Everything the guest does on the way exits
here or in the MMU as the hardware would. Where a counter moves, and why:

- ``exits``: every VM exit (the MMU's are counted in ``MmuVcpu.count_exit``). TSC-deadline writes and
  preemption-timer expiries are handled in the fastpath and re-enter at once; kernels before commit
  8b703a49c9df (in 6.4+, backported to 5.15.y/6.1.y later) did not count those (``counts_fastpath_exits``).
- ``halt_exits``: each HLT (__kvm_emulate_halt); the halt itself is kvmdbgfs.kvm.halt.kvm_vcpu_halt().
- ``irq_injections``, ``req_event``, ``irq_window_exits``: one event-injection per entry
  (vmx_inject_irq; this host has no APICv, so LAPIC interrupts are injected, not posted); a second
  pending vector waits for an interrupt window (handle_interrupt_window).
- ``irq_exits``: host interrupts (the host's own timer tick, HOST_HZ) arriving while guest code runs.
- ``io_exits``: IN/OUT (handle_io); ``hypercalls`` and ``directed_yield_*``: VMCALL (kvm_emulate_hypercall,
  kvm_sched_yield); x2APIC ICR writes are MSR exits that deliver an IPI.
- ``host_state_reload``: the vCPU thread scheduled out while blocked in a halt (vmx_prepare_switch_to_host
  from kvm_sched_out); ``preemption_reported`` / ``preemption_other``: the host's own load preempting a
  running vCPU thread after a host-interrupt exit or elsewhere (kvm_steal_time_set_preempted).
- ``l1d_flush``: vmx_l1d_flush() before a VM entry, on an L1TF-affected host and only with EPT (kvmdbgfs/
  host_model.py): with vmentry_l1d_flush=cond when the vCPU thread was scheduled in (kvm_arch_sched_in) or a
  host interrupt ran (the per-CPU flag its entry code sets) since the last entry; with =always at every entry.
- ``signal_exits``, ``request_irq_exits``, ``fpu_reload``: KVM_RUN returns to QEMU and QEMU's userspace
  irqchip; the emulated QEMU keeps its vCPU threads in KVM_RUN and uses the in-kernel irqchip, so 0.
- ``guest_mode``, ``nested_run``: 0, there are no nested guests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from kvmdbgfs.kvm.halt import HaltPollParams, HaltPollState, kvm_vcpu_halt, kvm_vcpu_is_blocking

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.mmu.vcpu_mmu import MmuVcpu
    from kvmdbgfs.kvm.eventfd import KvmIoBus
    from kvmdbgfs.kvm.vcpu import KvmVcpu

MSR_IA32_TSC_DEADLINE = 0x6E0
APIC_BASE_MSR = 0x800
X2APIC_ICR = APIC_BASE_MSR + 0x30  # x2APIC interrupt command register
KVM_HC_KICK_CPU = 5
KVM_HC_SEND_IPI = 10
KVM_HC_SCHED_YIELD = 11
# The vectors a Linux guest puts in its LVT timer entry and uses for reschedule IPIs.
LOCAL_TIMER_VECTOR = 0xEC
RESCHEDULE_VECTOR = 0xFD
GUEST_HZ = 250  # CONFIG_HZ of the guest kernel (Ubuntu's generic kernel): its tick while busy

# Guest-time costs: an exit round trip with its handling (a shadow page fault with its rmap work is the
# bulk of them), and the guest code around one interrupt (entry, handler, softirq, back to idle). Guest
# code that does not exit costs what the guest says it ran (``execute``).
NS_PER_EXIT = 600
NS_PER_INTERRUPT = 8_000
HOST_HZ = 250  # the host's scheduler tick, which interrupts a vCPU running guest code


class GuestCpu(Protocol):
    """What the hardware runs on a vCPU: the guest's interrupt entry (the guest ends by executing HLT)."""

    def interrupt(self, cpu: int, vectors: list[int], now_ns: int, then_idle: bool = True) -> None:
        """Take ``vectors`` at ``now_ns``; then HLT, unless the CPU has work to go back to."""

    def idle_cpu(self, cpu: int, interrupts: int) -> None:
        """The CPU has nothing to run: the guest's idle loop ends in HLT."""


@dataclass(frozen=True)
class HostCpu:
    """The host CPU model: its L1TF flush mode (off, cond, always), whether KVM runs the iTLB-multihit
    mitigation (kvm.nx_huge_pages), its scheduler tick, and how often its own load preempts a running vCPU
    thread (per second of guest code run)."""

    l1d_flush: str = "off"
    nx_huge_pages: bool = False
    hz: int = HOST_HZ
    preemptions_per_s: float = 2.0


@dataclass(eq=False)
class VcpuRun:
    """The run-loop state of one vCPU: its clock, its LAPIC (TSC deadline, IRR), halt and guest mode."""

    vcpu: KvmVcpu
    mmu: MmuVcpu
    now_ns: int = 0
    tscdeadline_ns: int | None = None
    irr: list[tuple[int, int]] = field(default_factory=list)  # (arrival ns, vector)
    halted: bool = True  # before its first KVM_RUN the vCPU has not run: it waits like a halted one
    ran: bool = False
    halt_start_ns: int = 0
    halt_poll: HaltPollState = field(default_factory=HaltPollState)
    busy_exits: int = 0  # nr_exits when the guest code now running was entered
    compute_ns: int = 0  # guest code that caused no exit, run since then
    guest_ns_run: int = 0  # guest code run in total, for the host's preemptions of this thread
    l1tf_flush_l1d: bool = False  # vcpu->arch.l1tf_flush_l1d: scheduled in since the last entry
    l1d_exits: int = 0  # nr_exits up to which re-entries were given their L1D flush (=always)

    def next_wake_ns(self) -> int | None:
        """When this vCPU next has something to run: a pending interrupt, else its TSC deadline."""
        if self.irr:
            return min(arrival for arrival, _ in self.irr)
        return self.tscdeadline_ns


class VcpuRunLoop:
    """vcpu_run() for every vCPU of one VM, and the exits the guest's own instructions cause."""

    def __init__(
        self,
        halt_params: HaltPollParams,
        host_cpu: HostCpu,
        counts_fastpath_exits: bool,
        pio_bus: KvmIoBus,
        l1d_flush: str = "off",
    ) -> None:
        self.halt_params = halt_params
        self.host_cpu = host_cpu
        self.l1d_flush = l1d_flush  # the host's mode, "off" for a VM without EPT
        self.counts_fastpath_exits = counts_fastpath_exits
        self.pio_bus = pio_bus
        self.runs: dict[int, VcpuRun] = {}

    def add_vcpu(self, vcpu: KvmVcpu, mmu: MmuVcpu) -> None:
        self.runs[vcpu.vcpu_id] = VcpuRun(vcpu, mmu)

    def next_wake(self) -> tuple[int, int] | None:
        """(time, vcpu id) of the earliest vCPU with something to run."""
        best: tuple[int, int] | None = None
        for vcpu_id, run in self.runs.items():
            when = run.next_wake_ns()
            if when is not None and (best is None or when < best[0]):
                best = (when, vcpu_id)
        return best

    # -- KVM_RUN -------------------------------------------------------------------------------

    def kvm_arch_vcpu_ioctl_run(self, vcpu_id: int, now_ns: int, guest: GuestCpu) -> None:
        """The vCPU thread wakes at ``now_ns`` (its deadline or a pending interrupt): vcpu_block() ends the
        halt, the expired timer is delivered, vcpu_enter_guest() injects and the guest runs until HLT."""
        vectors = self._vcpu_run_wake(self.runs[vcpu_id], now_ns)
        guest.interrupt(vcpu_id, vectors, self.runs[vcpu_id].now_ns)

    def _vcpu_run_wake(self, run: VcpuRun, now_ns: int) -> list[int]:
        """The halt ends at ``now_ns``, the expired timer is delivered, pending vectors are injected and the vCPU
        enters guest mode; returns the vectors the guest now takes."""
        if run.halted:
            # An interrupt sent while this vCPU was still running its last handler is taken at its HLT.
            self._vcpu_block(run, max(now_ns, run.halt_start_ns))
        run.now_ns = max(run.now_ns, now_ns)
        if run.tscdeadline_ns is not None and run.tscdeadline_ns <= run.now_ns:
            self._apic_timer_expired(run)
        vectors = self._inject_pending(run)
        self._enter_guest_mode(run)
        return vectors

    def _vcpu_block(self, run: VcpuRun, wake_ns: int) -> None:
        """vcpu_block() -> kvm_vcpu_halt(): the halt from halt_start to the wake; a vCPU that really slept was
        scheduled out (host_state_reload) and comes back on a fresh schedule-in (l1d_flush on L1TF hosts)."""
        run.halted = False
        if not run.ran:  # the first KVM_RUN: nothing was halted yet
            run.ran = True
            return
        outcome = kvm_vcpu_halt(run.vcpu.stat, run.halt_poll, self.halt_params, run.halt_start_ns, wake_ns)
        if outcome.waited:
            run.vcpu.stat.host_state_reload += 1
            run.l1tf_flush_l1d = True  # kvm_arch_sched_in()

    def _apic_timer_expired(self, run: VcpuRun) -> None:
        """apic_timer_expired(): the TSC deadline passed; the LOCAL_TIMER vector becomes pending."""
        assert run.tscdeadline_ns is not None
        run.irr.append((run.tscdeadline_ns, LOCAL_TIMER_VECTOR))
        run.tscdeadline_ns = None

    def _inject_pending(self, run: VcpuRun) -> list[int]:
        """kvm_check_and_inject_events() per entry: KVM_REQ_EVENT, one injection; each further pending vector
        waits for the interrupt window that opens when the guest has taken the previous one."""
        due = sorted(vector for arrival, vector in run.irr if arrival <= run.now_ns)
        run.irr = [(arrival, vector) for arrival, vector in run.irr if arrival > run.now_ns]
        stat = run.vcpu.stat
        for n, _ in enumerate(due):
            stat.req_event += 1
            stat.irq_injections += 1
            if n:
                self._exit(run)
                stat.irq_window_exits += 1
        return due

    def _enter_guest_mode(self, run: VcpuRun) -> None:
        run.mmu.in_guest_mode = True
        if self.l1d_flush == "always" or (self.l1d_flush == "cond" and run.l1tf_flush_l1d):
            run.vcpu.stat.l1d_flush += 1
        run.l1tf_flush_l1d = False
        self._accounted(run)

    def _l1d_flush_reentries(self, run: VcpuRun, halting: bool) -> None:
        """vmentry_l1d_flush=always: every exit the vCPU went back into the guest from flushed on that entry
        (an exit to HLT is entered again at the wake-up, in _enter_guest_mode)."""
        if self.l1d_flush == "always":
            run.vcpu.stat.l1d_flush += run.mmu.nr_exits - run.l1d_exits - int(halting)
        run.l1d_exits = run.mmu.nr_exits

    @staticmethod
    def _accounted(run: VcpuRun) -> None:
        """What the vCPU ran so far has been given its guest time: count from here."""
        run.busy_exits = run.mmu.nr_exits
        run.compute_ns = 0

    def _exit(self, run: VcpuRun) -> None:
        run.mmu.count_exit()

    def busy_ns(self, run: VcpuRun, interrupts: int = 0) -> int:
        """The guest code run since entry: its interrupts, every exit it took, and what it computed."""
        return interrupts * NS_PER_INTERRUPT + (run.mmu.nr_exits - run.busy_exits) * NS_PER_EXIT + run.compute_ns

    def pending_ns(self) -> int:
        """The guest time the busiest vCPU's code since its entry takes (a boot's, before the first KVM_RUN)."""
        return max((self.busy_ns(run) for run in self.runs.values()), default=0)

    # -- exits the guest's instructions cause ------------------------------------------------------

    def hlt(self, vcpu_id: int, interrupts: int = 1) -> None:
        """HLT: handle_halt() -> __kvm_emulate_halt(); the vCPU is HALTED from the end of what it ran."""
        run = self.runs[vcpu_id]
        self._exit(run)
        run.vcpu.stat.halt_exits += 1
        ran = self.busy_ns(run, interrupts)
        self._host_interrupts(run, ran)
        self._l1d_flush_reentries(run, halting=True)
        run.now_ns += ran
        run.mmu.in_guest_mode = False
        run.halted = True
        run.halt_start_ns = run.now_ns

    def wrmsr(self, vcpu_id: int, msr: int, value: int) -> None:
        """WRMSR: TSC_DEADLINE arms the LAPIC timer (a fastpath exit); the x2APIC ICR sends an IPI."""
        run = self.runs[vcpu_id]
        if msr == MSR_IA32_TSC_DEADLINE:
            if self.counts_fastpath_exits:
                self._exit(run)
            run.tscdeadline_ns = value or None
        elif msr == X2APIC_ICR:
            self._exit(run)
            self.kvm_apic_send_ipi(run, [value >> 32], value & 0xFF)
        else:
            raise ValueError(f"MSR {msr:#x} is not modelled")

    def execute(self, vcpu_id: int, ns: int) -> None:
        """The guest runs ``ns`` of code that causes no exit (a compiler's own work): only time passes."""
        self.runs[vcpu_id].compute_ns += ns

    def pio(self, vcpu_id: int, port: int) -> None:
        """OUT: handle_io() -> kernel_pio(): a port with an ioeventfd (a virtio queue notify) is served in the
        kernel; nothing else the guest writes is modelled (it would exit to userspace)."""
        run = self.runs[vcpu_id]
        self._exit(run)
        run.vcpu.stat.io_exits += 1
        if not self.pio_bus.kvm_io_bus_write(port, run.now_ns + self.busy_ns(run)):
            raise ValueError(f"port {port:#x} has no ioeventfd: its exit to userspace is not modelled")

    def vmcall(self, vcpu_id: int, nr: int, targets: list[int], vector: int = 0) -> None:
        """VMCALL: kvm_emulate_hypercall(): PV send-IPI, or a directed yield to a preempted vCPU."""
        run = self.runs[vcpu_id]
        self._exit(run)
        run.vcpu.stat.hypercalls += 1
        if nr == KVM_HC_SEND_IPI:
            self.kvm_apic_send_ipi(run, targets, vector)
        elif nr in (KVM_HC_SCHED_YIELD, KVM_HC_KICK_CPU):
            run.vcpu.stat.directed_yield_attempted += 1  # kvm_sched_yield(): the target runs already
        else:
            raise ValueError(f"hypercall {nr} is not modelled")

    def kvm_apic_send_ipi(self, sender: VcpuRun, targets: list[int], vector: int) -> None:
        """kvm_irq_delivery_to_apic(): the vector becomes pending on each target at the sender's time."""
        when = sender.now_ns + self.busy_ns(sender, 0)
        for target in targets:
            self.kvm_set_irq(target, vector, when)

    def kvm_set_irq(self, vcpu_id: int, vector: int, when_ns: int) -> None:
        """An interrupt for a vCPU (an IPI, or a device's MSI through an irqfd) from ``when_ns`` on."""
        self.runs[vcpu_id].irr.append((when_ns, vector))

    # -- the host side -------------------------------------------------------------------------------

    def _host_interrupts(self, run: VcpuRun, ran_ns: int) -> None:
        """Host ticks that arrived while guest code ran exit with EXTERNAL_INTERRUPT (handle_external_interrupt);
        now and then the host's load preempts the vCPU thread there (reported) or elsewhere (other)."""
        before = run.guest_ns_run
        run.guest_ns_run += ran_ns
        ticks = run.guest_ns_run * self.host_cpu.hz // 1_000_000_000 - before * self.host_cpu.hz // 1_000_000_000
        stat = run.vcpu.stat
        for _ in range(ticks):
            self._exit(run)
            stat.irq_exits += 1
        flushes = ticks  # =cond: the interrupt set the per-CPU flag, the entry after it flushes
        period = int(1e9 / self.host_cpu.preemptions_per_s) if self.host_cpu.preemptions_per_s else 0
        if period:
            preemptions = run.guest_ns_run // period - before // period
            for n in range(preemptions):
                if ticks and n % 2 == 0:
                    stat.preemption_reported += 1
                else:
                    stat.preemption_other += 1
                    flushes += 1  # scheduled in again away from a tick's exit
                stat.host_state_reload += 1
        if self.l1d_flush == "cond":
            stat.l1d_flush += flushes

    def run_guest_code(self, start_ns: int, guest: GuestCpu) -> int:
        """The vCPUs that have run guest code since their last accounting (a workload's step) ran it side by side
        from ``start_ns``; returns the guest time at which the longest of them ends. A vCPU left in guest mode
        with nothing to run in this step has run out of work: the guest idles it."""
        spent = {vcpu_id: self.busy_ns(run) for vcpu_id, run in self.runs.items()}
        end = start_ns + max(spent.values(), default=0)
        for vcpu_id, run in self.runs.items():
            if spent[vcpu_id]:
                self.busy(vcpu_id, start_ns, end, guest)
                self._accounted(run)
            elif not run.halted:
                guest.idle_cpu(vcpu_id, 0)
        return end

    def busy(self, vcpu_id: int, start_ns: int, end_ns: int, guest: GuestCpu) -> None:
        """The vCPU runs guest code from ``start_ns`` to ``end_ns``: a halted one is woken by a reschedule IPI
        (it takes what is pending and goes back to its task), it takes its scheduler tick at the guest's HZ
        (the TSC-deadline timer), and stays in guest mode until the guest halts it."""
        run = self.runs[vcpu_id]
        if run.halted:
            wake = max(start_ns, run.halt_start_ns)
            self.kvm_set_irq(vcpu_id, RESCHEDULE_VECTOR, wake)
            vectors = self._vcpu_run_wake(run, wake)
            guest.interrupt(vcpu_id, vectors, run.now_ns, then_idle=False)
        run.mmu.in_guest_mode = True
        ticks = end_ns * GUEST_HZ // 1_000_000_000 - max(start_ns, run.now_ns) * GUEST_HZ // 1_000_000_000
        stat = run.vcpu.stat
        for _ in range(max(ticks, 0)):
            if self.counts_fastpath_exits:
                self._exit(run)  # the preemption-timer exit, handled in the fastpath
                self._exit(run)  # the guest arms its next tick
            stat.req_event += 1
            stat.irq_injections += 1
        self._host_interrupts(run, max(end_ns - run.now_ns, 0))
        self._l1d_flush_reentries(run, halting=False)
        run.now_ns = max(run.now_ns, end_ns)

    def blocking_at(self, now_ns: int) -> None:
        """The instant ``blocking`` stat as a reader sees it at ``now_ns``: 1 for a vCPU asleep in its halt."""
        for run in self.runs.values():
            blocking = run.halted and run.ran and kvm_vcpu_is_blocking(
                run.halt_poll, self.halt_params, run.halt_start_ns, now_ns
            )
            run.vcpu.stat.blocking = int(blocking)

