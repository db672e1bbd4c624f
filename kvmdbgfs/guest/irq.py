"""The guest's interrupt entry and its NOHZ timers: what a vCPU does from an interrupt back to HLT.

Linux on x86 under KVM: each CPU's next timer (hrtimer/timer wheel) is programmed into the LAPIC's
TSC-deadline MSR; an idle CPU stops its tick (NOHZ idle) and sleeps in HLT until that deadline or an
interrupt arrives. The timer interrupt runs the timers that are due on that CPU (daemons wake up); a
task woken for another CPU is sent a reschedule IPI (x2APIC ICR write). Device interrupts (virtio MSI-X)
run their driver's handler, which refills the queue and notifies the device (a port write to the virtio
legacy I/O BAR). The vectors are Linux's.
"""

from __future__ import annotations

from typing import Final

LOCAL_TIMER_VECTOR: Final = 0xEC
CALL_FUNCTION_VECTOR: Final = 0xFC
RESCHEDULE_VECTOR: Final = 0xFD
MSR_IA32_TSC_DEADLINE: Final = 0x6E0
X2APIC_ICR: Final = 0x830
NSEC_PER_SEC: Final = 1_000_000_000


def icr(dest_cpu: int, vector: int) -> int:
    """An x2APIC ICR value: fixed delivery, physical destination ``dest_cpu``."""
    return (dest_cpu << 32) | vector
