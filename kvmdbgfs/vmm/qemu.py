"""One QEMU process: its identity (pid, VM fd), the memslot layout it registers, the guest it runs, its
vCPU threads' run loop and its queue of workloads.

The vCPU threads are emulated by one Python thread per VM, which runs the vCPUs in guest-time order
(each one is resumed in KVM_RUN when its next interrupt arrives). A VM's guest time starts at 0 when it is
created. Idle, it follows the host clock; a workload (the boot included) runs the guest as fast as the
emulation allows, its steps costing the guest time their exits and interrupts take, and the VM then idles
until the host clock catches up. Each step is a safe point: due timers and devices run there, the thread
yields to readers, and a cancelled workload stops there (it then tears down what it started in the guest:
workloads/teardown.py).

Nothing a workload's waiters do reaches the vCPU thread: it only sets the job's progress and notifies, so a
waiter that blocks, fails or goes away (a client that disconnected) leaves the workload running to its end,
exactly as if it had waited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvmdbgfs.guest.irq import NSEC_PER_SEC
from kvmdbgfs.sched import cond_resched, emulating, emulation_thread
from kvmdbgfs.vmm.devices import VirtioDevices
from kvmdbgfs.vmm.layout import q35_memslots

if TYPE_CHECKING:
    from kvmdbgfs.vmm.boot_ahead import BootAhead
    from kvmdbgfs.vmm.bootcache import BootCache
    from kvmdbgfs.guest.userspace import Userspace
    from kvmdbgfs.kvm.vm import Kvm
    from kvmdbgfs.vmm.clock import HostClock
    from kvmdbgfs.vmm.standin import StandinProcess

log = logging.getLogger(__name__)

IDLE_SLICE_NS = 50_000_000  # guest time idled between two yields to readers
# A realtime clock is always a little ahead: an idle VM catches up with it at each multiple of this much host
# time, or it would spin on microsecond slices (a core's worth of CPU for an idle host). Readers see the
# counters move in 50 ms steps (a 1 s sampler's deltas within 5% of the rate). The boundaries are the host's,
# not each VM's: every idle VM's thread wakes at the same instant and they emulate in one burst, one after the
# other, instead of each VM waking on its own. A burst starts with caches other processes have had meanwhile:
# the same 20 ms of an idle guest cost about twice the CPU run after a 20 ms sleep as run back to back, so
# fewer, longer bursts cost less. The default scenario's idle guests (mount.py, 10 s means, quiet 2-core
# machine): 20 ms steps 9.5-11.8% of a core, 50 ms steps 8.5-9.4% (issue 10's limit: 10%).
REALTIME_QUANTUM_NS = 50_000_000
MANUAL_WAIT_S = 1.0
# Waiters on a workload's progress are woken at most this often: a wake-up per step (every ~2 ms of
# rmap_fork) costs the workload an interpreter-lock hand-over each time, for a progress bar that cannot show it.
PROGRESS_NOTIFY_S = 0.05
CANCEL_WAIT_S = 30.0  # how long a cancel or QEMU's exit waits for the workload to stop and tear down
# QEMU's kvm_arch_init(): the identity map at 0xfeffc000 and the real-mode TSS in the 3 pages after it.
QEMU_TSS_ADDR = 0xFEFFD000


class WorkloadCancelled(Exception):
    """The workload was cancelled, or its VM destroyed, while it ran; it stopped at a safe point."""


@dataclass(eq=False)
class WorkloadJob:
    """A workload queued on a VM: its progress, and its result or error once done."""

    name: str
    run: Callable[[QemuProcess, Callable[..., None]], dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    ahead: BootAhead | None = None  # a scenario's later boot: a worker process may run it (boot_ahead.py)
    progress: tuple[int, int] = (0, 0)
    cancel: str | None = None  # why it must stop at its next safe point (its error then)
    result: dict[str, Any] | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)
    notify_after: float = 0.0  # monotonic time before which a progress step wakes no waiter

    def wait_change(self, timeout: float) -> None:
        """Until the progress moves, the job ends, or ``timeout`` seconds pass."""
        with self.changed:
            if not self.done.is_set():
                self.changed.wait(timeout)

    def set_progress(self, done: int, total: int) -> None:
        """The job has done ``done`` of ``total`` steps; waiters are woken at most every PROGRESS_NOTIFY_S."""
        self.progress = (done, total)
        now = time.monotonic()
        if now >= self.notify_after:
            self.notify_after = now + PROGRESS_NOTIFY_S
            self._notify()

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()


class QemuProcess:
    """What QEMU owns for one VM. ``kvm`` is the kernel's VM; ``guest`` the booted guest OS (None before);
    ``guest_name`` QEMU's ``-name guest=``; ``vcpu_tids`` its vCPU threads' ids; ``standin`` the real process
    that stands in for it, if any (it exits with the VM)."""

    def __init__(
        self,
        kvm: Kvm,
        pid: int,
        fd: int,
        seed: int,
        clock: HostClock,
        guest_name: str,
        vcpu_tids: list[int],
        jobs: Sequence[WorkloadJob] = (),
        boot_cache: BootCache | None = None,
        standin: StandinProcess | None = None,
        on_job_end: Callable[[], None] | None = None,
    ) -> None:
        """QEMU starts: memslots, vCPUs, devices, and its vCPU thread, which runs ``jobs`` first (queued before
        it starts, so that they start at guest time 0 whatever the host clock does); ``on_job_end`` is called
        on that thread after each job has ended."""
        self.kvm = kvm
        self.pid = pid
        self.fd = fd
        self.guest_name = guest_name
        self.vcpu_tids = vcpu_tids
        self.standin = standin
        self.name = kvm.name
        self.seed = seed
        self.memory = kvm.config.memory
        self.nr_vcpus = kvm.config.vcpus
        self.clock = clock
        self.created_ns = clock.now_ns()
        kvm.arch.kvm_arch_vm_ioctl_set_tss_addr(QEMU_TSS_ADDR)
        self.memslots = [
            kvm.kvm_set_memory_region(slot_id, region.as_id, region.base_gfn, region.npages)
            for slot_id, region in enumerate(q35_memslots(self.memory))
        ]
        self.vcpus = [kvm.host.kvm_vm_ioctl_create_vcpu(kvm, vcpu_id) for vcpu_id in range(self.nr_vcpus)]
        self.devices = VirtioDevices(kvm, np.random.default_rng([seed, 1 << 20]))
        self.guest: Userspace | None = None
        self.guest_ns = 0
        self.workload_runs = 0
        self.jobs: deque[WorkloadJob] = deque(jobs)
        self.boot_cache = boot_cache
        self.on_job_end = on_job_end
        self.current: WorkloadJob | None = None
        self.guest_panicked = False  # QEMU's guest-panicked state: the guest died booting, nothing runs on it
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=f"qemu {self.name}", daemon=True)
        self._thread.start()

    # -- what the rest of the VMM asks ------------------------------------------------------------

    def host_target_ns(self) -> int:
        """The guest time the host clock has reached for this VM."""
        return self.clock.now_ns() - self.created_ns

    def idle_target_ns(self) -> int:
        """The guest time an idle VM runs up to now: the host clock's, on a realtime clock as of its last
        REALTIME_QUANTUM_NS boundary."""
        now = self.clock.now_ns()
        if not self.clock.manual:
            now -= now % REALTIME_QUANTUM_NS
        return now - self.created_ns

    def _until_next_quantum_s(self) -> float:
        """Seconds from now to the realtime clock's next REALTIME_QUANTUM_NS boundary."""
        return (REALTIME_QUANTUM_NS - self.clock.now_ns() % REALTIME_QUANTUM_NS) / NSEC_PER_SEC

    def submit(self, job: WorkloadJob) -> WorkloadJob:
        """Queue a workload; it starts when the ones before it have ended. A destroyed VM (or one being
        destroyed) refuses it: LookupError."""
        with self._lock:
            if self._stopping:
                raise LookupError(f"VM {self.name!r} is destroyed: it runs no more workloads")
            self.jobs.append(job)
        self.clock.wake()
        return job

    def busy(self) -> bool:
        """A workload runs or waits on this VM."""
        with self._lock:
            return self._busy()

    def _busy(self) -> bool:
        """busy(), with ``_lock`` held."""
        return self.current is not None or bool(self.jobs)

    def caught_up(self, target_ns: int) -> bool:
        """True once the VM's guest time has reached ``target_ns`` with no workload waiting."""
        with self._lock:
            return self.guest_ns >= target_ns and not self._busy()

    def cancel_workload(self, timeout: float = CANCEL_WAIT_S) -> str:
        """`kvmdbgfs cancel`: the running workload stops at its next safe point and tears down what it started
        in the guest; returns its name once it has (its error then says it was cancelled; one that reached its
        end first simply ends). Workloads queued behind it are not affected: the next one starts after it.
        LookupError when no workload runs; TimeoutError when it has not stopped within ``timeout`` seconds (it
        still stops at its next safe point)."""
        with self._lock:
            job = self.current
            if job is None:
                raise LookupError(f"no workload is running on VM {self.name}")
            job.cancel = job.cancel or f"workload {job.name} on VM {self.name} was cancelled"
        if not job.done.wait(timeout):
            raise TimeoutError(f"workload {job.name} on VM {self.name} did not stop within {timeout:.0f} s")
        return job.name

    def stop(self, timeout: float = CANCEL_WAIT_S) -> None:
        """QEMU exits: a running workload stops at its next safe point and tears down what it started, queued
        ones fail, the thread ends (waited for ``timeout`` seconds at most)."""
        with self._lock:
            self._stopping = True
            if self.current is not None:
                self.current.cancel = f"VM {self.name} was destroyed: the workload stopped"
            queued, self.jobs = list(self.jobs), deque()
        for job in queued:
            _finish(job, error=f"VM {self.name} was destroyed before the workload started")
        self.clock.wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if self.standin is not None:
            self.standin.stop()

    def describe(self) -> dict[str, Any]:
        """What `vm list` shows of the QEMU side: uptime, guest time, what runs."""
        with self._lock:
            running = self.current.name if self.current else None
            queued = [job.name for job in self.jobs]
        return {
            "pid": self.pid,
            "guest_name": self.guest_name,
            "guest_time_ns": self.guest_ns,
            "uptime_s": round(self.guest_ns / NSEC_PER_SEC, 3),
            "booted": self.guest is not None,
            "workload": running,
            "queued": queued,
        }

    # -- the vCPU threads -----------------------------------------------------------------------------

    def _main(self) -> None:
        emulation_thread()
        while True:
            with self._lock:
                if self._stopping:
                    return
                job = self.jobs.popleft() if self.jobs else None
                self.current = job
            if job is not None:
                if job.ahead is not None:
                    job.ahead.wait(self, job)  # another process may boot this guest: not on the emulation CPU
                with emulating():
                    self._run_job(job)
                continue
            behind = self.idle_target_ns() - self.guest_ns
            if behind > 0:
                with emulating():
                    self.idle_until(self.guest_ns + min(behind, IDLE_SLICE_NS))
                    if behind <= IDLE_SLICE_NS:
                        self.kvm.arch.update_blocking(self.guest_ns)
                    cond_resched()
                time.sleep(0)  # let readers in
            else:
                self.clock.wait(MANUAL_WAIT_S if self.clock.manual else self._until_next_quantum_s())

    def _run_job(self, job: WorkloadJob) -> None:
        try:
            if job.cancel is not None:  # while it waited for a worker process (boot_ahead.py)
                raise WorkloadCancelled(job.cancel)
            job.result = job.run(self, lambda done, total, idle_ns=0: self._checkpoint(job, done, total, idle_ns))
        except (WorkloadCancelled, ValueError, LookupError, MemoryError) as exc:
            job.error = str(exc) or type(exc).__name__
        except Exception as exc:  # a bug must not kill the VM's thread
            log.exception("workload %s on %s failed", job.name, self.name)
            job.error = f"internal error: {type(exc).__name__}: {exc}"
        try:
            self._end_busy()
        except Exception:
            log.exception("the vCPUs of %s could not go idle after %s", self.name, job.name)
        with self._lock:
            self.current = None
        _finish(job)
        if self.on_job_end is not None:
            self.on_job_end()

    def _checkpoint(self, job: WorkloadJob, done: int, total: int, idle_ns: int) -> None:
        """A workload's safe point: the step's guest time passes (busy vCPUs take their ticks, due timers and
        devices run), then ``idle_ns`` of idle time; readers waiting go first (cond_resched); a cancelled workload
        (or one whose VM is destroyed) stops. (A reader that has not announced itself yet waits for the
        interpreter lock at most the switch interval: no sleep(0) here, which costs 50-70 us of timer slack a
        step, 5% of rmap_fork.)"""
        self._busy_step()
        if idle_ns:
            if self.guest is not None:
                self.guest.idle_running_cpus()
            self.idle_until(self.guest_ns + idle_ns)
        job.set_progress(done, total)
        cond_resched()
        if job.cancel is not None:
            raise WorkloadCancelled(job.cancel)

    def _busy_step(self) -> None:
        """The guest code a step ran on each vCPU runs side by side; the step lasts as long as the busiest."""
        if self.guest is None:
            return
        self.guest_ns = self.kvm.arch.run_guest_code(self.guest_ns, self.guest)
        self.kvm.arch.run_host_threads(self.guest_ns)
        self.guest.run_due_timers(self.guest_ns / NSEC_PER_SEC)

    def _end_busy(self) -> None:
        """The workload is over: what it last ran is accounted, and the guest idles every vCPU it ran on."""
        if self.guest is None:
            return
        self._busy_step()
        self.guest.idle_running_cpus()

    def idle_until(self, target_ns: int) -> None:
        """The vCPUs run the idle guest up to ``target_ns``: each is resumed when its deadline or an interrupt
        arrives, in time order; the LAN's packets and the VM's host threads (kvm_arch) run on the way."""
        if self.guest is None:
            self.guest_ns = max(self.guest_ns, target_ns)
            self.kvm.arch.run_host_threads(self.guest_ns)
            return
        while True:
            wake = self.kvm.arch.vcpu_next_wakeup()
            packet = self.devices.next_event_ns()
            if packet is not None and packet <= target_ns and (wake is None or packet < wake[0]):
                self.devices.deliver()
                continue
            if wake is None or wake[0] > target_ns:
                break
            when, vcpu_id = wake
            self.kvm.arch.run_host_threads(when)
            self.vcpus[vcpu_id].kvm_vcpu_ioctl_run(when, self.guest)
        self.guest_ns = max(self.guest_ns, target_ns)
        self.kvm.arch.run_host_threads(self.guest_ns)

    def vcpu_thread_pid(self, vcpu_id: int) -> int:
        """The thread id of the vCPU's thread (emulated, or the stand-in process's thread)."""
        return self.vcpu_tids[vcpu_id]

    def boot(self, system: Userspace) -> None:
        """The guest has booted (its code ran as long as its busiest vCPU's part took): the LAN reaches its
        drivers, and every vCPU enters KVM_RUN (its thread's id in ``pid``) and goes idle."""
        self.guest_ns += self.kvm.arch.guest_code_pending_ns()
        system.now = self.guest_ns / NSEC_PER_SEC
        self.guest = system
        self.devices.start(self.guest_ns)
        for vcpu in self.vcpus:
            vcpu.pid = self.vcpu_thread_pid(vcpu.vcpu_id)
            vcpu.kvm_vcpu_ioctl_run(self.guest_ns, _NoInterrupts(system))


class _NoInterrupts:
    """The first entry of a vCPU that has nothing pending: the guest idles it at once."""

    def __init__(self, system: Userspace) -> None:
        self.system = system

    def interrupt(self, cpu: int, vectors: list[int], now_ns: int, then_idle: bool = True) -> None:
        self.system.idle_cpu(cpu, 0)


def _finish(job: WorkloadJob, error: str | None = None) -> None:
    if error is not None:
        job.error = error
    job.done.set()
    job._notify()
