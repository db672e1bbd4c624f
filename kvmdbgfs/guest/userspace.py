"""User space of an idle server: boot (kernel threads, systemd, services, a login session), programs'
start-up after exec, and daemons waking up periodically.

A program's main() grows its heap with brk and writes it, writes its
anonymous mmap arenas and its stack. A daemon's wake-up is a context switch
to it, the return of the system call it slept in (the kernel writes its stack), then touches of its
stack, part of its heap and its hottest code.
A server process that has handled requests has run a share of the code of
every object it maps.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TYPE_CHECKING

from kvmdbgfs.guest.distro import (
    BOOT_HELPERS,
    IDLE_SERVICES,
    KTHREADS_GLOBAL,
    KTHREADS_PER_CPU,
    PROGRAMS,
    SESSION,
    Program,
)
from kvmdbgfs.guest.exec import run_code
from kvmdbgfs.guest.irq import (
    LOCAL_TIMER_VECTOR,
    MSR_IA32_TSC_DEADLINE,
    NSEC_PER_SEC,
    RESCHEDULE_VECTOR,
    X2APIC_ICR,
    icr,
)
from kvmdbgfs.guest.process import Task
from kvmdbgfs.guest.vaddr import PAGE_SIZE, page_align
from kvmdbgfs.guest.vma import PROT_READ, PROT_WRITE

if TYPE_CHECKING:
    from kvmdbgfs.guest.kernel import GuestKernel

KWORKER_PERIOD: Final = 2.0  # vmstat_update and friends
WAKE_STACK_PAGES: Final = 2
WAKE_TEXT_FRAC: Final = 0.25  # of the program's text windows, hottest first
THREAD_STACK_TOUCH: Final = 4 * PAGE_SIZE


def start_main(task: Task, program: Program) -> None:
    """main(): malloc'ed heap (brk), anonymous arenas (mmap), and the stack, all written."""
    mm = task.mm
    assert mm is not None
    if program.heap_kib:
        task.brk(mm.brk_start + program.heap_kib * 1024)
        task.touch(mm.brk_start, page_align(mm.brk), write=True)
    if program.anon_kib:
        arena = task.mmap(program.anon_kib * 1024, PROT_READ | PROT_WRITE, name="[anon]")
        task.touch(arena.start, arena.end, write=True)
    task.touch(mm.stack_top - page_align(program.stack_kib * 1024), mm.stack_top, write=True)
    vdso = next(vma for vma in mm.vmas if vma.name == "[vdso]")
    task.touch(vdso.start, vdso.end, write=False)  # clock_gettime and friends
    for _ in range(program.threads):
        thread = task.kernel.clone_thread(task)
        thread.touch(thread.user_stack_top - THREAD_STACK_TOUCH, thread.user_stack_top, write=True)


def wake(task: Task) -> None:
    """A daemon's timer fires: it runs, touching its stack, ``wake_kib`` of its heap and its hottest code.
    First the system call it slept in (epoll_wait, recvmsg, read) returns: the kernel writes its results
    to the top of the stack and the data it received to the start of the heap buffer the daemon then works
    through, with copy_to_user."""
    kernel = task.kernel
    kernel.run(task)
    if task.mm is None:
        return
    program = PROGRAMS[task.program]
    mm = task.mm
    stack_top = task.user_stack_top
    heap_pages = (page_align(mm.brk) - mm.brk_start) // PAGE_SIZE
    buffer = None
    if heap_pages:
        n = min(heap_pages, -(-program.wake_kib * 1024 // PAGE_SIZE))
        first = int(kernel.rng.integers(heap_pages - n + 1))
        buffer = (mm.brk_start + first * PAGE_SIZE, mm.brk_start + (first + n) * PAGE_SIZE)
    task.access_user(stack_top - PAGE_SIZE, stack_top, write=True)
    if buffer is not None:
        task.access_user(buffer[0], buffer[0] + PAGE_SIZE, write=True)
    task.touch(stack_top - WAKE_STACK_PAGES * PAGE_SIZE, stack_top, write=True)
    if buffer is not None:
        task.touch(*buffer, write=True)
    for obj in task.objects[:1] + [o for o in task.objects if o.elf.name == "libc.so.6"]:
        task.touch_pages(kernel.hot_pages(obj, "text", program.text_frac * WAKE_TEXT_FRAC), write=False, fetch=True)


def serve(task: Task, share: float) -> None:
    """A server process that has handled requests: it ran ``share`` of the code its program runs in each
    of its objects (the more requests, the more of the cold paths)."""
    frac = PROGRAMS[task.program].text_frac * share
    for obj in task.objects:
        run_code(task.kernel, task, obj, frac)


TimerFn = Callable[[int], float]  # a kernel timer function: runs on a CPU, returns its next period


@dataclass
class Userspace:
    """The booted system: init, the services, the session, and the timers that wake them.

    Timers are per CPU (the CPU the task ran on when it was armed), as hrtimers are: a CPU's next
    timer is what it programs into its TSC deadline before it halts (irq.py). ``now`` is guest time in
    seconds. Kernel timer functions (``add_timer``) sit in the same queues under negative ids.
    """

    kernel: GuestKernel
    init: Task
    services: list[Task]
    session: list[Task]
    now: float = 0.0
    _timers: list[list[tuple[float, int]]] = field(default_factory=list)
    _timer_fns: dict[int, TimerFn] = field(default_factory=dict)
    _deadline: list[int | None] = field(default_factory=list)
    device_handlers: dict[int, Callable[[int], None]] = field(default_factory=dict)
    wakeups: int = 0  # daemons woken by their timers so far

    def __post_init__(self) -> None:
        self._timers = [[] for _ in range(self.kernel.nr_vcpus)]
        self._deadline = [None] * self.kernel.nr_vcpus
        self._halted = [False] * self.kernel.nr_vcpus

    def arm(self, task: Task, period: float) -> None:
        """A periodic timer for ``task`` on its CPU, first firing at a random phase within one period."""
        first = self.now + float(self.kernel.rng.random()) * period
        heapq.heappush(self._timers[task.cpu], (first, task.pid))

    def add_timer(self, cpu: int, first: float, fn: TimerFn) -> None:
        """A kernel timer (timer_list) on ``cpu`` running ``fn`` at ``first`` and then every period it returns."""
        key = -1 - len(self._timer_fns)
        self._timer_fns[key] = fn
        heapq.heappush(self._timers[cpu], (first, key))

    def next_timer(self, cpu: int) -> float | None:
        """When the CPU's next timer is due (None: nothing armed)."""
        return self._timers[cpu][0][0] if self._timers[cpu] else None

    def run_timers(self, cpu: int, until: float) -> int:
        """The timer interrupt's softirq: every timer of ``cpu`` due by ``until`` runs, in time order; a task woken
        for another CPU gets there by a reschedule IPI. Returns the number of wake-ups."""
        queue, wakes = self._timers[cpu], 0
        hw = self.kernel.hw
        while queue and queue[0][0] <= until:
            when, key = heapq.heappop(queue)
            self.now = max(self.now, when)
            if key < 0:
                heapq.heappush(queue, (when + self._timer_fns[key](cpu), key))
                continue
            task = self.kernel.tasks.get(key)
            if task is None:
                continue
            if task.cpu != cpu:
                hw.wrmsr(cpu, X2APIC_ICR, icr(task.cpu, RESCHEDULE_VECTOR))
            wake(task)
            wakes += 1
            self.wakeups += 1
            heapq.heappush(self._timers[task.cpu], (when + self.period(task), key))
        return wakes

    def advance(self, seconds: float) -> int:
        """Let ``seconds`` pass inside a workload step: every due timer runs (in time order across CPUs), then the
        vCPUs idle. Returns the number of wake-ups."""
        end = self.now + seconds
        wakes = self.run_due_timers(end)
        for cpu in range(self.kernel.nr_vcpus):
            self.kernel.idle(cpu)
        return wakes

    def run_due_timers(self, until: float) -> int:
        """Every CPU's timers due by ``until``, in time order across CPUs; guest time is then ``until``."""
        wakes = 0
        while True:
            due = [(self._timers[cpu][0][0], cpu) for cpu in range(self.kernel.nr_vcpus) if self._timers[cpu]]
            if not due or min(due)[0] > until:
                break
            when, cpu = min(due)
            wakes += self.run_timers(cpu, when)
        self.now = max(self.now, until)
        return wakes

    def interrupt(self, cpu: int, vectors: list[int], now_ns: int, then_idle: bool = True) -> None:
        """The vCPU takes ``vectors`` at ``now_ns``: timers run, device handlers run, then it goes idle (HLT), or
        back to the task it was woken for."""
        self._halted[cpu] = False
        self.now = max(self.now, now_ns / NSEC_PER_SEC)
        for vector in vectors:
            if vector == LOCAL_TIMER_VECTOR:  # the deadline was rounded up to a whole ns: take what it covered
                self.run_timers(cpu, self.now + 1 / NSEC_PER_SEC)
            elif vector in self.device_handlers:
                self.device_handlers[vector](cpu)
        if then_idle:
            self.idle_cpu(cpu, len(vectors))

    def idle_cpu(self, cpu: int, interrupts: int) -> None:
        """do_idle(): the idle task runs, tick_nohz_idle_stop_tick() programs the next timer into the TSC
        deadline (only when it changed), then HLT."""
        self.kernel.idle(cpu)
        deadline = self.next_timer(cpu)
        deadline_ns = None if deadline is None else max(math.ceil(deadline * NSEC_PER_SEC), 1)
        if deadline_ns != self._deadline[cpu]:
            self._deadline[cpu] = deadline_ns
            self.kernel.hw.wrmsr(cpu, MSR_IA32_TSC_DEADLINE, deadline_ns or 0)
        self._halted[cpu] = True
        self.kernel.hw.hlt(cpu, interrupts)

    def idle_running_cpus(self) -> None:
        """The work is done: every CPU that is not halted already goes idle."""
        for cpu, halted in enumerate(self._halted):
            if not halted:
                self.idle_cpu(cpu, 0)

    @staticmethod
    def period(task: Task) -> float:
        return PROGRAMS[task.program].wake_period if task.mm is not None else KWORKER_PERIOD


def login(kernel: GuestKernel, init: Task, sshd: Task, session: list[str] = SESSION) -> list[Task]:
    """One user's SSH login: sshd forks twice (the privileged and the user's sshd: forks without exec,
    which then run), systemd --user with its (sd-pam) child, then the user's shell, which the user's
    sshd starts."""
    tasks: list[Task] = []
    last_sshd = sshd
    for name in session:
        if name == "sshd":
            last_sshd = kernel.fork(last_sshd)
            tasks.append(last_sshd)
            wake(last_sshd)
        elif name == "systemd":
            tasks.append(kernel.spawn(name, init))
            tasks.append(kernel.fork(tasks[-1]))
            wake(tasks[-1])
        else:
            tasks.append(kernel.spawn(name, last_sshd))
    return tasks


def boot(
    kernel: GuestKernel,
    services: list[tuple[str, int]] = IDLE_SERVICES,
    helpers: list[tuple[str, int]] = BOOT_HELPERS,
    session: list[str] = SESSION,
    logins: int = 1,
) -> Userspace:
    """kernel_init and kthreadd with the kernel threads, systemd as pid 1 running the boot helpers and
    starting the services, and ``logins`` users logged in over SSH, each running ``session``. The last
    login's shell is the Userspace's ``session[-1]``."""
    init = kernel.kthread("init")
    kthreads = [kernel.kthread(name) for name in KTHREADS_GLOBAL]
    kthreads += [kernel.kthread(name.format(cpu)) for cpu in range(kernel.nr_vcpus) for name in KTHREADS_PER_CPU]
    kernel.exec(init, "systemd")
    for name, count in helpers:
        for _ in range(count):
            kernel.exit(kernel.spawn(name, init))
    started = [kernel.spawn(name, init) for name, count in services for _ in range(count)]
    sshd = next((task for task in started if task.program == "sshd"), init)
    users = [task for _ in range(logins) for task in login(kernel, init, sshd, session)]
    system = Userspace(kernel, init, started, users)
    for task in list(kernel.tasks.values()):
        if (task.mm is None and task.comm.startswith("kworker/")) or (
            task.mm is not None and PROGRAMS[task.program].wake_period
        ):
            system.arm(task, system.period(task))
    for cpu in range(kernel.nr_vcpus):
        kernel.idle(cpu)
    return system
