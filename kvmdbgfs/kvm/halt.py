"""Generic halt-polling (virt/kvm/kvm_main.c kvm_vcpu_halt and its helpers).

The model is event-driven: guest time is an integer count of nanoseconds, and
when a vCPU halts the emulator already knows when the event that makes it
runnable (an interrupt) arrives. One call accounts for the whole halt.

The kernel's rules, as modelled here:
- Before halting, the per-vCPU poll time is capped at the maximum (the
  halt_poll_ns module parameter, or the VM's KVM_CAP_HALT_POLL value).
- The vCPU polls only if the architecture allows it and its poll time is
  non-zero. A wake that arrives no later than start + poll time ends the poll
  with success: the vCPU never sleeps. Otherwise polling gives up at
  start + poll time and the vCPU sleeps until the wake; the waker then finds a
  sleeper (halt_wakeup) and the sleep is added to halt_wait_ns and its histogram.
- Poll statistics move only when polling was done: every poll is attempted,
  a poll that saw the wake is successful, and the poll time goes to the
  success or fail sum and histogram. An invalid wake-up (s390 only; always
  valid on x86) that ends a successful poll also counts as poll_invalid.
- Then the poll time adapts on the whole halt time: an invalid wake-up
  shrinks it; a halt no longer than the poll time leaves it; a halt longer than
  the maximum shrinks it (if non-zero); a halt shorter than the maximum grows it
  while it is below the maximum. With no maximum it is reset to 0.
- Histograms are log2: a value goes to bucket fls64(value), clamped to the last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvmdbgfs.kvm.stats import StatBlock

# arch/x86/include/asm/kvm_host.h: the x86 default of the halt_poll_ns module parameter.
KVM_HALT_POLL_NS_DEFAULT = 200000
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class HaltPollParams:
    """The kvm module parameters halt_poll_ns, halt_poll_ns_grow, halt_poll_ns_grow_start, halt_poll_ns_shrink.

    ``halt_poll_ns`` is the maximum poll time. ``shrink_floor`` and ``cap_before_halt`` select
    kernel-version behaviour; each kernel profile (kvm/profiles.py) names its own.
    """

    halt_poll_ns: int = KVM_HALT_POLL_NS_DEFAULT
    grow: int = 2
    grow_start: int = 10000
    shrink: int = 2
    shrink_floor: bool = True
    cap_before_halt: bool = True


@dataclass
class HaltPollState:
    """Per-vCPU: vcpu->halt_poll_ns (starts at 0)."""

    halt_poll_ns: int = 0


@dataclass(frozen=True)
class HaltOutcome:
    """What one halt did: its span [start_ns, start_ns + halt_ns], whether it polled and slept."""

    start_ns: int
    halt_ns: int
    polled: bool
    waited: bool
    poll_end_ns: int

    @property
    def wake_ns(self) -> int:
        return self.start_ns + self.halt_ns

    def is_blocking(self, now_ns: int) -> bool:
        """The instant ``blocking`` stat at now_ns: asleep after the poll window, before the wake."""
        return self.waited and self.poll_end_ns < now_ns < self.wake_ns


def fls64(value: int) -> int:
    """fls64(): 1-based index of the most significant set bit, 0 for 0."""
    return int(value).bit_length()


def kvm_stats_log_hist_update(hist: np.ndarray, value: int) -> int:
    """kvm_stats_log_hist_update(): count value in bucket fls64(value), clamped to the last; returns the bucket."""
    index = min(fls64(value), len(hist) - 1)
    hist[index] += np.uint64(1)
    return index


def grow_halt_poll_ns(state: HaltPollState, params: HaltPollParams) -> None:
    """grow_halt_poll_ns(): multiply by grow, start from grow_start; nothing if grow is 0."""
    if not params.grow:
        return
    val = max((state.halt_poll_ns * params.grow) & _U32, params.grow_start)
    if not params.cap_before_halt:
        val = min(val, params.halt_poll_ns)
    state.halt_poll_ns = val


def shrink_halt_poll_ns(state: HaltPollState, params: HaltPollParams) -> None:
    """shrink_halt_poll_ns(): divide by shrink (0 resets); below grow_start becomes 0 where the kernel does so."""
    val = state.halt_poll_ns // params.shrink if params.shrink else 0
    if params.shrink_floor and val < params.grow_start:
        val = 0
    state.halt_poll_ns = val


def update_halt_poll_stats(stat: StatBlock, start_ns: int, end_ns: int, success: bool, valid_wakeup: bool) -> None:
    """update_halt_poll_stats(): account one poll of end_ns - start_ns."""
    poll_ns = end_ns - start_ns
    stat.halt_attempted_poll += 1
    if success:
        stat.halt_successful_poll += 1
        if not valid_wakeup:
            stat.halt_poll_invalid += 1
        stat.halt_poll_success_ns += poll_ns
        kvm_stats_log_hist_update(stat.halt_poll_success_hist, poll_ns)
    else:
        stat.halt_poll_fail_ns += poll_ns
        kvm_stats_log_hist_update(stat.halt_poll_fail_hist, poll_ns)


def kvm_vcpu_wake_up(stat: StatBlock, has_waiter: bool) -> bool:
    """kvm_vcpu_wake_up(): counts halt_wakeup only when a sleeping vCPU was woken."""
    if has_waiter:
        stat.halt_wakeup += 1
    return has_waiter


def kvm_vcpu_block(stat: StatBlock, block_start_ns: int, wake_ns: int) -> bool:
    """kvm_vcpu_block(): sleep from block_start_ns until the wake; returns whether the vCPU slept."""
    stat.blocking = 1
    waited = wake_ns > block_start_ns
    if waited:
        kvm_vcpu_wake_up(stat, has_waiter=True)
    stat.blocking = 0
    return waited


def halt_poll_window_ns(state: HaltPollState, params: HaltPollParams, poll_allowed: bool = True) -> int:
    """How long the next halt polls: vcpu->halt_poll_ns as kvm_vcpu_halt() caps it, 0 if polling is not allowed."""
    if not poll_allowed:
        return 0
    if params.cap_before_halt:
        return min(state.halt_poll_ns, params.halt_poll_ns)
    return state.halt_poll_ns


def kvm_vcpu_is_blocking(
    state: HaltPollState, params: HaltPollParams, start_ns: int, now_ns: int, poll_allowed: bool = True
) -> bool:
    """kvm_vcpu_is_blocking() for a vCPU halted since start_ns and not yet woken at now_ns.

    Call it with the state as it was when the halt began (before kvm_vcpu_halt() adapts it).
    """
    return now_ns > start_ns + halt_poll_window_ns(state, params, poll_allowed)


def kvm_vcpu_halt(
    stat: StatBlock,
    state: HaltPollState,
    params: HaltPollParams,
    start_ns: int,
    wake_ns: int,
    valid_wakeup: bool = True,
    poll_allowed: bool = True,
) -> HaltOutcome:
    """kvm_vcpu_halt(): the vCPU halts at start_ns; the event that makes it runnable arrives at wake_ns.

    Updates stat (counters and histograms, in place) and state (the adapted poll time).
    """
    if wake_ns < start_ns:
        raise ValueError(f"wake_ns {wake_ns} is before start_ns {start_ns}")
    max_halt_poll_ns = params.halt_poll_ns
    if params.cap_before_halt and state.halt_poll_ns > max_halt_poll_ns:
        state.halt_poll_ns = max_halt_poll_ns
    do_halt_poll = poll_allowed and state.halt_poll_ns > 0

    waited = False
    poll_end_ns = start_ns
    if do_halt_poll and wake_ns <= start_ns + state.halt_poll_ns:
        poll_end_ns = wake_ns  # the poll saw the wake: no block
    else:
        if do_halt_poll:
            poll_end_ns = start_ns + state.halt_poll_ns
        waited = kvm_vcpu_block(stat, poll_end_ns, wake_ns)
        if waited:
            stat.halt_wait_ns += wake_ns - poll_end_ns
            kvm_stats_log_hist_update(stat.halt_wait_hist, wake_ns - poll_end_ns)
    halt_ns = wake_ns - start_ns

    if do_halt_poll:
        update_halt_poll_stats(stat, start_ns, poll_end_ns, not waited, valid_wakeup)

    if poll_allowed:
        if not valid_wakeup:
            shrink_halt_poll_ns(state, params)
        elif max_halt_poll_ns:
            if halt_ns <= state.halt_poll_ns:
                pass
            elif state.halt_poll_ns and halt_ns > max_halt_poll_ns:
                shrink_halt_poll_ns(state, params)  # a long block
            elif state.halt_poll_ns < max_halt_poll_ns and halt_ns < max_halt_poll_ns:
                grow_halt_poll_ns(state, params)  # a short halt and a poll time too small
        else:
            state.halt_poll_ns = 0

    return HaltOutcome(start_ns, halt_ns, do_halt_poll, waited, poll_end_ns)
