"""User space of an idle server: boot (kernel threads, systemd, services, a login session), programs'
start-up after exec, and daemons waking up periodically.

A program's main() grows its heap with brk and writes it, writes its
anonymous mmap arenas and its stack. A daemon's wake-up is a context switch
to it followed by touches of its stack, part of its heap and its hottest code.
A server process that has handled requests has run a share of the code of
every object it maps.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
from kvmdbgfs.guest.process import Task
from kvmdbgfs.guest.vaddr import PAGE_SIZE, page_align
from kvmdbgfs.guest.vma import PROT_READ, PROT_WRITE

if TYPE_CHECKING:
    from kvmdbgfs.guest.kernel import GuestKernel

KWORKER_PERIOD = 2.0  # vmstat_update and friends
WAKE_STACK_PAGES = 2
WAKE_TEXT_FRAC = 0.25  # of the program's text windows, hottest first
THREAD_STACK_TOUCH = 4 * PAGE_SIZE


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
    """A daemon's timer fires: it runs, touching its stack, ``wake_kib`` of its heap and its hottest code."""
    kernel = task.kernel
    kernel.run(task)
    if task.mm is None:
        return
    program = PROGRAMS[task.program]
    mm = task.mm
    task.touch(task.user_stack_top - WAKE_STACK_PAGES * PAGE_SIZE, task.user_stack_top, write=True)
    heap_pages = (page_align(mm.brk) - mm.brk_start) // PAGE_SIZE
    if heap_pages:
        n = min(heap_pages, -(-program.wake_kib * 1024 // PAGE_SIZE))
        first = int(kernel.rng.integers(heap_pages - n + 1))
        task.touch(mm.brk_start + first * PAGE_SIZE, mm.brk_start + (first + n) * PAGE_SIZE, write=True)
    for obj in task.objects[:1] + [o for o in task.objects if o.elf.name == "libc.so.6"]:
        task.touch_pages(kernel.hot_pages(obj, "text", program.text_frac * WAKE_TEXT_FRAC), write=False)


def serve(task: Task, share: float) -> None:
    """A server process that has handled requests: it ran ``share`` of the code its program runs in each
    of its objects (the more requests, the more of the cold paths)."""
    frac = PROGRAMS[task.program].text_frac * share
    for obj in task.objects:
        run_code(task.kernel, task, obj, frac)


@dataclass
class Userspace:
    """The booted system: init, the services, the session, and a clock for periodic wake-ups."""

    kernel: GuestKernel
    init: Task
    services: list[Task]
    session: list[Task]
    now: float = 0.0
    _timers: list[tuple[float, int]] = field(default_factory=list)

    def arm(self, task: Task, period: float) -> None:
        """A periodic timer for ``task``, first firing at a random phase within one period."""
        first = self.now + float(self.kernel.rng.random()) * period
        heapq.heappush(self._timers, (first, task.pid))

    def advance(self, seconds: float) -> int:
        """Let ``seconds`` pass: every due timer wakes its task (in time order), then the vCPUs idle.
        Returns the number of wake-ups."""
        end = self.now + seconds
        wakes = 0
        while self._timers and self._timers[0][0] <= end:
            when, pid = heapq.heappop(self._timers)
            task = self.kernel.tasks.get(pid)
            if task is None:
                continue
            self.now = when
            wake(task)
            wakes += 1
            heapq.heappush(self._timers, (when + self.period(task), pid))
        self.now = end
        for cpu in range(self.kernel.nr_vcpus):
            self.kernel.idle(cpu)
        return wakes

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
